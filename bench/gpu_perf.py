#!/usr/bin/env python3
"""gpusaver's CUDA path against the link, same bytes, same run (for bench/gpu_check.py).

``python3 bench/gpu_perf.py OUT.json [--quick] [--only mix,large8,small10k,mix_bf16] [--skip-unpacked-e2e]``.
Per workload — ``mix`` (1 GiB: 16 large + 2000
small), ``large8`` (8 GiB in 16 tensors), ``small10k`` (10,000 tensors of 4–64 KiB), float32, and
``mix`` in bfloat16 — it times, as medians after a warm-up:

- raw pinned D2H / H2D of the same bytes (one ``cudaMemcpyAsync`` per tensor into one pinned
  buffer, CUDA events), and a device-to-device copy;
- staging only: every chunk of a save staged into host buffers (bounded pinned pool, and the
  host-mode arena) and handed back, no file;
- upload only: the restore's pinned-buffer → device upload loop, no file;
- small tensors: packed staging against one copy each, and restore packed against one upload each;
- device CRC32C: GB/s on large chunks, µs per small tensor;
- first save against later saves (page-locking, kernel compiles);
- end to end: ``gpusaver.save`` / ``gpusaver.load(device="cuda:0")`` beside a plain write / read.
"""
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from gpusaver.bench.gpu import raw_copy  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def shapes(workload: str, quick: bool) -> list[int]:
    """Element counts per tensor (4-byte elements unless the dtype says otherwise)."""
    rng = np.random.default_rng(0)
    scale = 16 if quick else 1
    if workload.startswith("mix"):
        small = [int(x) for x in rng.integers(256, 4096, 2000 // scale)]
        large = (GiB // scale - 4 * sum(small)) // 16 // 4
        return [large] * 16 + small
    if workload == "large8":
        return [8 * GiB // (16 if quick else 1) // 16 // 4] * 16
    if workload == "small10k":
        return [int(x) for x in rng.integers(1024, 16 * 1024 + 1, 10_000 // scale)]
    raise ValueError(workload)


def median_of(fn, runs: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = [fn() for _ in range(runs)]
    return {"median_s": statistics.median(times), "runs_s": times}


class Bench:
    def __init__(self, quick: bool):
        import cupy
        self.cp, self.quick = cupy, quick
        self.runs = 3 if quick else 5
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def arrays(self, workload: str):
        cp = self.cp
        dtype = "bfloat16" if workload.endswith("bf16") else "float32"
        out = {}
        for i, n in enumerate(shapes(workload, self.quick)):
            a = cp.random.random(n, dtype=cp.float32)
            if dtype == "bfloat16":
                import ml_dtypes
                a = (a.view(cp.uint32) >> 16).astype(cp.uint16).view(ml_dtypes.bfloat16)[: n]
            out[f"t{i:05d}"] = a
        cp.cuda.Device().synchronize()
        return out

    def events(self, fn) -> float:
        cp, s = self.cp, self.stream
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(s)
        fn(s)
        end.record(s)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3

    def raw_copies(self, arrays: dict) -> dict:
        cp = self.cp
        rt = cp.cuda.runtime
        total = sum(a.nbytes for a in arrays.values())
        pinned = cp.cuda.alloc_pinned_memory(total)
        dev = cp.empty(total, dtype=cp.uint8)
        d2h, h2d, d2d, off = [], [], [], 0
        for a in arrays.values():
            d2h.append((pinned.ptr + off, a.data.ptr, a.nbytes))
            h2d.append((dev.data.ptr + off, pinned.ptr + off, a.nbytes))
            d2d.append((dev.data.ptr + off, a.data.ptr, a.nbytes))
            off += a.nbytes

        def run(pairs, kind, clock="seconds"):  # "seconds": CUDA events; "wall_s": enqueue and wait
            return lambda: raw_copy(cp, pairs, kind, self.stream)[clock]

        out = {"raw_d2h": median_of(run(d2h, rt.memcpyDeviceToHost), self.runs),
               "raw_h2d": median_of(run(h2d, rt.memcpyHostToDevice), self.runs),
               "raw_d2d": median_of(run(d2d, rt.memcpyDeviceToDevice), self.runs),
               "raw_d2h_wall": median_of(run(d2h, rt.memcpyDeviceToHost, "wall_s"), self.runs)}
        del pinned, dev
        return out

    def staging_only(self, arrays: dict, options, mode: str, profile: bool = False) -> dict:
        """Every chunk of a save staged and handed back; the writer is replaced by a release."""
        from gpusaver.staging.stager import Stager
        stager = Stager(options)

        def once():
            values = dict(arrays)
            t0 = time.perf_counter()
            ready = stager.hold(values)
            items = stager.describe(values, lambda a: a, ready)
            buffers = stager.buffers(items, mode, ready)
            session = buffers.session(items)
            for item in items:
                for chunk in session.chunks(item, lambda: False):
                    chunk.release()
            seconds = time.perf_counter() - t0
            buffers.close()
            return seconds

        first = once()
        result = median_of(once, self.runs, warmup=0)
        result["first_s"] = first
        if profile:
            result["profile"] = profiled(once)
        return result

    def upload_only(self, nbytes: int, options) -> dict:
        from gpusaver.staging.stager import Stager
        cp = self.cp
        engine = Stager(options).cuda()
        out = cp.empty(nbytes, dtype=cp.uint8)
        copy, _ = engine.streams(0)

        def once():
            t0 = time.perf_counter()
            with copy:
                engine.upload_into(out, lambda view, start: None, copy)
            copy.synchronize()
            return time.perf_counter() - t0

        return median_of(once, self.runs)

    def crc(self) -> dict:
        from gpusaver.staging.cuda import kernels
        cp = self.cp
        big = cp.random.randint(0, 255, 256 * MiB, dtype=cp.uint8)
        small = cp.random.randint(0, 255, 4096, dtype=cp.uint8)
        t0 = time.perf_counter()
        kernels.load_kernels()  # NVRTC compile (or CuPy's disk cache), once per process
        compile_s = time.perf_counter() - t0
        kernels.device_crc32c(big)
        large = median_of(lambda: self.events(lambda s: kernels.crc32c_start(big, stream=s)), self.runs)

        def smalls():
            t0 = time.perf_counter()
            for _ in range(1000):
                kernels.device_crc32c(small)
            return (time.perf_counter() - t0) / 1000

        return {"first_kernel_load_s": compile_s, "large_256MiB": large,
                "gbps": big.nbytes / large["median_s"] / 1e9,
                "small_4KiB_us": median_of(smalls, self.runs)["median_s"] * 1e6}

    def end_to_end(self, arrays: dict, directory: str, options) -> dict:
        import gpusaver
        cp = self.cp
        prefix = os.path.join(directory, "e2e")
        total = sum(a.nbytes for a in arrays.values())

        def save():
            t0 = time.perf_counter()
            gpusaver.save(prefix, arrays, options)
            return time.perf_counter() - t0

        def load():
            t0 = time.perf_counter()
            gpusaver.load(prefix, device="cuda:0", options=options)
            cp.cuda.Device().synchronize()
            return time.perf_counter() - t0

        blob = np.random.default_rng(0).integers(0, 255, total, dtype=np.uint8)
        path = os.path.join(directory, "plain.bin")

        def write():
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                f.write(blob)
            return time.perf_counter() - t0

        def read():
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                f.readinto(memoryview(np.empty(total, np.uint8)))
            return time.perf_counter() - t0

        out = {"save": median_of(save, self.runs), "plain_write": median_of(write, self.runs),
               "load": median_of(load, self.runs), "plain_read": median_of(read, self.runs)}
        if len(arrays) > 5000:
            out["save_profile"], out["load_profile"] = profiled(save), profiled(load)
        loaded = gpusaver.load(prefix, device="cuda:0", options=options)
        out["load_correct"] = all(bool(cp.array_equal(loaded[k].view(cp.uint8), v.view(cp.uint8)))
                                  for k, v in arrays.items())
        os.remove(path)
        return out


def profiled(fn, top: int = 22) -> str:
    """Where the time goes: cProfile's functions by own time, as text."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()[-6000:]


def gbps(nbytes, seconds):
    return round(nbytes / seconds / 1e9, 2) if seconds else None


def run_workload(b: Bench, workload: str, directory: str, record: dict, unpacked_e2e: bool = True):
    import gpusaver
    arrays = b.arrays(workload)
    total = sum(a.nbytes for a in arrays.values())
    w = record.setdefault(workload, {"nbytes": total, "num_tensors": len(arrays)})
    w["raw"] = b.raw_copies(arrays)
    opts = gpusaver.Options()
    for mode in ("copy", "host"):
        w[f"staging_{mode}"] = b.staging_only(arrays, opts, mode)
    if workload == "small10k":
        w["staging_unpacked"] = b.staging_only(arrays, gpusaver.Options(pack_threshold=0), "copy")
        w["staging_profile"] = b.staging_only(arrays, opts, "copy", profile=True)["profile"]
    w["upload_only"] = b.upload_only(total, opts)
    if workload != "large8":
        w["e2e"] = b.end_to_end(arrays, directory, opts)
        if workload == "small10k" and unpacked_e2e:
            w["e2e_unpacked"] = b.end_to_end(arrays, directory, gpusaver.Options(pack_threshold=0))
    raw_d2h, raw_h2d = w["raw"]["raw_d2h"]["median_s"], w["raw"]["raw_h2d"]["median_s"]
    w["summary"] = {
        "raw_d2h_GBps": gbps(total, raw_d2h), "raw_h2d_GBps": gbps(total, raw_h2d),
        "staging_copy_GBps": gbps(total, w["staging_copy"]["median_s"]),
        "staging_host_GBps": gbps(total, w["staging_host"]["median_s"]),
        "staging_vs_raw_d2h": round(raw_d2h / w["staging_copy"]["median_s"], 3),
        "staging_host_vs_raw_d2h": round(raw_d2h / w["staging_host"]["median_s"], 3),
        "upload_vs_raw_h2d": round(raw_h2d / w["upload_only"]["median_s"], 3),
        "first_host_save_s": w["staging_host"]["first_s"],
    }
    if "staging_unpacked" in w:
        w["summary"]["packed_speedup"] = round(w["staging_unpacked"]["median_s"] / w["staging_copy"]["median_s"], 2)
    if "e2e_unpacked" in w:
        w["summary"]["restore_packed_speedup"] = round(
            w["e2e_unpacked"]["load"]["median_s"] / w["e2e"]["load"]["median_s"], 2)
    print(f"[perf] {workload}: {json.dumps(w['summary'])}", flush=True)
    del arrays
    b.cp.get_default_memory_pool().free_all_blocks()


def main(argv):
    out_path = argv[0] if argv and not argv[0].startswith("--") else "perf.json"
    quick = "--quick" in argv
    only = argv[argv.index("--only") + 1].split(",") if "--only" in argv else None
    workloads = [w for w in ("mix", "large8", "small10k", "mix_bf16") if only is None or w in only]
    b = Bench(quick)
    cp = b.cp
    props = cp.cuda.runtime.getDeviceProperties(0)
    record = {"device": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
              "quick": quick, "runs": b.runs}
    directory = tempfile.mkdtemp(prefix="gpusaver-perf-")
    try:
        record["crc"] = b.crc()
        print(f"[perf] crc: {record['crc']['gbps']:.0f} GB/s, {record['crc']['small_4KiB_us']:.1f} us per 4 KiB",
              flush=True)
        for w in workloads:
            try:
                run_workload(b, w, directory, record, unpacked_e2e="--skip-unpacked-e2e" not in argv)
            except Exception as e:  # noqa: BLE001 — record and go on to the next workload
                import traceback
                record[w] = {"error": traceback.format_exc()[-3000:]}
                print(f"[perf] {w}: FAILED {type(e).__name__}: {e}", flush=True)
            with open(out_path, "w") as f:
                json.dump(record, f, indent=1, default=str)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        with open(out_path, "w") as f:
            json.dump(record, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
