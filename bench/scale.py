#!/usr/bin/env python3
"""Scale: does the core's cost grow linearly in bytes and in tensor count, within its memory bounds?

The core (``gpusaver.save`` / ``gpusaver.load`` on numpy arrays, CRC32C written and verified) on
the "many" workload at several tensor counts (8 KiB each) and on the "mix" workload at several
sizes, each point in a fresh child process so its peak memory is its own. Per point: medians of
the save and the load (page cache, every save into an emptied folder), µs per tensor, GiB/s, and
the load's peak extra resident memory (peak RSS minus RSS once the arrays were built) beside what
the load returns (the model itself): the bound is the model plus ``buffer_budget`` plus two
host slabs (see ``gpusaver.staging.pool.HostSlabs``). Usage::

    python bench/scale.py --many 10000,30000,100000 --mix-gib 1,2,4 --runs 3
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpusaver.bench import MANY_PER_GIB, GiB, Workload  # noqa: E402

MiB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak():
    """Start a new peak-RSS (VmHWM) measurement here (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def point(kind: str, size_bytes: int, runs: int, scratch: str) -> dict:
    """One workload in this process: save and load ``runs`` times after a warm-up."""
    import gpusaver
    from gpusaver.bench.disk import fresh, warm_free_memory
    from gpusaver.bench.peers import build_arrays

    workload = Workload(kind, size_bytes)
    arrays = build_arrays(workload)
    nbytes = sum(a.nbytes for a in arrays.values())
    prefix = os.path.join(scratch, "ckpt")
    saves, loads, extra = [], [], []
    for run in range(runs + 1):  # the first is the warm-up
        fresh(scratch)
        warm_free_memory(2 * nbytes)
        started = time.perf_counter()
        gpusaver.save(prefix, arrays)
        saves.append(time.perf_counter() - started)
        os.sync()
        warm_free_memory(2 * nbytes)
        before = _rss()
        _reset_peak()
        started = time.perf_counter()
        values = gpusaver.load(prefix)
        loads.append(time.perf_counter() - started)
        extra.append(_peak() - before)
        del values
    return {"kind": kind, "label": workload.label, "tensors": len(arrays), "bytes": nbytes,
            "save_s": statistics.median(saves[1:]), "load_s": statistics.median(loads[1:]),
            "load_peak_extra_bytes": max(extra)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--many", default="10000,30000,100000", help="tensor counts of the many workload")
    parser.add_argument("--mix-gib", default="1,2,4", help="sizes of the mix workload, GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--point", help=argparse.SUPPRESS)  # kind:bytes, run in a child
    parser.add_argument("--scratch", default=None, help="where checkpoints go (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.point:
        kind, size = args.point.split(":")
        print(json.dumps(point(kind, int(size), args.runs, args.scratch)))
        return 0

    points = [("many", round(int(n) * GiB / MANY_PER_GIB)) for n in args.many.split(",") if n]
    points += [("mix", int(float(g) * GiB)) for g in args.mix_gib.split(",") if g]
    scratch = args.scratch or tempfile.mkdtemp(prefix="gpusaver-scale-")
    rows = []
    try:
        for kind, size in points:
            out = subprocess.run([sys.executable, __file__, "--point", f"{kind}:{size}", "--runs", str(args.runs),
                                  "--scratch", scratch], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['label']:>36}: {r['tensors']:>6} tensors {r['bytes'] / GiB:5.2f} GiB | save {r['save_s']:6.3f} s "
                  f"({r['save_s'] / r['tensors'] * 1e6:5.1f} us/tensor, {r['bytes'] / GiB / r['save_s']:4.2f} GiB/s) | "
                  f"load {r['load_s']:6.3f} s ({r['load_s'] / r['tensors'] * 1e6:5.1f} us/tensor, "
                  f"{r['bytes'] / GiB / r['load_s']:4.2f} GiB/s) | load peak extra "
                  f"{r['load_peak_extra_bytes'] / MiB:6.0f} MiB for a {r['bytes'] / MiB:.0f} MiB model", flush=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
