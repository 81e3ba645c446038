"""The Stager: the copy engines and buffers one Saver (or the module-level functions) reuses, and
each save's claim on them (:class:`SaveBuffers`)."""
import functools
import threading
from typing import Iterator

import numpy as np

from gpusaver.errors import InvalidArgumentError, MismatchError, UnsupportedError
from gpusaver.format.columns import IndexCache
from gpusaver.format.reader import BundleReader
from gpusaver.format.dtypes import dtype_to_enum
from gpusaver.options import Options
from gpusaver.staging import devices
from gpusaver.staging.devices import Device
from gpusaver.staging.feed import Feed
from gpusaver.staging.host import HostEngine, as_host_array
from gpusaver.staging.io_types import LoadItem, SaveItem
from gpusaver.staging.pool import Arena, BufferPool, HostSlabs, aligned_empty, align_up

#: Tensors described (converted, checked) at a time: a save's first ones are written while later
#: ones are described (~1-3 µs each: for thousands of tensors, tens of ms before the first write).
DESCRIBE_BATCH = 512


class Stager:
    """Engines, pools and snapshot arenas, created on first use and reused save after save.

    The CUDA engine (and its pinned memory, allocated once because page-locking is slow) exists
    only once a CUDA array is seen, so CPU-only use never imports CuPy. Thread-safe.
    """

    def __init__(self, options: Options):
        self.options = options
        self.host = HostEngine()
        self.host_pool = BufferPool(options.buffer_budget, options.effective_chunk)
        self.host_arena = Arena()
        self._cuda = None
        self._cupy_array = None  # cupy.ndarray once the CUDA engine exists
        self._dtypes_ok: set = set()
        self.index_cache = IndexCache()  # a model saved again: its index refilled, not re-encoded
        self._lock = threading.Lock()

    def cuda(self):
        """The CUDA engine; ImportError (naming the extra to install) without CuPy."""
        with self._lock:
            if self._cuda is None:
                from gpusaver.staging.cuda.engine import CudaEngine  # imports CuPy
                self._cuda = CudaEngine(self.options)
                self._cupy_array = self._cuda.array_type
            return self._cuda

    # -- save ----------------------------------------------------------------------------------
    def hold(self, values: dict) -> dict[int, list]:
        """On the caller's thread, at save time: order the save after the work that produced the
        device arrays in ``values``, and return, per device, an event to wait for.

        CuPy's and torch's current streams are per thread, so only this thread sees the
        producer's. A DLPack import orders the consumer's stream after the producer's current
        stream, so one import per kind of array and device does it for all of that kind (the
        rest are imported on the save thread, which is cheaper for the caller: ~20 µs each for
        torch tensors). CuPy arrays need none; non-contiguous ones are copied here, in order.
        """
        device_ids, ordered = set(), set()
        for name, value in values.items():
            kind = type(value)
            if kind is np.ndarray:  # host memory: nothing to order (most of a model's tensors, per call)
                continue
            if kind is self._cupy_array:
                if not value.flags.c_contiguous:
                    values[name] = self.cuda().import_array(value)
                device_ids.add(value.data.device_id)
                continue
            device = devices.of_array(value)
            if not device.is_cuda:
                continue
            if (kind, device.index) not in ordered:
                ordered.add((kind, device.index))
                values[name] = self.cuda().import_array(value)
            device_ids.add(device.index)
        if not device_ids:
            return {}
        return {d: [e] for d, e in self.cuda().ready_events(device_ids).items()}

    def describe(self, values: dict | Feed, convert, ready: dict) -> Iterator[list[SaveItem]]:
        """The save's items, :data:`DESCRIBE_BATCH` at a time (or a :class:`Feed`'s batches, as
        they arrive), as the save's staging thread asks for them (see :class:`save_pipeline.SaveJob`);
        each value leaves ``values`` as it is described.
        Imports and copies made here run on that thread's stream after the caller's ready events
        (JAX arrays also wait for their own buffers here); one more event per device, added to
        ``ready`` after each batch, orders the batch's staging after them. Arrays an adapter's
        ``convert`` exports come from producers that finished their work (the TF adapter
        synchronises first)."""
        if ready:
            self.cuda().wait_events(ready)
        for names, batch in (values if isinstance(values, Feed) else _batches(values)):
            items = [self.item(name, convert(value)) for name, value in zip(names, batch)]
            ids = {item.device.index for item in items if item.device.is_cuda}
            for d, event in (self.cuda().ready_events(ids) if ids else {}).items():
                ready.setdefault(d, []).append(event)
            yield items

    def item(self, name: str, array) -> SaveItem:
        """Describe one array to save. Raises ValueError / UnsupportedError naming the tensor."""
        # Models have thousands of tensors: a contiguous numpy array of a dtype seen before (only
        # native, supported ones are remembered) skips every other check.
        if type(array) is np.ndarray and array.dtype in self._dtypes_ok and array.flags.c_contiguous \
                and type(name) is str and name:
            return SaveItem(name, array, devices.CPU, array.dtype, array.shape, array.nbytes)
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"tensor names must be non-empty strings, got {name!r}")
        if type(array) is np.ndarray:
            if not (array.flags.c_contiguous and array.dtype.isnative):
                array = as_host_array(array)
        elif type(array) is not self._cupy_array or not array.flags.c_contiguous:
            if devices.of_array(array).is_cuda:
                array = self.cuda().import_array(array)
            else:
                array = as_host_array(array)
        device = _cuda_device(array.data.device_id) if type(array) is self._cupy_array else devices.CPU
        if array.dtype not in self._dtypes_ok:
            try:
                dtype_to_enum(array.dtype)
            except UnsupportedError as e:
                raise UnsupportedError(f"tensor {name!r}: {e}") from None
            self._dtypes_ok.add(array.dtype)  # native by now
        return SaveItem(name, array, device, array.dtype, array.shape, array.nbytes)  # numpy/CuPy: int shapes

    def buffers(self, items: list[SaveItem], mode: str, ready: dict) -> "SaveBuffers":
        return SaveBuffers(self, items, mode, ready)

    # -- restore -------------------------------------------------------------------------------
    def staging_device(self, target: Device, dtype) -> Device:
        """Where a value for ``target`` is read to: the GPU itself (uploaded through CuPy) when
        ``target`` is one, the dtype is numeric and CuPy is there; else the host (the framework
        uploads it)."""
        if target.is_cuda and dtype.kind != "O":
            try:
                self.cuda()
                return target
            except ImportError:
                pass
        return devices.CPU

    def fetch(self, reader: BundleReader, batch: list[LoadItem], slabs: HostSlabs) -> list:
        """Read each item of ``batch`` (CRC-checked) onto its device: numpy arrays on the host
        (64-byte aligned, so TF and CUDA uploads adopt them without a copy), CuPy on a GPU,
        complete when returned."""
        if not any(item.device.is_cuda for item in batch):  # the common case: all to host memory
            return self._read_host(reader, batch, slabs)
        values: dict[int, object] = {}
        host = [i for i, item in enumerate(batch) if not item.device.is_cuda]
        values.update(zip(host, self._read_host(reader, [batch[i] for i in host], slabs)))
        small: dict[int, list[int]] = {}  # device index -> positions of packable tensors
        for i, item in enumerate(batch):
            name, entry, device = item.name, item.entry, item.device
            if not device.is_cuda:
                continue
            if reader.dtype(name).kind == "O":
                raise MismatchError(f"tensor {name!r} holds strings, which cannot live on {device}")
            if entry.slices:
                values[i] = self.cuda().upload(reader.read(name, allocate=aligned_empty), device)
            elif entry.size <= self.options.effective_pack_threshold:
                small.setdefault(device.index, []).append(i)
            else:
                values[i] = self.cuda().load(reader, name, entry, device)
        for index, positions in small.items():
            for part in _parts(positions, [batch[i].entry.size for i in positions],
                               self.cuda().load_pool.buffer_size):
                outs = self.cuda().load_small(reader, [batch[i].name for i in part], batch[part[0]].device)
                values.update(zip(part, outs))
        return [values[i] for i in range(len(batch))]

    def _read_host(self, reader: BundleReader, items: list[LoadItem], slabs: HostSlabs) -> list:
        """The items as host arrays, in memory from the load's ``slabs`` (see :class:`HostSlabs`:
        fresh memory per tensor cost more than the read)."""
        return reader.read_many([item.name for item in items], slabs.region, [item.entry for item in items])


