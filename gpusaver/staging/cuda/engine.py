"""The CUDA copy engine: pinned staging buffers, per-device copy streams, device CRC32C, packing.

Save: each chunk of a large tensor is copied device→pinned host on the device's copy stream while
the CRC kernel checksums the same bytes on a second stream, so the host never reads the data to
checksum it; the staging thread waits for the copy while the writer writes the previous chunk. Small tensors (at most
``pack_threshold`` bytes) are gathered on the device by the pack kernel into one buffer and cross
the bus in one copy instead of thousands. Restore: chunks are read from the file straight into
pinned buffers and uploaded into the destination device array, double-buffered by the pool; the
CRC is verified on the device. CuPy is imported here and in ``kernels.py`` only.
"""
import dataclasses
import threading

import numpy as np

from gpusaver.format.proto import Entry
from gpusaver.options import Options
from gpusaver.staging.cuda import kernels
from gpusaver.staging.devices import Device
from gpusaver.staging.io_types import Chunk, SaveItem
from gpusaver.staging.pool import BufferPool


def _cupy():
    return kernels._import_cupy()


def _pinned_empty(nbytes: int) -> np.ndarray:
    """Page-locked host memory as a uint8 array (kept alive by the array's base)."""
    mem = _cupy().cuda.alloc_pinned_memory(nbytes)
    return np.frombuffer(mem, dtype=np.uint8, count=nbytes)


@dataclasses.dataclass
class _Group:
    """Small tensors packed together: one device gather, one D2H copy, shared pinned buffer."""
    items: list
    offsets: dict = dataclasses.field(default_factory=dict)
    buffer: np.ndarray | None = None
    event: object = None
    packed: object = None
    pending: int = 0


