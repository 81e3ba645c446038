"""The save pipeline: engines stage chunks, shard writers consume them, in parallel.

Per data shard, a producer thread stages chunks (copy-out, checksum) into a bounded queue while
the shard's writer thread writes the previous ones, so copy-out of chunk k+1 overlaps the write of
chunk k. (The load side is :mod:`gpusaver.staging.load_pipeline`.)
"""
import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Iterable

from gpusaver import gcpause
from gpusaver.format import strings
from gpusaver.format.dtypes import dtype_to_enum
from gpusaver.format.wire import crc32c_many
from gpusaver.format.writer import BundleWriter, ShardWriter
from gpusaver.log import log_done
from gpusaver.options import Options
from gpusaver.storage import for_url
from gpusaver.staging.io_types import Chunk, SaveItem

_QUEUE_DEPTH = 64  # staged items a producer may run ahead (memory is bounded by the pool, not this)
# In reference mode running ahead gains nothing (the snapshot is held already) and costs the
# writer: a producer with work to do keeps the GIL the writer needs between its write calls.
# Core saves, medians of 9 (depth 4 / 64): 30,000 × 8 KiB 0.233 / 0.233 s, 10,000 × 105 KiB
# 0.446 / 0.480 s.
_REFERENCE_DEPTH = 4
_BATCH_BYTES = 1 << 20  # consecutive small staged tensors up to this many bytes: one writer message
# A run of small tensors written as they are (views): one writer message, one writev. Each write
# call costs ~45 µs on its own (ext4 on the project VM: 10,000 tensors of 105 KiB written 10 a
# call took 0.355 s, 64 a call 0.316 s, one buffer 0.302 s), so runs go up to 8 MiB; at most 128
# tensors, as their checksums are computed holding the GIL the writer needs between its calls
# (30,000 tensors of 8 KiB saved slower in runs of 1024 than of 128). Core save of the 10,000
# tensors, medians of 11: 0.558 s in runs of 1 MiB, 0.518 s in these.
_RUN_BYTES, _RUN_TENSORS = 8 << 20, 128


def plan_shards(items: list[SaveItem], num_shards: int) -> list[list[SaveItem]]:
    """Split items over shards, largest first onto the lightest shard; each keeps the input order."""
    if num_shards == 1:
        return [list(items)]
    loads = [0] * num_shards
    owner = {}
    for i in sorted(range(len(items)), key=lambda i: -items[i].nbytes):
        s = loads.index(min(loads))
        owner[i] = s
        loads[s] += items[i].nbytes
    shards: list[list[SaveItem]] = [[] for _ in range(num_shards)]
    for i, item in enumerate(items):
        shards[owner[i]].append(item)
    return shards


