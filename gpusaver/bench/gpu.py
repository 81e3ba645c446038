"""GPU bench: CuPy arrays through ``gpusaver.save`` / ``gpusaver.load(device="cuda:0")`` beside raw copies.

In the same run and on the same tensors it times raw pinned copies (each tensor ``cudaMemcpyAsync``-ed
into / out of one ``cupy.cuda.alloc_pinned_memory`` buffer, CUDA events around the lot), so the ratio
"gpusaver / raw" says how close the staging pipeline gets to what the link gives Python. It also reports
the PCIe link's theoretical rate from NVML and the pack effect: 10,000 tensors of 4 KiB saved with and
without the device-side gather (``Options(pack_threshold=...)``).

Needs CuPy and a GPU; imports neither TensorFlow nor (until :func:`bench_gpu` runs) CuPy, so nothing
else in gpusaver depends on this module.
"""
import os
import shutil
import time

import gpusaver
from gpusaver.bench import Case, Workload, interleave, summary, timed

PACK_TENSORS, PACK_BYTES = 10_000, 4096


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise ImportError("the GPU bench needs CuPy: pip install gpusaver[cuda]") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver: CuPy raises its own CUDARuntimeError
        raise RuntimeError(f"the GPU bench needs a CUDA GPU: {e}") from e
    if count < 1:
        raise RuntimeError("the GPU bench needs a CUDA GPU; CuPy sees none")
    return cupy


def _fresh(directory: str):
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.sync()


def raw_copy(cupy, pairs: list[tuple[int, int, int]], kind: int, stream) -> dict[str, float]:
    """Copy (dst pointer, src pointer, bytes) pairs in order on ``stream``; time with CUDA events.

    Events measure the copies as the GPU ran them; "wall_s" adds the host's enqueue and wait.
    """
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    t0 = time.perf_counter()
    start.record(stream)
    for dst, src, n in pairs:
        cupy.cuda.runtime.memcpyAsync(dst, src, n, kind, stream.ptr)
    end.record(stream)
    end.synchronize()
    return {"seconds": cupy.cuda.get_elapsed_time(start, end) / 1e3, "wall_s": time.perf_counter() - t0}


def _arrays(cupy, workload: Workload) -> dict:
    rng = cupy.random.RandomState(0)
    return {name: rng.random_sample(shape, dtype=cupy.float32) for name, shape in workload.shapes().items()}


