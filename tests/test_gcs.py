"""Checkpoints on Google Cloud Storage (issue 13) through gcsfs, against a real GCS emulator on
127.0.0.1 (fake-gcs-server, tests/gcs.py): round trips through ``gpusaver.save/load``, ``Saver``,
``Checkpoint`` and ``CheckpointManager`` (retention on the bucket), the commit order, a failed save,
wrong buckets and credentials, and exchange with TensorFlow's own ``gs://`` file system."""
import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import CheckpointIOError, CheckpointNotFoundError
from gpusaver.format.reader import BundleReader
from gpusaver.format.writer import BundleWriter
from gpusaver.storage import for_url
from gpusaver.storage.fsspec import PART_SIZE

from remote_cases import assert_same, check_manager_retention_and_restart, object_names, sample_arrays

_PART_FLOATS = (PART_SIZE + (1 << 20)) // 4  # float32 elements of a tensor that fills more than one part


@pytest.fixture
def gs(gcs, gs_url):
    """(URL of a fresh directory, Options reaching the emulator)."""
    return gs_url.rsplit("/", 1)[0], gpusaver.Options(storage_options=gcs.storage_options())


def test_save_load_round_trip_on_gs(gs):
    url, options = gs
    arrays = sample_arrays()
    assert gpusaver.save(url + "/model", arrays, options) == url + "/model"
    assert object_names(url, options) == ["model.data-00000-of-00001", "model.index"]
    assert_same(gpusaver.load(url + "/model", options=options), arrays)
    assert_same(gpusaver.load(url + "/model", ["text", "big"], options=options),
                 {k: arrays[k] for k in ("text", "big")})


def test_a_tensor_of_several_upload_parts_in_several_shards(gs):
    """Resumable uploads of more than one part, shards written in parallel, ranged reads."""
    url, options = gs
    options = dataclasses.replace(options, num_shards=2)
    arrays = {"large": np.arange(_PART_FLOATS, dtype=np.float32), **sample_arrays(1)}
    gpusaver.save(url + "/sharded", arrays, options)
    assert object_names(url, options) == ["sharded.data-00000-of-00002", "sharded.data-00001-of-00002", "sharded.index"]
    assert_same(gpusaver.load(url + "/sharded", options=options), arrays)


def test_nothing_is_visible_before_the_commit_and_the_index_comes_last(gs):
    url, options = gs
    storage = for_url(url, options)
    seen = {}

    def on_commit(p):  # runs once the objects are in place, before the state object
        seen["objects"] = object_names(url, options)
        return p

    with BundleWriter(url + "/m", 2, on_commit=on_commit, storage=storage) as writer:
        writer.shard(0).add_array("a", np.arange(_PART_FLOATS, dtype=np.float32))  # a part sent already
        writer.shard(1).add_array("b", np.ones(10, np.int8))
        assert object_names(url, options) == []  # resumable uploads in flight are not objects yet
    assert seen["objects"] == ["m.data-00000-of-00002", "m.data-00001-of-00002", "m.index"]
    with BundleReader(url + "/m", storage=storage) as reader:
        np.testing.assert_array_equal(reader.read("a"), np.arange(_PART_FLOATS, dtype=np.float32))


def test_a_save_failing_midway_leaves_the_previous_checkpoint(gs, tf):
    url, options = gs
    v = tf.Variable(np.arange(4, dtype=np.float32), name="v")
    saver = gpusaver.Saver([v], options=options)
    first = saver.save(url + "/model", global_step=1)
    with pytest.raises(RuntimeError, match="stopped"):
        with BundleWriter(url + "/model-2", storage=for_url(url, options)) as writer:
            writer.add_array("v", np.zeros(_PART_FLOATS, np.float32))  # a part uploaded already
            raise RuntimeError("stopped mid-save")
    assert object_names(url, options) == ["checkpoint", "model-1.data-00000-of-00001", "model-1.index"]
    assert gpusaver.latest_checkpoint(url, for_url(url, options)) == first
    v.assign(tf.zeros(4))
    saver.restore(url)
    np.testing.assert_array_equal(v.numpy(), np.arange(4, dtype=np.float32))


