"""The CUDA copy engine: pinned staging buffers, per-device copy streams, device CRC32C, packing.

Save (:class:`CudaStaging`, one per save and shard): each chunk of a large tensor is copied
device→pinned host on the device's copy stream while the CRC kernel checksums the same bytes on a
second stream, a few chunks in flight at once; small tensors are gathered on the device by the
pack kernel and cross the bus in one copy. Both streams first wait for the events the save
recorded where the data was produced (see :meth:`CudaEngine.ready_events`).

Restore: large tensors are read from the file into pinned buffers and uploaded chunk by chunk,
double-buffered, with the CRC verified on the device; small tensors are read together into one
pinned buffer (CRC-checked on the host while in cache), uploaded in one copy and scattered by the
unpack kernel. Outputs are allocated on the copy stream and synchronised before anyone sees them.

CuPy is imported here, in ``kernels.py`` and in ``dlpack.py`` only.
"""
import collections
import threading

import numpy as np

from gpusaver.format.proto import Entry
from gpusaver.format.reader import run_layout
from gpusaver.options import Options
from gpusaver.staging.cuda import dlpack, kernels
from gpusaver.staging.devices import Device
from gpusaver.staging.io_types import Chunk, SaveItem
from gpusaver.staging.pool import Arena, BufferPool, align_up
from gpusaver.staging.session import GroupedStaging, PackGroup


def _cupy():
    return kernels._import_cupy()


def pinned_empty(nbytes: int) -> np.ndarray:
    """Page-locked host memory as a uint8 array of exactly ``nbytes`` (CuPy's pinned pool would
    round a model-sized buffer up to a power of two); kept alive by the array's base."""
    cp = _cupy()
    mem = cp.cuda.PinnedMemory(max(nbytes, 1))
    return np.frombuffer(cp.cuda.PinnedMemoryPointer(mem, 0), dtype=np.uint8, count=nbytes)