def _batches(values: dict) -> Iterator[tuple[list[str], list]]:
    """``values``' items, :data:`DESCRIBE_BATCH` at a time, each leaving ``values`` as it goes."""
    names = list(values)
    for start in range(0, len(names), DESCRIBE_BATCH):
        part = names[start:start + DESCRIBE_BATCH]
        yield part, [values.pop(name) for name in part]


@functools.lru_cache(maxsize=None)
def _cuda_device(index: int) -> Device:
    return Device("cuda", index)


def _parts(positions: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """Split positions into runs whose packed sizes (64-byte aligned, as read_many lays them
    out) fit ``limit`` bytes."""
    parts, end = [[]], 0
    for pos, size in zip(positions, sizes):
        start = align_up(end)
        if parts[-1] and start + size > limit:
            parts.append([])
            start = 0
        parts[-1].append(pos)
        end = start + size
    return [p for p in parts if p]


class SaveBuffers:
    """One save's claim on a Stager's buffers, by snapshot mode:

    - ``reference``: host arrays as views; CUDA arrays through the bounded pinned pool;
    - ``copy``: both through the bounded pools;
    - ``host``: both into the Stager's model-sized arenas (pinned for CUDA), held until written.

    ``session(items)`` gives one shard its staging; ``close()`` gives everything back.
    """

    def __init__(self, stager: Stager, items: list[SaveItem], mode: str, ready: dict):
        self._stager, self._ready = stager, ready
        self._leases, self._sessions = [], []
        chunk = stager.options.effective_chunk
        self._host_dest = {"reference": None, "copy": stager.host_pool}.get(mode)
        self._cuda_dest = None  # the engine's pinned pool
        try:
            if mode == "host":
                host = [i for i in items if not i.device.is_cuda and i.dtype.kind not in "OSU"]
                self._host_dest = self._lease(stager.host_arena, host, chunk)
                cuda = [i for i in items if i.device.is_cuda]
                if cuda:
                    self._cuda_dest = self._lease(stager.cuda().arena, cuda, chunk)
        except BaseException:
            self.close()
            raise

    def _lease(self, arena: Arena, items: list[SaveItem], chunk: int):
        # Each item is taken in chunk-sized pieces, each starting aligned.
        need = sum((i.nbytes // chunk) * align_up(chunk) + align_up(i.nbytes % chunk) for i in items)
        lease = arena.lease(need, chunk)
        self._leases.append(lease)
        return lease

    def session(self, items: list[SaveItem]) -> "_ShardStaging":
        s = _ShardStaging(self, items)
        self._sessions.append(s)
        return s

    def close(self):
        for s in self._sessions:
            s.close()
        for lease in self._leases:
            lease.close()
        self._sessions, self._leases = [], []


class _ShardStaging:
    """A shard's staging: host and CUDA items each through their engine's per-save state."""

    def __init__(self, buffers: SaveBuffers, items: list[SaveItem]):
        stager, opts = buffers._stager, buffers._stager.options
        host = [i for i in items if not i.device.is_cuda]
        cuda = [i for i in items if i.device.is_cuda]
        self._host = stager.host.session(host, buffers._host_dest, opts.effective_pack_threshold,
                                         opts.effective_chunk)
        self._cuda = (stager.cuda().session(cuda, buffers._cuda_dest, buffers._ready)
                      if cuda else None)

    def chunks(self, item: SaveItem, cancelled):
        return (self._cuda if item.device.is_cuda else self._host).chunks(item, cancelled)

    def views(self, items: list[SaveItem]) -> list | None:
        return self._host.views(items) if self._cuda is None else None

    def may_wait(self, item: SaveItem) -> bool:
        return (self._cuda if item.device.is_cuda else self._host).may_wait(item)

    def close(self):
        self._host.close()
        if self._cuda is not None:
            self._cuda.close()
