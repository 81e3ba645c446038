#!/usr/bin/env python3
"""gpusaver against the checkpointers GPU users pick: same torch tensors, same disk, same run.

    python3 bench/gpu_peers.py OUT.json [--quick] [--device cuda|cpu] [--workloads mix,mix-bf16,large8]
                               [--runs N] [--warmup N] [--budget SECONDS] [--scratch DIR] [--only A,B]

Contenders, each saving the same tensors and restoring them onto the same device:
  gpusaver.save, gpusaver.save_async with Options(snapshot=reference|host|copy), torch.save / torch.load,
  torch.distributed.checkpoint save / async_save (default staging, and pinned staging where the installed
  torch has it) / load, safetensors save_file / load_file(device=...), and Orbax (StandardCheckpointer,
  asynchronous) of the same values as JAX arrays.
Raw limits in the same rounds: pinned D2H and H2D copies (CUDA events), a device-to-device copy, and a
plain file write / read of the same number of bytes.

What each figure means (every raw timing is kept in the JSON):
  stall_s    until the call returned (the training loop's stall).
  safe_s     until the caller may overwrite the tensors in place without changing the checkpoint:
             return for synchronous savers and Orbax (JAX arrays are immutable); DCP's staging_completion
             where async staging is used; for gpusaver.save_async the moment its device references were
             released (see release_s).
  release_s  gpusaver.save_async only: each run saves fresh clones of the tensors and the bench drops its
             own references at once; release_s is when torch.cuda.memory_allocated() fell back by the
             clones' bytes, i.e. when gpusaver let go of every tensor (on --device cpu: when weak
             references to the clones died). null if that happened only after the save had finished.
  save_s     until the files are complete (no fsync: page cache, like every contender here).
  restore_s  until the values are on the device (synchronised); results are compared bitwise with the
             saved tensors on the device (torch.equal), outside the timing.
  host_peak  peak RSS growth over the case (psutil, sampled every 5 ms by a thread); pinned memory
             counts in RSS. Allocators keep memory between cases, so it is growth, not use.
  dev_peak   torch.cuda.max_memory_allocated() growth (reset per case), CuPy's default pool used bytes
             and NVML's used bytes, both sampled with the RSS (NVML sees every allocator, JAX's too).
Each contender saves and then restores its own checkpoint, which is deleted before the next contender,
so the disk holds one checkpoint at a time; contenders rotate order each round. Restores read files
just written, so they come from the page cache (dropping caches needs root; noted in the JSON).
Contenders whose files another contender's restore already reads (gpusaver's async modes, DCP's
async_save) are restored and checked in the warm-up round only. The warm-up's figures are kept
("first_*" in the summary: page-locking, kernel compiles).

Each workload runs in child processes (``--child``): one for the torch-side contenders and the raw
limits, one for Orbax/JAX, so that a crash, a hang or a poisoned CUDA context costs one workload's
group, not the run, and each process's memory figures start clean. The runs adapt to ``--budget``
(default 135 s): each workload gets a share (mix 30%, mix-bf16 20%, large8 50%); after the warm-up
round, counted rounds go on while the last round's length still fits the share, up to 5 (large8: 3);
the JSON and the table say how many ran. 8 GiB saves take seconds each, so at the default budget
large8 gets few counted runs; give more ``--budget`` or fewer ``--workloads`` for more.
"""
import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import inspect
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "bench")):  # gpusaver, and gpu_check beside this script
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX must share the GPU with torch

import numpy as np  # noqa: E402

import gpusaver  # noqa: E402
from gpusaver.bench import GiB, MiB, Workload, summary  # noqa: E402
from gpu_check import mount_of  # noqa: E402

# name: (kind, bytes, dtype, counted runs, share of the budget); --quick shrinks bytes and runs
WORKLOADS = {
    "mix": ("mix", GiB, "float32", 5, 0.3),
    "mix-bf16": ("mix", GiB, "bfloat16", 5, 0.2),
    "large8": ("large", 8 * GiB, "float32", 3, 0.5),
}
QUICK_BYTES = {"mix": 8 * MiB, "large": 32 * MiB}
LARGE_TENSORS = 16
LIMIT_BUFFER = GiB  # raw copies cycle through one host buffer of at most this: same bytes, bounded pinning
PIECE = 64 * MiB
SAMPLE_S = 0.005


# --- environment --------------------------------------------------------------------------------
@dataclasses.dataclass
class Env:
    torch: Any
    device: str  # "cuda:0" or "cpu"
    scratch: str
    cupy: Any = None
    nvml: Any = None  # (pynvml, handle)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()  # cudaDeviceSynchronize: every stream, CuPy's and JAX's too


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:600]


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvml():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None


