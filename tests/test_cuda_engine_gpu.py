"""The CUDA staging engine end to end on a real GPU, through the framework-neutral API (CuPy
arrays; TensorFlow is not on the GPU machine). Skipped without CuPy or a GPU."""
import numpy as np
import pytest

import gpusaver
from gpusaver.format import BundleReader

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def _arrays(cp, n_small=300):
    rng = np.random.default_rng(5)
    host = {f"large/{i}": rng.random((3 * MiB + 13) // 4, dtype=np.float32) for i in range(3)}
    host.update({f"small/{i}": rng.integers(-1000, 1000, int(rng.integers(1, 300)), dtype=np.int32)
                 for i in range(n_small)})
    host["f16"] = rng.random((7, 9)).astype(np.float16)
    host["empty"] = np.zeros((0, 4), np.float32)
    return host, {k: cp.asarray(v) for k, v in host.items()}


@pytest.mark.parametrize("options", [
    gpusaver.Options(),
    gpusaver.Options(buffer_budget=2 * MiB, chunk_size=MiB, pack_threshold=0),
    gpusaver.Options(buffer_budget=2 * MiB, chunk_size=MiB, num_shards=3, snapshot="copy"),
])
def test_device_arrays_round_trip(cupy_gpu, tmp_path, options):
    cp = cupy_gpu
    host, device = _arrays(cp)
    prefix = str(tmp_path / "g")
    gpusaver.save(prefix, device, options)
    # The bytes on disk are what the host path writes for the same values (same CRCs too).
    gpusaver.save(str(tmp_path / "h"), host, options)
    with BundleReader(prefix) as a, BundleReader(str(tmp_path / "h")) as b:
        for k in host:
            assert a.entry(k) == b.entry(k) or a.entry(k).crc32c == b.entry(k).crc32c
            np.testing.assert_array_equal(a.read(k), host[k])
    loaded = gpusaver.load(prefix, device="cuda:0", options=options)
    for k, v in host.items():
        assert isinstance(loaded[k], cp.ndarray) and loaded[k].device.id == 0
        np.testing.assert_array_equal(cp.asnumpy(loaded[k]), v)


def test_corruption_detected_on_device(cupy_gpu, tmp_path):
    cp = cupy_gpu
    prefix = str(tmp_path / "c")
    gpusaver.save(prefix, {"x": cp.arange(1 << 20, dtype=cp.float32)})
    path = tmp_path / "c.data-00000-of-00001"
    raw = bytearray(path.read_bytes())
    raw[12345] ^= 4
    path.write_bytes(raw)
    with pytest.raises(gpusaver.CorruptCheckpointError, match="'x'"):
        gpusaver.load(prefix, device="cuda:0")


def test_copy_mode_snapshot_on_device(cupy_gpu, tmp_path):
    cp = cupy_gpu
    x = cp.arange(4 << 20, dtype=cp.float32)
    expected = cp.asnumpy(x)
    future = gpusaver.save_async(str(tmp_path / "s"), {"x": x}, gpusaver.Options(snapshot="copy"))
    x += 1  # after a copy-mode save_async returns, the staged bytes are already on the host
    future.result()
    np.testing.assert_array_equal(gpusaver.load(str(tmp_path / "s"))["x"], expected)
