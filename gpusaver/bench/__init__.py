"""Checkpoint benchmarks: gpusaver beside TensorFlow's own savers and the machine's raw limits, in one run.

- :mod:`gpusaver.bench.cpu`: host variables — gpusaver ``Saver`` against ``tf.compat.v1.train.Saver``
  and ``tf.train.Checkpoint`` (sync and async), page cache and fsync'd, plus peak host memory per
  contender measured in child processes.
- :mod:`gpusaver.bench.gpu`: CuPy arrays through ``gpusaver.save``/``load`` against raw pinned copies.
- :mod:`gpusaver.bench.peers`: without TensorFlow, the core (numpy arrays, CRC-checked) beside
  safetensors, torch.save, torch DCP and np.savez on the same arrays.
- :mod:`gpusaver.bench.report`: machine description, JSON, markdown table, PNG plot, PASS/MISS targets.

This module holds what the CPU and GPU benches share: the workload shapes and the interleaved timer.
Run it through ``gpusaver bench`` (see ``gpusaver bench --help``) or ``bench/cpu_bench.py``.
"""
import dataclasses
import math
import statistics
import time
from typing import Callable

MiB = 1 << 20
GiB = 1 << 30

#: The mix workload: a few large tensors (embeddings, dense kernels) holding ~99% of the bytes, and
#: many small ones (biases, norms) that stress per-tensor overheads.
MIX_LARGE, MIX_SMALL, MIX_SMALL_SHARE = 16, 2000, 0.01
#: The small workload: many equal variables, where per-tensor cost dominates (105 KiB each at 1 GiB).
SMALL_COUNT = 10_000
#: The many workload: 8 KiB tensors (biases, norms, their optimizer slots), 30,000 per GiB of
#: ``--sizes``, so nearly all of the cost is per tensor and the scale runs grow the count.
MANY_TENSOR_BYTES, MANY_PER_GIB = 8 << 10, 30_000
#: --tiny keeps the structure (large + small, many small) but at a size a smoke test runs in seconds.
TINY_MIX_SMALL, TINY_SMALL_COUNT, TINY_MANY_COUNT = 100, 200, 300
WORKLOADS = ("mix", "small", "many")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What to save: ``kind`` (see :data:`WORKLOADS`), about ``size_bytes`` of ``dtype`` ("float32",
    "bfloat16"); for "many", ``size_bytes`` sets the tensor count (30,000 per GiB), not their size."""
    kind: str
    size_bytes: int
    dtype: str = "float32"
    tiny: bool = False

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{tensor name: shape}; the total is ``size_bytes`` rounded down to whole elements."""
        if self.kind == "mix":
            n_small = TINY_MIX_SMALL if self.tiny else MIX_SMALL
            small = max(1, int(self.size_bytes * MIX_SMALL_SHARE / n_small) // self.itemsize)
            large = max(1, (self.size_bytes - n_small * small * self.itemsize) // (MIX_LARGE * self.itemsize))
            large -= large % 1024 if large >= 1024 else 0  # whole rows of 1024, like a dense kernel
            shapes = {f"large_{i:02d}": _matrix(large) for i in range(MIX_LARGE)}
            shapes.update({f"small_{i:05d}": (small,) for i in range(n_small)})
            return shapes
        if self.kind == "small":
            count = TINY_SMALL_COUNT if self.tiny else SMALL_COUNT
            each = max(1, self.size_bytes // (count * self.itemsize))
            return {f"var_{i:05d}": (each,) for i in range(count)}
        if self.kind == "many":
            each = MANY_TENSOR_BYTES // self.itemsize
            return {f"var_{i:06d}": (each,) for i in range(self.count)}
        raise ValueError(f"unknown workload {self.kind!r} (known: {', '.join(WORKLOADS)})")

    @property
    def count(self) -> int:
        """How many tensors: fixed for mix and small, by ``size_bytes`` for many."""
        if self.kind == "many":
            return TINY_MANY_COUNT if self.tiny else max(1, round(MANY_PER_GIB * self.size_bytes / GiB))
        return len(self.shapes())

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values()) * self.itemsize

    @property
    def label(self) -> str:
        if self.kind == "many":
            return f"many {self.count} x {MANY_TENSOR_BYTES >> 10} KiB {self.dtype}"
        size = f"{self.size_bytes / GiB:g} GiB" if self.size_bytes >= GiB // 4 else f"{self.size_bytes / MiB:g} MiB"
        return f"{self.kind} {size} {self.dtype}"


def _matrix(elements: int) -> tuple[int, ...]:
    # 2-D where it divides, as model weights are; the writer only sees bytes, TF's savers see shapes.
    return (elements // 1024, 1024) if elements % 1024 == 0 and elements >= 1024 else (elements,)


@dataclasses.dataclass
class Case:
    """One contender: ``run()`` times itself and returns {metric: seconds} ("seconds" always: until done;
    "return_s" for async ones: until the call returned). ``setup()`` runs untimed before each run."""
    name: str
    phase: str  # "save", "fsync", "restore", "limit"
    run: Callable[[], dict[str, float]]
    setup: Callable[[], None] = lambda: None
    stall: bool = False  # blocks a training loop: report its stall (return_s, else seconds)


def timed(fn: Callable[[], object]) -> dict[str, float]:
    """{"seconds": wall time of fn()}."""
    start = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - start}


def interleave(cases: list[Case], runs: int, warmup: int = 1, progress: Callable[[str], None] = print
               ) -> dict[str, dict]:
    """Run the cases interleaved, A B C, B C A, C A B, ... (``warmup`` uncounted rounds, then ``runs``).

    Interleaving spreads drift (page-cache pressure, thermal, other tenants) over every contender
    instead of charging it to whichever ran last; rotating the order each round keeps any one
    contender from always following the same predecessor (e.g. one whose background writer or
    freed memory slows the next). Returns {name: {"phase", "stall", "runs": [...], "warmup": [...]}}.
    """
    out = {c.name: {"phase": c.phase, "stall": c.stall, "runs": [], "warmup": []} for c in cases}
    for round_ in range(warmup + runs):
        k = round_ % len(cases)
        for case in cases[k:] + cases[:k]:
            case.setup()
            result = case.run()
            out[case.name]["warmup" if round_ < warmup else "runs"].append(result)
        progress(f"  round {round_ + 1}/{warmup + runs} ({'warm-up' if round_ < warmup else 'counted'})")
    return out


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max (seconds); NaN for an empty list."""
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
