#!/usr/bin/env python3
"""What all-or-nothing costs ``Saver.restore``: the same restore with and without holding the
previous values, interleaved, medians.

``Saver.restore`` takes one extra step for its guarantee: before the first assign it reads every
variable's current value (copy-on-write reads, in batched ops) so it can put them back if a later
tensor fails. Run B skips exactly that read (the rollback is then impossible, so B exists only
here); everything else is the shipped code path. Usage::

    python bench/restore_ab.py --workloads mix,many --size-gib 1 --runs 5
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpusaver  # noqa: E402
from gpusaver.bench import GiB, Workload  # noqa: E402
from gpusaver.bench.cpu import build_variables  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="mix,many")
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="gpusaver-restore-ab-")
    try:
        for kind in args.workloads.split(","):
            workload = Workload(kind, int(args.size_gib * GiB))
            variables = build_variables(workload)
            saver = gpusaver.Saver(variables)
            prefix = saver.save(os.path.join(scratch, kind))
            hold = saver._read_all  # the previous-value read that makes restore all-or-nothing

            def restore(with_hold: bool, saver=saver) -> float:
                saver._read_all = hold if with_hold else (lambda: [])
                started = time.perf_counter()
                saver.restore(prefix)
                return time.perf_counter() - started

            restore(True), restore(False)  # warm-up: page cache, traced ops
            times = {True: [], False: []}
            hold_only = []
            for _ in range(args.runs):
                for with_hold in (True, False):
                    times[with_hold].append(restore(with_hold))
                started = time.perf_counter()
                hold()
                hold_only.append(time.perf_counter() - started)
            saver._read_all = hold
            a, b = statistics.median(times[True]), statistics.median(times[False])
            print(f"{kind}: {len(variables)} variables, {workload.size_bytes / GiB:.2f} GiB; medians of {args.runs}: "
                  f"restore {a:.3f} s all-or-nothing vs {b:.3f} s without the hold "
                  f"({100 * (a - b) / b:+.1f}%); the hold alone {statistics.median(hold_only) * 1e3:.1f} ms")
            del saver, variables
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
