"""Run-time loader and launchers for the CUDA kernels in ``kernels/*.cu``.

The sources are compiled with NVRTC through CuPy on first use, once per source per process
(CuPy also caches the binary on disk and per device). CuPy is imported here, lazily, and only
here in the staging layer's kernel path: without it, :func:`kernel_sources` still works (the
compile test uses it) and everything else raises an ``ImportError`` that says what to install.

Launches go on CuPy's current stream, or on ``stream`` where given (which must belong to the
device the arrays live on). Inputs must be ready in that stream's order (work queued on other
streams is the caller's to synchronise with); results are valid in that stream's order.
"""

from __future__ import annotations

import contextlib
import operator
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from .crc import THREADS as _CRC_THREADS
from .crc import combine_segments, pack_layout

__all__ = ["kernel_sources", "load_kernels", "device_crc32c", "crc32c_start", "pack", "unpack", "gather",
           "scatter"]

#: Source file stem -> kernel names it defines.
_KERNELS = {
    "crc32c": ("crc32c_segments",),
    "pack": ("pack_gather", "unpack_scatter"),
}
_OPTIONS = ("-std=c++14",)
_PACK_THREADS = 256
_MAX_GRID = 65535  # blocks loop over their work, so more would only queue
_INSTALL_HINT = ("pip install 'gpusaver[cuda13]' (or 'gpusaver[cuda12]' for drivers older than 580); "
                 "from a clone of the repository: pip install -e '.[cuda13]' (or -e '.[cuda12]')")
# kDLCUDA, kDLCUDAManaged, kDLROCM: memory a kernel can read. Host arrays (numpy has
# __dlpack__ too) are refused here rather than copied behind the caller's back.
_DLPACK_DEVICE_TYPES = (2, 13, 10)


def _kernel_dir():
    """Where the .cu files are, as an ``importlib.resources`` Traversable: the package
    ``gpusaver._kernels`` (pyproject.toml maps it to the top-level kernels/, so wheels carry
    gpusaver/_kernels/*.cu and editable installs resolve it to the checkout), else, for a source
    tree imported without installing it (PYTHONPATH), the checkout's top-level kernels/."""
    from importlib import resources

    candidates = []
    try:
        candidates.append(resources.files("gpusaver._kernels"))
    except ModuleNotFoundError:
        pass
    candidates.append(Path(__file__).resolve().parents[3] / "kernels")
    for d in candidates:
        if all(d.joinpath(f"{stem}.cu").is_file() for stem in _KERNELS):
            return d
    raise FileNotFoundError(
        "gpusaver's CUDA sources (crc32c.cu, pack.cu) were not found in "
        + " or ".join(str(d) for d in candidates)
        + "; reinstall gpusaver (pip install gpusaver, or pip install -e . in a checkout)")


@lru_cache(maxsize=None)
def _source(stem: str) -> str:
    return _kernel_dir().joinpath(f"{stem}.cu").read_text(encoding="utf-8")


def kernel_sources() -> dict[str, str]:
    """Kernel source texts by name (``"crc32c"``, ``"pack"``); needs no CuPy.

    Raises:
        FileNotFoundError: the .cu files are in neither search location.
    """
    return {stem: _source(stem) for stem in _KERNELS}


def _import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise ImportError(
            f"gpusaver's GPU kernels need CuPy, which is not installed: {_INSTALL_HINT}") from e
    return cupy


@lru_cache(maxsize=None)
def _module(stem: str):
    cupy = _import_cupy()
    return cupy.RawModule(code=_source(stem), options=_OPTIONS)


def load_kernels() -> dict:
    """The compiled kernels by name (``crc32c_segments``, ``pack_gather``, ``unpack_scatter``),
    as ``cupy.RawKernel`` objects. Compilation happens once per source per process.

    Raises:
        ImportError: CuPy is not installed (install ``gpusaver[cuda]``).
        FileNotFoundError: the .cu sources are missing.
        cupy.cuda.compiler.CompileException: a source fails to compile (a packaging bug).
    """
    return {name: _module(stem).get_function(name)
            for stem, names in _KERNELS.items() for name in names}


def _kernel(name: str):
    for stem, names in _KERNELS.items():
        if name in names:
            return _module(stem).get_function(name)
    raise KeyError(name)


@lru_cache(maxsize=None)
def _sm_count(cupy, device_id: int) -> int:
    return int(cupy.cuda.runtime.deviceGetAttribute(
        cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device_id))


def _device_bytes(cupy, obj, what: str):
    """A 1-D uint8 view (no copy) of a C-contiguous device array: a CuPy array, or anything
    with ``__cuda_array_interface__`` or ``__dlpack__``."""
    if isinstance(obj, cupy.ndarray):
        arr = obj
    elif hasattr(obj, "__cuda_array_interface__"):
        arr = cupy.asarray(obj)
    elif hasattr(obj, "__dlpack__"):
        device_type = obj.__dlpack_device__()[0] if hasattr(obj, "__dlpack_device__") else None
        if device_type is not None and int(device_type) not in _DLPACK_DEVICE_TYPES:
            raise TypeError(f"{what}: expected a device array, got a {type(obj).__name__} "
                            f"in DLPack device type {int(device_type)} memory")
        arr = cupy.from_dlpack(obj)
    else:
        raise TypeError(f"{what}: expected a device array, got {type(obj).__name__}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what}: device array must be C-contiguous (shape {arr.shape}, "
                         f"strides {arr.strides})")
    return arr.reshape(-1).view(cupy.uint8)


