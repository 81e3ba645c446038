"""Checkpoints on S3 (issue 13), against a real SeaweedFS server on 127.0.0.1 (tests/seaweed.py):
round trips through ``gpusaver.save/load`` and ``Saver``, the commit order (data, then index, then
state object), a save failing or the server dying mid-save, and wrong credentials."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import CheckpointIOError, CheckpointNotFoundError
from gpusaver.format.reader import BundleReader
from gpusaver.format.writer import BundleWriter
from gpusaver.storage import for_url
from gpusaver.storage.fsspec import PART_SIZE

from remote_cases import assert_same, check_manager_retention_and_restart, object_names, sample_arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PART_FLOATS = (PART_SIZE + (1 << 20)) // 4  # float32 elements of a tensor that fills more than one part


@pytest.fixture
def s3(seaweed, s3_url, monkeypatch):
    """(URL of a fresh directory, Options reaching the server). The server's endpoint and
    credentials are also in the AWS_* environment, as users configure s3fs, for the APIs that
    take no Options (``Saver``'s files, ``latest_checkpoint``)."""
    from seaweed import ACCESS_KEY, SECRET_KEY

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_url, gpusaver.Options(storage_options=seaweed.storage_options())


@pytest.fixture
def fresh_s3_clients():
    """fsspec keeps one S3FileSystem per set of arguments, its client made from the environment of
    its first use: forget them before and after a test that changes that environment."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_save_load_round_trip(s3):
    url, options = s3
    arrays = sample_arrays()
    prefix = gpusaver.save(url + "/model", arrays, options)
    assert prefix == url + "/model"
    assert object_names(url, options) == ["model.data-00000-of-00001", "model.index"]
    assert_same(gpusaver.load(prefix, options=options), arrays)
    assert_same(gpusaver.load(prefix, ["big", "text"], options=options), {k: arrays[k] for k in ("big", "text")})


def test_save_load_round_trip_in_several_shards(s3):
    url, options = s3
    import dataclasses
    options = dataclasses.replace(options, num_shards=3, chunk_size=1 << 20)
    arrays = sample_arrays(1)
    gpusaver.save(url + "/sharded", arrays, options)
    assert sorted(object_names(url, options)) == [f"sharded.data-0000{i}-of-00003" for i in range(3)] + ["sharded.index"]
    assert_same(gpusaver.load(url + "/sharded", options=options), arrays)


def test_saver_save_restore(s3, tf):
    url, _ = s3
    v = tf.Variable(np.arange(12, dtype=np.float32).reshape(3, 4), name="v")
    w = tf.Variable(np.ones(5, np.int64), name="w")
    saver = gpusaver.Saver([v, w], max_to_keep=2)
    paths = [saver.save(url + "/model", global_step=step) for step in (1, 2, 3)]
    # Retention on the store: the oldest checkpoint's objects are gone, the two newest stay.
    names = object_names(url, s3[1])
    assert not [n for n in names if n.startswith("model-1.")]
    assert {"model-2.index", "model-3.index", "model-3.data-00000-of-00001"} <= set(names)
    assert paths[-1] == url + "/model-3"
    assert gpusaver.latest_checkpoint(url) == paths[-1]
    v.assign(tf.zeros((3, 4)))
    w.assign(tf.zeros(5, tf.int64))
    saver.restore(url)  # a directory URL: its latest checkpoint
    np.testing.assert_array_equal(v.numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(w.numpy(), np.ones(5, np.int64))
    saver.restore(paths[1])


def test_nothing_is_visible_before_the_commit_and_the_index_comes_last(s3):
    url, options = s3
    storage = for_url(url, options)
    prefix = url + "/m"
    seen = {}

    def on_commit(p):  # runs once the files are in place, before the state object
        seen["objects"] = object_names(url, options)
        return p

    with BundleWriter(prefix, 2, on_commit=on_commit, storage=storage) as writer:
        writer.shard(0).add_array("a", np.arange(_PART_FLOATS, dtype=np.float32))  # > 1 part: one left already
        writer.shard(1).add_array("b", np.ones(10, np.int8))
        assert object_names(url, options) == []  # uploads in flight are not objects yet
    assert seen["objects"] == ["m.data-00000-of-00002", "m.data-00001-of-00002", "m.index"]
    with BundleReader(prefix, storage=storage) as reader:
        np.testing.assert_array_equal(reader.read("a"), np.arange(_PART_FLOATS, dtype=np.float32))


def test_a_save_failing_midway_leaves_no_index_and_the_previous_checkpoint(s3, tf):
    url, options = s3
    v = tf.Variable(np.arange(4, dtype=np.float32), name="v")
    saver = gpusaver.Saver([v])
    first = saver.save(url + "/model", global_step=1)
    storage = for_url(url, options)
    with pytest.raises(RuntimeError, match="stopped"):
        with BundleWriter(url + "/model-2", storage=storage) as writer:
            writer.add_array("v", np.zeros(_PART_FLOATS, np.float32))  # a part uploaded already
            raise RuntimeError("stopped mid-save")
    assert object_names(url, options) == ["checkpoint", "model-1.data-00000-of-00001", "model-1.index"]
    assert gpusaver.latest_checkpoint(url) == first
    v.assign(tf.zeros(4))
    saver.restore(url)
    np.testing.assert_array_equal(v.numpy(), np.arange(4, dtype=np.float32))


def test_server_killed_mid_save_keeps_the_previous_checkpoint(s3, seaweed):
    url, options = s3
    first = {"a": np.arange(100, dtype=np.float64)}
    gpusaver.save(url + "/model-1", first, options)
    for_url(url, options).write_bytes(url + "/checkpoint", b'model_checkpoint_path: "model-1"\n'
                                      b'all_model_checkpoint_paths: "model-1"\n')
    storage = for_url(url, options)
    try:
        with pytest.raises(CheckpointIOError) as info:
            with BundleWriter(url + "/model-2", storage=storage) as writer:
                writer.add_array("a", np.zeros(_PART_FLOATS, np.float32))  # a part uploaded
                seaweed.stop()  # SIGKILL, with the data's upload open
                writer.add_array("b", np.zeros(_PART_FLOATS, np.float32))  # the next one fails
        assert url + "/model-2" in str(info.value) and "cannot reach the storage server" in str(info.value)
    finally:
        seaweed.start()
    assert gpusaver.latest_checkpoint(url) == url + "/model-1"
    assert not storage.exists(url + "/model-2.index")
    assert_same(gpusaver.load(url, options=options), first)


def test_wrong_credentials_name_the_url(s3, seaweed):
    url, options = s3
    gpusaver.save(url + "/model", {"a": np.ones(3)}, options)
    bad = gpusaver.Options(storage_options=seaweed.storage_options(secret="not-the-secret"))
    with pytest.raises(CheckpointIOError) as info:
        gpusaver.load(url + "/model", options=bad)
    assert url + "/model" in str(info.value) and "credentials" in str(info.value)
    with pytest.raises(CheckpointIOError) as info:
        with BundleWriter(url + "/other", storage=for_url(url, bad)) as writer:
            writer.add_array("a", np.ones(_PART_FLOATS, np.float32))
    assert url + "/other" in str(info.value) and "credentials" in str(info.value)


def test_missing_checkpoint_on_s3_is_not_found(s3):
    url, options = s3
    with pytest.raises(CheckpointNotFoundError, match="nothing.index. not found"):
        gpusaver.load(url + "/nothing", options=options)
    with pytest.raises(CheckpointNotFoundError):
        BundleReader(url + "/nothing", storage=for_url(url, options))


def test_s3_bench_runs_tiny(seaweed, tmp_path):
    from seaweed import ACCESS_KEY, SECRET_KEY
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "s3_bench.py"), "--tiny",
                          "--endpoint", seaweed.endpoint, "--key", ACCESS_KEY, "--secret", SECRET_KEY],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "gpusaver save" in run.stdout and "s3fs put" in run.stdout


def test_cli_lists_and_verifies_an_s3_checkpoint(s3):
    url, options = s3
    gpusaver.save(url + "/model", sample_arrays(2), options)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    from gpusaver.format.state import CheckpointState, write_state
    write_state(url, CheckpointState("model", ["model"], [0.0]), storage=for_url(url, options))

    def cli(*command):
        run = subprocess.run([sys.executable, "-m", "gpusaver.cli", *command], capture_output=True, text=True,
                             env=env, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        return run.stdout

    assert "big" in cli("ls", url + "/model")
    assert "ok" in cli("verify", url + "/model.index").lower()
    assert cli("latest", url).strip() == url + "/model"
    listing = json.loads(cli("ls", url, "--json"))  # a directory URL: its latest checkpoint
    assert all(size and size > 0 for size in listing["files"].values()), listing["files"]


def test_tensorflow_reads_a_mirror_of_what_gpusaver_wrote_and_gpusaver_reads_what_tf_wrote(s3, tf, tmp_path):
    """TF 2.21 cannot open s3:// itself; a local copy of the bucket's objects is TF's view of it."""
    url, options = s3
    store = for_url(url, options)
    arrays = sample_arrays(4)
    gpusaver.save(url + "/ours", arrays, options)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for obj in store.list(url):
        (mirror / obj.rsplit("/", 1)[-1]).write_bytes(store.read_bytes(obj))
    reader = tf.train.load_checkpoint(str(mirror / "ours"))
    for name, value in arrays.items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)
    v = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    local = tf.train.Checkpoint(v=v).write(str(tmp_path / "theirs" / "ckpt"))
    for path in (tmp_path / "theirs").iterdir():
        store.write_bytes(url + "/theirs/" + path.name, path.read_bytes())
    loaded = gpusaver.load(url + "/theirs/" + os.path.basename(local), options=options)
    np.testing.assert_array_equal(loaded["v/.ATTRIBUTES/VARIABLE_VALUE"], v.numpy())


