#!/usr/bin/env python3
"""API and race probes of gpusaver's CUDA path, for the one-shot GPU check (bench/gpu_check.py).

``python3 bench/gpu_probes.py OUT.json [--only NAME ...]`` runs each probe in its own subprocess
under a timeout (a hang is a failed probe, not a stuck check) and writes every probe's verdict,
detail and seconds to OUT.json. Needs CuPy and a GPU; torch and JAX probes are skipped where those
are missing; TensorFlow is not needed (a stand-in behaves as TF 2.21's tensors do).
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 1 << 20
PROBES = {}


def probe(timeout=60, env=None):
    def register(fn):
        PROBES[fn.__name__] = (fn, timeout, env or {})
        return fn
    return register


def _cp():
    import cupy
    return cupy


def _torch():
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    return torch


def _load_np(prefix):
    import gpusaver
    return gpusaver.load(prefix, device="cpu")


class TFLike:
    """Behaves as a TF 2.21 EagerTensor on a GPU does towards DLPack consumers: ``__dlpack__``
    raises RuntimeError for any stream argument and gives a legacy "dltensor" capsule."""

    def __init__(self, cupy_array):
        self._a = cupy_array

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()

    def __dlpack__(self, stream=None, **kwargs):
        if stream is not None:
            raise RuntimeError("TF: __dlpack__ stream argument is not supported")
        return self._a.__dlpack__()  # CuPy without max_version: legacy capsule


def tf_like_from_dlpack(capsule):
    """As TF 2.21's ``tf.experimental.dlpack.from_dlpack``: only unversioned capsules."""
    from gpusaver.staging.cuda import dlpack
    name = dlpack.capsule_name(capsule)
    if name != dlpack.LEGACY:
        raise ValueError(f"TF accepts only 'dltensor' capsules, got {name!r}")
    torch = _torch()
    return torch.utils.dlpack.from_dlpack(capsule)


# --- API probes ---------------------------------------------------------------------------------
@probe()
def capsule_names():
    from gpusaver.staging.cuda import dlpack
    cp = _cp()
    a = cp.arange(10, dtype=cp.float32)
    out = {"cupy.__dlpack__()": dlpack.capsule_name(a.__dlpack__()),
           "cupy.__dlpack__(max_version=(1,0))": dlpack.capsule_name(a.__dlpack__(max_version=(1, 0))),
           "legacy_capsule": dlpack.capsule_name(dlpack.legacy_capsule(a))}
    try:
        out["cupy.toDlpack()"] = dlpack.capsule_name(a.toDlpack())
    except Exception as e:
        out["cupy.toDlpack()"] = f"{type(e).__name__}: {e}"
    assert out["legacy_capsule"] == dlpack.LEGACY, out
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in out.items()}


@probe()
def tf_standin_both_ways():
    import gpusaver
    from gpusaver.staging.cuda import dlpack
    cp = _cp()
    d = tempfile.mkdtemp()
    src = cp.random.random((257, 33)).astype(cp.float32)
    expected = cp.asnumpy(src)
    stand_in = TFLike(src)
    try:
        cp.from_dlpack(stand_in)
        raise AssertionError("the stand-in accepted a stream: it does not behave as TF 2.21")
    except RuntimeError:
        pass
    gpusaver.save(os.path.join(d, "t"), {"x": stand_in, "small": TFLike(cp.arange(7, dtype=cp.int32))})
    host = _load_np(os.path.join(d, "t"))
    assert (host["x"] == expected).all() and list(host["small"]) == list(range(7))
    loaded = gpusaver.load(os.path.join(d, "t"), device="cuda:0")
    back = tf_like_from_dlpack(dlpack.legacy_capsule(loaded["x"]))
    assert (back.cpu().numpy() == expected).all()
    return "save from a TF-like tensor and restore into a TF-like consumer: values equal"


@probe()
def torch_arrays():
    import gpusaver
    import ml_dtypes
    import numpy as np
    torch = _torch()
    d = tempfile.mkdtemp()
    base = torch.arange(6 * 8, dtype=torch.float32, device="cuda").reshape(6, 8)
    arrays = {"f32": base.clone(), "bf16": base.to(torch.bfloat16), "f16": base.half(),
              "transposed": base.t(), "sliced": base[:, ::2], "i64": torch.arange(5, device="cuda"),
              "bool": base > 10, "big": torch.randn(3 * MiB, device="cuda")}
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy() for k, v in arrays.items()}
    gpusaver.save(os.path.join(d, "t"), arrays)
    host = _load_np(os.path.join(d, "t"))
    for k, v in expected.items():
        got = host[k].astype(np.float32) if host[k].dtype == ml_dtypes.bfloat16 else host[k]
        assert got.shape == v.shape and (got == v).all(), k
    assert host["bf16"].dtype == ml_dtypes.bfloat16
    on_gpu = gpusaver.load(os.path.join(d, "t"), device="cuda:0")
    t = torch.from_dlpack(on_gpu["bf16"])
    assert t.dtype == torch.bfloat16 and torch.equal(t, arrays["bf16"])
    return {k: str(v.dtype) for k, v in host.items()}