def _stream_ctx(stream):
    return stream if stream is not None else contextlib.nullcontext()


def device_crc32c(device_array, segment: int = 1 << 20, stream=None) -> int:
    """CRC-32C (unmasked, as ``crc32c.crc32c``) of a C-contiguous device array's bytes.

    The device computes one CRC per ``segment`` bytes; those (4 bytes per segment) are copied
    back and combined on the host, so only the CRC array crosses the bus. Blocks until the
    result is on the host. An empty array gives 0.

    Args:
        device_array: CuPy array, or anything with ``__cuda_array_interface__``/``__dlpack__``.
        segment: bytes per device segment (> 0); 1 MiB keeps the grid busy for buffers from
            about 100 MiB up while leaving little host work.
        stream: a ``cupy.cuda.Stream`` on the array's device; default the current stream.

    Raises:
        ImportError: CuPy is not installed.
        TypeError: ``device_array`` is not a device array.
        ValueError: the array is not C-contiguous, or ``segment <= 0``.
    """
    return crc32c_start(device_array, segment, stream).result()


class PendingCrc:
    """A device CRC launched on a stream; :meth:`result` waits for it and folds the segments."""

    def __init__(self, segments, segment: int, nbytes: int, stream, host=None, landed=None):
        self._segments, self._segment, self._nbytes, self._stream = segments, segment, nbytes, stream
        self._host, self._landed = host, landed

    def result(self) -> int:
        if self._segments is None:
            return 0
        if self._host is not None:
            self._landed.synchronize()
            crcs = self._host
        else:
            with _stream_ctx(self._stream):
                crcs = self._segments.get()  # waits for this stream's work up to here
        return combine_segments(crcs, self._segment, self._nbytes)


