"""Arrays handed to a save in batches while it already runs (:class:`Feed`).

A framework's snapshot takes time per tensor (TF's batched variable read: ~3.5 µs a variable,
36 ms for a model of 10,000, 0.1 s for 30,000). Read whole before the save starts, that time
comes before the first byte is written; fed batch by batch, the save's staging thread describes
and writes the first batches while the caller still reads the next ones.
"""
import queue
from typing import Iterator

from gpusaver.errors import GpusaverError

_END = object()


class Feed:
    """A save's arrays, arriving as ``(names, values)`` batches: the caller puts every batch, then
    closes the feed (or aborts it when it cannot go on); the save's staging thread iterates it,
    each batch as it arrives. Every name must differ, as in a dict. One producer, one consumer."""

    def __init__(self):
        self._batches = queue.SimpleQueue()

    def put(self, names: list[str], values: list):
        self._batches.put((names, values))

    def close(self):
        """No more batches: the save goes on to commit once the last one is written."""
        self._batches.put(_END)

    def abort(self, error: BaseException):
        """No more batches, and the save must fail (its files removed, the previous checkpoint
        kept), with a GpusaverError naming ``error``."""
        self._batches.put(GpusaverError(f"the save's arrays were not all handed over: {error!r}"))

    def __iter__(self) -> Iterator[tuple[list[str], list]]:
        while (batch := self._batches.get()) is not _END:
            if isinstance(batch, GpusaverError):
                raise batch
            yield batch
