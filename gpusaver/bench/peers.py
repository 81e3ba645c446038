"""Peers bench, without TensorFlow: gpusaver's core beside what a user would pick instead.

The same numpy arrays go through ``gpusaver.save`` / ``gpusaver.load`` (a CRC32C written per tensor
and verified on load), ``safetensors.numpy.save_file`` / ``load_file``, ``torch.save`` /
``torch.load`` and torch DCP (``torch.distributed.checkpoint``, one process) on zero-copy torch
views, and ``np.savez`` / ``np.load``, beside a plain write and read-back of the same bytes: same
disk, one run, interleaved, medians. A peer that is not installed (or refuses the dtype) is skipped
with the reason printed, never failing the run. Every peer's load is checked once, untimed, against
the saved values.

``--baseline DIR`` adds another gpusaver checkout (e.g. the previous commit) as a contender, run in
a child process that imports gpusaver from DIR, so before/after figures come from one run.

Run as ``python -m gpusaver.bench.peers --workloads mix,many`` (or ``bench/cpu_bench.py --peers``).
"""
import argparse
import gc
import os
import shlex
import sys

import numpy as np

from gpusaver.bench import GiB, MiB, Case, Workload, interleave
from gpusaver.bench.disk import fresh, fresh_folder, limit_cases, slug, warm_free_memory
from gpusaver.bench.peer_impls import Baseline, available_peers, fingerprints

CORE = "gpusaver (core)"


def build_arrays(workload: Workload, seed: int = 0) -> dict[str, np.ndarray]:
    """{name: numpy array}: the values cpu.py gives its TF variables (same generator, same seed)."""
    import ml_dtypes
    rng = np.random.default_rng(seed)
    dtype = ml_dtypes.bfloat16 if workload.dtype == "bfloat16" else np.float32
    return {name: rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
            for name, shape in workload.shapes().items()}


def bench_peers(workload: Workload, runs: int, warmup: int, scratch: str, baseline: str | None = None,
                progress=print) -> dict:
    """Time the core and every available peer on ``workload``; return the raw record (report.py)."""
    progress(f"[peers] {workload.label}: building arrays")
    arrays = build_arrays(workload)
    expected = fingerprints(arrays)
    nbytes = sum(a.nbytes for a in arrays.values())
    peers, skipped = available_peers(arrays, workload)
    if baseline:
        peers[f"gpusaver (baseline {os.path.basename(os.path.abspath(baseline))})"] = Baseline(baseline, workload)
    root = os.path.join(scratch, "out")
    target = {name: os.path.join(root, slug(name)) for name in peers}

    def clean_slate():
        # Every contender's output goes, dirty pages are flushed, free memory is warm: each save
        # starts alike (see cpu.py's clean_slate).
        fresh(root)
        warm_free_memory(2 * nbytes)

    def before_load():
        os.sync()
        warm_free_memory(2 * nbytes)

    # One untimed round first: the load must give back the saved values, and a peer that cannot
    # take these arrays (a dtype it lacks) is skipped with its error rather than failing the run.
    correct = {}
    for name in list(peers):
        clean_slate()
        try:
            os.makedirs(target[name])
            peers[name].save(target[name])
            correct[name] = peers[name].check(target[name], expected)
        except Exception as e:  # noqa: BLE001 — any failure of a peer is a reason to skip it
            skipped[name] = f"{type(e).__name__}: {e}"
            peers.pop(name).close()
    for name, why in skipped.items():
        progress(f"[peers] skipping {name}: {why}")

    def save_case(name):
        def setup():
            clean_slate()
            os.makedirs(target[name])
        return Case(f"{name} save", "save", lambda: peers[name].timed_save(target[name]), setup)

    limits = [c for c in limit_cases(nbytes, os.path.join(root, "limit", "plain.bin"), clean_slate, before_load)
              if c.name in ("limit: write", "limit: read")]
    progress(f"[peers] {workload.label}: save phase")
    results = interleave([save_case(n) for n in peers] + limits[:1], runs, warmup, progress)

    clean_slate()  # the loads read files written once more here, then flushed
    for name in peers:
        os.makedirs(target[name])
        peers[name].save(target[name])
    limits[0].run()
    os.sync()
    progress(f"[peers] {workload.label}: load phase")
    load_cases = [Case(f"{n} load", "restore", (lambda n=n: peers[n].timed_load(target[n])), before_load)
                  for n in peers]
    results.update(interleave(load_cases + limits[1:], runs, warmup, progress))
    for p in peers.values():
        p.close()
    peers.clear()
    del arrays
    gc.collect()
    fresh(scratch)
    return {"workload": workload.kind, "size_bytes": workload.size_bytes, "dtype": workload.dtype,
            "nbytes": nbytes, "num_tensors": len(expected), "label": workload.label, "cases": results,
            "load_correct": correct, "skipped": skipped}


# --- report ------------------------------------------------------------------------------------
CORE_US_TARGET = 10  # µs per tensor over the plain write / read, on the many workload (DESIGN.md)


def _contenders(record: dict) -> list[str]:
    return list(dict.fromkeys(n.rsplit(" ", 1)[0] for n in record["cases"] if not n.startswith("limit:")))


def _median(record: dict, case: str) -> float | None:
    from gpusaver.bench.report import metric
    return metric(record["cases"][case])["median"] if case in record["cases"] else None


