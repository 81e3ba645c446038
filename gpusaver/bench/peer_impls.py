"""The contenders of the peers bench: one small class each, over the same numpy arrays.

Each writes into a directory of its own and loads everything back into host memory (numpy arrays
or torch tensors); the load's result is dropped only after the clock stops, so no contender is
charged for freeing memory.
"""
import json
import os
import subprocess
import sys
import time
import warnings

import crc32c
import numpy as np

import gpusaver
from gpusaver.bench import Workload


def fingerprints(arrays: dict) -> dict[str, int]:
    """{name: CRC32C of the value's bytes} (torch tensors through their numpy view)."""
    return {name: crc32c.crc32c(np.ascontiguousarray(v if isinstance(v, np.ndarray) else v.numpy())
                                .reshape(-1).view(np.uint8))
            for name, v in arrays.items()}


class Peer:
    """A way to save and load the arrays; ``save(directory)``, ``load(directory) -> {name: array}``."""

    def __init__(self, arrays: dict):
        self.arrays = arrays

    def save(self, directory: str):
        raise NotImplementedError

    def load(self, directory: str) -> dict:
        raise NotImplementedError

    def timed_save(self, directory: str) -> dict[str, float]:
        start = time.perf_counter()
        self.save(directory)
        return {"seconds": time.perf_counter() - start}

    def timed_load(self, directory: str) -> dict[str, float]:
        start = time.perf_counter()
        values = self.load(directory)
        seconds = time.perf_counter() - start
        del values
        return {"seconds": seconds}

    def check(self, directory: str, expected: dict[str, int]) -> bool:
        """Whether a load gives back exactly the saved values (untimed)."""
        return fingerprints(self.load(directory)) == expected

    def close(self):
        pass


class Core(Peer):
    """gpusaver's framework-neutral core: a CRC32C per tensor, written and verified."""

    def save(self, directory):
        gpusaver.save(os.path.join(directory, "ckpt"), self.arrays)

    def load(self, directory):
        return gpusaver.load(os.path.join(directory, "ckpt"))


class Safetensors(Peer):
    def __init__(self, arrays):
        super().__init__(arrays)
        import safetensors.numpy
        self._st = safetensors.numpy

    def save(self, directory):
        self._st.save_file(self.arrays, os.path.join(directory, "model.safetensors"))

    def load(self, directory):
        return self._st.load_file(os.path.join(directory, "model.safetensors"))


class _Torch(Peer):
    def __init__(self, arrays):
        super().__init__(arrays)
        import torch
        self._torch = torch
        # Zero-copy views: the peers move the very bytes the core does.
        self.state = {name: torch.from_numpy(a) for name, a in arrays.items()}


class TorchSave(_Torch):
    def save(self, directory):
        self._torch.save(self.state, os.path.join(directory, "model.pt"))

    def load(self, directory):
        return self._torch.load(os.path.join(directory, "model.pt"), weights_only=True)


class TorchDCP(_Torch):
    """torch.distributed.checkpoint in one process (no process group): its planner, metadata and
    file writer, as a single-host job would use them. Loads fill tensors allocated in the timing,
    as the others' outputs are."""

    def __init__(self, arrays):
        super().__init__(arrays)
        import torch.distributed.checkpoint as dcp
        self._dcp = dcp

    def save(self, directory):
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore")
            self._dcp.save(self.state, checkpoint_id=directory)

    def load(self, directory):
        out = {name: self._torch.empty_like(t) for name, t in self.state.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._dcp.load(out, checkpoint_id=directory)
        return out


class NpSavez(Peer):
    def save(self, directory):
        import numpy as np
        np.savez(os.path.join(directory, "model.npz"), **self.arrays)

    def load(self, directory):
        import numpy as np
        with np.load(os.path.join(directory, "model.npz")) as f:  # lazy: read every array here
            return {name: f[name] for name in f.files}


#: name → (class, what to install when its import fails)
PEERS = {
    "gpusaver (core)": (Core, None),
    "safetensors": (Safetensors, "pip install safetensors"),
    "torch.save": (TorchSave, "pip install torch (CPU build)"),
    "torch DCP": (TorchDCP, "pip install torch (CPU build)"),
    "np.savez": (NpSavez, None),
}


def available_peers(arrays: dict, workload: Workload) -> tuple[dict[str, Peer], dict[str, str]]:
    """({name: Peer} that could be set up, {name: why not} for the others)."""
    peers, skipped = {}, {}
    for name, (cls, install) in PEERS.items():
        try:
            peers[name] = cls(arrays)
        except ImportError as e:
            skipped[name] = f"not installed ({e}); {install}"
        except Exception as e:  # noqa: BLE001 — e.g. torch.from_numpy refusing bfloat16
            skipped[name] = f"cannot take {workload.dtype} arrays: {type(e).__name__}: {e}"
    return peers, skipped


# --- another gpusaver checkout, in a child process ---------------------------------------------------
_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import crc32c, ml_dtypes, numpy as np, gpusaver
spec = json.loads(sys.stdin.readline())
rng = np.random.default_rng(spec["seed"])
dtype = ml_dtypes.bfloat16 if spec["dtype"] == "bfloat16" else np.float32
arrays = {n: rng.random(tuple(s), dtype=np.float32).astype(dtype, copy=False) for n, s in spec["shapes"]}
crc = lambda a: crc32c.crc32c(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
expected = {n: crc(a) for n, a in arrays.items()}
print(json.dumps({"ready": gpusaver.__file__}), flush=True)
for line in sys.stdin:
    op, prefix = line.rstrip("\n").split(" ", 1)
    start = time.perf_counter()
    if op == "save":
        gpusaver.save(prefix, arrays)
        reply = {"seconds": time.perf_counter() - start}
    else:
        values = gpusaver.load(prefix)
        reply = {"seconds": time.perf_counter() - start}
        reply["ok"] = {n: crc(v) for n, v in values.items()} == expected
        del values
    print(json.dumps(reply), flush=True)
"""


class Baseline(Peer):
    """The core of another gpusaver checkout (``root``: the folder holding its ``gpusaver``
    package), timed in a child process that builds the same arrays (same generator, same seed)."""

    def __init__(self, root: str, workload: Workload, seed: int = 0):
        super().__init__({})
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self._proc = subprocess.Popen([sys.executable, "-c", _CHILD, os.path.abspath(root)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env)
        spec = {"seed": seed, "dtype": workload.dtype, "shapes": list(workload.shapes().items())}
        self._call(json.dumps(spec))
        self.ok = True

    def _call(self, line: str) -> dict:
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        reply = self._proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the baseline child exited ({self._proc.wait()})")
        return json.loads(reply)

    def timed_save(self, directory):
        return self._call(f"save {os.path.join(directory, 'ckpt')}")

    def timed_load(self, directory):
        reply = self._call(f"load {os.path.join(directory, 'ckpt')}")
        self.ok = self.ok and reply.pop("ok")
        return reply

    def save(self, directory):
        self.timed_save(directory)

    def check(self, directory, expected):
        # The child compares what it loaded with its own arrays.
        self.timed_load(directory)
        return self.ok

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait()
