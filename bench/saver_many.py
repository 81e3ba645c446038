#!/usr/bin/env python3
"""Per-variable cost: ``gpusaver.Saver`` against ``tf.compat.v1.train.Saver`` on many small variables.

The "many" workload (30,000 float32 variables of 8 KiB by default, on the CPU): save and restore of
the same variables by both savers, interleaved, page cache, medians; then a cProfile of one
gpusaver restore (top entries by cumulative time, and by own time) and the first-call cost of a
fresh Saver's restore (building its per-Saver caches and TF's kernels). Usage::

    python bench/saver_many.py --count 30000 --runs 5
"""
import argparse
import cProfile
import gc
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpusaver  # noqa: E402
from gpusaver.bench import MANY_PER_GIB, MANY_TENSOR_BYTES, GiB, Workload  # noqa: E402
from gpusaver.bench.cpu import build_variables, fingerprints, perturb  # noqa: E402


class _GcClock:
    """Seconds spent in Python's cyclic garbage collector (all generations) while running."""

    def __init__(self):
        self.seconds, self._started = 0.0, None
        gc.callbacks.append(self._tick)

    def _tick(self, phase, info):
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started


_GC = _GcClock()


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _timed_gc(fn) -> tuple[float, float]:
    """(wall seconds, of which in the garbage collector)."""
    before = _GC.seconds
    return _timed(fn), _GC.seconds - before


def _profile(fn, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    out = io.StringIO()
    for key in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(top)
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=30_000, help="variables of 8 KiB each")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="profile entries shown")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    import tensorflow as tf

    from gpusaver.tf.assign import group_function

    workload = Workload("many", -(-args.count * GiB // MANY_PER_GIB))  # its size sets the count
    assert workload.count == args.count
    variables = build_variables(workload)
    expected = fingerprints(variables)
    scratch = tempfile.mkdtemp(prefix="gpusaver-saver-many-")
    try:
        ours = gpusaver.Saver(variables, max_to_keep=None)
        theirs = tf.compat.v1.train.Saver(variables, max_to_keep=None)
        ours_prefix, theirs_prefix = os.path.join(scratch, "gs", "ckpt"), os.path.join(scratch, "tf", "ckpt")
        os.makedirs(os.path.dirname(theirs_prefix))

        # First calls: a fresh Saver's save and restore build its caches (and TF its kernels); the
        # traced group assign is built once per dtype per process, timed here on its own.
        trace = _timed(lambda: group_function(tf.float32, keep=True))
        first_save = _timed(lambda: ours.save(ours_prefix))
        theirs.save(None, theirs_prefix)
        perturb(variables)
        first_restore = _timed(lambda: ours.restore(ours_prefix))
        assert fingerprints(variables) == expected, "gpusaver restore did not restore the values"
        perturb(variables)
        theirs.restore(None, theirs_prefix)
        assert fingerprints(variables) == expected, "TF restore did not restore the values"

        cases = {"gpusaver Saver.save": lambda: ours.save(ours_prefix),
                 "tf.compat.v1 Saver.save": lambda: theirs.save(None, theirs_prefix),
                 "gpusaver Saver.restore": lambda: ours.restore(ours_prefix),
                 "tf.compat.v1 Saver.restore": lambda: theirs.restore(None, theirs_prefix)}
        times = {name: [] for name in cases}
        in_gc = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, fn in cases.items():
                wall, collecting = _timed_gc(fn)
                times[name].append(wall)
                in_gc[name].append(collecting)
        med = {name: statistics.median(t) for name, t in times.items()}
        med_gc = {name: statistics.median(t) for name, t in in_gc.items()}
        print(f"{args.count} float32 variables x {MANY_TENSOR_BYTES // 1024} KiB on the CPU, TF {tf.__version__}, "
              f"medians of {args.runs} (interleaved, page cache)")
        print(f"  first call of a fresh gpusaver.Saver: save {first_save:.3f} s, restore {first_restore:.3f} s "
              f"(+ {trace:.3f} s, once per dtype per process, to trace the group assign)")
        for op in ("save", "restore"):
            g, t = med[f"gpusaver Saver.{op}"], med[f"tf.compat.v1 Saver.{op}"]
            g_gc, t_gc = med_gc[f"gpusaver Saver.{op}"], med_gc[f"tf.compat.v1 Saver.{op}"]
            print(f"  {op:8s} gpusaver {g:7.3f} s ({g / args.count * 1e6:6.1f} us/var, gc {g_gc:5.3f} s)   "
                  f"tf.compat.v1 {t:7.3f} s ({t / args.count * 1e6:6.1f} us/var, gc {t_gc:5.3f} s)   "
                  f"gpusaver {t / g:5.2f}x faster")
        print("  (gc: median seconds in Python's garbage collector within the call; its full collections "
              "walk every object of the process, ~0.3 s here, and land on whichever call comes next)")
        if not args.no_profile:
            print(f"\ncProfile of one gpusaver Saver.restore (top {args.top})")
            print(_profile(lambda: ours.restore(ours_prefix), args.top))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