# --- memory probe -------------------------------------------------------------------------------
class Probe:
    """Peak host RSS and device memory over a ``with`` block, sampled by a thread every 5 ms."""

    def __init__(self, env: Env):
        self.env = env
        self.result: dict = {}

    def _read(self) -> tuple:
        rss = self._proc.memory_info().rss if self._proc else _statm_rss()
        pool = self.env.cupy.get_default_memory_pool().used_bytes() if self.env.cupy else 0
        used = 0
        if self.env.nvml:
            nv, handle = self.env.nvml
            try:
                used = nv.nvmlDeviceGetMemoryInfo(handle).used
            except Exception:  # advisory: a failing NVML read must not fail the case
                pass
        return rss, pool, used

    def _loop(self):
        while not self._stop.wait(SAMPLE_S):
            self._peak = tuple(map(max, self._peak, self._read()))

    def __enter__(self):
        try:
            import psutil
            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
        torch = self.env.torch
        if self.env.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._torch0 = torch.cuda.memory_allocated()
        self._start = self._peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        end = self._read()
        peak = tuple(map(max, self._peak, end))
        r = {"rss_start": self._start[0], "host_peak_growth": peak[0] - self._start[0]}
        if self.env.cuda:
            r["torch_peak_growth"] = self.env.torch.cuda.max_memory_allocated() - self._torch0
            if self.env.cupy:
                r["cupy_pool_peak_growth"] = peak[1] - self._start[1]
            if self.env.nvml:
                r["nvml_used_peak_growth"] = peak[2] - self._start[2]
        self.result = r
        return False


