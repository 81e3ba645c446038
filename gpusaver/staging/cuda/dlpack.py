"""Device arrays in and out through DLPack, for producers and consumers with different rules.

In: :func:`import_array` turns any device array into a CuPy view. CuPy's ``from_dlpack`` hands the
producer a stream to order its work against (``__dlpack__(stream=...)``), which is what torch and
JAX expect; TensorFlow 2.21's tensors refuse any stream (``RuntimeError``, where CuPy only falls
back on ``TypeError``), so those are imported from their stream-less capsule — the adapter that
hands them over has already waited for TF's device work (see ``gpusaver.tf.variables``).

Out: :func:`legacy_capsule` gives an unversioned ``"dltensor"`` capsule. CuPy 14's ``toDlpack()``
returns a ``"dltensor_versioned"`` one, which TF 2.21's ``from_dlpack`` refuses. Arrays handed out
are complete (the engine synchronises its stream first), so no stream is passed on.
"""
import ctypes

from gpusaver.staging.cuda import kernels

LEGACY, VERSIONED = b"dltensor", b"dltensor_versioned"
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype = ctypes.c_int
_capsule_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]


def capsule_name(capsule) -> bytes | None:
    """``b"dltensor"``, ``b"dltensor_versioned"`` (or their ``used_`` forms), or None."""
    for name in (LEGACY, VERSIONED, b"used_" + LEGACY, b"used_" + VERSIONED):
        if _capsule_valid(capsule, name):
            return name
    return None


class CapsuleProducer:
    """A legacy capsule dressed as a DLPack producer, for consumers that only take objects.

    Any ``stream`` is accepted and ignored: the producer finished its work before the capsule was
    taken, so there is nothing to order against; a legacy capsule answers any ``max_version``.
    Holding the capsule holds the producer's buffer.
    """
    __slots__ = ("_capsule", "_device")

    def __init__(self, capsule, device: tuple[int, int]):
        self._capsule, self._device = capsule, tuple(device)

    def __dlpack_device__(self):
        return self._device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy or (dl_device is not None and tuple(dl_device) != self._device):
            raise BufferError("an exported capsule can only be shared where it lives, without a copy")
        return self._capsule


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def device_field(capsule):
    """The (device_type, device_id) pair inside a legacy DLPack capsule, writable in place (TF
    numbers devices by its logical index, CuPy by CUDA ordinal).

    ``DLManagedTensor`` begins with ``DLTensor {void *data; DLDevice device; ...}``. Raises
    ValueError for a capsule that is not an unconsumed ``"dltensor"``.
    """
    address = _capsule_pointer(capsule, LEGACY)
    return (ctypes.c_int32 * 2).from_address(address + ctypes.sizeof(ctypes.c_void_p))


def import_array(obj):
    """A CuPy array viewing ``obj``'s device memory (no copy), ordered after its producer's work.

    CuPy arrays are returned as they are; ``__cuda_array_interface__`` objects go through CuPy's
    own import (which honours the interface's stream); DLPack producers are asked for a capsule
    on CuPy's current stream, and those that refuse a stream argument (TF) for a plain one.
    """
    cp = kernels._import_cupy()
    if isinstance(obj, cp.ndarray):
        return obj
    if not hasattr(obj, "__dlpack__"):
        return cp.asarray(obj)
    try:
        return cp.from_dlpack(obj)
    except (RuntimeError, BufferError, TypeError):
        # TF 2.21: "__dlpack__ stream argument not supported" (RuntimeError). Its capsule export
        # needs no stream: the producer's work was synchronised before the tensor reached us.
        return cp.from_dlpack(CapsuleProducer(obj.__dlpack__(), obj.__dlpack_device__()))


def legacy_capsule(array):
    """An unversioned ``"dltensor"`` capsule of a CuPy array, for consumers such as TF 2.21's
    ``tf.experimental.dlpack.from_dlpack``. The array's pending work must be complete."""
    capsule = array.__dlpack__()  # no max_version: CuPy 13 and 14 both give the legacy form
    if capsule_name(capsule) != LEGACY:
        raise RuntimeError(f"CuPy returned a DLPack capsule named {capsule_name(capsule)!r}, "
                           f"expected {LEGACY!r}")
    return capsule
