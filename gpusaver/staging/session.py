"""Per-save staging state shared by the host and CUDA engines: pack groups and their buffers.

Small tensors are packed: a run of consecutive small tensors of one device shares one staging
buffer (for GPU arrays, one gather kernel and one device-to-host copy). Why runs of *consecutive*
tensors: a group's buffer is given back only once its last member is written, and members are
written in order, so a group that spanned a large tensor would hold its buffer while the large
one waits for buffers — with a budget of one buffer, forever.
"""
import threading
from typing import Callable, Iterable, Iterator

from gpusaver.staging.io_types import Chunk, SaveItem

PACK_ALIGN = 16  # the pack kernel moves 16-byte words; each member starts on such a boundary


class PackGroup:
    """Consecutive small tensors of one device staged together into one buffer."""

    def __init__(self, items: list[SaveItem], offsets: list[int], nbytes: int):
        self.items, self.offsets, self.nbytes = items, offsets, nbytes
        self.index = {id(item): i for i, item in enumerate(items)}
        self.buffer = None        # host bytes, once staged
        self.device_buffer = None  # CUDA: the packed device array, alive until its copy is done
        self.event = None          # CUDA: the copy's completion
        self._give: Callable = lambda buf: None
        self._pending = len(items)
        self._lock = threading.Lock()
        self._released = False

    @property
    def staged(self) -> bool:
        return self.buffer is not None

    def hold(self, buffer, give: Callable):
        """The group's bytes are in ``buffer``; ``give(buffer)`` once every member is written."""
        self.buffer, self._give = buffer, give

    def drop_arrays(self):
        """Forget the members' arrays once their bytes are staged (and any device copy done)."""
        for item in self.items:
            item.array = None

    def member_written(self):
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            self.release()

    def release(self):
        """Give the buffer back and drop device arrays (idempotent; also on failure)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self.device_buffer = self.event = None
        if self.buffer is not None:
            self._give(self.buffer)


def plan_groups(items: list[SaveItem], threshold: int, limit: int) -> list[PackGroup]:
    """Pack groups over ``items``: runs of consecutive non-empty numeric tensors of at most
    ``threshold`` bytes on one device, each run's packed size at most ``limit`` bytes."""
    threshold = min(threshold, limit)
    groups: list[PackGroup] = []
    if threshold <= 0:  # packing off (reference mode's views): no run can form
        return groups
    run: list[SaveItem] = []
    offsets: list[int] = []
    end = 0

    def close_run():
        nonlocal run, offsets, end
        if len(run) > 1:  # a lone tensor gains nothing from packing
            groups.append(PackGroup(run, offsets, end))
        run, offsets, end = [], [], 0

    for item in items:
        n = item.nbytes
        if item.dtype.kind in "OSU" or n == 0 or n > threshold:
            close_run()
            continue
        start = -(-end // PACK_ALIGN) * PACK_ALIGN
        if run and (item.device != run[0].device or start + n > limit):
            close_run()
            start = 0
        run.append(item)
        offsets.append(start)
        end = start + n
    close_run()
    return groups


class GroupedStaging:
    """The part of a save's staging every engine shares: which group an item is in, staging a
    group when its first member comes up, and giving everything back on ``close``.

    Engines implement ``_stage_group(group, cancelled) -> bool``, ``_group_chunk(group, i)`` and
    ``_pieces(item, cancelled)`` (tensors not in a group).
    """

    def __init__(self, items: list[SaveItem], threshold: int, limit: int, dest_waits: bool):
        self._groups = plan_groups(items, threshold, limit)
        self._group_of = {id(item): g for g in self._groups for item in g.items}
        self._dest_waits = dest_waits

    def may_wait(self, item: SaveItem) -> bool:
        """Whether staging ``item`` may wait for a buffer to be given back."""
        group = self._group_of.get(id(item))
        return self._dest_waits and (group is None or not group.staged)

    def views(self, items: list[SaveItem]) -> list | None:
        """Byte views of ``items`` (consecutive small tensors) to write as they are, each one
        chunk, or None where they must be staged through :meth:`chunks` (copies, device arrays)."""
        return None

    def chunks(self, item: SaveItem, cancelled=lambda: False) -> Iterable[Chunk]:
        group = self._group_of.get(id(item))
        if group is None:
            return self._pieces(item, cancelled)
        # A group member is one chunk: a tuple, not a generator, as models have thousands of them.
        if not group.staged and not self._stage_group(group, cancelled):
            return ()
        return (self._group_chunk(group, group.index[id(item)]),)

    def close(self):
        for group in self._groups:
            group.release()
        self._groups, self._group_of = [], {}

    def _stage_group(self, group: PackGroup, cancelled) -> bool:
        raise NotImplementedError

    def _group_chunk(self, group: PackGroup, i: int) -> Chunk:
        raise NotImplementedError

    def _pieces(self, item: SaveItem, cancelled) -> Iterator[Chunk]:
        raise NotImplementedError
