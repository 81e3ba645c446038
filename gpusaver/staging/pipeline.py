"""The save and load pipelines: engines stage chunks, shard writers consume them, in parallel.

Save: per data shard, a producer thread stages chunks (copy-out, checksum) into a bounded queue
while the shard's writer thread writes the previous ones, so copy-out of chunk k+1 overlaps the
write of chunk k. Load: reader threads fill host buffers (or device arrays via the engine) ahead of
the consumer, within the byte budget, in data-file order; small tensors travel in batches.
"""
import collections
import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from gpusaver.format import strings
from gpusaver.format.bundle import num_elements
from gpusaver.format.reader import BundleReader
from gpusaver.format.writer import BundleWriter, ShardWriter
from gpusaver.log import log_done
from gpusaver.options import Options
from gpusaver.staging.devices import Device
from gpusaver.staging.io_types import Chunk, SaveItem

_QUEUE_DEPTH = 64  # staged items a producer may run ahead (memory is bounded by the pool, not this)
_DONE = ("done", None)
_BATCH_BYTES = 1 << 20  # consecutive small tensors up to this many bytes: one writer message, one read task


def plan_shards(items: list[SaveItem], num_shards: int) -> list[list[SaveItem]]:
    """Split items over shards, largest first onto the lightest shard; each keeps the input order."""
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

    ``describe()`` returns the tensors to save; it runs on the save thread, so the caller's stall
    holds only what the snapshot needs. ``buffers(items)`` claims the staging buffers
    of this save (an object with ``session(shard_items)`` and ``close()``, see ``stager.py``).

    ``snapshot_held`` is set once the job no longer needs the caller's arrays to stay unchanged:
    at once in reference mode (the job holds the arrays themselves), or once every tensor's bytes
    are staged in host memory in copy and host modes. It is also set if the job fails.
    """

    def __init__(self, prefix: str, describe: Callable[[], list[SaveItem]], options: Options, mode: str,
                 buffers: Callable[[list[SaveItem]], Any], on_done: Callable[[str], Any] | None = None):
        self.prefix = prefix
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.snapshot_held = threading.Event()
        self._describe = describe
        self._options = options
        self._buffers = buffers
        self._on_done = on_done
        self._staging_left = options.num_shards
        # Host mode stages at link speed into a model-sized buffer, never waiting for the writer.
        self._queue_depth = 0 if mode == "host" else _QUEUE_DEPTH
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
            self.future.set_result(self._save())
        except BaseException as e:  # noqa: B902 — re-raised by future.result() in the caller
            self.future.set_exception(e)
        finally:
            self.snapshot_held.set()

    def _save(self):
        opts = self._options
        # on_done (the state file, retention) commits inside the writer: if it fails, the writer
        # puts back the checkpoint files this save replaced.
        with BundleWriter(self.prefix, opts.num_shards, fsync=opts.fsync, on_commit=self._on_done) as writer:
            items = self._describe()
            self._describe = None  # the caller's mapping: dropped, so staged arrays can go
            shards = plan_shards(items, opts.num_shards)
            buffers = self._buffers(items)
            nbytes = sum(item.nbytes for item in items)
            del items
            try:
                if opts.num_shards == 1:
                    self._write_shard(writer.shard(0), shards[0], buffers)
                else:
                    with concurrent.futures.ThreadPoolExecutor(opts.num_shards, "gpusaver-shard") as pool:
                        futures = [pool.submit(self._write_shard, writer.shard(i), shard, buffers)
                                   for i, shard in enumerate(shards)]
                        for f in futures:
                            f.result()
            finally:
                buffers.close()  # every buffer and device array this save still held
        log_done("save", self.prefix, nbytes, time.perf_counter() - self._started)
        return writer.committed

    def _staged_one_shard(self):
        with self._lock:
            self._staging_left -= 1
            if self._staging_left == 0:
                self.snapshot_held.set()

    def _produce(self, items: list[SaveItem], staging, out: queue.Queue, cancel: threading.Event):
        def put(entry):
            while not cancel.is_set():
                try:
                    out.put(entry, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            # Small tensors travel to the writer in batches instead of begin/chunk/end each: models
            # have thousands of them, and the queue hand-offs were most of their cost. A batch that
            # holds pool buffers is sent before staging anything that may wait for a buffer, so
            # staging never waits on buffers only the unsent batch would give back.
            batch: list[tuple[SaveItem, list[Chunk]]] = []
            batch_bytes, batch_holds = 0, False

            def flush():
                nonlocal batch, batch_bytes, batch_holds
                sent = not batch or put(("tensors", batch))
                if not sent:
                    for _, chunks in batch:
                        _release(chunks)
                batch, batch_bytes, batch_holds = [], 0, False
                return sent

            for item in items:
                if item.dtype.kind in "OSU":  # DT_STRING: encoded whole by the writer
                    if not (flush() and put(("strings", item))):
                        return
                    continue
                if item.nbytes > _BATCH_BYTES:
                    if not (flush() and put(("begin", item))):
                        return
                    for chunk in staging.chunks(item, cancel.is_set):
                        if not put(("chunk", chunk)):
                            chunk.release()
                            return
                    if not put(("end", item)):
                        return
                    continue
                if batch_holds and staging.may_wait(item) and not flush():
                    return
                staged = (item, list(staging.chunks(item, cancel.is_set)))  # may stage (and wait) now
                batch.append(staged)
                batch_bytes += item.nbytes
                batch_holds = batch_holds or any(chunk.holds_buffer for chunk in staged[1])
                if batch_bytes >= _BATCH_BYTES and not flush():
                    return
            if not flush():
                return
            self._staged_one_shard()
            put(_DONE)
        except BaseException as e:
            put(("error", e))

    def _write_shard(self, shard: ShardWriter, items: list[SaveItem], buffers):
        staged: queue.Queue = queue.Queue(self._queue_depth)
        cancel = threading.Event()
        producer = threading.Thread(target=self._produce, args=(items, buffers.session(items), staged, cancel),
                                    name="gpusaver-stage", daemon=True)
        producer.start()
        try:
            while True:
                kind, payload = staged.get()
                if kind == "chunk":
                    _write_chunk(shard, payload)
                elif kind == "tensors":
                    try:
                        for item, chunks in payload:
                            shard.begin(item.name, item.dtype, item.shape)
                            for chunk in chunks:
                                shard.write(chunk.data, chunk.crc)
                            shard.end()
                    finally:
                        for _, chunks in payload:
                            _release(chunks)
                elif kind == "begin":
                    shard.begin(payload.name, payload.dtype, payload.shape)
                elif kind == "end":
                    shard.end()
                elif kind == "strings":
                    shard.add_strings(payload.name, payload.shape, strings.as_bytes_list(payload.array, payload.name))
                elif kind == "error":
                    raise payload
                else:
                    break
        finally:
            cancel.set()
            producer.join()
            while not staged.empty():  # hand staged buffers back to the pool
                kind, payload = staged.get_nowait()
                if kind == "chunk":
                    payload.release()
                elif kind == "tensors":
                    for _, chunks in payload:
                        _release(chunks)


def _release(chunks: list[Chunk]):
    for chunk in chunks:
        chunk.release()


def _write_chunk(shard: ShardWriter, chunk: Chunk):
    """Write one staged chunk and hand its buffer back to the pool, whatever happens."""
    try:
        shard.write(chunk.data, chunk.crc)
    finally:
        chunk.release()


# --- load -------------------------------------------------------------------------------------
def load_iter(reader: BundleReader, requests: Iterable[tuple[str, Device]], options: Options,
              fetch: Callable[[list[tuple[str, Device]]], list]) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, value)`` for every (name, device) request, in the order the tensors lie in
    the checkpoint's data files (sequential reads); ``fetch(batch)`` runs on reader threads and
    returns the batch's values.

    A batch is a run of consecutive tensors that together fit in ``_BATCH_BYTES``: models have
    thousands of small tensors, and a thread-pool hand-off each cost twice the read itself.
    Up to ``2 * num_threads`` batches are read ahead, as long as their bytes stay within
    ``buffer_budget`` (one batch is always allowed, however large), so host memory holds at most
    the budget plus one tensor beyond what the consumer keeps.
    """
    def position(request):
        e = reader.entry(request[0])
        return e.shard_id, e.offset

    def size_of(name):
        e = reader.entry(name)
        return e.size if not e.slices else num_elements(e.shape) * max(reader.dtype(name).itemsize, 1)

    batches: list[list[tuple[str, Device]]] = []
    sizes: list[int] = []
    for request in sorted(requests, key=position):
        size = size_of(request[0])
        if batches and sizes[-1] + size <= _BATCH_BYTES:
            batches[-1].append(request)
            sizes[-1] += size
        else:
            batches.append([request])
            sizes.append(size)

    inflight: collections.deque = collections.deque()
    inflight_bytes = 0
    with concurrent.futures.ThreadPoolExecutor(options.num_threads, "gpusaver-read") as pool:
        nxt = 0
        while nxt < len(batches) or inflight:
            while nxt < len(batches) and len(inflight) < 2 * options.num_threads:
                batch, size = batches[nxt], sizes[nxt]
                if inflight and inflight_bytes + size > options.buffer_budget:
                    break
                inflight.append((batch, size, pool.submit(fetch, batch)))
                inflight_bytes += size
                nxt += 1
            batch, size, fut = inflight.popleft()
            inflight_bytes -= size
            try:
                values = fut.result()
            except BaseException:
                for _, _, f in inflight:
                    f.cancel()
                raise
            for (name, _), value in zip(batch, values):
                yield name, value
