"""The seam between staging and the bundle writer/reader: what a copy engine hands the writer.

A save is a sequence of :class:`Chunk` per tensor; a copy engine (host or CUDA) produces them, the
shard writer consumes them in order. Engines implement :class:`CopyEngine`.
"""
import dataclasses
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from gpusaver.format.bundle import num_elements
from gpusaver.staging.devices import Device


def _noop():
    pass


@dataclasses.dataclass
class Chunk:
    """Consecutive bytes of one tensor, staged in host memory and ready to write.

    ``crc`` is the CRC32C of ``data`` alone when the engine computed it (else None, and the
    writer computes it); ``release()`` hands the buffer back to the pool once written.
    """
    data: memoryview
    crc: int | None = None
    release: Callable[[], None] = _noop

    @property
    def holds_buffer(self) -> bool:
        """Whether the chunk occupies a pool buffer until released (a zero-copy view does not)."""
        return self.release is not _noop


@dataclasses.dataclass(frozen=True)
class SaveItem:
    """One tensor to save: its checkpoint name and an array (numpy, CuPy, DLPack, buffer)."""
    name: str
    array: Any
    device: Device
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return num_elements(self.shape) * self.dtype.itemsize


class CopyEngine(Protocol):
    """Moves tensor bytes from a device into host staging buffers (see host.py, cuda.py).

    An engine may also define ``plan(items)``, called once per shard before staging starts, to
    batch work across tensors (the CUDA engine packs small tensors into one copy).
    """

    def chunks(self, item: SaveItem, cancelled: Callable[[], bool]) -> Iterator[Chunk]:
        """Stage ``item`` as chunks in order; may block on the buffer pool (the budget) and stops
        early once ``cancelled()`` is true."""
