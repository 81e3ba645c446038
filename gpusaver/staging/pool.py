"""Where staged bytes go: a bounded pool of equal buffers, or a model-sized arena.

Both hand out host buffers through ``take(nbytes, cancelled)`` / ``give(buf)`` and say how large
one piece may be (``size``), so the copy engines stage into either without knowing which.
"""
import threading
from typing import Callable

import numpy as np

from gpusaver.format.bundle import ALIGN, align_up  # noqa: F401 — the staging layer's alignment


def aligned_empty(nbytes: int, alignment: int = ALIGN) -> np.ndarray:
    """An uninitialised uint8 array whose data starts on an ``alignment``-byte boundary."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + nbytes]


class HostSlabs:
    """Host memory for one load's reads of up to ``slab_bytes // 8``, carved from shared slabs.

    Fresh memory costs more than reading into it: malloc per tensor, then a page fault per 4 KiB
    on first touch (about 1 µs each, several times that on VMs). Slabs of 32 MiB are large enough
    for numpy to advise the kernel to back them with transparent huge pages (it does so from
    4 MiB), which made reading 234 MiB of 8 KiB tensors 3x cheaper than 1 MiB slabs on the
    project machine. Pieces never overlap. A slab is freed with its last piece: an array kept
    alone keeps its whole slab. TF variables restored from host arrays adopt them without a copy
    (checked on TF 2.21: ``AssignVariableOp`` keeps the DLPack-imported buffer), so a slab lives
    until every variable restored into it has been given a new buffer; in a model whose variables
    are all updated in place (optimizer steps) that is the variables' own memory, but a few kept
    among many replaced can hold up to 32 MiB each. Thread-safe: reader threads carve concurrently.
    """

    def __init__(self, slab_bytes: int = 32 << 20):
        self.slab_bytes = slab_bytes
        self.max_piece = slab_bytes // 8
        self._slab: np.ndarray | None = None
        self._used = 0
        self._lock = threading.Lock()

    def region(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of 64-byte aligned memory, from the current slab or a new one (one lock per
        read: the reader reads a run of small tensors into one region)."""
        if nbytes > self.max_piece:
            return aligned_empty(nbytes)
        with self._lock:
            if self._slab is None or self._used + nbytes > len(self._slab):
                self._slab, self._used = aligned_empty(self.slab_bytes), 0
            out = self._slab[self._used:self._used + nbytes]
            self._used = align_up(self._used + nbytes)
        return out


class BufferPool:
    """At most ``budget // buffer_size`` buffers (at least one), allocated on first use and reused.

    ``allocate(nbytes)`` makes one buffer; the CUDA engine passes a pinned allocator, because
    page-locking is slow (about 1–2 GB/s) and must not be paid per save.
    """

    def __init__(self, budget: int, buffer_size: int, allocate: Callable[[int], np.ndarray] = aligned_empty):
        self.buffer_size = min(buffer_size, budget)
        self.capacity = max(1, budget // self.buffer_size)
        self._allocate = allocate
        self._free: list[np.ndarray] = []
        self._allocated = 0
        self._cond = threading.Condition()

    @property
    def size(self) -> int:
        """The most bytes one ``take`` gives."""
        return self.buffer_size

    def acquire(self, cancelled: Callable[[], bool] = lambda: False, wait: bool = True) -> np.ndarray | None:
        """A free buffer of ``buffer_size`` bytes, blocking while all are in use.

        Returns None if ``cancelled()`` becomes true while waiting, or at once if all are in use
        and not ``wait``. Deadlock rule for callers: block only while holding no buffer that
        waits on this caller to be given back; extra buffers (read-ahead, copies in flight) are
        taken with ``wait=False``.
        """
        with self._cond:
            while True:
                if self._free:
                    return self._free.pop()
                if self._allocated < self.capacity:
                    self._allocated += 1
                    break
                if cancelled() or not wait:
                    return None
                self._cond.wait(0.05)
        try:
            return self._allocate(self.buffer_size)
        except BaseException:
            with self._cond:
                self._allocated -= 1
                self._cond.notify()
            raise

    def release(self, buf: np.ndarray):
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def take(self, nbytes: int, cancelled: Callable[[], bool] = lambda: False,
             wait: bool = True) -> np.ndarray | None:
        """A whole buffer (``nbytes <= size``); ``give`` it back once its bytes are written.
        See :meth:`acquire` for ``cancelled`` and ``wait``."""
        return self.acquire(cancelled, wait)

    def give(self, buf: np.ndarray):
        self.release(buf)

    @property
    def allocated_bytes(self) -> int:
        return self._allocated * self.buffer_size


class Arena:
    """One host buffer the size of a model, reused save after save and lent to one save at a time.

    Page-locking runs at 1–2 GB/s, so a pinned arena is allocated once (and again only when a
    larger model needs more) instead of per save. ``lease(nbytes)`` blocks while another save
    holds the arena: a second snapshot would otherwise need a second model's worth of memory.
    """

    def __init__(self, allocate: Callable[[int], np.ndarray] = aligned_empty):
        self._allocate = allocate
        self._buf: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else len(self._buf)

    def lease(self, nbytes: int, piece: int) -> "ArenaLease":
        """Hold the arena for one save needing ``nbytes`` (sum of :func:`align_up` sizes), handed
        out in pieces of at most ``piece`` bytes. Release it with ``close()`` once written."""
        self._lock.acquire()
        try:
            if self.nbytes < nbytes:
                self._buf = None  # free the old one before page-locking a larger one
                self._buf = self._allocate(nbytes)
        except BaseException:
            self._lock.release()
            raise
        return ArenaLease(self._buf, piece, self._lock)


class ArenaLease:
    """One save's use of an :class:`Arena`: consecutive aligned slices, never given back singly."""

    def __init__(self, buf: np.ndarray, piece: int, lock: threading.Lock):
        self._buf, self.size, self._lock = buf, piece, lock
        self._used = 0
        self._mutex = threading.Lock()  # shards take slices concurrently
        self._closed = False

    def take(self, nbytes: int, cancelled: Callable[[], bool] = lambda: False, wait: bool = True) -> np.ndarray:
        with self._mutex:
            start = self._used
            if start + nbytes > len(self._buf):
                raise RuntimeError(f"snapshot arena overrun: {start + nbytes} > {len(self._buf)} bytes "
                                   "(the save's size was computed wrongly)")
            self._used = align_up(start + nbytes)
        return self._buf[start:start + nbytes]

    def give(self, buf: np.ndarray):
        pass  # the whole arena is handed back by close()

    def close(self):
        with self._mutex:
            if self._closed:
                return
            self._closed = True
        self._lock.release()
