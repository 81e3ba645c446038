"""A bounded pool of equal-sized host staging buffers: the byte budget of a Saver."""
import threading
from typing import Callable

import numpy as np


def aligned_empty(nbytes: int, alignment: int = 64) -> np.ndarray:
    """An uninitialised uint8 array whose data starts on an ``alignment``-byte boundary.

    TF and DLPack consumers take 64-byte aligned host memory without copying it.
    """
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start:start + nbytes]


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

    def acquire(self, cancelled: Callable[[], bool] = lambda: False) -> np.ndarray | None:
        """A free buffer of ``buffer_size`` bytes, blocking while all are in use.

        Returns None if ``cancelled()`` becomes true while waiting.
        """
        with self._cond:
            while True:
                if self._free:
                    return self._free.pop()
                if self._allocated < self.capacity:
                    self._allocated += 1
                    break
                if cancelled():
                    return None
                self._cond.wait(0.05)
        try:
            return self._allocate(self.buffer_size)
        except BaseException:
            with self._cond:
                self._allocated -= 1
            raise

    def release(self, buf: np.ndarray):
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    @property
    def allocated_bytes(self) -> int:
        return self._allocated * self.buffer_size