class CudaEngine:
    """What a Stager's saves and restores of CUDA arrays share: streams, pinned pools, the arena.

    Everything per save lives in :class:`CudaStaging`. Saves and restores have separate pools, so
    a restore never waits for buffers a save holds (each is bounded by ``buffer_budget``).
    """

    def __init__(self, options: Options):
        self._cp = _cupy()
        self.array_type = self._cp.ndarray
        self.options = options
        self.save_pool = BufferPool(options.buffer_budget, options.effective_chunk, allocate=pinned_empty)
        self.load_pool = BufferPool(options.buffer_budget, options.effective_chunk, allocate=pinned_empty)
        self.arena = Arena(pinned_empty)
        self._streams: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def streams(self, device_id: int):
        """(copy stream, CRC stream) of a device, created once; non-blocking, so they never wait
        for unrelated work on the legacy default stream."""
        with self._lock:
            if device_id not in self._streams:
                with self._cp.cuda.Device(device_id):
                    self._streams[device_id] = (self._cp.cuda.Stream(non_blocking=True),
                                                self._cp.cuda.Stream(non_blocking=True))
            return self._streams[device_id]

    # -- save ----------------------------------------------------------------------------------
    def import_array(self, array):
        """A C-contiguous CuPy view of a device array (DLPack/CAI import, no copy when contiguous).
        Call it on the thread that produced the array: a non-contiguous array is copied on that
        thread's current stream, and a DLPack producer orders its work against that stream."""
        if type(array) is not self.array_type:
            array = dlpack.import_array(array)
        return array if array.flags.c_contiguous else self._cp.ascontiguousarray(array)

    def ready_events(self, device_ids) -> dict[int, object]:
        """One event per device, recorded on this thread's current CuPy stream: the save's copy
        and CRC streams wait on them, so they read what this thread's work (and the producers it
        imported from) wrote. CuPy's current stream is per thread, so call this on the producer's."""
        events = {}
        for d in device_ids:
            with self._cp.cuda.Device(d):
                events[d] = self._cp.cuda.Event(disable_timing=True)
                events[d].record()
        return events

    def wait_events(self, events: dict[int, list]):
        """Make this thread's current stream on each device wait for ``events`` {device: [event]}."""
        for d, evs in events.items():
            with self._cp.cuda.Device(d):
                stream = self._cp.cuda.get_current_stream()
                for event in evs:
                    stream.wait_event(event)

    def session(self, items: list[SaveItem], dest, ready: dict) -> "CudaStaging":
        return CudaStaging(self, items, dest or self.save_pool, ready)

    # -- restore -------------------------------------------------------------------------------
    def load(self, reader, name: str, entry: Entry, device: Device):
        """Read a numeric tensor chunk by chunk into pinned buffers and upload each into a new
        array on ``device``; verify the CRC32C on the device. Raises CorruptCheckpointError.
        The array is complete when returned."""
        cp = self._cp
        copy, _ = self.streams(device.index)
        with cp.cuda.Device(device.index), copy:
            out = cp.empty(entry.shape, dtype=reader.dtype(name))  # allocated in copy-stream order
            flat = out.reshape(-1).view(cp.uint8)
            self.upload_into(flat, lambda view, start: reader.pread_into(entry, name, view, start), copy)
            crc = kernels.crc32c_start(flat, stream=copy).result()  # waits for the uploads too
        reader.check_crc(name, entry, crc)
        return out

    def upload_into(self, flat, fill, stream):
        """Fill the uint8 device array ``flat`` chunk by chunk: ``fill(view, start)`` writes bytes
        ``[start, start + len(view))`` into a pinned buffer, which is uploaded on ``stream`` while
        the next chunk is filled. Returns with the uploads queued (the buffers are free again)."""
        pool = self.load_pool
        in_flight = collections.deque()  # (event, buffer): reused only after its upload finished
        try:
            for start in range(0, flat.size, pool.buffer_size):
                # A second buffer overlaps this read with the last upload, if one is free now:
                # waiting for one while holding another could deadlock concurrent restores.
                buf = pool.acquire(wait=False) if len(in_flight) == 1 else None
                if buf is None and in_flight:
                    event, buf = in_flight.popleft()
                    event.synchronize()
                if buf is None:
                    buf = pool.acquire()
                n = min(pool.buffer_size, flat.size - start)
                try:
                    fill(memoryview(buf[:n]), start)
                except BaseException:
                    pool.release(buf)
                    raise
                flat[start:start + n].set(buf[:n], stream=stream)
                in_flight.append((stream.record(), buf))
        finally:
            for event, buf in in_flight:
                event.synchronize()
                pool.release(buf)

    def load_small(self, reader, names: list[str], device: Device) -> list:
        """Read plain numeric tensors (together at most one buffer, packed) into one pinned buffer,
        CRC-checked on the host, upload it in one copy and scatter it on the device."""
        cp = self._cp
        entries = [reader.entry(n) for n in names]
        # read_many lays each run of tensors out 64-byte aligned (run_layout), runs one after
        # another: over the whole list that is one aligned layout, which the scatter follows.
        offsets, end, _ = run_layout([e.size for e in entries])
        buf = self.load_pool.acquire()
        used = 0

        def place(nbytes):  # read_many asks for each run's (or lone tensor's) region in order
            nonlocal used
            start, used = used, align_up(used + nbytes)
            return buf[start:start + nbytes]

        try:
            reader.read_many(names, allocate=place)
            copy, _ = self.streams(device.index)
            with cp.cuda.Device(device.index), copy:
                packed = cp.empty(end, dtype=cp.uint8)
                packed.set(buf[:end], stream=copy)
                outs = [cp.empty(e.shape, dtype=reader.dtype(n)) for n, e in zip(names, entries)]
                work = [i for i, e in enumerate(entries) if e.size]
                kernels.scatter(packed, [offsets[i] for i in work], [entries[i].size for i in work],
                                [outs[i].data.ptr for i in work])
                copy.synchronize()  # before the pinned buffer is reused and before TF sees outs
        finally:
            self.load_pool.release(buf)
        return outs

    def upload(self, host: np.ndarray, device: Device):
        """Upload a host array (sliced tensors take this path) to ``device``; complete on return."""
        cp = self._cp
        copy, _ = self.streams(device.index)
        with cp.cuda.Device(device.index), copy:
            out = cp.empty(host.shape, dtype=host.dtype)
            out.set(host, stream=copy)
            copy.synchronize()
        return out


_IN_FLIGHT = 4  # chunk copies queued ahead of the one being waited for


class _Transfer:
    """One large tensor's device-to-host copies: the next byte to copy, the chunks in flight."""

    def __init__(self, item: SaveItem, data):
        self.item, self.data, self.next = item, data, 0
        self.pending = collections.deque()  # (copy event, pending CRC, host bytes, buffer)

    @property
    def issued_all(self) -> bool:
        return self.next >= self.data.size