def test_checkpoint_save_restore(s3, tf):
    url, _ = s3
    v = tf.Variable(np.arange(6, dtype=np.float32), name="v")
    ckpt = gpusaver.Checkpoint(v=v)
    path = ckpt.save(url + "/ckpt")
    assert path == url + "/ckpt-1" and gpusaver.latest_checkpoint(url) == path
    v.assign(tf.zeros(6))
    ckpt.restore(gpusaver.latest_checkpoint(url)).assert_consumed()
    np.testing.assert_array_equal(v.numpy(), np.arange(6, dtype=np.float32))


def test_save_uses_the_storage_options_alone(seaweed, s3_url, monkeypatch, fresh_s3_clients, tf):
    # The environment points at a closed loopback port with wrong keys: only the options reach the server.
    from servers import free_ports

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = gpusaver.Options(storage_options=seaweed.storage_options())
    gpusaver.save(s3_url + "/model", {"a": np.ones(3)}, options)
    assert gpusaver.load(s3_url + "/model", options=options)["a"].tolist() == [1, 1, 1]
    # gpusaver.Checkpoint.save writes its state object (``checkpoint``) with them too.
    directory = s3_url.rsplit("/", 1)[0]
    path = gpusaver.Checkpoint(v=tf.Variable([1.0, 2.0]), options=options).save(directory + "/ckpt")
    assert gpusaver.latest_checkpoint(directory, for_url(directory, options)) == path


