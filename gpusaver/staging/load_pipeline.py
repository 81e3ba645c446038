"""The load pipeline: reader threads fill host buffers (or device arrays through the engine) ahead
of the consumer, within the byte budget, in data-file order; small tensors travel in batches.
(The save side is :mod:`gpusaver.staging.save_pipeline`.)
"""
import collections
import concurrent.futures
from typing import Any, Callable, Iterable, Iterator

from gpusaver.format.bundle import num_elements
from gpusaver.format.reader import BundleReader
from gpusaver.options import Options
from gpusaver.staging.devices import Device
from gpusaver.staging.io_types import LoadItem

_BATCH_BYTES = 1 << 20  # consecutive small tensors up to this many bytes: one read task


def load_iter(reader: BundleReader, requests: Iterable[tuple[str, Device]], options: Options,
              fetch: Callable[[list[LoadItem]], list]) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, value)`` for every (name, device) request, in the order the tensors lie in
    the checkpoint's data files (sequential reads); ``fetch(batch)`` runs on reader threads and
    returns the values of a batch of :class:`LoadItem`.

    A batch is a run of consecutive tensors that together fit in ``_BATCH_BYTES``: models have
    thousands of small tensors, and a thread-pool hand-off each cost twice the read itself.
    Up to ``2 * num_threads`` batches are read ahead, as long as their bytes stay within
    ``buffer_budget`` (one batch is always allowed, however large), so host memory holds at most
    the budget plus one tensor beyond what the consumer keeps (where ``fetch`` carves host
    arrays from shared slabs, as the stager does, add the slab being filled and the one being
    consumed: a slab is freed once all its tensors are, 32 MiB each).
    """
    # One index lookup per request (models have tens of thousands): its place and its bytes.
    items = [LoadItem(name, entry, device, entry.size if not entry.slices else
                      num_elements(entry.shape) * max(reader.dtype(name).itemsize, 1))
             for name, device in requests for entry in (reader.entry(name),)]
    items.sort(key=_file_place)  # stable, as the file order is
    batches: list[list[LoadItem]] = []
    sizes: list[int] = []
    for item in items:
        if batches and sizes[-1] + item.nbytes <= _BATCH_BYTES:
            batches[-1].append(item)
            sizes[-1] += item.nbytes
        else:
            batches.append([item])
            sizes.append(item.nbytes)

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
            for item, value in zip(batch, values):
                yield item.name, value


def _file_place(item: LoadItem) -> tuple[int, int]:
    return item.entry.shard_id, item.entry.offset