@probe(timeout=90, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
def jax_arrays():
    import gpusaver
    import jax
    import jax.numpy as jnp
    import numpy as np
    d = tempfile.mkdtemp()
    arrays = {"f32": jnp.arange(1000, dtype=jnp.float32), "bf16": jnp.arange(64, dtype=jnp.bfloat16),
              "t": jnp.arange(12, dtype=jnp.int32).reshape(3, 4).T}
    gpusaver.save(os.path.join(d, "j"), arrays)
    host = _load_np(os.path.join(d, "j"))
    for k, v in arrays.items():
        assert (np.asarray(host[k]) == np.asarray(v)).all(), k
    back = gpusaver.load(os.path.join(d, "j"), device="cuda:0")
    assert (np.asarray(jnp.from_dlpack(back["bf16"])) == np.asarray(arrays["bf16"])).all()
    return {"devices": [str(x) for x in jax.devices()], "dtypes": {k: str(v.dtype) for k, v in host.items()}}


@probe()
def restore_small_and_large():
    import gpusaver
    import numpy as np
    cp = _cp()
    d = tempfile.mkdtemp()
    rng = np.random.default_rng(1)
    host = {f"s{i}": rng.random(int(rng.integers(1, 5000)), dtype=np.float32) for i in range(500)}
    host.update({"big": rng.random(5 * MiB, dtype=np.float32), "empty": np.zeros((0, 3), np.float32),
                 "f16": rng.random((9, 7)).astype(np.float16)})
    gpusaver.save(os.path.join(d, "r"), host)
    for opts in (gpusaver.Options(), gpusaver.Options(pack_threshold=0),
                 gpusaver.Options(buffer_budget=MiB, chunk_size=MiB, num_threads=3)):
        got = gpusaver.load(os.path.join(d, "r"), device="cuda:0", options=opts)
        for k, v in host.items():
            assert isinstance(got[k], cp.ndarray) and (cp.asnumpy(got[k]) == v).all(), (k, opts)
    return "packed, per-tensor and one-buffer restores equal the saved values"


# --- race probes ----------------------------------------------------------------------------------
_SPIN = r'''
extern "C" __global__ void spin_fill(float* out, long long n, float value, long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) out[i] = value;
}
'''


def _slow_fill(cp, x, value, stream, cycles=400_000_000):
    kernel = cp.RawKernel(_SPIN, "spin_fill")
    with stream:
        kernel((64,), (256,), (x, cp.int64(x.size), cp.float32(value), cp.int64(cycles)))


def _check_slow_stream_save(snapshot):
    import gpusaver
    import numpy as np
    cp = _cp()
    d = tempfile.mkdtemp()
    x = cp.zeros(4 * MiB, dtype=cp.float32)
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    _slow_fill(cp, x, 7.0, s)  # ~0.2 s of spinning, then the write lands
    with s:  # the producer's stream is current on this thread, as in a training loop
        gpusaver.save_async(os.path.join(d, "r"), {"x": x}, gpusaver.Options(snapshot=snapshot)).result()
    got = _load_np(os.path.join(d, "r"))["x"]
    assert (got == 7.0).all(), f"saved before the producer's write landed ({np.mean(got == 7.0):.0%} written)"
    return "saved values are the producer's"


@probe()
def slow_nonblocking_stream_host_mode():
    return _check_slow_stream_save("host")


@probe()
def slow_nonblocking_stream_reference_mode():
    return _check_slow_stream_save("reference")


@probe(env={"CUPY_CUDA_PER_THREAD_DEFAULT_STREAM": "1"})
def slow_per_thread_default_stream():
    import gpusaver
    cp = _cp()
    d = tempfile.mkdtemp()
    x = cp.zeros(4 * MiB, dtype=cp.float32)
    cp.cuda.Device().synchronize()
    _slow_fill(cp, x, 3.0, cp.cuda.get_current_stream())
    gpusaver.save(os.path.join(d, "p"), {"x": x})
    assert (_load_np(os.path.join(d, "p"))["x"] == 3.0).all()
    return "per-thread default stream: ordered"


@probe()
def slow_torch_side_stream():
    import gpusaver
    torch = _torch()
    d = tempfile.mkdtemp()
    x = torch.zeros(4 * MiB, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(400_000_000)
        x.fill_(5.0)
        f = gpusaver.save_async(os.path.join(d, "t"), {"x": x})  # torch's side stream is current
    f.result()
    assert (_load_np(os.path.join(d, "t"))["x"] == 5.0).all()
    return "torch side-stream writes land before the save reads"


@probe()
def mutate_after_save_async():
    import gpusaver
    cp = _cp()
    out = {}
    for mode in ("auto", "host", "copy", "reference"):
        d = tempfile.mkdtemp()
        x = cp.full(8 * MiB, 1.0, dtype=cp.float32)
        small = cp.full(100, 1.0, dtype=cp.float32)
        f = gpusaver.save_async(os.path.join(d, "m"), {"x": x, "small": small, "small2": small + 0},
                                gpusaver.Options(snapshot=mode))
        x.fill(2.0)  # in place, at once
        small.fill(2.0)
        f.result()
        got = _load_np(os.path.join(d, "m"))
        kept = bool((got["x"] == 1.0).all() and (got["small"] == 1.0).all())
        out[mode] = "snapshot kept" if kept else "saw the mutation"
        if mode != "reference":
            assert kept, (mode, out)
    return out


@probe()
def one_buffer_small_large_small():
    import gpusaver
    import numpy as np
    cp = _cp()
    d = tempfile.mkdtemp()
    arrays = {"a": cp.arange(100, dtype=cp.float32), "big": cp.arange(5 * MiB, dtype=cp.float32),
              "b": cp.arange(50, dtype=cp.int32), "c": cp.arange(70, dtype=cp.int32)}
    for opts in (gpusaver.Options(buffer_budget=MiB, chunk_size=MiB),
                 gpusaver.Options(buffer_budget=MiB, chunk_size=MiB, pack_threshold=64 * MiB),
                 gpusaver.Options(buffer_budget=MiB, chunk_size=MiB, num_shards=3, snapshot="copy")):
        gpusaver.save(os.path.join(d, "o"), arrays, opts)
        got = _load_np(os.path.join(d, "o"))
        for k, v in arrays.items():
            assert (got[k] == cp.asnumpy(v)).all(), (k, opts)
    return "no deadlock; values equal"


@probe()
def concurrent_saves_same_names():
    import gpusaver
    cp = _cp()
    d = tempfile.mkdtemp()
    errors, opts = [], gpusaver.Options(buffer_budget=4 * MiB, chunk_size=MiB)

    def run(k):
        try:
            arrays = {f"t{i}": cp.full(1000 + i, float(k), dtype=cp.float32) for i in range(300)}
            arrays["big"] = cp.full(3 * MiB, float(k), dtype=cp.float32)
            gpusaver.save(os.path.join(d, f"c{k}"), arrays, opts)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(4):
        got = _load_np(os.path.join(d, f"c{k}"))
        assert all((v == float(k)).all() for v in got.values()), f"save {k} holds another save's bytes"
    return "4 concurrent saves with the same names: each file holds its own values"


@probe()
def failed_saves_release_buffers():
    import gpusaver
    from gpusaver import core
    cp = _cp()
    d = tempfile.mkdtemp()
    opts = gpusaver.Options(buffer_budget=2 * MiB, chunk_size=MiB)
    stager = core._default_stager(opts)
    arrays = {f"s{i}": cp.ones(1000, dtype=cp.float32) for i in range(50)}
    arrays["big"] = cp.ones(3 * MiB, dtype=cp.float32)
    blocker = os.path.join(d, "f.index")
    os.makedirs(blocker)  # the index cannot be written: every save fails after staging
    failures = 0
    for _ in range(stager.cuda().save_pool.capacity + 3):
        try:
            gpusaver.save(os.path.join(d, "f"), arrays, opts)
        except Exception:  # noqa: BLE001
            failures += 1
    pool = stager.cuda().save_pool
    free = len(pool._free)
    assert failures == pool.capacity + 3 and free == pool._allocated, (failures, free, pool._allocated)
    os.rmdir(blocker)
    gpusaver.save(os.path.join(d, "f"), arrays, opts)
    return f"{failures} failed saves, all {free} pinned buffers back in the pool, then a save succeeded"


# --- runner ---------------------------------------------------------------------------------------
def _child(name):
    fn = PROBES[name][0]
    t0 = time.perf_counter()
    detail = fn()
    print(json.dumps({"ok": True, "detail": detail, "seconds": time.perf_counter() - t0}))


def main(argv):
    if argv[:1] == ["--child"]:
        _child(argv[1])
        return 0
    out_path = argv[0] if argv else "probes.json"
    only = argv[argv.index("--only") + 1:] if "--only" in argv else list(PROBES)
    results = {}
    for name in only:
        _, timeout, env = PROBES[name]
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                               timeout=timeout, env={**os.environ, **env})
            last = (p.stdout.strip().splitlines() or [""])[-1]
            if p.returncode == 0 and last.startswith("{"):
                results[name] = json.loads(last)
            else:
                results[name] = {"ok": False, "rc": p.returncode, "stderr": p.stderr[-3000:]}
        except subprocess.TimeoutExpired as e:
            results[name] = {"ok": False, "timed_out": timeout,
                             "stderr": (e.stderr or b"")[-2000:].decode(errors="replace")
                             if isinstance(e.stderr, bytes) else str(e.stderr)[-2000:]}
        results[name].setdefault("seconds", time.perf_counter() - t0)
        print(f"[probe] {name}: {'ok' if results[name]['ok'] else 'FAILED'} "
              f"({results[name]['seconds']:.1f} s)", flush=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