class CudaStaging(GroupedStaging):
    """One save's (one shard's) staging of CUDA arrays into ``dest``: the bounded pinned pool
    (reference and copy modes) or a lease on the pinned arena (host mode).

    Large tensors keep up to ``_IN_FLIGHT`` chunk copies queued, and while one drains its last
    chunks the next large tensor's first copies are queued, so the link never idles between
    tensors. Extra buffers are only ever taken without waiting: a producer blocks on the pool
    only while it holds nothing the writer has not been given (no deadlock, however many saves
    and shards share the pool).
    """

    def __init__(self, engine: CudaEngine, items: list[SaveItem], dest, ready: dict):
        super().__init__(items, engine.options.effective_pack_threshold, dest.size,
                         dest_waits=isinstance(dest, BufferPool))
        self._engine, self._cp, self._dest = engine, engine._cp, dest
        self._ready = ready
        self._waited: set[int] = set()
        self._following = {id(a): b for a, b in zip(items, items[1:])}
        self._ahead: dict[int, _Transfer] = {}  # transfers started before their turn

    def _streams(self, device_id: int):
        copy, crc = self._engine.streams(device_id)
        if device_id not in self._waited:
            for event in self._ready.get(device_id, ()):
                copy.wait_event(event)
                crc.wait_event(event)
            self._waited.add(device_id)
        return copy, crc

    def _stage_group(self, group: PackGroup, cancelled) -> bool:
        cp = self._cp
        buf = self._dest.take(group.nbytes, cancelled)
        if buf is None:
            return False
        device_id = group.items[0].array.device.id
        copy, _ = self._streams(device_id)
        try:
            with cp.cuda.Device(device_id), copy:
                packed = cp.empty(group.nbytes, dtype=cp.uint8)
                kernels.gather([i.array.data.ptr for i in group.items], [i.nbytes for i in group.items],
                               group.offsets, packed)
                packed.get(stream=copy, out=buf[:group.nbytes], blocking=False)  # async: pinned
                group.event = copy.record()
        except BaseException:
            self._dest.give(buf)
            raise
        group.device_buffer = packed  # must outlive the copy
        group.hold(buf, self._dest.give)
        return True

    def _group_chunk(self, group: PackGroup, i: int) -> Chunk:
        if group.event is not None:
            group.event.synchronize()
            # The gather has read every member: the caller's arrays may go (and be reused).
            group.event = group.device_buffer = None
            group.drop_arrays()
        off, n = group.offsets[i], group.items[i].nbytes
        return Chunk(memoryview(group.buffer[off:off + n]), None, release=group.member_written)

    def _pieces(self, item: SaveItem, cancelled):
        t = self._ahead.pop(id(item), None) or self._transfer(item)
        try:
            while not t.issued_all or t.pending:
                while not t.issued_all and len(t.pending) < _IN_FLIGHT:
                    got = self._issue(t, cancelled, wait=not t.pending)
                    if got is None:
                        return  # cancelled while waiting for a buffer
                    if not got:
                        break  # no buffer free now: drain one first
                if t.issued_all:
                    self._start_following(item, room=_IN_FLIGHT - len(t.pending))
                yield self._finish(*t.pending.popleft())
            item.array = None  # every byte is on the host and checksummed: let the device memory go
        finally:
            self._drain(t)

    def _transfer(self, item: SaveItem) -> _Transfer:
        return _Transfer(item, item.array.reshape(-1).view(self._cp.uint8))

    def _issue(self, t: _Transfer, cancelled, wait: bool):
        """Queue the copy and CRC of ``t``'s next chunk. True if queued, False if no buffer was
        free (``wait`` False), None if cancelled while waiting."""
        n = min(self._dest.size, t.data.size - t.next)
        buf = self._dest.take(n, cancelled, wait=wait)
        if buf is None:
            return None if wait else False
        device_id = t.item.array.device.id
        copy, crc_stream = self._streams(device_id)
        piece, host = t.data[t.next:t.next + n], buf[:n]
        with self._cp.cuda.Device(device_id):
            piece.get(stream=copy, out=host, blocking=False)  # async: host is pinned
            crc = kernels.crc32c_start(piece, stream=crc_stream, copy_stream=copy)
            t.pending.append((copy.record(), crc, host, buf))
        t.next += n
        return True

    def _start_following(self, item: SaveItem, room: int):
        """Queue the first copies of the next tensor if it is a large one, so the link stays busy
        while this one's last chunks drain (never waiting for a buffer)."""
        nxt = self._following.get(id(item))
        if room <= 0 or nxt is None or id(nxt) in self._ahead or id(nxt) in self._group_of:
            return
        t = self._ahead[id(nxt)] = self._transfer(nxt)
        while room > 0 and not t.issued_all and self._issue(t, lambda: True, wait=False):
            room -= 1

    def _finish(self, event, crc, host, buf) -> Chunk:
        event.synchronize()
        return Chunk(memoryview(host), crc.result(), release=lambda: self._dest.give(buf))

    def _drain(self, t: _Transfer):
        """Give back the buffers of copies never handed on (closed early: they may be landing)."""
        while t.pending:
            event, _, _, buf = t.pending.popleft()
            event.synchronize()
            self._dest.give(buf)

    def close(self):
        for t in self._ahead.values():
            self._drain(t)
        self._ahead = {}
        super().close()
