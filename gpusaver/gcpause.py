"""Python's cyclic garbage collector held off while a save or restore makes its per-tensor objects.

A save or restore of a model with tens of thousands of tensors makes and keeps that many small
objects (items, entries, messages, TF tensors). Those allocations trigger the collector's full
collections, and each walks every object of the process: in a TensorFlow process (~500,000
objects) that took ~0.3 s of a 1.3 s restore of 30,000 variables, none of it finding garbage (the
objects are not cycles; reference counting frees them). So the bulk phases run with the collector
off; reference counting goes on, and cycles made meanwhile are collected after.
"""
import contextlib
import gc
import threading

_lock = threading.Lock()
_depth = 0  # phases running now, across threads
_was_enabled = False  # the collector's state before the first of them


@contextlib.contextmanager
def paused():
    """Run the body with the cyclic collector disabled. Nested and concurrent uses are counted:
    the collector's state from before the first is put back after the last (a caller that
    disabled it keeps it disabled)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