def test_checkpoint_manager_on_s3_keeps_its_newest_and_recovers_after_a_restart(s3, tf):
    check_manager_retention_and_restart(tf, *s3)


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_a_reader_between_the_data_and_the_index_of_an_overwrite_fails_its_crc(request, store):
    """Object stores replace objects one by one: an overwrite of a prefix commits its data
    objects, then its index (TF's names are fixed, so new data cannot go elsewhere first). A
    reader in between meets the old index over the new data: it must raise CorruptCheckpointError
    (the CRC32C of the old entries), never return values of either save as if they were whole."""
    from gpusaver.errors import CorruptCheckpointError

    if store == "s3":
        url, options = request.getfixturevalue("s3_url"), gpusaver.Options(
            storage_options=request.getfixturevalue("seaweed").storage_options())
    else:
        url, options = request.getfixturevalue("gs_url"), gpusaver.Options(
            storage_options=request.getfixturevalue("gcs").storage_options())
    old = {"w": np.arange(4096, dtype=np.float32), "b": np.arange(7, dtype=np.int64)}
    new = {k: v + 1 for k, v in old.items()}  # the same shapes: the same offsets in the data object
    prefix = gpusaver.save(url + "/model", old, options)
    storage = for_url(url, options)
    seen = {}
    open_write = storage.open_write

    def open_write_pausing_before_the_index(path, *args, **kwargs):
        stream = open_write(path, *args, **kwargs)
        if path.endswith(".index"):
            commit = stream.commit

            def read_then_commit():  # the data objects are the new ones already
                seen["data"] = storage.read_bytes(url + "/model.data-00000-of-00001")
                try:
                    seen["read"] = gpusaver.load(prefix, options=options)
                except CorruptCheckpointError as e:
                    seen["error"] = str(e)
                commit()

            stream.commit = read_then_commit
        return stream

    storage.open_write = open_write_pausing_before_the_index
    with BundleWriter(prefix, storage=storage) as writer:
        for name, value in new.items():
            writer.add_array(name, value)
    assert new["w"].tobytes() in seen["data"]  # the window was real: new data under the old index
    assert "read" not in seen, "a reader between data and index returned values"
    assert "CRC32C mismatch" in seen["error"] and "model.data-00000-of-00001" in seen["error"]
    assert_same(gpusaver.load(prefix, options=options), new)  # after the index: the new checkpoint