class CudaEngine:
    """Copy engine for arrays in CUDA device memory (CuPy, or anything with DLPack / CAI)."""

    def __init__(self, options: Options):
        self._cp = _cupy()
        self._pool = BufferPool(options.buffer_budget, options.effective_chunk, allocate=_pinned_empty)
        self._threshold = options.pack_threshold
        # Uploads in flight per reader thread: two overlap the next read with the last upload, but
        # only if every reader can hold two buffers at once — else one, so readers cannot deadlock.
        self._upload_depth = 2 if self._pool.capacity >= 2 * options.num_threads else 1
        self._streams: dict[int, tuple] = {}
        self._groups: dict[str, _Group] = {}
        self._lock = threading.Lock()

    # -- save ----------------------------------------------------------------------------------
    def prepare(self, array):
        """A C-contiguous CuPy view of a device array (DLPack/CAI import, no copy when contiguous)."""
        cp = self._cp
        if not isinstance(array, cp.ndarray):
            array = cp.from_dlpack(array) if hasattr(array, "__dlpack__") else cp.asarray(array)
        return array if array.flags.c_contiguous else cp.ascontiguousarray(array)

    def _stream_pair(self, device_id: int):
        with self._lock:
            if device_id not in self._streams:
                with self._cp.cuda.Device(device_id):
                    self._streams[device_id] = (self._cp.cuda.Stream(non_blocking=True),
                                                self._cp.cuda.Stream(non_blocking=True))
            return self._streams[device_id]

    def plan(self, items: list[SaveItem]):
        """Group consecutive small tensors of one device, up to one staging buffer each."""
        group, size, dev = None, 0, None
        for item in items:
            if not item.device.is_cuda or item.nbytes > self._threshold or item.nbytes == 0:
                continue
            padded = -(-item.nbytes // 16) * 16
            if group is None or size + padded > self._pool.buffer_size or item.device.index != dev:
                group, size, dev = _Group([]), 0, item.device.index
            group.items.append(item)
            size += padded
            with self._lock:
                self._groups[item.name] = group

    def _stage_group(self, group: _Group, cancelled) -> bool:
        cp = self._cp
        buf = self._pool.acquire(cancelled)
        if buf is None:
            return False
        device_id = group.items[0].array.device.id
        copy_stream, _ = self._stream_pair(device_id)
        with cp.cuda.Device(device_id):
            # The gather must see the arrays as the producer's stream does: wait on it first.
            copy_stream.wait_event(cp.cuda.get_current_stream().record())
            packed, offsets = kernels.pack([i.array for i in group.items], stream=copy_stream)
            host = buf[:packed.size]
            packed.get(stream=copy_stream, out=host, blocking=False)  # async: host is pinned
            group.event = copy_stream.record()
        group.packed = packed  # the device buffer must outlive the copy
        group.buffer = buf
        group.offsets = {item.name: int(off) for item, off in zip(group.items, offsets)}
        group.pending = len(group.items)
        return True

    def _release_from(self, group: _Group):
        with self._lock:
            group.pending -= 1
            done = group.pending == 0
        if done:
            self._pool.release(group.buffer)

    def chunks(self, item: SaveItem, cancelled=lambda: False):
        with self._lock:
            group = self._groups.pop(item.name, None)
        if group is not None:
            if group.buffer is None and not self._stage_group(group, cancelled):
                return
            off = group.offsets[item.name]
            group.event.synchronize()
            yield Chunk(memoryview(group.buffer[off:off + item.nbytes]), None,
                        release=lambda: self._release_from(group))
            return
        yield from self._large_chunks(item, cancelled)

    def _large_chunks(self, item: SaveItem, cancelled):
        cp = self._cp
        data = item.array.reshape(-1).view(cp.uint8)
        device_id = item.array.device.id
        copy_stream, crc_stream = self._stream_pair(device_id)
        step = self._pool.buffer_size
        with cp.cuda.Device(device_id):
            ready = cp.cuda.get_current_stream().record()
            copy_stream.wait_event(ready)
            crc_stream.wait_event(ready)
            for start in range(0, data.size, step):
                buf = self._pool.acquire(cancelled)
                if buf is None:
                    return
                piece = data[start:start + step]
                host = buf[:piece.size]
                piece.get(stream=copy_stream, out=host, blocking=False)  # async: host is pinned
                event = copy_stream.record()
                crc = kernels.device_crc32c(piece, stream=crc_stream)  # overlaps the copy
                # Wait here, on the staging thread: once the last chunk is yielded the snapshot
                # is on the host (copy mode may then let training overwrite the device memory),
                # and the writer is meanwhile busy with the previous chunk.
                event.synchronize()
                yield Chunk(memoryview(host), crc, release=lambda b=buf: self._pool.release(b))

    # -- restore -------------------------------------------------------------------------------
    def load(self, reader, name: str, entry: Entry, device: Device):
        """Read a numeric tensor chunk by chunk into pinned buffers and upload each into a new
        array on ``device``; verify the CRC32C on the device. Raises CorruptCheckpointError."""
        cp = self._cp
        dtype = reader.dtype(name)
        copy_stream, _ = self._stream_pair(device.index)
        with cp.cuda.Device(device.index):
            out = cp.empty(entry.shape, dtype=dtype)
            flat = out.reshape(-1).view(cp.uint8)
            in_flight = []  # (event, buffer): a buffer is reused only after its upload finished
            try:
                for start in range(0, entry.size, self._pool.buffer_size):
                    if len(in_flight) >= self._upload_depth:
                        event, buf = in_flight.pop(0)
                        event.synchronize()
                        self._pool.release(buf)
                    buf = self._pool.acquire()
                    n = min(self._pool.buffer_size, entry.size - start)
                    reader.pread_into(entry, name, memoryview(buf[:n]), start)
                    flat[start:start + n].set(buf[:n], stream=copy_stream)
                    in_flight.append((copy_stream.record(), buf))
            finally:
                for event, buf in in_flight:
                    event.synchronize()
                    self._pool.release(buf)
            reader.check_crc(name, entry, kernels.device_crc32c(flat, stream=copy_stream))
        return out

    def upload(self, host: np.ndarray, device: Device):
        """Upload a host array (strings and sliced tensors take this path) to ``device``."""
        with self._cp.cuda.Device(device.index):
            return self._cp.asarray(host)
