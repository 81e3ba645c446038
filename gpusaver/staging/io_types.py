"""The seam between staging and the bundle writer/reader: what a copy engine hands the writer.

Save: a :class:`SaveItem` per tensor; a copy engine (host or CUDA) stages each as a sequence of
:class:`Chunk` through a per-save :class:`Staging`, and the shard writer consumes them in order.
Restore: a :class:`LoadItem` per tensor; host memory is filled by the reader, device memory by an
:class:`UploadEngine` (the CUDA engine), batch by batch.
"""
import dataclasses
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from gpusaver.format.bundle import num_elements
from gpusaver.format.proto import Entry
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


@dataclasses.dataclass(eq=False, slots=True)  # slots: a model makes tens of thousands
class SaveItem:
    """One tensor to save: its checkpoint name and an array (numpy, CuPy, DLPack, buffer).

    ``array`` is set to None once the tensor's bytes are staged (copy and host modes), so the save
    stops holding device memory the caller may want back.
    """
    name: str
    array: Any
    device: Device
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int = -1  # bytes of the array's elements; computed when not given

    def __post_init__(self):
        if self.nbytes < 0:
            self.nbytes = num_elements(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(eq=False, slots=True)  # slots: a restore makes tens of thousands
class LoadItem:
    """One tensor to restore, the counterpart of :class:`SaveItem`: its checkpoint name, its
    (checked) index entry and the device it is read onto. ``nbytes``: what it takes in memory
    once read (for a partitioned tensor, the assembled whole)."""
    name: str
    entry: Entry
    device: Device
    nbytes: int


class Staging(Protocol):
    """One save's (one shard's) staging of its tensors through one copy engine (see session.py).

    All per-save state — pack groups, buffers taken, device arrays in flight — lives here, never
    in the engine, which concurrent saves share.
    """

    def chunks(self, item: SaveItem, cancelled: Callable[[], bool]) -> Iterator[Chunk]:
        """Stage ``item`` as chunks in order; may block on the buffers (the budget) and stops
        early once ``cancelled()`` is true."""

    def close(self):
        """Give back every buffer and device array still held (after the writer is done, or
        after a failure): a failed or cancelled save leaks nothing."""


class UploadEngine(Protocol):
    """The restore side of a device engine: reads checkpoint bytes straight into new device
    arrays, CRC-checked, each complete when returned (the stager calls it from reader threads)."""

    def load(self, reader, name: str, entry: Entry, device: Device) -> Any:
        """One large numeric tensor, uploaded chunk by chunk through pinned buffers."""

    def load_small(self, reader, names: list[str], device: Device) -> list:
        """Small numeric tensors (together at most one pinned buffer): read packed, uploaded in
        one copy and scattered on the device."""

    def upload(self, host: np.ndarray, device: Device) -> Any:
        """An array already on the host (an assembled partitioned tensor)."""
