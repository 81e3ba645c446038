"""Every kernels/*.cu compiles to a cubin through NVRTC 12 and NVRTC 13, without a GPU.

NVRTC comes from PyPI (``nvidia-cuda-nvrtc-cu12`` and ``nvidia-cuda-nvrtc``, both in the ``test``
extra) and is driven through its C API with ctypes: cuda-bindings 12 and 13 cannot be installed
side by side, while the two libraries (``libnvrtc.so.12``, ``libnvrtc.so.13``) load into one
process. CuPy's own compile path cannot be used here because it asks the CUDA driver first.
"""

import ctypes
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

from gpusaver.staging.cuda.kernels import _KERNELS, _OPTIONS, kernel_sources

KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernels"
SOURCES = sorted(KERNEL_DIR.glob("*.cu"))
ARCHES = ["sm_80", "sm_90"]
KERNEL_NAME = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)')

#: CUDA major -> (PyPI distribution that ships NVRTC, the library's file name in it).
NVRTC_WHEELS = {
    12: ("nvidia-cuda-nvrtc-cu12", "libnvrtc.so.12"),  # nvidia/cuda_nvrtc/lib/
    13: ("nvidia-cuda-nvrtc", "libnvrtc.so.13"),  # nvidia/cu13/lib/
}
NVRTC_SUCCESS = 0


class Nvrtc:
    """The few NVRTC entry points a compile needs, from one libnvrtc.so."""

    def __init__(self, path: Path):
        self.path = path
        # RTLD_LOCAL (ctypes' default): the two majors export the same names and must not
        # resolve into each other; each finds its libnvrtc-builtins through its $ORIGIN rpath.
        lib = ctypes.CDLL(str(path))
        self.lib = lib
        p, pp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        size_p, str_array = ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_char_p)
        signatures = {
            "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
            "nvrtcCreateProgram": [pp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                   str_array, str_array],
            "nvrtcCompileProgram": [p, ctypes.c_int, str_array],
            "nvrtcGetProgramLogSize": [p, size_p],
            "nvrtcGetProgramLog": [p, ctypes.c_char_p],
            "nvrtcGetCUBINSize": [p, size_p],
            "nvrtcGetCUBIN": [p, ctypes.c_char_p],
            "nvrtcDestroyProgram": [pp],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def error(self, result: int) -> str:
        return f"{self.lib.nvrtcGetErrorString(result).decode()} ({result})"

    def _check(self, result: int, what: str) -> None:
        assert result == NVRTC_SUCCESS, f"{what} in {self.path}: {self.error(result)}"

    def compile(self, source: str, name: str, options: list[str]) -> tuple[int, str, bytes]:
        """(nvrtcCompileProgram's result, the program log, the cubin: empty on failure)."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
            "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            result = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)),
                        "nvrtcGetProgramLogSize")
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            log_text = log.value.decode(errors="replace").strip()
            cubin = b""
            if result == NVRTC_SUCCESS:
                self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)),
                            "nvrtcGetCUBINSize")
                buf = ctypes.create_string_buffer(size.value)
                self._check(self.lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
                cubin = buf.raw
            return result, log_text, cubin
        finally:
            self._check(self.lib.nvrtcDestroyProgram(ctypes.byref(prog)), "nvrtcDestroyProgram")


def _wheel_library(dist_name: str, file_name: str) -> Path:
    """The library file inside an installed wheel; skips only when the wheel is not installed."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"NVRTC is looked up as {file_name}, a Linux library name")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist_name} is not installed, so {file_name} is absent "
                    "(pip install -e '.[test]' installs it)")
    found = [Path(dist.locate_file(f)) for f in dist.files or () if f.name == file_name]
    found = [p for p in found if p.is_file()]
    # Installed but without its library is a broken install, not a reason to skip.
    assert found, f"{dist_name} {dist.version} is installed but has no {file_name}"
    return found[0]


@pytest.fixture(scope="module", params=sorted(NVRTC_WHEELS), ids=lambda m: f"nvrtc{m}")
def nvrtc(request):
    major = request.param
    lib = Nvrtc(_wheel_library(*NVRTC_WHEELS[major]))
    assert lib.version[0] == major, f"{lib.path} is NVRTC {lib.version}, expected {major}.x"
    return lib


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
def test_compiles_to_cubin(nvrtc, path, arch):
    source = path.read_text(encoding="utf-8")
    where = f"{path.name} for {arch} with NVRTC {nvrtc.version[0]}.{nvrtc.version[1]}"
    result, log, cubin = nvrtc.compile(
        source, path.name, [*_OPTIONS, f"--gpu-architecture={arch}"])
    assert result == NVRTC_SUCCESS, f"{where}: {nvrtc.error(result)}\n{log}"
    assert not re.search(r"\bwarning\b", log, re.IGNORECASE), f"{where}:\n{log}"
    assert cubin[:4] == b"\x7fELF", f"{where}: not a cubin"
    # Every extern "C" kernel is in the binary under its unmangled name, as CuPy looks it up.
    for kernel in KERNEL_NAME.findall(source):
        assert kernel.encode() in cubin, f"{kernel} missing from the cubin of {where}"


def test_compile_error_carries_the_log(nvrtc):
    """The harness itself: a source NVRTC rejects gives a failed result and a log naming the
    error, which test_compiles_to_cubin puts in its failure message."""
    bad = 'extern "C" __global__ void broken(int* out) { out[0] = undeclared_name; }\n'
    result, log, cubin = nvrtc.compile(bad, "broken.cu", [*_OPTIONS, "--gpu-architecture=sm_80"])
    assert result != NVRTC_SUCCESS
    assert "undeclared_name" in log and "broken.cu" in log, log
    assert cubin == b""
