"""Multi-worker saves on a real MultiWorkerMirroredStrategy cluster: worker processes on localhost."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import gpusaver
from gpusaver.storage import for_url
from servers import free_ports

tf = pytest.importorskip("tensorflow")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mw_worker.py")


def _run_cluster(n: int, directory, scenario: str, timeout: float = 240, env: dict | None = None) -> list[dict | None]:
    """Start n workers (``env``: added to their environment); return each one's RESULT (None for
    a worker that printed none)."""
    ports = ",".join(map(str, free_ports(n)))
    env = dict(os.environ, **(env or {}),
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(WORKER)), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), ports, str(directory), scenario],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(n)]
    results: list[dict | None] = [None] * n
    logs = [""] * n

    def collect(i):
        for line in procs[i].stdout:  # the result line comes before TF's shutdown, which may linger
            if line.startswith("RESULT "):
                results[i] = json.loads(line[len("RESULT "):])
                return

    readers = [threading.Thread(target=collect, args=(i,)) for i in range(n)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(timeout)
    for i, p in enumerate(procs):
        p.kill()
        logs[i] = p.stderr.read()[-3000:]
        p.wait()
    for i, r in enumerate(results):
        if r is None and not (scenario.endswith("die") and i == 1):
            pytest.fail(f"worker {i} printed no result:\n{logs[i]}")
    return results


@pytest.mark.parametrize("workers", [2, 3])
def test_every_worker_writes_a_share_and_the_chief_commits_one_checkpoint(tmp_path, workers):
    results = _run_cluster(workers, tmp_path, "save")
    first = str(tmp_path / "ckpt-1")
    second = str(tmp_path / "ckpt-2")
    assert [r["first"] for r in results] == [first] * workers
    assert [r["second"] for r in results] == [second] * workers
    assert all(r["restored"] and r["tf_restored"] and r["object_restored"] for r in results)
    assert [r["object_based"] for r in results] == [str(tmp_path / "obj" / "ckpt-1")] * workers
    assert len(list((tmp_path / "obj").glob("ckpt-1.data-*"))) == workers
    # One checkpoint per save: a single index over one data file per worker, no parts left over.
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt"))
    assert names == sorted([f"ckpt-{s}.data-{i:05d}-of-{workers:05d}" for s in (1, 2) for i in range(workers)]
                           + ["ckpt-1.index", "ckpt-2.index"])
    assert tf.train.latest_checkpoint(str(tmp_path)) == second
    # TF reads it; every worker wrote a part (each data file holds tensors).
    reader = tf.train.load_checkpoint(first)
    rng = np.random.default_rng(0)
    kernels = {f"layer{i}/kernel": rng.random((64 * (i + 1), 33), dtype=np.float32) for i in range(6)}
    for name, value in kernels.items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)
    assert reader.get_tensor("step") == 1234
    assert all((tmp_path / f"ckpt-1.data-{i:05d}-of-{workers:05d}").stat().st_size > 0 for i in range(workers))
    loaded = gpusaver.load(second)
    assert not loaded["layer0/kernel"].any()  # the second save holds the zeros


def test_a_worker_dying_mid_save_commits_nothing_and_the_others_raise(tmp_path):
    results = _run_cluster(2, tmp_path, "die")
    assert results[1] is None
    assert results[0]["error"] and "CheckpointIOError" in results[0]["error"]
    assert "worker" in results[0]["error"]
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-1")
    assert not (tmp_path / "ckpt-2.index").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    gpusaver.load(str(tmp_path / "ckpt-1"))  # the previous checkpoint stays whole


@pytest.fixture
def s3_cluster(seaweed, s3_url):
    """(directory URL on the SeaweedFS server, Options reaching it, the workers' environment)."""
    import json

    from seaweed import ACCESS_KEY, SECRET_KEY

    directory = s3_url.rsplit("/", 1)[0]
    options = gpusaver.Options(storage_options=seaweed.storage_options())
    env = {"MW_STORAGE_OPTIONS": json.dumps(seaweed.storage_options()),
           # for what takes no Options (latest_checkpoint): s3fs reads the environment
           "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_ENDPOINT_URL": seaweed.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    return directory, options, env


def _objects(url: str, options) -> dict[str, int]:
    """{name: bytes} of the objects directly under ``url``."""
    store = for_url(url, options)
    return {p.rsplit("/", 1)[-1]: store.info(p)["size"] for p in store.list(url)}


def test_a_multi_worker_save_to_s3_merges_the_parts_on_the_server(s3_cluster):
    directory, options, env = s3_cluster
    results = _run_cluster(2, directory, "store", env=env)
    first, second = directory + "/ckpt-1", directory + "/ckpt-2"
    assert [(r["first"], r["second"], r["latest"]) for r in results] == [(first, second, second)] * 2
    assert all(r["restored"] and r["object_restored"] for r in results)
    assert [r["object_based"] for r in results] == [directory + "/obj/ckpt-1"] * 2
    # One checkpoint per save: an index over one data object per worker, each holding tensors;
    # the state object names the newest; no part (index or data) is left.
    objects = _objects(directory, options)
    assert sorted(objects) == sorted([f"ckpt-{s}.data-0000{i}-of-00002" for s in (1, 2) for i in range(2)]
                                     + ["ckpt-1.index", "ckpt-2.index", "checkpoint"])
    assert all(size > 0 for size in objects.values())
    assert sorted(_objects(directory + "/obj", options)) == [
        "checkpoint", "ckpt-1.data-00000-of-00002", "ckpt-1.data-00001-of-00002", "ckpt-1.index"]
    assert gpusaver.latest_checkpoint(directory, for_url(directory, options)) == second
    rng = np.random.default_rng(0)
    kernels = {f"layer{i}/kernel": rng.random((64 * (i + 1), 33), dtype=np.float32) for i in range(6)}
    loaded = gpusaver.load(first, options=options)
    for name, value in kernels.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert loaded["step"] == 1234
    assert not gpusaver.load(second, options=options)["layer0/kernel"].any()  # the second save: zeros


def test_a_worker_dying_mid_save_to_s3_commits_nothing_and_leaves_no_parts(s3_cluster):
    directory, options, env = s3_cluster
    results = _run_cluster(2, directory, "store-die", env=env)
    assert results[1] is None
    assert results[0]["error"] and "CheckpointIOError" in results[0]["error"]
    assert gpusaver.latest_checkpoint(directory, for_url(directory, options)) == directory + "/ckpt-1"
    assert sorted(_objects(directory, options)) == [
        "checkpoint", "ckpt-1.data-00000-of-00002", "ckpt-1.data-00001-of-00002", "ckpt-1.index"]
    gpusaver.load(directory + "/ckpt-1", options=options)  # the previous checkpoint stays whole
