"""The host copy engine: arrays already in host memory (numpy, CPU tensors, any buffer)."""
from typing import Iterator

import numpy as np

from gpusaver.format.bundle import byte_view
from gpusaver.format.wire import crc32c
from gpusaver.staging.io_types import Chunk, SaveItem
from gpusaver.staging.pool import BufferPool
from gpusaver.staging.session import GroupedStaging, PackGroup


class HostEngine:
    """Stages host arrays: zero-copy views in reference mode, else copies into staging buffers.

    The CRC of chunk k+1 is computed here while the writer writes chunk k (numpy's copy and
    crc32c both release the GIL).
    """

    def session(self, items: list[SaveItem], dest, pack_threshold: int, chunk: int) -> "HostStaging":
        """Staging for one save: ``dest`` (a pool or an arena lease) receives copies; None means
        reference mode (views of the caller's arrays, checksummed in ``chunk``-byte pieces)."""
        return HostStaging(items, dest, pack_threshold, chunk)


class HostStaging(GroupedStaging):
    def __init__(self, items: list[SaveItem], dest, pack_threshold: int, chunk: int):
        # Views need no packing; copies pack small tensors into one buffer.
        super().__init__(items, pack_threshold if dest is not None else 0, dest.size if dest else chunk,
                         dest_waits=isinstance(dest, BufferPool))
        self._dest = dest
        self._chunk = chunk

    def views(self, items: list[SaveItem]) -> list | None:
        # Reference mode holds the caller's arrays: small ones go to the writer as views, with
        # no Chunk, generator or checksum call per tensor (the pipeline checksums the run at once).
        if self._dest is not None or any(item.nbytes > self._chunk for item in items):
            return None
        return [_bytes_of(item.array) for item in items]

    def _pieces(self, item: SaveItem, cancelled) -> Iterator[Chunk]:
        view = byte_view(item.array)
        if self._dest is None:
            if len(view) <= self._chunk:  # the common small tensor: one chunk, no slicing
                yield Chunk(view, crc32c(view))
                return
            for start in range(0, len(view), self._chunk):
                piece = view[start:start + self._chunk]
                yield Chunk(piece, crc32c(piece))
            return
        step = self._dest.size
        for start in range(0, len(view), step):
            piece = view[start:start + step]
            buf = self._dest.take(len(piece), cancelled)
            if buf is None:
                return
            staged = buf[:len(piece)]
            np.copyto(staged, np.frombuffer(piece, dtype=np.uint8))
            data = memoryview(staged)
            yield Chunk(data, crc32c(data), release=lambda b=buf: self._dest.give(b))
        item.array = None

    def _stage_group(self, group: PackGroup, cancelled) -> bool:
        buf = self._dest.take(group.nbytes, cancelled)
        if buf is None:
            return False
        for item, off in zip(group.items, group.offsets):
            view = byte_view(item.array)
            np.copyto(buf[off:off + len(view)], np.frombuffer(view, dtype=np.uint8))
        group.hold(buf, self._dest.give)
        group.drop_arrays()
        return True

    def _group_chunk(self, group: PackGroup, i: int) -> Chunk:
        off, n = group.offsets[i], group.items[i].nbytes
        data = memoryview(group.buffer[off:off + n])
        return Chunk(data, crc32c(data), release=group.member_written)


def _bytes_of(array: np.ndarray) -> memoryview:
    """``byte_view`` of a C-contiguous host array, at a third of its cost where the buffer
    protocol knows the dtype (numpy's own; not ml_dtypes' bfloat16 or float8)."""
    try:
        return memoryview(array).cast("B")
    except (TypeError, ValueError, NotImplementedError):
        return byte_view(array)


def as_host_array(array) -> np.ndarray:
    """A C-contiguous, native-byte-order numpy view (or, if it must, copy) of a host array."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "OSU" and not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # ascontiguousarray makes 0-d 1-d
