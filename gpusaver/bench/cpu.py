"""CPU bench: gpusaver's Saver against TensorFlow's savers on the same host variables, in one run.

Contenders are interleaved (see :func:`gpusaver.bench.interleave`); every save starts from the same
state: its previous output removed and dirty pages flushed (``os.sync``) before the clock starts, so
no save pays for its predecessor's writeback. Page-cache saves, fsync'd saves and restores (from the
page cache) are separate phases. Raw limits (plain write, memcpy, read-back of the same number of
bytes) run interleaved with them. Peak host memory is measured per contender in a fresh child process
(``python -m gpusaver.bench.cpu --memory-child NAME ...``), because a process that already ran another
contender keeps freed memory in its allocator and would under-report the next one.
"""
import argparse
import concurrent.futures
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time

import crc32c
import ml_dtypes
import numpy as np
import tensorflow as tf

import gpusaver
from gpusaver.bench import GiB, MiB, Case, Workload, interleave, timed
from gpusaver.bench.disk import fresh, fsync_tree, limit_cases, slug, warm_free_memory



# --- the model ---------------------------------------------------------------------------------
def build_variables(workload: Workload, seed: int = 0) -> dict[str, tf.Variable]:
    """{name: tf.Variable} on the CPU with random values, one tensor generated at a time."""
    try:  # host variables only, even where TF sees a GPU: the GPU path is gpu.py's
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass  # TF already initialised; tf.device below still pins the variables
    rng = np.random.default_rng(seed)
    dtype = ml_dtypes.bfloat16 if workload.dtype == "bfloat16" else np.float32
    variables = {}
    with tf.device("/CPU:0"):
        for name, shape in workload.shapes().items():
            value = rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
            variables[name] = tf.Variable(value, name=name)
    return variables


def fingerprints(variables: dict) -> dict[str, int]:
    """{name: CRC32C of the variable's bytes}: compares values without keeping a second model copy."""
    return {name: crc32c.crc32c(v.numpy().reshape(-1).view(np.uint8)) for name, v in variables.items()}


def perturb(variables: dict):
    """Overwrite every variable, so a restore that does nothing cannot pass the correctness check."""
    for v in variables.values():
        v.assign(tf.zeros_like(v))


# --- contenders --------------------------------------------------------------------------------
def timed_async(start) -> dict[str, float]:
    """Time an asynchronous save: ``start()`` begins it and returns a callable that waits for it.

    "return_s" is the training loop's stall; "seconds" runs until the files are complete.
    """
    t0 = time.perf_counter()
    wait = start()
    t1 = time.perf_counter()
    wait()
    return {"return_s": t1 - t0, "seconds": time.perf_counter() - t0}


def contenders(variables: dict, nbytes: int) -> tuple[dict, dict]:
    """The contenders over ``variables``: (saves, restores).

    saves: {name: (phase, stall, fn(prefix) -> timings)}; restores: {name: (save contender whose
    checkpoint it reads, fn(prefix) -> timings)}. Saver objects are built once, outside the timing.
    """
    G = gpusaver.Saver
    g = G(variables, max_to_keep=None)
    g_async = G(variables, max_to_keep=None)
    g_copy = G(variables, max_to_keep=None,
               options=gpusaver.Options(snapshot="copy", buffer_budget=copy_budget(nbytes)))
    g_shards = G(variables, max_to_keep=None, options=gpusaver.Options(num_shards=2))
    g_fsync = G(variables, max_to_keep=None, options=gpusaver.Options(fsync=True))
    v1 = tf.compat.v1.train.Saver(variables, max_to_keep=None)
    ckpt = tf.train.Checkpoint(**variables)
    ckpt_async = tf.train.Checkpoint(**variables)  # its own object: the async helper keeps a CPU copy
    async_options = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)

    def tf_async_write(prefix):
        ckpt_async.write(prefix, options=async_options)
        return ckpt_async.sync  # TF 2.21: waits for the background write of this Checkpoint

    def v1_fsync(prefix):
        v1.save(None, prefix)
        fsync_tree(os.path.dirname(prefix))  # TF never fsyncs; do it after, as a user would have to

    saves = {
        "gpusaver save": ("save", True, lambda p: timed(lambda: g.save(p))),
        "gpusaver save_async": ("save", True, lambda p: timed_async(lambda: g_async.save_async(p).result)),
        "gpusaver save_async snapshot=copy": ("save", True,
                                              lambda p: timed_async(lambda: g_copy.save_async(p).result)),
        "gpusaver save 2 shards": ("save", True, lambda p: timed(lambda: g_shards.save(p))),
        "tf.compat.v1 Saver.save": ("save", True, lambda p: timed(lambda: v1.save(None, p))),
        "tf.train.Checkpoint.write": ("save", True, lambda p: timed(lambda: ckpt.write(p))),
        "tf.train.Checkpoint.write async": ("save", True, lambda p: timed_async(lambda: tf_async_write(p))),
        "gpusaver save fsync=True": ("fsync", True, lambda p: timed(lambda: g_fsync.save(p))),
        "tf.compat.v1 Saver.save + explicit fsync": ("fsync", True, lambda p: timed(lambda: v1_fsync(p))),
    }
    restores = {
        "gpusaver restore": ("gpusaver save", lambda p: timed(lambda: g.restore(p))),
        "gpusaver restore 2 shards": ("gpusaver save 2 shards", lambda p: timed(lambda: g_shards.restore(p))),
        "tf.compat.v1 Saver.restore": ("tf.compat.v1 Saver.save", lambda p: timed(lambda: v1.restore(None, p))),
        "tf.train.Checkpoint.read": ("tf.train.Checkpoint.write", lambda p: timed(lambda: ckpt.read(p))),
    }
    return saves, restores


