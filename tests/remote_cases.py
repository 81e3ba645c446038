"""What the object-store tests (test_s3.py, test_gcs.py) save and compare."""
import numpy as np

import gpusaver
from gpusaver.storage import for_url


def sample_arrays(seed: int = 0, smalls: int = 50) -> dict:
    """A 10 MiB tensor (several ranged reads and upload parts), odd dtypes, strings and ``smalls``
    small tensors; ``seed`` changes every value."""
    rng = np.random.default_rng(seed)
    return {
        "big": rng.standard_normal((10 << 20) // 4).astype(np.float32),
        "int": np.arange(1000, dtype=np.int64).reshape(10, 100) + seed,
        "half": rng.standard_normal(333).astype(np.float16),
        "text": np.array([b"alpha", b"", "gamma".encode()] * 3, dtype=object).reshape(3, 3),
        **{f"small/{i:03d}": np.full(i + 1, i + seed, np.int32) for i in range(smalls)},
    }


def assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tolist() == v.tolist(), k


def object_names(url: str, options) -> list[str]:
    """The names of the objects directly under ``url``."""
    return [p.rsplit("/", 1)[-1] for p in for_url(url, options).list(url)]


def check_manager_retention_and_restart(tf, url: str, options):
    """A CheckpointManager on a store keeps its newest two (deleting the oldest's objects), and a
    new one (a restarted job) finds the latest and restores it."""
    v = tf.Variable(np.zeros(4, np.float32))
    manager = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=v, options=options), url + "/run", max_to_keep=2)
    for step in range(3):
        v.assign(np.full(4, step, np.float32))
        manager.save()
    assert manager.checkpoints == [url + "/run/ckpt-2", url + "/run/ckpt-3"]
    assert not [n for n in object_names(url + "/run", options) if n.startswith("ckpt-1.")]
    restarted = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=v, options=options), url + "/run", max_to_keep=2)
    assert restarted.latest_checkpoint == url + "/run/ckpt-3"
    v.assign(np.zeros(4, np.float32))
    restarted.restore_or_initialize()
    np.testing.assert_array_equal(v.numpy(), np.full(4, 2, np.float32))
