"""Devices: TF device strings, DLPack device tuples and user shorthands → (kind, index)."""
import dataclasses
import functools
import re

_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST = 1, 2, 3
_TF_DEVICE = re.compile(r"(?:^|/)device:([A-Za-z_]+):(\d+)$|^/?([A-Za-z_]+):(\d+)$")


@dataclasses.dataclass(frozen=True)
class Device:
    """A place arrays live: ``kind`` is "cpu" or "cuda"; ``index`` the device number.

    ``name`` keeps TF's spelling ("/job:localhost/.../device:CPU:1") where one was given, so the
    TF adapter can place tensors on logical devices the core does not distinguish.
    """
    kind: str
    index: int = 0
    name: str = ""
    # A field, not a property: asked several times per tensor of a save.
    is_cuda: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "is_cuda", self.kind == "cuda")

    def __str__(self):
        return self.name or f"{self.kind}:{self.index}"


CPU = Device("cpu", 0)


def parse(device) -> Device:
    """A Device from "cpu", "cuda:1", "/GPU:0", a full TF device string, or a Device.

    Raises ValueError naming the string when it is none of these.
    """
    if isinstance(device, Device):
        return device
    if device is None or device == "":
        return CPU
    return _parse_text(str(device))


@functools.lru_cache(maxsize=1024)  # a model's thousands of tensors share a few device strings
def _parse_text(device: str) -> Device:
    text = device.strip()
    lower = text.lower()
    if lower in ("cpu", "host"):
        return CPU
    if lower in ("cuda", "gpu"):
        return Device("cuda", 0)
    m = _TF_DEVICE.search(text)
    if not m:
        raise ValueError(f"cannot parse device {device!r} (expected e.g. 'cpu', 'cuda:0', '/GPU:0')")
    kind, index = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    kind = kind.lower()
    if kind in ("gpu", "cuda"):
        return Device("cuda", int(index), text if text.startswith("/") else "")
    if kind == "cpu":
        return Device("cpu", int(index), text if text.startswith("/") else "")
    raise ValueError(f"device {device!r}: kind {kind!r} is not supported (CPU or GPU)")


def of_array(array) -> Device:
    """Where an array's memory is: a CUDA DLPack device, or ``__cuda_array_interface__`` (device
    from CuPy's ``array.device.id``), else the host."""
    get = getattr(array, "__dlpack_device__", None)
    if get is not None:
        try:
            dev_type, dev_id = get()
        except Exception:
            dev_type, dev_id = _DLPACK_CPU, 0
        if int(dev_type) == _DLPACK_CUDA:
            return Device("cuda", int(dev_id))
        if int(dev_type) in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
            return CPU
    if hasattr(array, "__cuda_array_interface__"):
        dev = getattr(array, "device", None)
        return Device("cuda", int(getattr(dev, "id", 0) or 0))
    return CPU