def test_saver_keeps_its_newest_on_gs_and_restores_the_latest(gs, tf):
    url, options = gs
    v = tf.Variable(np.arange(12, dtype=np.float32).reshape(3, 4), name="v")
    w = tf.Variable(np.ones(5, np.int64), name="w")
    saver = gpusaver.Saver([v, w], max_to_keep=2, options=options)
    paths = [saver.save(url + "/model", global_step=step) for step in (1, 2, 3)]
    names = object_names(url, options)
    assert not [n for n in names if n.startswith("model-1.")]  # retention deleted the oldest's objects
    assert {"model-2.index", "model-3.index", "model-3.data-00000-of-00001", "checkpoint"} <= set(names)
    assert gpusaver.latest_checkpoint(url, for_url(url, options)) == paths[-1] == url + "/model-3"
    v.assign(tf.zeros((3, 4)))
    w.assign(tf.zeros(5, tf.int64))
    saver.restore(url)  # a directory URL: its latest checkpoint
    np.testing.assert_array_equal(v.numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(w.numpy(), np.ones(5, np.int64))


def test_checkpoint_manager_on_gs_keeps_its_newest_and_recovers_after_a_restart(gs, tf):
    check_manager_retention_and_restart(tf, *gs)


def test_a_missing_bucket_names_the_url_and_the_fix(gcs):
    options = gpusaver.Options(storage_options=gcs.storage_options())
    url = "gs://no-such-bucket-gpusaver/run/model"
    with pytest.raises(CheckpointIOError) as info:
        gpusaver.save(url, {"a": np.ones(3)}, options)
    assert url in str(info.value) and "bucket" in str(info.value)
    with pytest.raises(CheckpointNotFoundError, match="no-such-bucket-gpusaver/run/model.index"):
        gpusaver.load(url, options=options)


def test_unusable_credentials_name_the_url(gcs, gs_url):
    # A token gcsfs cannot use (a dict that is no service-account or user credential): refused
    # where the file system is made, offline.
    bad = gpusaver.Options(storage_options=gcs.storage_options(token={"not": "a credential"}))
    with pytest.raises(CheckpointIOError) as info:
        gpusaver.save(gs_url, {"a": np.ones(3)}, bad)
    assert gs_url in str(info.value) and "credentials" in str(info.value) and "token" in str(info.value)


def _tensorflow(env: dict, code: str, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_tensorflow_reads_on_gs_what_gpusaver_wrote_there_and_the_other_way(gs, tf_gcs_env, tf, tmp_path):
    """TF's own ``gs://`` file system (not gcsfs) against the emulator, through the proxy of
    tests/gcs.py: TF's reader and ``tf.train.Checkpoint`` read gpusaver's objects, and gpusaver
    reads what TF's Saver and Checkpoint wrote to the bucket."""
    url, options = gs
    arrays = {k: v for k, v in sample_arrays(3).items()}
    gpusaver.save(url + "/ours", arrays, dataclasses.replace(options, num_shards=2))
    # write(), not save(): Checkpoint.save writes its state object without Options.storage_options
    # (gpusaver/tf/checkpoint.py's _commit), which gcsfs then sends to Google, not the emulator.
    gpusaver.Checkpoint(v=tf.Variable(np.arange(5, dtype=np.float64)), options=options).write(url + "/obj/ckpt-1")
    _tensorflow(tf_gcs_env, """
        import sys
        import numpy as np
        import tensorflow as tf
        url, out = sys.argv[1], sys.argv[2]
        reader = tf.train.load_checkpoint(url + "/ours")
        np.savez(out, **{k.replace("/", "|"): reader.get_tensor(k) for k in reader.get_variable_to_shape_map()})
        v = tf.Variable(np.zeros(5))
        tf.train.Checkpoint(v=v).read(url + "/obj/ckpt-1").assert_consumed()
        assert v.numpy().tolist() == [0, 1, 2, 3, 4], v.numpy()
        w = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
        tf.train.Checkpoint(w=w).save(url + "/theirs/ckpt")
        tf.compat.v1.train.Saver([tf.Variable([7, 8], name="legacy")]).save(None, url + "/legacy/model", global_step=4)
        """, url, str(tmp_path / "ours.npz"))
    with np.load(tmp_path / "ours.npz", allow_pickle=True) as seen:
        got = {k.replace("|", "/"): seen[k] for k in seen.files}
    got["text"] = got["text"].astype(object)
    assert_same(got, arrays)
    store = for_url(url, options)
    theirs = gpusaver.latest_checkpoint(url + "/theirs", store)
    assert theirs == url + "/theirs/ckpt-1"
    np.testing.assert_array_equal(gpusaver.load(theirs, options=options)["w/.ATTRIBUTES/VARIABLE_VALUE"],
                                  np.arange(6, dtype=np.float32).reshape(2, 3))
    w = tf.Variable(np.zeros((2, 3), np.float32))
    gpusaver.Checkpoint(w=w, options=options).restore(theirs).assert_consumed()
    np.testing.assert_array_equal(w.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert gpusaver.load(url + "/legacy/model-4", options=options)["legacy"].tolist() == [7, 8]