def _gpu_cases(cupy, arrays: dict, directory: str) -> tuple[list[Case], bool]:
    """gpusaver save/load and raw pinned D2H/H2D of the same tensors; also checks one load's values."""
    runtime = cupy.cuda.runtime
    total = sum(a.nbytes for a in arrays.values())
    pinned = cupy.cuda.alloc_pinned_memory(total)  # raw copies' host side, page-locked once, reused
    device_dst = cupy.empty(total, dtype=cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    d2h, h2d, offset = [], [], 0
    for a in arrays.values():
        d2h.append((pinned.ptr + offset, a.data.ptr, a.nbytes))
        h2d.append((device_dst.data.ptr + offset, pinned.ptr + offset, a.nbytes))
        offset += a.nbytes
    prefix = os.path.join(directory, "ckpt")
    gpusaver.save(prefix, arrays)
    loaded = gpusaver.load(prefix, device="cuda:0")
    correct = all(bool(cupy.array_equal(loaded[n], a)) for n, a in arrays.items())
    del loaded

    def load():
        gpusaver.load(prefix, device="cuda:0")
        cupy.cuda.Device().synchronize()  # the uploads are complete, not just enqueued

    cases = [
        Case("gpusaver.save cuda", "save", lambda: timed(lambda: gpusaver.save(prefix, arrays)),
             lambda: _fresh(directory)),
        Case("raw pinned D2H", "save", lambda: raw_copy(cupy, d2h, runtime.memcpyDeviceToHost, stream)),
        Case("gpusaver.load cuda:0", "restore", lambda: timed(load), os.sync),
        Case("raw pinned H2D", "restore", lambda: raw_copy(cupy, h2d, runtime.memcpyHostToDevice, stream)),
    ]
    return cases, correct


def _pack_cases(cupy, directory: str) -> list[Case]:
    """10,000 tensors of 4 KiB: gathered on the device (pack) against one copy per tensor."""
    arrays = {f"t{i:05d}": cupy.full(PACK_BYTES // 4, i, dtype=cupy.float32) for i in range(PACK_TENSORS)}
    cases = []
    for threshold in (64 * 1024, 0):
        opts = gpusaver.Options(pack_threshold=threshold)
        d = os.path.join(directory, f"pack{threshold}")
        cases.append(Case(f"save {PACK_TENSORS}x4KiB pack_threshold={threshold}", "save",
                          lambda o=opts, d=d: timed(lambda: gpusaver.save(os.path.join(d, "ckpt"), arrays, o)),
                          lambda d=d: _fresh(d)))
    return cases


def _link() -> tuple[list[dict], float | None]:
    try:  # NVML facts are advisory; a missing module or driver is not a bench failure
        import dataclasses
        from gpusaver.bench import nvml
        infos = [dataclasses.asdict(g) if dataclasses.is_dataclass(g) else dict(g) for g in nvml.device_info()]
    except Exception as e:
        return [{"error": f"{type(e).__name__}: {e}"}], None
    return infos, (infos[0].get("theoretical_link_bytes_per_s") if infos else None)


def bench_gpu(workloads: list[Workload], runs: int, warmup: int, scratch: str, progress=print) -> dict:
    """Time the GPU contenders on each float32 workload, then the pack effect. Returns the raw record."""
    cupy = _cupy()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    nvml_info, link = _link()
    record = {"device": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
              "nvml": nvml_info, "link_bytes_per_s": link, "workloads": [], "skipped": []}
    for w in workloads:
        if w.dtype != "float32":  # CuPy has no bfloat16 arrays
            record["skipped"].append(f"{w.label}: CuPy has no {w.dtype}")
            continue
        progress(f"[gpu] {w.label}")
        arrays = _arrays(cupy, w)
        cases, correct = _gpu_cases(cupy, arrays, os.path.join(scratch, "gpu"))
        record["workloads"].append({"label": w.label, "nbytes": w.nbytes, "num_tensors": len(arrays),
                                    "load_correct": correct, "cases": interleave(cases, runs, warmup, progress)})
        del arrays, cases
        cupy.get_default_memory_pool().free_all_blocks()
    progress("[gpu] pack effect")
    pack = interleave(_pack_cases(cupy, os.path.join(scratch, "pack")), runs, warmup, progress)
    record["pack"] = {"nbytes": PACK_TENSORS * PACK_BYTES, "cases": pack}
    shutil.rmtree(scratch, ignore_errors=True)
    return record


# --- report -------------------------------------------------------------------------------------
def _gbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def markdown_lines(record: dict) -> list[str]:
    """The GPU section of results.md: GB/s per case, ratios to the raw copies and to the link."""
    link = record.get("link_bytes_per_s")
    lines = [f"## GPU: {record['device']} (PCIe theoretical {link / 1e9:.1f} GB/s per direction)" if link
             else f"## GPU: {record['device']} (PCIe rate unknown to NVML)", ""]
    for w in record["workloads"]:
        med = {n: summary([r["seconds"] for r in c["runs"]])["median"] for n, c in w["cases"].items()}
        gbs = {n: _gbs(w["nbytes"], s) for n, s in med.items()}
        lines += [f"### {w['label']} — {w['num_tensors']} tensors, load values correct: {w['load_correct']}", "",
                  "| case | median s | GB/s | vs raw pinned copy | vs link |", "|---|---:|---:|---:|---:|"]
        raw = {"save": gbs.get("raw pinned D2H"), "restore": gbs.get("raw pinned H2D")}
        for name, case in w["cases"].items():
            ref = raw[case["phase"]]
            lines.append(f"| {name} | {med[name]:.4f} | {gbs[name]:.2f} | {gbs[name] / ref:.0%} | "
                         f"{(gbs[name] * 1e9 / link) if link else float('nan'):.0%} |")
        lines.append("")
    lines += ["Targets (end to end, so file I/O counts against gpusaver): save ≥ 85% of raw D2H, "
              "load ≥ 80% of raw H2D.", ""]
    pack = record.get("pack")
    if pack:
        lines += [f"### pack effect: {PACK_TENSORS} tensors of {PACK_BYTES} bytes", "",
                  "| case | median s | GB/s |", "|---|---:|---:|"]
        for name, case in pack["cases"].items():
            s = summary([r["seconds"] for r in case["runs"]])["median"]
            lines.append(f"| {name} | {s:.4f} | {_gbs(pack['nbytes'], s):.3f} |")
    lines += [f"- skipped: {s}" for s in record.get("skipped", [])]
    return lines
