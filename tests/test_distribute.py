"""Multi-worker saves on a real MultiWorkerMirroredStrategy cluster: worker processes on localhost."""
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

import gpusaver

tf = pytest.importorskip("tensorflow")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mw_worker.py")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run_cluster(n: int, directory, scenario: str, timeout: float = 240) -> list[dict | None]:
    """Start n workers; return each one's RESULT (None for a worker that printed none)."""
    ports = ",".join(map(str, _free_ports(n)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(WORKER)),
                                                       os.environ.get("PYTHONPATH", "")]))
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
        if r is None and not (scenario == "die" and i == 1):
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
