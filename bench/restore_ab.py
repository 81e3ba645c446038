#!/usr/bin/env python3
"""What all-or-nothing costs ``Saver.restore``: the same restore with and without holding the
previous values, interleaved, medians.

``Saver.restore`` keeps every variable's previous value from just before it is assigned until the
restore is done (copy-on-write reads: a group's traced call pushes them onto a TF stack, other
values are read in batched ops; see gpusaver.tf.assign), so it can put them back if anything
fails. Run B assigns through an Assigner that keeps nothing (the rollback is then impossible, so B
exists only here); everything else is the shipped code path. A and B alternate which goes first.
For scale, the last figure is one read of every variable at once, which is what the hold cost
before it moved into the groups' calls. Usage::

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
from gpusaver.tf import saver as saver_module  # noqa: E402
from gpusaver.tf.assign import Assigner  # noqa: E402


def _keeping_nothing(**_):
    """An Assigner as Saver.restore makes one, minus the previous values it would keep."""
    return Assigner()


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

            def restore(with_hold: bool, saver=saver) -> float:
                saver_module.Assigner = Assigner if with_hold else _keeping_nothing
                try:
                    started = time.perf_counter()
                    saver.restore(prefix)
                    return time.perf_counter() - started
                finally:
                    saver_module.Assigner = Assigner

            restore(True), restore(False)  # warm-up: page cache, traced ops
            times = {True: [], False: []}
            read_all = []
            for run in range(args.runs):
                # Each in turn first: a restore that kept values leaves the variables in the
                # buffers it allocated, and the next restore, of either kind, starts from those.
                for with_hold in ((True, False) if run % 2 == 0 else (False, True)):
                    times[with_hold].append(restore(with_hold))
                started = time.perf_counter()
                saver._read_all()
                read_all.append(time.perf_counter() - started)
            a, b = statistics.median(times[True]), statistics.median(times[False])
            print(f"{kind}: {len(variables)} variables, {workload.size_bytes / GiB:.2f} GiB; medians of {args.runs}: "
                  f"restore {a:.3f} s all-or-nothing vs {b:.3f} s without the hold "
                  f"({100 * (a - b) / b:+.1f}%); reading every variable at once "
                  f"{statistics.median(read_all) * 1e3:.1f} ms")
            del saver, variables
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