class SaveJob:
    """One save running on background threads; ``future`` resolves to ``on_done(prefix)``'s result.

    ``describe()`` returns the tensors to save as an iterable of lists (batches) of items; it is
    consumed in the background, so the caller's stall holds only what the snapshot needs. With
    one data shard and no model-sized staging (every mode but ``host``), each batch is described
    as the producer reaches it, so the first tensors are written while later ones are still
    converted (a TF model's 10,000 tensors took 45-80 ms to describe, before the first write);
    otherwise every batch is described first (shards are balanced by size, host mode leases a
    buffer for all). ``buffers(items)`` claims the staging buffers of this save (an object with
    ``session(batch_items)`` and ``close()``, see ``stager.py``); streamed, it gets no items.

    ``snapshot_held`` is set once the job no longer needs the caller's arrays to stay unchanged:
    at once in reference mode (the job holds the arrays themselves), or once every tensor's bytes
    are staged in host memory in copy and host modes. It is also set if the job fails.
    """

    def __init__(self, prefix: str, describe: Callable[[], Iterable[list[SaveItem]]], options: Options, mode: str,
                 buffers: Callable[[list[SaveItem]], Any], on_done: Callable[[str], Any] | None = None,
                 index_cache=None):
        self.prefix = prefix
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.snapshot_held = threading.Event()
        self._describe = describe
        self._options = options
        self._buffers = buffers
        self._on_done = on_done
        self._index_cache = index_cache
        self._staging_left = options.num_shards
        self._streamed = options.num_shards == 1 and mode != "host"
        # Host mode stages at link speed into a model-sized buffer, never waiting for the writer.
        self._queue_depth = {"host": 0, "reference": _REFERENCE_DEPTH}.get(mode, _QUEUE_DEPTH)
        self._nbytes = 0  # of the tensors described so far
        self._lock = threading.Lock()
        if mode == "reference":
            self.snapshot_held.set()

    def start(self) -> "SaveJob":
        self._started = time.perf_counter()
        # Not a daemon: a save in flight keeps the interpreter alive until its files are complete.
        threading.Thread(target=self._run, name=f"gpusaver-save:{self.prefix}", daemon=False).start()
        return self

    def _run(self):
        try:
            with gcpause.paused():  # the per-tensor objects of a save: see gpusaver.gcpause
                result = self._save()
            self.future.set_result(result)
        except BaseException as e:  # noqa: B902 — re-raised by future.result() in the caller
            self.future.set_exception(e)
        finally:
            self.snapshot_held.set()

    def _save(self):
        opts = self._options
        # on_done (the state file, retention) commits inside the writer: if it fails, the writer
        # puts back the checkpoint files this save replaced.
        with BundleWriter(self.prefix, opts.num_shards, fsync=opts.fsync, on_commit=self._on_done,
                          storage=for_url(self.prefix, opts), index_cache=self._index_cache) as writer:
            batches = self._describe()
            self._describe = None  # the caller's mapping: dropped, so staged arrays can go
            if self._streamed:
                shards, buffers = [batches], self._buffers([])
            else:
                items = [item for batch in batches for item in batch]
                shards = [[shard] for shard in plan_shards(items, opts.num_shards)]
                buffers = self._buffers(items)
                del items, batches
            try:
                if opts.num_shards == 1:
                    self._write_shard(writer.shard(0), shards.pop(), buffers)
                else:
                    with concurrent.futures.ThreadPoolExecutor(opts.num_shards, "gpusaver-shard") as pool:
                        futures = [pool.submit(self._write_shard, writer.shard(i), shard, buffers)
                                   for i, shard in enumerate(shards)]
                        for f in futures:
                            f.result()
            finally:
                buffers.close()  # every buffer and device array this save still held
        log_done("save", self.prefix, self._nbytes, time.perf_counter() - self._started)
        return writer.committed

    def _staged_one_shard(self):
        with self._lock:
            self._staging_left -= 1
            if self._staging_left == 0:
                self.snapshot_held.set()

    def _write_shard(self, shard: ShardWriter, batches: Iterable[list[SaveItem]], buffers):
        staged: queue.Queue = queue.Queue(self._queue_depth)
        cancel = threading.Event()
        producer = threading.Thread(target=_Producer(self, buffers, staged, cancel).run, args=(batches,),
                                    name="gpusaver-stage", daemon=True)
        producer.start()
        try:
            while True:
                message = staged.get()
                if message is _DONE:
                    break
                message.write(shard)
        finally:
            cancel.set()
            producer.join()
            while not staged.empty():  # hand staged buffers back to the pool
                staged.get_nowait().release()


class _Cancelled(Exception):
    """The writer stopped taking messages (the save failed): the producer stops staging."""


class _Producer:
    """A shard's staging thread: turns the described items into messages for the shard's writer.

    Large tensors go as a begin, their staged chunks and an end; strings whole (the writer
    encodes them); runs of small tensors the engine hands over as they are (host arrays in
    reference mode) as one message of views with their CRCs; other small tensors are staged
    (copied or packed) into batches of up to ``_BATCH_BYTES``. Models have thousands of small
    tensors, and one queue hand-off each was most of their cost. A batch that holds pool buffers
    is sent before staging anything that may wait for a buffer, so staging never waits on buffers
    only the unsent batch would give back.
    """

    def __init__(self, job: SaveJob, buffers, out: queue.Queue, cancel: threading.Event):
        self._job, self._buffers, self._out, self._cancel = job, buffers, out, cancel
        self._batch = _Staged([])  # small tensors staged, not sent yet
        self._views_wanted = True  # until the engine says it stages these tensors (copies, devices)

    def run(self, batches: Iterable[list[SaveItem]]):
        try:
            for items in batches:  # streamed: each list is described here, as it is reached
                self._stage(items, self._buffers.session(items))
            self._flush()
            self._job._staged_one_shard()
            self._put(_DONE)
        except _Cancelled:
            self._batch.release()
        except BaseException as e:
            self._batch.release()  # staged but never sent: its buffers go back
            try:
                self._put(_Failed(e))
            except _Cancelled:
                pass

    def _stage(self, items: list[SaveItem], staging):
        with self._job._lock:
            self._job._nbytes += sum(item.nbytes for item in items)
        i = 0
        while i < len(items):
            item = items[i]
            if item.dtype.kind in "OSU":  # DT_STRING: encoded whole by the writer
                self._flush()
                self._put(_Strings(item))
            elif item.nbytes > _BATCH_BYTES:
                self._flush()
                self._put(_Begin(item))
                for chunk in staging.chunks(item, self._cancel.is_set):
                    self._put(_Piece(chunk))
                self._put(_END)
            elif self._views_wanted and not self._batch.tensors and (views := staging.views(run := _small_run(items, i))):
                self._put(_Views.of(run, views))
                i += len(run)
                continue
            else:
                self._add_small(item, staging)
            i += 1

    def _add_small(self, item: SaveItem, staging):
        if not self._batch.tensors:
            self._views_wanted = False  # the engine stages these (copies, device arrays): stop asking
        if self._batch.holds and staging.may_wait(item):
            self._flush()
        self._batch.add(item, list(staging.chunks(item, self._cancel.is_set)))  # may stage (and wait) now
        if self._batch.nbytes >= _BATCH_BYTES:
            self._flush()

    def _flush(self):
        if self._batch.tensors:
            batch, self._batch = self._batch, _Staged([])
            self._put(batch)

    def _put(self, message: "_Message"):
        """Queue ``message`` for the writer; if the save is cancelled meanwhile, give its buffers
        back and raise _Cancelled."""
        while not self._cancel.is_set():
            try:
                self._out.put(message, timeout=0.05)
                return
            except queue.Full:
                pass
        message.release()  # it never reaches the writer: its buffers go back here
        raise _Cancelled