def crc32c_start(device_array, segment: int = 1 << 20, stream=None, copy_stream=None) -> PendingCrc:
    """Launch :func:`device_crc32c`'s kernel without waiting: the CRC of chunk k is folded on
    the host while the device already checksums chunk k+1. Same arguments and errors.

    ``copy_stream``: bring the segment CRCs back on this stream (after its work so far, and
    after the kernel), into pinned memory, without blocking. A blocking read on the CRC stream
    would queue behind the large copies the link is busy with and stall the staging thread."""
    cupy = _import_cupy()
    data = _device_bytes(cupy, device_array, "device_crc32c")
    segment = operator.index(segment)
    if segment <= 0:
        raise ValueError(f"segment must be > 0 bytes, got {segment}")
    n = data.size
    if n == 0:
        return PendingCrc(None, segment, 0, stream)
    nseg = -(-n // segment)
    with data.device, _stream_ctx(stream):
        out = cupy.empty(nseg, dtype=cupy.uint32)
        # Resident-block count is enough: each block loops over segments and builds its
        # tables once, so extra blocks would only rebuild tables.
        grid = min(nseg, 8 * _sm_count(cupy, data.device.id), _MAX_GRID)
        _kernel("crc32c_segments")(
            (grid,), (_CRC_THREADS,), (data, np.uint64(n), np.uint64(segment), out))
        if copy_stream is None:
            return PendingCrc(out, segment, n, stream)
        copy_stream.wait_event(cupy.cuda.get_current_stream().record())
        host = _pinned_uint32(cupy, nseg)
        out.get(stream=copy_stream, out=host, blocking=False)
        return PendingCrc(out, segment, n, stream, host, copy_stream.record())


def _pinned_uint32(cupy, n: int) -> np.ndarray:
    # CuPy's pinned pool: a few bytes per chunk, reused from the pool after the first chunks.
    mem = cupy.cuda.alloc_pinned_memory(4 * n)
    return np.frombuffer(mem, dtype=np.uint32, count=n)


def _metadata(cupy, columns: Sequence[Sequence[int]]):
    """One host-to-device copy of several uint64 columns; returns device views of each."""
    host = np.asarray(columns, dtype=np.uint64).reshape(len(columns), -1)
    dev = cupy.asarray(host)
    return [dev[i] for i in range(len(columns))]


def _check_same_device(arrays, device, what: str) -> None:
    for i, a in enumerate(arrays):
        if a.device.id != device.id:
            raise ValueError(f"{what}: array {i} is on device {a.device.id}, "
                             f"expected device {device.id}")


def pack(device_arrays: Sequence, out=None, *, align: int = 16, stream=None):
    """Gather device arrays into one contiguous uint8 device buffer (``pack_gather``).

    Layout is :func:`gpusaver.staging.cuda.crc.pack_layout` of the arrays' byte sizes: each array
    starts at a multiple of ``align`` bytes. A buffer allocated here has zero padding; an
    ``out`` given keeps whatever its padding bytes held. Inputs are not modified.

    Args:
        device_arrays: C-contiguous device arrays (any dtype), all on one device.
        out: optional C-contiguous uint8 CuPy array of at least the packed size, same device.
        align: power-of-two alignment of each start, in bytes.
        stream: a ``cupy.cuda.Stream`` on that device; default the current stream.

    Returns:
        (buffer, offsets): the uint8 device buffer and a numpy int64 array of byte offsets.

    Raises:
        ImportError: CuPy is not installed.
        ValueError: non-contiguous arrays, mixed devices, an ``out`` too small or not uint8.
    """
    cupy = _import_cupy()
    views = [_device_bytes(cupy, a, f"pack: array {i}") for i, a in enumerate(device_arrays)]
    sizes = [v.size for v in views]
    offsets, total = pack_layout(sizes, align)
    device = views[0].device if views else (out.device if out is not None else cupy.cuda.Device())
    _check_same_device(views, device, "pack")
    if out is not None:
        if not isinstance(out, cupy.ndarray) or out.dtype != cupy.uint8 or out.ndim != 1 \
                or not out.flags.c_contiguous:
            raise ValueError("pack: out must be a 1-D C-contiguous uint8 CuPy array")
        if out.size < total:
            raise ValueError(f"pack: out holds {out.size} bytes, packing needs {total}")
        _check_same_device([out], device, "pack: out")
    work = [i for i, s in enumerate(sizes) if s > 0]
    if len(work) > np.iinfo(np.int32).max:
        raise ValueError(f"pack: {len(work)} arrays exceed one launch")
    with device, _stream_ctx(stream):
        if out is None:
            out = cupy.zeros(total, dtype=cupy.uint8)
        gather([views[i].data.ptr for i in work], [sizes[i] for i in work],
               [int(offsets[i]) for i in work], out)
    return out, offsets


def gather(pointers: Sequence[int], sizes: Sequence[int], offsets: Sequence[int], out) -> None:
    """Launch ``pack_gather`` on the current device and stream: ``sizes[i]`` bytes from device
    address ``pointers[i]`` to ``out[offsets[i]:]``. No checks: :func:`pack` is the checked form;
    the CUDA engine calls this directly because per-array checks cost more than the copy."""
    cupy = _import_cupy()
    if not len(pointers):
        return
    ptrs, nbytes, offs = _metadata(cupy, [pointers, sizes, offsets])
    _kernel("pack_gather")((min(len(pointers), _MAX_GRID),), (_PACK_THREADS,),
                           (ptrs, nbytes, offs, np.int32(len(pointers)), out))


def scatter(src, offsets: Sequence[int], sizes: Sequence[int], pointers: Sequence[int]) -> None:
    """Launch ``unpack_scatter`` on the current device and stream, the inverse of :func:`gather`;
    unchecked like it (:func:`unpack` is the checked form)."""
    cupy = _import_cupy()
    if not len(pointers):
        return
    offs, nbytes, ptrs = _metadata(cupy, [offsets, sizes, pointers])
    _kernel("unpack_scatter")((min(len(pointers), _MAX_GRID),), (_PACK_THREADS,),
                              (src, offs, nbytes, ptrs, np.int32(len(pointers))))


def unpack(buf, offsets: Sequence[int], outs: Sequence, *, stream=None):
    """Scatter a packed device buffer back into device arrays (``unpack_scatter``).

    ``outs[i]`` receives ``outs[i].nbytes`` bytes from ``buf[offsets[i]:]``; ``buf`` is not
    modified.

    Args:
        buf: the packed uint8 device buffer (as returned by :func:`pack`).
        offsets: byte offset of each array in ``buf``.
        outs: C-contiguous device arrays to fill, on ``buf``'s device.
        stream: a ``cupy.cuda.Stream`` on that device; default the current stream.

    Returns:
        ``outs``, as a list.

    Raises:
        ImportError: CuPy is not installed.
        ValueError: counts differ, a range runs past the end of ``buf``, non-contiguous arrays
            or mixed devices.
    """
    cupy = _import_cupy()
    src = _device_bytes(cupy, buf, "unpack: buf")
    outs = list(outs)
    offsets = [operator.index(o) for o in offsets]
    if len(offsets) != len(outs):
        raise ValueError(f"unpack: {len(offsets)} offsets but {len(outs)} output arrays")
    views = [_device_bytes(cupy, o, f"unpack: output {i}") for i, o in enumerate(outs)]
    _check_same_device(views, src.device, "unpack")
    for i, (off, v) in enumerate(zip(offsets, views)):
        if off < 0 or off + v.size > src.size:
            raise ValueError(f"unpack: output {i} needs bytes [{off}, {off + v.size}) of a "
                             f"{src.size}-byte buffer")
    work = [i for i, v in enumerate(views) if v.size > 0]
    if len(work) > np.iinfo(np.int32).max:
        raise ValueError(f"unpack: {len(work)} arrays exceed one launch")
    with src.device, _stream_ctx(stream):
        scatter(src, [offsets[i] for i in work], [views[i].size for i in work],
                [views[i].data.ptr for i in work])
    return outs
