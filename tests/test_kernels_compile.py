"""Every kernels/*.cu compiles to a cubin through NVRTC, without a GPU.

NVRTC comes from PyPI (``nvidia-cuda-nvrtc-cu12``) and is driven through ``cuda-bindings``;
CuPy's own compile path cannot be used here because it asks the CUDA driver first.
"""

import ctypes
import re
from pathlib import Path

import pytest

from gpusaver.staging.cuda.kernels import _KERNELS, kernel_sources

nvrtc = pytest.importorskip("cuda.bindings.nvrtc")

KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernels"
SOURCES = sorted(KERNEL_DIR.glob("*.cu"))
ARCHES = ["sm_80", "sm_90"]
OPTIONS = ["-std=c++14"]  # what gpusaver.staging.cuda.kernels hands CuPy
KERNEL_NAME = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)')


def _preload_wheel_nvrtc() -> None:
    """Load libnvrtc from the nvidia-cuda-nvrtc-cu12 wheel so that cuda.bindings, which may
    look only on the system library path (releases without cuda-pathfinder), finds it."""
    try:
        import nvidia.cuda_nvrtc
    except ImportError:
        return
    for root in nvidia.cuda_nvrtc.__path__:
        for lib in sorted(Path(root, "lib").glob("libnvrtc.so*")):
            if "builtins" not in lib.name:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                return


@pytest.fixture(scope="module")
def nvrtc_ready():
    try:
        err, *_ = nvrtc.nvrtcVersion()
    except Exception:  # the shared library was not found: help it, then try once more
        _preload_wheel_nvrtc()
        err, *_ = nvrtc.nvrtcVersion()
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS


def _check(err, what):
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{what}: {err}"


def _compile(source: bytes, name: str, arch: str) -> tuple[object, str, bytes]:
    err, prog = nvrtc.nvrtcCreateProgram(source, name.encode(), 0, [], [])
    _check(err, "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in OPTIONS + [f"--gpu-architecture={arch}"]]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, log_size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check(err, "nvrtcGetProgramLogSize")
        log = b" " * log_size
        (err,) = nvrtc.nvrtcGetProgramLog(prog, log)
        _check(err, "nvrtcGetProgramLog")
        log_text = log.rstrip(b"\0 ").decode(errors="replace")
        cubin = b""
        if result == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            _check(err, "nvrtcGetCUBINSize")
            cubin = b" " * size
            (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
            _check(err, "nvrtcGetCUBIN")
        return result, log_text, cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def test_sources_found():
    assert {p.stem for p in SOURCES} >= {"crc32c", "pack"}
    # The run-time loader reads the same files.
    loaded = kernel_sources()
    for p in SOURCES:
        if p.stem in loaded:
            assert loaded[p.stem] == p.read_text(encoding="utf-8")
    # Every kernel the loader launches is defined in the source it looks in.
    for stem, names in _KERNELS.items():
        assert set(names) <= set(KERNEL_NAME.findall(loaded[stem])), stem


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_compiles_to_cubin(nvrtc_ready, path, arch):
    source = path.read_text(encoding="utf-8")
    result, log, cubin = _compile(source.encode(), path.name, arch)
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{path.name} for {arch}:\n{log}"
    assert not re.search(r"\bwarning\b", log, re.IGNORECASE), f"{path.name} for {arch}:\n{log}"
    assert len(cubin) > 0
    # Every extern "C" kernel is in the binary under its unmangled name, as CuPy looks it up.
    for kernel in KERNEL_NAME.findall(source):
        assert kernel.encode() in cubin, f"{kernel} missing from {path.name} cubin for {arch}"