def _small_run(items: list[SaveItem], i: int) -> list[SaveItem]:
    """Consecutive small numeric tensors from ``items[i]`` on, together up to ``_RUN_BYTES`` and
    ``_RUN_TENSORS``."""
    j, nbytes, end = i, 0, min(len(items), i + _RUN_TENSORS)
    while j < end and nbytes < _RUN_BYTES:
        item = items[j]
        if item.nbytes > _BATCH_BYTES or item.dtype.kind in "OSU":
            break
        nbytes += item.nbytes
        j += 1
    return items[i:j]


# --- messages from a shard's producer to its writer --------------------------------------------
# Each one ``write(shard)``s itself on the writer thread; ``release()`` gives back the buffers of
# one that will never be written (a failed or cancelled save).
class _Message:
    def write(self, shard: ShardWriter):
        raise NotImplementedError

    def release(self):
        pass


@dataclasses.dataclass
class _Views(_Message):
    """Consecutive small tensors as zero-copy views of the caller's arrays, with their CRCs: the
    columns :meth:`ShardWriter.add_views` takes, made on the producer's thread (the writer's
    Python between its write calls is on the save's critical path)."""
    names: list[str]
    enums: list[int]
    shapes: list[tuple]
    views: list[memoryview]
    crcs: list[int]

    @classmethod
    def of(cls, items: list[SaveItem], views: list[memoryview]) -> "_Views":
        dtype = enum = None
        enums = []
        for item in items:
            if item.dtype is not dtype:  # a model has a few dtypes: each converted once per run
                dtype, enum = item.dtype, dtype_to_enum(item.dtype)
            enums.append(enum)
        return cls([item.name for item in items], enums, [item.shape for item in items], views,
                   crc32c_many(views))  # one checksum call for the run

    def write(self, shard):
        shard.add_views(self.names, self.enums, self.shapes, self.views, self.crcs)


@dataclasses.dataclass
class _Staged(_Message):
    """Consecutive small tensors, each in one chunk or a few, staged (copied or packed) by the engine."""
    tensors: list[tuple[SaveItem, list[Chunk]]]
    nbytes: int = 0
    holds: bool = False  # whether a chunk holds a pool buffer

    def add(self, item: SaveItem, chunks: list[Chunk]):
        self.tensors.append((item, chunks))
        self.nbytes += item.nbytes
        self.holds = self.holds or any(chunk.holds_buffer for chunk in chunks)

    def write(self, shard):
        try:
            for item, chunks in self.tensors:
                shard.begin(item.name, item.dtype, item.shape)
                for chunk in chunks:
                    shard.write(chunk.data, chunk.crc)
                shard.end()
        finally:
            self.release()

    def release(self):
        for _, chunks in self.tensors:
            for chunk in chunks:
                chunk.release()
        self.tensors = []


@dataclasses.dataclass
class _Begin(_Message):
    item: SaveItem

    def write(self, shard):
        shard.begin(self.item.name, self.item.dtype, self.item.shape)


@dataclasses.dataclass
class _Piece(_Message):
    """One chunk of a large tensor; its buffer goes back to the pool once written, whatever happens."""
    chunk: Chunk

    def write(self, shard):
        try:
            shard.write(self.chunk.data, self.chunk.crc)
        finally:
            self.chunk.release()

    def release(self):
        self.chunk.release()


class _End(_Message):
    def write(self, shard):
        shard.end()


@dataclasses.dataclass
class _Strings(_Message):
    item: SaveItem

    def write(self, shard):
        shard.add_strings(self.item.name, self.item.shape, strings.as_bytes_list(self.item.array, self.item.name))


@dataclasses.dataclass
class _Failed(_Message):
    error: BaseException

    def write(self, shard):
        raise self.error


_END, _DONE = _End(), _Message()
