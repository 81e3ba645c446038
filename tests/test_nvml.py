"""GPU description through NVML: never raises, and the link-rate arithmetic."""

import dataclasses
import sys
import types

import pytest

from gpusaver.bench import nvml


def test_device_info_returns_a_list():
    info = nvml.device_info()
    assert isinstance(info, list)
    assert all(isinstance(g, nvml.GpuInfo) for g in info)
    assert nvml.device_info(index=10_000) == []


@pytest.mark.parametrize("gen, width, expected", [
    (1, 1, 250e6),
    (2, 16, 8e9),
    (3, 16, 15.75e9),
    (4, 16, 31.51e9),
    (5, 16, 63.02e9),
    (6, 16, 121.0e9),
    (4, 8, 15.75e9),
])
def test_link_rate(gen, width, expected):
    assert nvml.pcie_link_bytes_per_s(gen, width) == pytest.approx(expected, rel=1e-3)


def test_lane_rates_match_published_figures():
    published_mb_s = {1: 250, 2: 500, 3: 985, 4: 1969, 5: 3938, 6: 7563}
    for gen, mb_s in published_mb_s.items():
        assert nvml.PCIE_LANE_BYTES_PER_S[gen] / 1e6 == pytest.approx(mb_s, abs=1)


@pytest.mark.parametrize("gen, width", [(0, 16), (7, 16), (3, 0)])
def test_link_rate_rejects_unknown(gen, width):
    with pytest.raises(ValueError):
        nvml.pcie_link_bytes_per_s(gen, width)


def _fake_pynvml(*, fail_init=False, link_supported=True):
    """A stand-in for pynvml with two GPUs, to check how device_info assembles its answer on
    a machine without a driver."""

    class NVMLError(Exception):
        pass

    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.shutdowns = 0

    def init():
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    def shutdown():
        m.shutdowns += 1

    def link(value):
        def get(handle):
            if not link_supported:
                raise NVMLError("Not Supported")
            return value
        return get

    m.nvmlInit = init
    m.nvmlShutdown = shutdown
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3" if h[1] == 0 else "NVIDIA A100"
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30, free=1, used=2)
    m.nvmlDeviceGetMaxPcieLinkGeneration = link(5)
    m.nvmlDeviceGetCurrPcieLinkGeneration = link(1)
    m.nvmlDeviceGetMaxPcieLinkWidth = link(16)
    m.nvmlDeviceGetCurrPcieLinkWidth = link(16)
    return m


def test_device_info_assembly(monkeypatch):
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = nvml.device_info()
    assert [g.index for g in info] == [0, 1]
    g = info[0]
    assert g.name == "NVIDIA H100 80GB HBM3" and info[1].name == "NVIDIA A100"
    assert g.total_memory_bytes == 80 * 2**30
    assert (g.pcie_generation_max, g.pcie_generation_current) == (5, 1)
    assert (g.pcie_width_max, g.pcie_width_current) == (16, 16)
    assert g.theoretical_link_bytes_per_s == pytest.approx(63.02e9, rel=1e-3)
    assert dataclasses.asdict(g)["theoretical_link_bytes_per_s"] == g.theoretical_link_bytes_per_s
    assert [x.index for x in nvml.device_info(index=1)] == [1]
    assert fake.shutdowns == 2


def test_device_info_link_not_supported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(link_supported=False))
    (g, _) = nvml.device_info()
    assert g.pcie_generation_max is None and g.pcie_width_current is None
    assert g.theoretical_link_bytes_per_s is None


def test_device_info_no_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    assert nvml.device_info() == []


def test_device_info_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    assert nvml.device_info() == []
