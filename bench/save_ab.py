#!/usr/bin/env python3
"""``gpusaver.Saver.save`` of this checkout against another one (``--baseline``), interleaved.

Each round starts one child process per checkout, in alternating order; a child builds the
workload's TF variables, then times ``Saver.save`` and the plain write of the same bytes (page
cache; each run after :func:`gpusaver.bench.disk.warm_free_memory`, into a fresh folder). The
medians over every round are printed side by side, with the save as a share of the plain write.
A save path change shows against the VM's drift this way, which separate bench runs hide.
Usage::

    python bench/save_ab.py --baseline ../gpusaver-old --workloads small,many --rounds 4 --runs 3 [--snapshot copy]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import gpusaver
from gpusaver.bench import GiB, Workload
from gpusaver.bench.cpu import build_variables
from gpusaver.bench.disk import fresh, warm_free_memory
name, runs, scratch, snapshot, tiny = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "tiny"
workload = Workload(name, (4 << 20) if tiny else GiB, "float32", tiny=tiny)  # "many": 30,000 tensors of 8 KiB
variables = build_variables(workload)
saver = gpusaver.Saver(variables, options=gpusaver.Options(snapshot=snapshot))
flat = np.concatenate([v.numpy().reshape(-1).view(np.uint8) for v in variables.values()])
def plain():
    with open(os.path.join(scratch, "plain"), "wb") as f:
        for start in range(0, len(flat), 64 << 20):
            f.write(flat[start:start + (64 << 20)])
out = {"save": [], "plain": []}
for run in range(runs + 1):  # the first is a warm-up
    for what, call in (("save", lambda: saver.save(os.path.join(scratch, "ckpt"))), ("plain", plain)):
        fresh(scratch)
        warm_free_memory(2 * flat.nbytes)
        started = time.perf_counter()
        call()
        if run:
            out[what].append(time.perf_counter() - started)
print("RESULT " + json.dumps(out))
"""


def _child(checkout: str, workload: str, runs: int, scratch: str, snapshot: str, tiny: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout)
    proc = subprocess.run([sys.executable, "-c", _CHILD, workload, str(runs), scratch, snapshot, "tiny" if tiny else "-"],
                          env=env, capture_output=True, text=True, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"child for {checkout} ({workload}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="root of the other gpusaver checkout")
    p.add_argument("--workloads", default="small,many", help="mix, small and/or many (as gpusaver bench)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=3, help="timed saves per child (after one warm-up)")
    p.add_argument("--snapshot", default="auto", help="the Saver's Options(snapshot=...): auto, copy or host")
    p.add_argument("--tiny", action="store_true", help="the workloads at 4 MiB (a smoke test)")
    args = p.parse_args(argv)
    checkouts = {"this": here, "baseline": os.path.abspath(args.baseline)}
    for workload in args.workloads.split(","):
        times = {k: {"save": [], "plain": []} for k in checkouts}
        with tempfile.TemporaryDirectory(prefix="save_ab-") as scratch:
            for r in range(args.rounds):
                for key in (list(checkouts) if r % 2 == 0 else list(checkouts)[::-1]):
                    for what, values in _child(checkouts[key], workload, args.runs, scratch, args.snapshot,
                                                         args.tiny).items():
                        times[key][what] += values
        print(f"{workload}, snapshot={args.snapshot}: medians of {args.rounds * args.runs}")
        for key, t in times.items():
            save, plain = statistics.median(t["save"]), statistics.median(t["plain"])
            print(f"  {key:9s} Saver.save {save:.3f} s  plain write {plain:.3f} s  save = {plain / save:.0%} of "
                  f"the plain write's speed  (saves {min(t['save']):.3f}-{max(t['save']):.3f} s)")


if __name__ == "__main__":
    main()