def markdown_lines(records: list[dict]) -> list[str]:
    """One table per workload: save and load medians, GiB/s and µs per tensor over the limits."""
    from gpusaver.bench.report import _f, metric, per_tensor_us
    lines = []
    for r in records:
        lines += [f"## Without TensorFlow: {r['label']} — {r['num_tensors']} tensors, {r['nbytes'] / MiB:.1f} MiB",
                  "", "Numpy arrays; the core writes and verifies a CRC32C per tensor, the peers check nothing. "
                  "µs/tensor = (median − plain write or read median) / tensors.", "",
                  "| contender | save s (min–max) | load s (min–max) | save GiB/s | load GiB/s "
                  "| save µs/tensor | load µs/tensor | load ok |", "|---|---:|---:|---:|---:|---:|---:|:-:|"]
        for name in _contenders(r) + ["limit"]:
            cells = []
            for case in ((f"{name} save", f"{name} load") if name != "limit" else ("limit: write", "limit: read")):
                m = metric(r["cases"][case]) if case in r["cases"] else {"median": None, "min": None, "max": None}
                cells.append((case, m))
            ok = {True: "yes", False: "**NO**", None: ""}[r["load_correct"].get(name)]
            times = [f"{_f(m['median'], '.3f')} ({_f(m['min'], '.3f')}–{_f(m['max'], '.3f')})" for _, m in cells]
            speeds = [_f(r["nbytes"] / GiB / m["median"] if m["median"] else None, ".2f") for _, m in cells]
            costs = [_f(per_tensor_us(r, case) if case in r["cases"] else None, ".1f") for case, _ in cells]
            label = "plain write / read" if name == "limit" else name
            lines.append(f"| {label} | {' | '.join(times)} | {' | '.join(speeds)} | {' | '.join(costs)} | {ok} |")
        lines += [f"- skipped {n}: {why}" for n, why in r["skipped"].items()]
        lines.append("")
    return lines


def targets(record: dict) -> list[dict]:
    """PASS/MISS: the core at least as fast as the fastest peer (save, load); on the many workload,
    at most :data:`CORE_US_TARGET` µs per tensor over the plain write / read."""
    from gpusaver.bench.report import per_tensor_us
    out = []
    peers = [n for n in _contenders(record) if n != CORE and not n.startswith("gpusaver (baseline")]
    for op in ("save", "load"):
        core = _median(record, f"{CORE} {op}")
        best = min(((t, n) for n in peers if (t := _median(record, f"{n} {op}")) is not None), default=None)
        if core and best:
            out.append({"workload": record["label"], "target": f"core {op} at least as fast as every peer",
                        "ratio": best[0] / core, "pass": core <= best[0],
                        "detail": f"core {core:.3f} s vs fastest peer {best[1]} {best[0]:.3f} s"})
        if record["workload"] == "many" and f"{CORE} {op}" in record["cases"]:
            us = per_tensor_us(record, f"{CORE} {op}")
            if us is not None:
                out.append({"workload": record["label"], "ratio": us / CORE_US_TARGET, "pass": us <= CORE_US_TARGET,
                            "target": f"core {op} <= {CORE_US_TARGET} us per tensor over plain "
                                      f"{'write' if op == 'save' else 'read'}",
                            "detail": f"{us:.1f} us x {record['num_tensors']} tensors"})
    return out


def main(argv=None) -> int:
    """``python -m gpusaver.bench.peers``: run, print the markdown, write results.json and .md."""
    from gpusaver.bench import WORKLOADS, report
    p = argparse.ArgumentParser(prog="python -m gpusaver.bench.peers", description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="mix,many", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--sizes", default="1", help="GiB, comma-separated (many: 30,000 tensors per GiB)")
    p.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16")
    p.add_argument("--runs", type=int, default=None, help="counted runs (default 3; 1 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="uncounted runs first (default 1; 0 with --tiny)")
    p.add_argument("--out", default=None, help="output directory (default: a new ./gpusaver-peers-DATE-TIME)")
    p.add_argument("--scratch", default=None, help="where files are written (default OUT/scratch.tmp)")
    p.add_argument("--tiny", action="store_true", help="a few MiB, 1 run: a smoke test")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="another gpusaver checkout (its root) to time beside this one")
    a = p.parse_args(argv)
    kinds = [k.strip() for k in a.workloads.split(",") if k.strip()]
    for bad in set(kinds) - set(WORKLOADS):
        raise SystemExit(f"unknown workload {bad!r} (known: {', '.join(WORKLOADS)})")
    sizes = [4 * MiB] if a.tiny else [int(float(s) * GiB) for s in a.sizes.split(",") if s.strip()]
    workloads = [Workload(k, s, d.strip(), tiny=a.tiny) for s in sizes for k in kinds for d in a.dtypes.split(",")]
    runs = a.runs if a.runs is not None else (1 if a.tiny else 3)
    warmup = a.warmup if a.warmup is not None else (0 if a.tiny else 1)
    out = a.out or fresh_folder(stem="gpusaver-peers")
    scratch = a.scratch or os.path.join(out, "scratch.tmp")
    records = [bench_peers(w, runs, warmup, os.path.join(scratch, slug(w.label)), a.baseline) for w in workloads]
    if not a.scratch:
        fresh(scratch)
        os.rmdir(scratch)
    command = "python -m gpusaver.bench.peers " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    result = report.assemble([], None, out, command, {"workloads": [w.label for w in workloads], "runs": runs,
                                                      "warmup": warmup, "tiny": a.tiny}, peers=records)
    paths = report.write_all(result, out)
    print(report.markdown(result))
    print("wrote " + ", ".join(paths.values()))
    bad = [f"{r['label']}: {n} loaded wrong values" for r in records for n, ok in r["load_correct"].items() if not ok]
    for line in bad:
        print(f"ERROR: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
