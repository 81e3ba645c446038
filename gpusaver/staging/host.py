"""The host copy engine: arrays already in host memory (numpy, CPU tensors, any buffer)."""
from typing import Iterator

import numpy as np

from gpusaver.format.bundle import byte_view
from gpusaver.format.wire import crc32c
from gpusaver.staging.io_types import Chunk, SaveItem
from gpusaver.staging.pool import BufferPool


class HostEngine:
    """Chunks of host arrays, checksummed here so the CRC of chunk k+1 overlaps the write of chunk k.

    In reference mode the chunks are zero-copy views of the caller's array; in copy mode each is
    copied into a pool buffer first (numpy's copy and crc32c both release the GIL).
    """

    def __init__(self, pool: BufferPool, copy: bool):
        self._pool = pool
        self._copy = copy

    def chunks(self, item: SaveItem, cancelled=lambda: False) -> Iterator[Chunk]:
        view = byte_view(item.array)
        step = self._pool.buffer_size
        for start in range(0, len(view), step):
            piece = view[start:start + step]
            if not self._copy:
                yield Chunk(piece, crc32c(piece))
                continue
            buf = self._pool.acquire(cancelled)
            if buf is None:
                return
            staged = buf[:len(piece)]
            np.copyto(staged, np.frombuffer(piece, dtype=np.uint8))
            data = memoryview(staged)
            yield Chunk(data, crc32c(data), release=lambda b=buf: self._pool.release(b))


def as_host_array(array) -> np.ndarray:
    """A C-contiguous, native-byte-order numpy view (or, if it must, copy) of a host array."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "OSU" and not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # ascontiguousarray makes 0-d 1-d