def _statm_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- tensors ------------------------------------------------------------------------------------
def workload_shapes(name: str, quick: bool) -> tuple[dict, str]:
    kind, nbytes, dtype, _, _ = WORKLOADS[name]
    nbytes = QUICK_BYTES[kind] if quick else nbytes
    if kind == "mix":
        return Workload("mix", nbytes, dtype, tiny=quick).shapes(), dtype
    itemsize = 2 if dtype == "bfloat16" else 4
    each = nbytes // LARGE_TENSORS // itemsize
    return {f"large_{i:02d}": (each // 1024, 1024) for i in range(LARGE_TENSORS)}, dtype


def make_tensors(env: Env, shapes: dict, dtype: str, seed: int = 0) -> dict:
    torch = env.torch
    gen = torch.Generator(device=env.device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.rand(shape, generator=gen, device=env.device, dtype=torch.float32)
        out[name] = t.to(torch.bfloat16) if dtype == "bfloat16" else t
    env.sync()
    return out


def as_torch(env: Env, x):
    """A torch view of a restored value: torch tensors as they are, DLPack producers (CuPy, JAX)
    without a copy, numpy (incl. ml_dtypes bfloat16) through an integer view."""
    torch = env.torch
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(x)
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(x)
        except Exception:  # a producer torch cannot import: compare through the host instead
            host = np.asarray(x)
            return as_torch(env, host).to(env.device if env.cuda else "cpu")
    return torch.as_tensor(np.asarray(x))


def numpy_of(torch, t) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor, bfloat16 through ml_dtypes (torch's .numpy() refuses it)."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def host_view(env: Env, t):
    """What gpusaver is given: the torch tensor itself on CUDA (DLPack), a numpy view on --device cpu."""
    return t if env.cuda else numpy_of(env.torch, t)


def verify(env: Env, tensors: dict, restored) -> str | None:
    """None if ``restored`` holds every tensor with equal shape, dtype, device and bits; else why not."""
    if set(restored) != set(tensors):
        return f"keys differ: {len(set(tensors) ^ set(restored))} names"
    for name, want in tensors.items():
        got = as_torch(env, restored[name])
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"{name}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
        if got.device != want.device:
            return f"{name}: restored on {got.device}, not {want.device}"
        if not env.torch.equal(got, want):
            return f"{name}: values differ"
    return None


# --- contenders ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Contender:
    """``save(path, prepared) -> timings`` ("stall_s", "save_s", optional "safe_s", ...) writes under the
    directory ``path``; ``restore(path) -> {name: value}``; ``prepare()`` runs untimed before each save."""
    name: str
    save: Callable[[str, Any], dict]
    restore: Callable[[str], Any] | None = None
    prepare: Callable[[], Any] = lambda: None
    close: Callable[[], None] = lambda: None
    restore_counted: bool = True  # False: restored (and checked) in the warm-up round only, to save time
    note: str = ""


def _sync_timings(fn) -> dict:
    t0 = time.perf_counter()
    fn()
    s = time.perf_counter() - t0
    return {"stall_s": s, "save_s": s, "safe_s": s}


class ReleaseWatch:
    """Tells when gpusaver has dropped every reference to the clones it was given (see the module doc)."""

    def __init__(self, env: Env, clones: dict):
        self.env = env
        if env.cuda:
            self.before = env.torch.cuda.memory_allocated()
            self.nbytes = sum(t.untyped_storage().nbytes() for t in clones.values())
        else:
            self.refs = [weakref.ref(t) for t in clones.values()]

    def released(self) -> bool:
        if self.env.cuda:  # the clones' blocks went back to torch's allocator
            return self.env.torch.cuda.memory_allocated() <= self.before - 0.99 * self.nbytes
        return all(r() is None for r in self.refs)


def gpusaver_contenders(env: Env, tensors: dict, errors: dict) -> list[Contender]:
    prefix = lambda path: os.path.join(path, "ckpt")  # noqa: E731
    inputs = {n: host_view(env, t) for n, t in tensors.items()}
    device = "cuda:0" if env.cuda else "cpu"

    def restore(path):
        return {n: as_torch(env, a) for n, a in gpusaver.load(prefix(path), device=device).items()}

    out = [Contender("gpusaver.save", lambda p, _: _sync_timings(lambda: gpusaver.save(prefix(p), inputs)),
                     restore)]

    def prepare():
        clones = {n: t.clone() for n, t in tensors.items()}
        env.sync()
        return {"clones": clones, "watch": ReleaseWatch(env, clones)}

    for mode in ("reference", "host", "copy"):
        name = f"gpusaver.save_async {mode}"
        try:
            options = gpusaver.Options(snapshot=mode)
        except Exception as e:  # "host" is new: an Options that rejects it is a finding, not a crash
            errors[name] = _err(e)
            continue

        def save(path, prepared, options=options):
            clones, watch = prepared.pop("clones"), prepared["watch"]
            arrays = {n: host_view(env, t) for n, t in clones.items()}
            clones.clear()  # from here gpusaver holds the only references
            t0 = time.perf_counter()
            future = gpusaver.save_async(prefix(path), arrays, options)
            t1 = time.perf_counter()
            del arrays
            release = None
            while not future.done():
                if watch.released():
                    release = time.perf_counter() - t0
                    break
                time.sleep(0.0005)
            future.result()
            t2 = time.perf_counter()
            gc.collect()
            r = {"stall_s": t1 - t0, "save_s": t2 - t0, "release_s": release,
                 "released_after_done": release is None and watch.released()}
            r["safe_s"] = release if release is not None else (t2 - t0 if r["released_after_done"] else None)
            return r

        out.append(Contender(name, save, restore, prepare, restore_counted=False))
    return out


def torch_save_contender(env: Env, tensors: dict) -> Contender:
    torch = env.torch
    file = lambda path: os.path.join(path, "model.pt")  # noqa: E731
    return Contender("torch.save", lambda p, _: _sync_timings(lambda: torch.save(tensors, file(p))),
                     lambda p: torch.load(file(p), map_location=env.device, weights_only=True))


def safetensors_contender(env: Env, tensors: dict) -> Contender:
    from safetensors.torch import load_file, save_file
    file = lambda path: os.path.join(path, "model.safetensors")  # noqa: E731
    return Contender("safetensors", lambda p, _: _sync_timings(lambda: save_file(tensors, file(p))),
                     lambda p: load_file(file(p), device=env.device))


_PG = {}


def _process_group(torch) -> dict:
    """A gloo process group of world size 1 (DCP's async_save needs a CPU backend); on failure,
    DCP's no_dist mode. Returns the extra keyword arguments for dcp.save/async_save/load."""
    if "kwargs" in _PG:
        return _PG["kwargs"]
    import torch.distributed as dist
    try:
        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            # loopback: the GPU machine has no network, and gloo otherwise resolves the host name
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
        _PG.update(kwargs={}, note="gloo process group, world size 1")
    except Exception as e:
        _PG.update(kwargs={"no_dist": True}, note=f"no_dist=True (process group failed: {_err(e)})")
    return _PG["kwargs"]


def _accepts(fn, name) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def pinned_stager(torch):
    """DCP's pinned-memory staging: ``BlockingAsyncStager(cache_staged_state_dict=True)`` — a
    CPU copy of the state dict in pinned memory, allocated on the first save and reused.
    (torch 2.11's ``DefaultStager(StagingOptions(use_pinned_memory=True, ...))`` failed on the
    H200 run with ``KeyError: <class 'type'>`` inside its deep copy, so it is not used.)
    Returns (stager, description)."""
    from torch.distributed.checkpoint import staging
    desc = "BlockingAsyncStager(cache_staged_state_dict=True)"
    return staging.BlockingAsyncStager(cache_staged_state_dict=True), desc


def dcp_contenders(env: Env, tensors: dict, errors: dict) -> list[Contender]:
    import torch.distributed.checkpoint as dcp
    torch = env.torch
    kw = _process_group(torch)
    kw_save = {k: v for k, v in kw.items() if _accepts(dcp.save, k)}
    kw_load = {k: v for k, v in kw.items() if _accepts(dcp.load, k)}
    kw_async = {k: v for k, v in kw.items() if _accepts(dcp.async_save, k)}
    note = _PG["note"]

    def restore(path):
        dest = {n: torch.empty_like(t) for n, t in tensors.items()}
        dcp.load(dest, checkpoint_id=path, **kw_load)
        return dest

    def async_save(path, stager=None):
        extra = {"async_stager": stager} if stager is not None else {}
        t0 = time.perf_counter()
        response = dcp.async_save(tensors, checkpoint_id=path, **kw_async, **extra)
        t1 = time.perf_counter()
        if hasattr(response, "staging_completion"):  # AsyncSaveResponse: staging runs in the background
            response.staging_completion.result()
            staged = time.perf_counter()
            response.upload_completion.result()
        else:
            staged = t1
            response.result()
        t2 = time.perf_counter()
        return {"stall_s": t1 - t0, "safe_s": staged - t0, "save_s": t2 - t0}

    out = [
        Contender("dcp.save", lambda p, _: _sync_timings(lambda: dcp.save(tensors, checkpoint_id=p, **kw_save)),
                  restore, note=note),
        Contender("dcp.async_save", lambda p, _: async_save(p), restore, restore_counted=False,
                  note="default staging (CPU copy)"),
    ]
    name = "dcp.async_save pinned"
    if not env.cuda:
        errors[name] = "skipped: pinned staging needs CUDA"
    elif not _accepts(dcp.async_save, "async_stager"):
        errors[name] = "skipped: this torch's dcp.async_save has no async_stager argument"
    else:
        try:
            stager, desc = pinned_stager(torch)
            out.append(Contender(name, lambda p, _: async_save(p, stager), restore, restore_counted=False,
                                 close=getattr(stager, "close", lambda: None), note=desc))
        except Exception as e:
            errors[name] = _err(e)
    return out


def orbax_contender(env: Env, tensors: dict) -> Contender:
    import jax
    import orbax.checkpoint as ocp
    if env.cuda:
        try:
            dev = jax.devices("cuda")[0]
        except RuntimeError:  # older JAX names the platform "gpu"
            dev = jax.devices("gpu")[0]
    else:
        dev = jax.devices("cpu")[0]

    def to_jax(t):
        try:  # zero copy where JAX accepts torch's DLPack export
            a = jax.dlpack.from_dlpack(t)
            if a.devices() == {dev}:
                return a
        except Exception:
            pass
        return jax.device_put(numpy_of(env.torch, t.cpu()), dev)

    arrays = {n: to_jax(t) for n, t in tensors.items()}
    jax.block_until_ready(arrays)
    if hasattr(ocp, "StandardCheckpointer"):
        ckptr, kind = ocp.StandardCheckpointer(), "StandardCheckpointer"
    else:
        ckptr, kind = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()), "AsyncCheckpointer"
    sharding = jax.sharding.SingleDeviceSharding(dev)
    target = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for n, a in arrays.items()}
    where = lambda path: os.path.join(os.path.abspath(path), "orbax")  # noqa: E731

    def save(path, _):
        t0 = time.perf_counter()
        ckptr.save(where(path), arrays)
        t1 = time.perf_counter()
        ckptr.wait_until_finished()
        t2 = time.perf_counter()
        return {"stall_s": t1 - t0, "safe_s": t1 - t0, "save_s": t2 - t0}

    def restore(path):
        out = ckptr.restore(where(path), target)
        return jax.block_until_ready(out)

    return Contender("orbax", save, restore, close=ckptr.close,
                     note=f"orbax-checkpoint {_version('orbax-checkpoint')} {kind}, jax {jax.__version__}")


#: Contender families by the child process that runs them: JAX gets a process of its own, so that
#: its CUDA libraries, its allocator and any crash of its stay out of the torch contenders' figures.
GROUPS = {"torch": ("gpusaver", "torch.save", "dcp", "safetensors"), "jax": ("orbax",)}


def _selected(label: str, only: list[str]) -> bool:
    return not only or any(o.startswith(label) or label.startswith(o) for o in only)


def build_contenders(env: Env, tensors: dict, only: list[str], group: str) -> tuple[list[Contender], dict]:
    errors: dict[str, str] = {}
    out: list[Contender] = []
    builders = {"gpusaver": lambda: gpusaver_contenders(env, tensors, errors),
                "torch.save": lambda: [torch_save_contender(env, tensors)],
                "dcp": lambda: dcp_contenders(env, tensors, errors),
                "safetensors": lambda: [safetensors_contender(env, tensors)],
                "orbax": lambda: [orbax_contender(env, tensors)]}
    for label in GROUPS[group]:
        if not _selected(label, only):
            continue  # building some contenders costs (imports, JAX copies of the tensors)
        build = builders[label]
        try:
            out.extend(build())
        except Exception as e:
            errors[label] = _err(e)
    if only:
        out = [c for c in out if any(c.name.startswith(o) for o in only)]
    return out, errors


# --- raw limits ---------------------------------------------------------------------------------
class Limits:
    """Raw copies and file I/O of the workload's bytes: what the link and the disk give.

    Host and device sides are buffers of at most ``LIMIT_BUFFER`` that the copies cycle through: the
    same bytes cross the link as in a save, with bounded pinned (and device) memory.
    """

    def __init__(self, env: Env, tensors: dict):
        torch = self.torch = env.torch
        self.env = env
        views = [t.reshape(-1).view(torch.uint8) for t in tensors.values()]
        self.nbytes = sum(v.numel() for v in views)
        self.size = size = min(self.nbytes, LIMIT_BUFFER)
        self.host = torch.empty(size, dtype=torch.uint8, pin_memory=env.cuda)  # pinned once
        self.host_np = self.host.numpy()
        self.dev = torch.empty(size, dtype=torch.uint8, device=env.device) if env.cuda else None
        self.file = os.path.join(env.scratch, "limit.bin")
        # each tensor in pieces at its offset in the cycled buffers: (offset, tensor piece)
        self.pieces, off = [], 0
        for v in views:
            done = 0
            while done < v.numel():
                n = min(v.numel() - done, size - off)
                self.pieces.append((off, v[done:done + n]))
                done += n
                off = (off + n) % size

    def _timed_cuda(self, copies) -> dict:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for dst, src in copies:
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return {"seconds": start.elapsed_time(end) / 1e3, "wall_s": time.perf_counter() - t0}

    def _spans(self):
        """(offset, length) pieces of at most PIECE covering nbytes, cycling through the buffers."""
        off = 0
        while off < self.nbytes:
            n = min(PIECE, self.nbytes - off, self.size - off % self.size)
            yield off % self.size, n
            off += n

    def cases(self) -> dict[str, Callable[[], dict]]:
        out = {}
        per_tensor = [(self.host[o:o + p.numel()], p) for o, p in self.pieces]
        if self.env.cuda:
            d2d = [(self.dev[o:o + p.numel()], p) for o, p in self.pieces]
            d2h = [(self.host[o:o + n], self.dev[o:o + n]) for o, n in self._spans()]
            h2d = [(d, h) for h, d in d2h]
            out["raw pinned D2H per tensor"] = lambda: self._timed_cuda(per_tensor)
            out["raw pinned D2H bulk"] = lambda: self._timed_cuda(d2h)
            out["raw pinned H2D bulk"] = lambda: self._timed_cuda(h2d)
            out["raw D2D per tensor"] = lambda: self._timed_cuda(d2d)
        else:
            out["raw memcpy per tensor"] = lambda: _wall(lambda: [d.copy_(s) for d, s in per_tensor])
        out["raw file write"] = self.write
        out["raw file read"] = self.read
        return out

    def write(self) -> dict:
        if os.path.exists(self.file):
            os.unlink(self.file)  # unsynced: its dirty pages are dropped, not written back
        view = memoryview(self.host_np)

        def run():
            fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for off, n in self._spans():
                    while n:  # os.write may write less than asked
                        done = os.write(fd, view[off:off + n])
                        off, n = off + done, n - done
            finally:
                os.close(fd)
        return _wall(run)

    def read(self) -> dict:
        view = memoryview(self.host_np)

        def run():
            with open(self.file, "rb", buffering=0) as f:
                for off, n in self._spans():
                    while n:
                        got = f.readinto(view[off:off + n])
                        if not got:
                            raise EOFError(f"{self.file} is shorter than {self.nbytes} bytes")
                        off, n = off + got, n - got
        try:
            return _wall(run)
        finally:
            os.unlink(self.file)  # unsynced: keeps dirty pages (and writeback) out of the next cases

    def close(self):
        if os.path.exists(self.file):
            os.unlink(self.file)


def _wall(fn) -> dict:
    t0 = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - t0}


# --- the runner ---------------------------------------------------------------------------------
def _fresh(path):
    shutil.rmtree(path, ignore_errors=True)  # unsynced: a deleted checkpoint's dirty pages are dropped
    os.makedirs(path)


def run_workload(env: Env, name: str, group: str, args, soft_deadline: float, hard_deadline: float, log,
                 progress: Callable[[dict], None] = lambda rec: None) -> dict:
    """Rounds of every contender of ``group`` (and, for "torch", the raw limits) on workload ``name``.

    Deadlines are ``time.time()`` values: no counted round starts after ``soft_deadline`` would be
    passed (judged by the last round's length), no case starts after ``hard_deadline``.
    ``progress(rec)`` is called after each case so that a killed child still leaves its figures.
    """
    shapes, dtype = workload_shapes(name, args.quick)
    runs = args.runs or (2 if args.quick else WORKLOADS[name][3])
    t_setup = time.perf_counter()
    tensors = make_tensors(env, shapes, dtype)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    rec = {"workload": name, "group": group, "dtype": dtype, "nbytes": nbytes, "num_tensors": len(tensors),
           "runs_done": 0, "runs_target": runs, "warmup": args.warmup, "rounds": [], "limits": {}, "contenders": {},
           "errors": {}, "notes": {}}
    contenders, rec["errors"] = build_contenders(env, tensors, args.only, group)
    rec["notes"] = {c.name: c.note for c in contenders if c.note}
    limits, limit_cases = None, {}
    if group == "torch":
        try:
            limits = Limits(env, tensors)
            limit_cases = limits.cases()
        except Exception as e:
            rec["errors"]["limits"] = _err(e)
    # Modules and tensors live for the whole workload: freezing them keeps each gc.collect() below
    # (a few per case, so freed results do not linger into the next case) from rescanning torch and JAX.
    gc.collect()
    gc.freeze()
    rec["setup_s"] = time.perf_counter() - t_setup
    log(f"[peers] {name}/{group}: {len(tensors)} tensors, {nbytes / GiB:.3f} GiB {dtype}, "
        f"{len(contenders)} contenders, setup {rec['setup_s']:.1f} s")
    for n in limit_cases:
        rec["limits"][n] = {"runs": [], "warmup": []}
    for c in contenders:
        rec["contenders"][c.name] = {"save": {"runs": [], "warmup": []}, "restore": {"runs": [], "warmup": []},
                                     "correct": [], "error": None}
    dead: set[str] = set()
    path = os.path.join(env.scratch, "ckpt")
    round_s = 0.0
    counted = 0
    for r in range(args.warmup + runs):
        warm = r < args.warmup
        now = time.time()
        if not warm and counted > 0 and now + round_s > soft_deadline:
            rec["stopped"] = f"budget: {counted} counted rounds of {runs} (last round {round_s:.1f} s)"
            break
        if now >= hard_deadline:
            rec["stopped"] = "budget: out of time before the round"
            break
        key = "warmup" if warm else "runs"
        t_round = time.perf_counter()
        for lname, fn in limit_cases.items():
            try:
                rec["limits"][lname][key].append(fn())
            except Exception as e:
                rec["errors"][lname] = _err(e)
        k = r % max(1, len(contenders))
        for c in contenders[k:] + contenders[:k]:
            if c.name in dead:
                continue
            if time.time() >= hard_deadline:
                rec["stopped"] = f"budget: out of time in round {r + 1} before {c.name}"
                break
            entry = rec["contenders"][c.name]
            try:
                _fresh(path)
                gc.collect()
                prepared = c.prepare()
                with Probe(env) as probe:
                    timings = c.save(path, prepared)
                del prepared
                entry["save"][key].append({**timings, **probe.result})
            except Exception as e:
                entry["error"] = f"save: {_err(e)}"
                entry["traceback"] = traceback.format_exc()[-3000:]
                dead.add(c.name)
                continue
            if c.restore is not None and (warm or c.restore_counted or not entry["correct"]):
                try:
                    gc.collect()
                    with Probe(env) as probe:
                        t0 = time.perf_counter()
                        restored = c.restore(path)
                        env.sync()
                        seconds = time.perf_counter() - t0
                    entry["restore"][key].append({"restore_s": seconds, **probe.result})
                    problem = verify(env, tensors, restored)
                    entry["correct"].append(problem is None)
                    if problem:
                        entry["mismatch"] = problem
                    del restored
                except Exception as e:
                    entry["error"] = f"restore: {_err(e)}"
                    entry["traceback"] = traceback.format_exc()[-3000:]
            progress(rec)
        round_s = time.perf_counter() - t_round
        rec["rounds"].append({"warmup": warm, "seconds": round_s})
        counted += 0 if warm else 1
        rec["runs_done"] = counted
        progress(rec)
        log(f"[peers] {name}/{group}: round {r + 1}/{args.warmup + runs} ({'warm-up' if warm else 'counted'}) "
            f"{round_s:.1f} s")
        if "stopped" in rec:
            break
    rec["runs_done"] = counted
    shutil.rmtree(path, ignore_errors=True)
    for c in contenders:
        try:
            c.close()
        except Exception as e:
            rec["errors"][f"{c.name} close"] = _err(e)
    if limits:
        limits.close()
    rec["done"] = True
    return rec


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return summary(vals)["median"] if vals else None


def _max(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return max(vals) if vals else None


MEMORY_KEYS = ("host_peak_growth", "torch_peak_growth", "nvml_used_peak_growth", "cupy_pool_peak_growth")


def _dev_peak(c: dict, phase: str):
    vals = [c.get(f"{phase}_{k}") for k in MEMORY_KEYS[1:] if c.get(f"{phase}_{k}") is not None]
    return max(vals) if vals else None


def summarize(rec: dict) -> dict:
    """Medians of the counted runs (the warm-up's where no counted run exists), GB/s of nbytes."""
    gbs = lambda s: rec["nbytes"] / s / 1e9 if s else None  # noqa: E731
    out = {"limits": {}, "contenders": {}}
    for name, lim in rec["limits"].items():
        runs = lim["runs"] or lim["warmup"]
        s = _median(runs, "seconds")
        out["limits"][name] = {"seconds": s, "gbs": gbs(s)}
    for name, c in rec["contenders"].items():
        save = c["save"]["runs"] or c["save"]["warmup"]
        if not c["save"]["runs"]:  # nothing counted: report the warm-up rather than nothing
            restore = c["restore"]["runs"] or c["restore"]["warmup"]
        else:  # those restored in the warm-up only (same format as another contender's): no median
            restore = c["restore"]["runs"]
        s, rs = _median(save, "save_s"), _median(restore, "restore_s")
        first = c["save"]["warmup"][0] if c["save"]["warmup"] else {}
        out["contenders"][name] = {
            "stall_s": _median(save, "stall_s"), "safe_s": _median(save, "safe_s"),
            "release_s": _median(save, "release_s"), "save_s": s, "save_gbs": gbs(s),
            "restore_s": rs, "restore_gbs": gbs(rs),
            "first_stall_s": first.get("stall_s"), "first_save_s": first.get("save_s"),
            "first_save_host_peak_growth": first.get("host_peak_growth"),
            **{f"{phase}_{key}": _max(runs, key) for phase, runs in (("save", save), ("restore", restore))
               for key in MEMORY_KEYS},
            "counted_from": "runs" if c["save"]["runs"] else "warmup",
            "correct": all(c["correct"]) if c["correct"] else None, "error": c["error"],
        }
    return out


# --- report -------------------------------------------------------------------------------------
def _f(x, scale=1.0, fmt="{:.3f}"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x * scale)


def markdown(record: dict) -> str:
    lines = [f"# gpusaver vs peers on {record['device_name']} ({record['device']})", ""]
    for w in record["workloads"]:
        s = w.get("summary", {})
        groups = w.get("groups") or {"": {"runs_done": w.get("runs_done", 0)}}
        counted = ", ".join(f"{g} {x['runs_done']}".strip() for g, x in groups.items())
        lines += [f"## {w['workload']}: {w['num_tensors']} tensors, {w['nbytes'] / GiB:.3f} GiB {w['dtype']}, "
                  f"counted runs {counted} of {w['runs_target']} (else the warm-up's figures)"
                  + (f" ({w['stopped']})" if w.get("stopped") else ""), "",
                  "| contender | stall ms | safe ms | save s | save GB/s | restore s | restore GB/s | "
                  "host peak +MiB save/restore | dev peak +MiB save/restore | correct |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]
        mib = lambda x: _f(x, 1 / MiB, "{:.0f}")  # noqa: E731
        for name, c in s.get("contenders", {}).items():
            correct = {True: "yes", False: "**NO**", None: "—"}[c["correct"]]
            if c["error"]:
                correct += f" error: {c['error'][:80]}"
            lines.append(f"| {name} | {_f(c['stall_s'], 1e3, '{:.2f}')} | {_f(c['safe_s'], 1e3, '{:.1f}')} | "
                         f"{_f(c['save_s'])} | {_f(c['save_gbs'], fmt='{:.2f}')} | {_f(c['restore_s'])} | "
                         f"{_f(c['restore_gbs'], fmt='{:.2f}')} | "
                         f"{mib(c['save_host_peak_growth'])} / {mib(c['restore_host_peak_growth'])} | "
                         f"{mib(_dev_peak(c, 'save'))} / {mib(_dev_peak(c, 'restore'))} | {correct} |")
        for name, lim in s.get("limits", {}).items():
            lines.append(f"| *{name}* | | | {_f(lim['seconds'])} | {_f(lim['gbs'], fmt='{:.2f}')} | | | | | |")
        for name, e in w.get("errors", {}).items():
            lines.append(f"- {name}: {e}")
        for group, ch in w.get("children", {}).items():
            if ch.get("rc") != 0 or ch.get("timed_out") or ch.get("error"):
                lines.append(f"- {group} child process: rc={ch.get('rc')}"
                             f"{', killed at its timeout' if ch.get('timed_out') else ''} {ch.get('error', '')}")
        lines.append("")
    return "\n".join(lines)


def _device_facts(env: Env) -> dict:
    torch = env.torch
    return {"device_name": torch.cuda.get_device_name(0) if env.cuda else "CPU", "torch_cuda": torch.version.cuda,
            "versions": {d: _version(d) for d in ("torch", "numpy", "cupy-cuda13x", "jax", "jaxlib",
                                                  "orbax-checkpoint", "tensorstore", "safetensors", "gpusaver",
                                                  "psutil")}}


NO_DEVICE = 3  # a child's exit status that ends the whole bench: no later child can do better


def child(args) -> int:
    """One workload, one group of contenders, in this process; its record goes to ``args.out``."""
    import torch
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    device = "cuda:0" if args.device == "cuda" else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_peers: torch sees no CUDA device (use --device cpu for a CPU smoke run)", file=sys.stderr)
        return NO_DEVICE
    env = Env(torch, device, os.path.join(args.scratch, args.group))
    _fresh(env.scratch)
    if env.cuda:
        env.nvml = _nvml()
        try:
            import cupy
            env.cupy = cupy
        except ImportError:
            pass
    facts = _device_facts(env)

    def write(rec):
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**facts, "record": rec, "dcp_process_group": _PG.get("note")}, f, default=str)
        os.replace(tmp, args.out)

    try:
        rec = run_workload(env, args.child, args.group, args, args.soft_deadline, args.hard_deadline, log, write)
        write(rec)
    finally:
        shutil.rmtree(env.scratch, ignore_errors=True)
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    return 0


def merge(parts: list[dict], name: str) -> dict:
    """One workload's record from its children's (torch: limits and most contenders; jax: Orbax)."""
    recs = [p["record"] for p in parts if p.get("record")]
    if not recs:
        return {"workload": name, "error": "no child produced a record"}
    out = {k: v for k, v in recs[0].items() if k not in ("group", "done")}
    for key in ("limits", "contenders", "errors", "notes"):
        out[key] = {k: v for r in recs for k, v in r.get(key, {}).items()}
    out["groups"] = {r["group"]: {"runs_done": r.get("runs_done", 0), "rounds": r.get("rounds", []),
                                  "setup_s": r.get("setup_s"), "stopped": r.get("stopped"),
                                  "finished": bool(r.get("done"))} for r in recs}
    out["runs_done"] = min(r.get("runs_done", 0) for r in recs)
    stopped = [f"{r['group']}: {r['stopped']}" for r in recs if r.get("stopped")]
    if stopped:
        out["stopped"] = "; ".join(stopped)
    out.pop("rounds", None)
    out.pop("setup_s", None)
    out["summary"] = summarize(out)
    return out


def _spawn(cmd: list[str], timeout: float) -> dict:
    """Run a child (in our process group, so a kill of ours reaches it; its output goes to ours);
    end it on timeout, or when we are interrupted."""
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    timed_out = False
    try:
        proc.wait(max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:  # timed out, or we are being stopped: the child goes first
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"rc": proc.returncode, "seconds": round(time.time() - t0, 2), "timed_out": timed_out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the JSON file to write")
    ap.add_argument("--quick", action="store_true", help="tiny workloads, 2 counted runs")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {','.join(WORKLOADS)}")
    ap.add_argument("--runs", type=int, default=0, help="counted runs per workload (default 5, large8 3, quick 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole bench (default 135, quick 60)")
    ap.add_argument("--scratch", default=os.path.join(ROOT, "bench", "results", "peers-scratch.tmp"),
                    help="where checkpoints are written: a real disk, not tmpfs (default: git-ignored, removed)")
    ap.add_argument("--only", default="", help="comma-separated prefixes of contender names, e.g. gpusaver,dcp")
    # a child: one workload and group of contenders, with deadlines in time.time() seconds
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--group", default="torch", choices=tuple(GROUPS), help=argparse.SUPPRESS)
    ap.add_argument("--soft-deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    ap.add_argument("--hard-deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.only = [o for o in args.only.split(",") if o]
    if args.child:
        return child(args)
    # A SIGTERM (gpu_check's timeout) ends the children and still writes what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    workloads = [w for w in args.workloads.split(",") if w]
    bad = set(workloads) - set(WORKLOADS)
    if bad:
        ap.error(f"unknown workloads {sorted(bad)}")
    budget = args.budget or (60 if args.quick else 135)
    t_start = time.time()
    hard = t_start + budget
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    scratch = os.path.abspath(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    mount, fstype = mount_of(scratch)
    record = {
        "device": "cuda:0" if args.device == "cuda" else "cpu", "device_name": None, "python": sys.version.split()[0],
        "scratch": {"path": scratch, "mount": mount, "fstype": fstype, "free_bytes": shutil.disk_usage(scratch).free},
        "quick": args.quick, "budget_s": budget, "argv": sys.argv,
        "page_cache": "warm: each restore reads the files its save just wrote; no fsync anywhere; "
                      "dropping caches needs root",
        "processes": "per workload, one child process for the torch-side contenders and raw limits, and one "
                     "for Orbax/JAX; contenders rotate within a child, children run one after the other",
        "definitions": __doc__.split("What each figure means (every raw timing is kept in the JSON):")[1]
                       .split("Each contender saves")[0].strip(),
        "workloads": [],
    }
    groups = [g for g in GROUPS if any(_selected(label, args.only) for label in GROUPS[g])]

    def write():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, args.out)

    weights = {w: WORKLOADS[w][4] for w in workloads}
    try:
        for i, w in enumerate(workloads):
            now = time.time()
            if now >= hard - 5:
                record["workloads"].append({"workload": w, "skipped": "budget spent"})
                continue
            end = now + (hard - now) * weights[w] / sum(weights[x] for x in workloads[i:])
            parts, children = [], {}
            try:
                for g in groups:
                    if any(ch.get("rc") == NO_DEVICE for ch in children.values()):
                        break
                    now = time.time()
                    # the torch child gets most of the share; the JAX child what is left of it
                    soft = end if g == groups[-1] else now + (end - now) * 0.75
                    part = os.path.join(scratch, f"{w}.{g}.json")
                    cmd = [sys.executable, os.path.abspath(__file__), part, "--child", w, "--group", g,
                           "--device", args.device, "--warmup", str(args.warmup), "--runs", str(args.runs),
                           "--scratch", scratch, "--only", ",".join(args.only), "--soft-deadline", str(soft),
                           "--hard-deadline", str(min(hard, soft + 10))] + (["--quick"] if args.quick else [])
                    children[g] = {"rc": None, "killed": "bench interrupted"}
                    try:
                        children[g] = _spawn(cmd, min(hard, soft + 10) - now + 30)  # a hung child is killed
                    finally:  # what the child wrote counts, however it ended
                        try:
                            with open(part) as f:
                                parts.append(json.load(f))
                        except (OSError, ValueError) as e:
                            children[g]["error"] = f"no record: {_err(e)}"
            finally:
                rec = merge(parts, w)
                rec["children"] = children
                for p in parts:
                    record["device_name"] = record["device_name"] or p.get("device_name")
                    record.setdefault("versions", p.get("versions"))
                    record.setdefault("torch_cuda", p.get("torch_cuda"))
                    if p.get("dcp_process_group"):
                        record["dcp_process_group"] = p["dcp_process_group"]
                record["workloads"].append(rec)
                write()
            if "summary" in rec:
                print(markdown({**record, "workloads": [rec]}), flush=True)
            else:
                print(f"## {w}: failed: {rec.get('error')} {children}", flush=True)
            if any(ch.get("rc") == NO_DEVICE for ch in children.values()):
                record["error"] = "no CUDA device visible to torch"
                break
    finally:
        record["seconds"] = time.time() - t_start
        record["markdown"] = markdown({**record, "workloads": [w for w in record["workloads"] if "summary" in w]})
        write()
        shutil.rmtree(scratch, ignore_errors=True)
    if record.get("error"):
        log(f"[peers] {record['error']}")
        return 1
    failed = [f"{w['workload']}/{g}" for w in record["workloads"] for g, ch in w.get("children", {}).items()
              if ch.get("rc") != 0]
    log(f"[peers] done in {record['seconds']:.1f} s -> {args.out}"
        + (f"; failed children: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
