"""What the GPUs are and how fast their PCIe links can be, through NVML.

Used to report device names and to put measured copy rates beside the link's theoretical
rate. ``pynvml`` (the ``nvidia-ml-py`` package) is imported lazily and only here; without it,
without a driver or without a GPU, :func:`device_info` returns an empty list and never raises,
because this information is advisory and must not stop a save or a benchmark.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["GpuInfo", "device_info", "pcie_link_bytes_per_s", "PCIE_LANE_BYTES_PER_S"]

#: Usable bytes per second per lane and direction, after line coding: 8b/10b for gen 1-2,
#: 128b/130b for gen 3-5, and for gen 6 PAM4 with 242 payload bytes per 256-byte FLIT.
PCIE_LANE_BYTES_PER_S = {
    1: 2.5e9 * 8 / 10 / 8,  # 250 MB/s
    2: 5.0e9 * 8 / 10 / 8,  # 500 MB/s
    3: 8.0e9 * 128 / 130 / 8,  # ~985 MB/s
    4: 16.0e9 * 128 / 130 / 8,  # ~1969 MB/s
    5: 32.0e9 * 128 / 130 / 8,  # ~3938 MB/s
    6: 64.0e9 * 242 / 256 / 8,  # ~7563 MB/s
}


def pcie_link_bytes_per_s(generation: int, width: int) -> float:
    """Theoretical one-direction rate of a PCIe link, in bytes per second.

    Protocol overhead above line coding (packet headers, flow control) is not subtracted, so
    real copies top out some 10-20% lower.

    Args:
        generation: PCIe generation, 1 to 6.
        width: lanes (x1 ... x32).

    Raises:
        ValueError: unknown generation or a width below 1.
    """
    generation = operator.index(generation)
    width = operator.index(width)
    if generation not in PCIE_LANE_BYTES_PER_S:
        raise ValueError(f"unknown PCIe generation {generation} (known: 1 to 6)")
    if width < 1:
        raise ValueError(f"PCIe link width must be >= 1 lane, got {width}")
    return PCIE_LANE_BYTES_PER_S[generation] * width


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. PCIe fields are None where NVML cannot tell (e.g. SXM
    parts behind a switch in some VMs).

    The "max" link values are the best this GPU and this slot support together; "current"
    ones are what the link runs at now, which drops while the GPU idles to save power, so
    the theoretical rate uses the max values.
    """

    index: int
    name: str
    total_memory_bytes: int
    pcie_generation_max: Optional[int]
    pcie_generation_current: Optional[int]
    pcie_width_max: Optional[int]
    pcie_width_current: Optional[int]
    #: One-direction PCIe rate from the max generation and width, in bytes/s; None if either
    #: is unknown. Derived, and a field so that ``dataclasses.asdict`` reports carry it.
    theoretical_link_bytes_per_s: Optional[float] = field(init=False)

    def __post_init__(self):
        rate = None
        if self.pcie_generation_max is not None and self.pcie_width_max is not None:
            try:
                rate = pcie_link_bytes_per_s(self.pcie_generation_max, self.pcie_width_max)
            except ValueError:
                rate = None
        object.__setattr__(self, "theoretical_link_bytes_per_s", rate)  # frozen dataclass


def _optional(fn, *args) -> Optional[int]:
    # A GPU that cannot report its link (not supported, virtualised) is still listed.
    try:
        return int(fn(*args))
    except Exception:
        return None


def device_info(index: Optional[int] = None) -> list[GpuInfo]:
    """Describe every GPU NVML sees, or only GPU ``index`` (NVML's numbering).

    Returns:
        One :class:`GpuInfo` per GPU, in index order; an empty list when ``pynvml`` is not
        installed, NVML or the driver cannot be loaded, there is no GPU, or ``index`` is out
        of range. Never raises.
    """
    try:
        import pynvml
    except Exception:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        wanted = range(count) if index is None else [i for i in range(count) if i == index]
        result = []
        for i in wanted:
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # older pynvml returns bytes
                name = name.decode("utf-8", "replace")
            result.append(GpuInfo(
                index=i,
                name=str(name),
                total_memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                pcie_generation_max=_optional(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
                pcie_generation_current=_optional(
                    pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
                pcie_width_max=_optional(pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
                pcie_width_current=_optional(pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
            ))
        return result
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
