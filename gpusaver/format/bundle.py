"""What the bundle writer and reader share: byte views of any buffer, element counts, limits.

The writer (``writer.py``) streams tensors into a checkpoint prefix's ``.data`` shards and commits
the ``.index``; the reader (``reader.py``) checks and reads them back.
"""
import math

import numpy as np

MAX_SHARDS = 1 << 16
ALIGN = 64  # TF and DLPack consumers adopt 64-byte aligned host memory without copying it


def align_up(nbytes: int, alignment: int = ALIGN) -> int:
    return -(-nbytes // alignment) * alignment


def byte_view(buf) -> memoryview:
    """A flat, C-contiguous byte view of any buffer (numpy arrays of any dtype included), no copy."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("buffer must be C-contiguous")
        return memoryview(buf.reshape(-1).view(np.uint8))
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view



def num_elements(shape) -> int:
    return math.prod(shape)