def copy_budget(nbytes: int) -> int:
    """The staging budget of the copy-mode contender: a quarter of the model (the model is 4x it)."""
    return max(MiB, nbytes // 4)


# --- one workload ------------------------------------------------------------------------------
def bench_workload(workload: Workload, runs: int, warmup: int, scratch: str, memory: bool = True,
                   progress=print) -> dict:
    """Time every contender on ``workload``; return the raw record (see report.py for its use)."""
    progress(f"[cpu] {workload.label}: building variables")
    variables = build_variables(workload)
    expected = fingerprints(variables)
    nbytes = workload.nbytes
    saves, restores = contenders(variables, nbytes)
    root = os.path.join(scratch, "out")
    prefix = {name: os.path.join(root, slug(name), "ckpt") for name in saves}

    def clean_slate(directory):
        # Every output of every contender goes, then dirty pages are flushed: deleted files' pages
        # are dropped rather than written, so no save starts while the disk is busy with another's.
        fresh(root)
        os.makedirs(directory, exist_ok=True)  # TF's Saver wants the directory to exist
        warm_free_memory(2 * nbytes)  # page cache + a copy (TF's async checkpoint) at most

    def before_restore():
        os.sync()
        warm_free_memory(2 * nbytes)  # the restored values' new buffers (+ TF's temporaries)

    save_cases = [Case(name, phase, (lambda f=fn, p=prefix[name]: f(p)),
                       (lambda d=os.path.dirname(prefix[name]): clean_slate(d)), stall)
                  for name, (phase, stall, fn) in saves.items()]
    limits = limit_cases(nbytes, os.path.join(root, "limit", "plain.bin"), lambda: clean_slate(root),
                         before_restore)
    results = {}
    for phase in ("save", "fsync"):
        progress(f"[cpu] {workload.label}: {phase} phase")
        results.update(interleave([c for c in save_cases + limits if c.phase == phase], runs, warmup, progress))

    # Restores read checkpoints written once more here (the clean slates removed them), then flushed.
    clean_slate(root)
    for name in {src for src, _ in restores.values()}:
        os.makedirs(os.path.dirname(prefix[name]), exist_ok=True)
        saves[name][2](prefix[name])
    limits[0].run()
    os.sync()
    restore_cases = [Case(name, "restore", (lambda f=fn, p=prefix[src]: f(p)), before_restore)
                     for name, (src, fn) in restores.items()]
    correct = {}  # once per contender, outside the timing: a restore must change perturbed values back
    for case in restore_cases:
        perturb(variables)
        case.run()
        correct[case.name] = fingerprints(variables) == expected
    progress(f"[cpu] {workload.label}: restore phase")
    results.update(interleave(restore_cases + [c for c in limits if c.phase == "restore"], runs, warmup, progress))
    del variables, saves, restores, save_cases, restore_cases, limits
    gc.collect()
    record = {"workload": workload.kind, "size_bytes": workload.size_bytes, "dtype": workload.dtype,
              "nbytes": nbytes, "num_tensors": len(workload.shapes()), "label": workload.label,
              "cases": results, "restore_correct": correct, "copy_budget_bytes": copy_budget(nbytes)}
    if memory:
        progress(f"[cpu] {workload.label}: peak memory, one child process per contender")
        record["memory"] = measure_memory(workload, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return record


# --- peak memory in child processes -------------------------------------------------------------
MEMORY_CASES = ["gpusaver save", "gpusaver save_async", "gpusaver save_async snapshot=copy",
                "gpusaver save 2 shards", "tf.compat.v1 Saver.save", "tf.train.Checkpoint.write",
                "tf.train.Checkpoint.write async", "gpusaver restore", "gpusaver restore 2 shards",
                "tf.compat.v1 Saver.restore", "tf.train.Checkpoint.read"]
#: --tiny measures a few, enough to keep the child-process path from rotting while staying quick
TINY_MEMORY_CASES = ["gpusaver save", "gpusaver save_async snapshot=copy", "tf.compat.v1 Saver.restore"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak_rss():
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the peak that
    # follows is this contender's alone, not the model construction's.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(name: str, workload: Workload, directory: str, repeats: int = 2) -> dict:
    """In this (fresh) process: build the model, then measure the peak RSS of one contender.

    The contender runs ``repeats`` times (a training job checkpoints again and again): the peak is
    over all of them, against the RSS before the first, so one-time costs (tracing, buffer pools
    filled over several saves) count. Also reported: the first run's peak and what stays resident.
    """
    variables = build_variables(workload)
    saves, restores = contenders(variables, workload.nbytes)
    prefix = os.path.join(directory, "ckpt")
    fresh(directory)
    if name in restores:
        source, op = restores[name]
        saves[source][2](prefix)  # the checkpoint to read, written before the baseline
        reset = os.sync
    else:
        op = saves[name][2]
        reset = lambda: fresh(directory)
    gc.collect()
    reset()
    baseline = _status_kib("VmRSS") * 1024
    _reset_peak_rss()
    timings, first_peak = [], None
    for _ in range(repeats):
        timings.append(op(prefix))
        first_peak = first_peak or _status_kib("VmHWM") * 1024
        reset()
    peak = _status_kib("VmHWM") * 1024
    retained = _status_kib("VmRSS") * 1024 - baseline
    shutil.rmtree(directory, ignore_errors=True)
    return {"baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_extra_bytes": peak - baseline,
            "first_peak_extra_bytes": first_peak - baseline, "retained_bytes": retained,
            "repeats": repeats, "timings": timings}


def _child_env() -> dict:
    """The child's environment: it must import the very gpusaver (and numpy, TF) this process
    imported, wherever that came from (an install, a checkout on sys.path, a script that put the
    checkout there itself) and whatever the working directory is."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gpusaver.__file__)))
    paths = [package_root] + [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)]
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run_child(name: str, workload: Workload, directory: str) -> dict:
    cmd = [sys.executable, "-m", "gpusaver.bench.cpu", "--memory-child", name, "--kind", workload.kind,
           "--bytes", str(workload.size_bytes), "--dtype", workload.dtype, "--dir", directory]
    cmd += ["--tiny"] if workload.tiny else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def measure_memory(workload: Workload, scratch: str) -> dict[str, dict]:
    """{contender: peak RSS record}, one child process each. Two children at a time up to 1 GiB
    (RSS is per process, so they do not disturb each other's numbers), one at a time above."""
    jobs = 2 if workload.nbytes <= GiB else 1
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {n: pool.submit(_run_child, n, workload, os.path.join(scratch, "mem", slug(n)))
                   for n in (TINY_MEMORY_CASES if workload.tiny else MEMORY_CASES)}
        return {n: f.result() for n, f in futures.items()}


def main(argv=None):
    """Entry point of the memory child (the parent calls it; not a user command)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-child", required=True)
    p.add_argument("--kind", required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--dir", required=True)
    a = p.parse_args(argv)
    result = memory_child(a.memory_child, Workload(a.kind, a.bytes, a.dtype, a.tiny), a.dir)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
