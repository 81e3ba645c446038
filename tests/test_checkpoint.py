"""gpusaver.Checkpoint against TensorFlow itself: object-based files both ways, numbering, the state
file, async saves, deferred restoration, and proof that gpusaver (not TF) moves the bytes."""
import os

import numpy as np
import pytest

import gpusaver
from gpusaver.format import BundleReader

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
from tensorflow.core.protobuf import trackable_object_graph_pb2  # noqa: E402

from corrupt import GRAPH_KEY, flip_byte  # noqa: E402


def _model(build=True, seed=0):
    """A small Keras 3 model and an Adam optimizer whose slots are built (one step of fit)."""
    model = keras.Sequential([keras.layers.Dense(5, activation="relu"), keras.layers.Dense(2)])
    opt = keras.optimizers.Adam(learning_rate=0.01)
    if build:
        rng = np.random.default_rng(seed)
        model.compile(optimizer=opt, loss="mse")
        model.fit(rng.random((8, 3), np.float32), rng.random((8, 2), np.float32), epochs=1, verbose=0)
    return model, opt


def _values(model, opt):
    return [v.numpy() for v in model.weights + opt.variables]


def _assert_same(expected, model, opt):
    got = _values(model, opt)
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def _object_graph(prefix):
    proto = trackable_object_graph_pb2.TrackableObjectGraph()
    proto.ParseFromString(tf.train.load_checkpoint(prefix).get_tensor(GRAPH_KEY))
    return proto


def _corrupt_a_variable(prefix):
    """Flip a byte inside a kernel's bytes (a variable that exists only once the model is built)."""
    flip_byte(prefix, lambda reader, keys: next(k for k in keys if len(reader.entry(k).shape) == 2))


def test_tf_restores_gpusaver_checkpoint_with_object_matching(tmp_path):
    model, opt = _model()
    ckpt = gpusaver.Checkpoint(model=model, opt=opt)
    path = ckpt.save(str(tmp_path / "ours" / "ckpt"))
    tf_path = tf.train.Checkpoint(model=model, opt=opt).save(str(tmp_path / "theirs" / "ckpt"))

    # The same keys and the same object graph as TF writes for the same objects.
    assert set(tf.train.load_checkpoint(path).get_variable_to_shape_map()) == \
        set(tf.train.load_checkpoint(tf_path).get_variable_to_shape_map())
    assert _object_graph(path) == _object_graph(tf_path)
    keys = BundleReader(path).keys()
    assert GRAPH_KEY in keys and "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in keys
    # (TF's breadth-first walk reaches the model's variables through the optimizer first.)
    model_only = BundleReader(gpusaver.Checkpoint(model=model).write(str(tmp_path / "m"))).keys()
    assert any(k.startswith("model/") and k.endswith("/.ATTRIBUTES/VARIABLE_VALUE") for k in model_only)

    model2, opt2 = _model(seed=1)
    status = tf.train.Checkpoint(model=model2, opt=opt2).restore(path)
    # CheckpointLoadStatus is TF's object-matching status; the name-based fallback would give
    # NameBasedSaverStatus.
    assert type(status).__name__ == "CheckpointLoadStatus"
    status.assert_consumed()
    _assert_same(_values(model, opt), model2, opt2)


def test_restores_tf_save_write_and_checkpoint_manager(tmp_path):
    model, opt = _model()
    expected = _values(model, opt)
    theirs = tf.train.Checkpoint(model=model, opt=opt)
    written = theirs.write(str(tmp_path / "w" / "ckpt"))  # before any save: no save_counter in it
    saved = theirs.save(str(tmp_path / "s" / "ckpt"))
    manager = tf.train.CheckpointManager(theirs, str(tmp_path / "m"), max_to_keep=2)
    managed = manager.save()

    assert int(theirs.save_counter.numpy()) == 2  # the manager's save counts too
    for path, how, counter in [(saved, "restore", 1), (written, "read", None), (managed, "restore", 2),
                               (tf.train.latest_checkpoint(str(tmp_path / "m")), "restore", 2)]:
        model2, opt2 = _model(seed=2)
        ours = gpusaver.Checkpoint(model=model2, opt=opt2)
        status = getattr(ours, how)(path)
        assert type(status).__name__ == "CheckpointLoadStatus"
        status.assert_consumed()
        status.assert_existing_objects_matched()
        _assert_same(expected, model2, opt2)
        if how == "restore":
            assert int(ours.save_counter.numpy()) == counter


def test_save_counter_numbering_and_state_file(tmp_path):
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = gpusaver.Checkpoint(step=step)
    prefix = str(tmp_path / "run" / "ckpt")
    assert ckpt.save(prefix) == prefix + "-1"
    step.assign(7)
    assert ckpt.save(prefix) == prefix + "-2"
    assert int(ckpt.save_counter.numpy()) == 2
    assert tf.train.latest_checkpoint(str(tmp_path / "run")) == prefix + "-2"
    assert gpusaver.latest_checkpoint(str(tmp_path / "run")) == prefix + "-2"
    state = tf.train.get_checkpoint_state(str(tmp_path / "run"))
    assert state.model_checkpoint_path == prefix + "-2"  # relative in the file, as TF writes it
    with open(tmp_path / "run" / "checkpoint") as f:
        assert 'model_checkpoint_path: "ckpt-2"' in f.read()

    # TF restores the counter and values; its next save continues the numbering.
    step2 = tf.Variable(0, dtype=tf.int64)
    theirs = tf.train.Checkpoint(step=step2)
    theirs.restore(tf.train.latest_checkpoint(str(tmp_path / "run"))).assert_consumed()
    assert int(step2.numpy()) == 7 and int(theirs.save_counter.numpy()) == 2
    assert theirs.save(prefix) == prefix + "-3"

    # write: exactly the prefix, no counter increment, no state file change.
    assert ckpt.write(str(tmp_path / "plain")) == str(tmp_path / "plain")
    assert int(ckpt.save_counter.numpy()) == 2
    assert not (tmp_path / "checkpoint").exists()

    # And back: our restore picks up TF's counter.
    ours = gpusaver.Checkpoint(step=tf.Variable(0, dtype=tf.int64))
    ours.restore(prefix + "-3").assert_consumed()
    assert int(ours.save_counter.numpy()) == 3
    assert ours.save(prefix) == prefix + "-4"


def test_save_async_snapshot_and_state_names_complete_checkpoints_only(tmp_path):
    big = tf.Variable(tf.random.normal([1 << 22]))  # 16 MiB
    small = tf.Variable([1.0, 2.0])
    ckpt = gpusaver.Checkpoint(big=big, small=small)
    directory = str(tmp_path)
    prefix = os.path.join(directory, "ckpt")
    first = ckpt.save_async(prefix)
    expected_big = big.numpy()
    small.assign([5.0, 6.0])  # after the snapshot: not in checkpoint 1
    while not first.done():
        if os.path.exists(os.path.join(directory, "checkpoint")):
            # Whenever the state file exists, the checkpoint it names is complete.
            assert tf.train.latest_checkpoint(directory) == prefix + "-1"
    assert first.result() == prefix + "-1"
    second = ckpt.save_async(prefix)
    while not second.done():
        latest = tf.train.latest_checkpoint(directory)
        assert latest in (prefix + "-1", prefix + "-2")
    assert second.result() == prefix + "-2"
    ckpt.sync()
    assert tf.train.latest_checkpoint(directory) == prefix + "-2"

    reader = tf.train.load_checkpoint(prefix + "-1")
    np.testing.assert_array_equal(reader.get_tensor("small/.ATTRIBUTES/VARIABLE_VALUE"), [1.0, 2.0])
    np.testing.assert_array_equal(reader.get_tensor("big/.ATTRIBUTES/VARIABLE_VALUE"), expected_big)
    np.testing.assert_array_equal(
        tf.train.load_checkpoint(prefix + "-2").get_tensor("small/.ATTRIBUTES/VARIABLE_VALUE"), [5.0, 6.0])


def test_sync_reraises_a_failed_async_save(tmp_path):
    (tmp_path / "blocker").write_text("a file where the checkpoint directory should be")
    ckpt = gpusaver.Checkpoint(v=tf.Variable(1.0))
    future = ckpt.save_async(str(tmp_path / "blocker" / "ckpt"))
    assert future.exception() is not None
    with pytest.raises(Exception):
        ckpt.sync()
    # A later save works and the counter kept counting, as TF's does.
    assert ckpt.save(str(tmp_path / "ok" / "ckpt")) == str(tmp_path / "ok" / "ckpt") + "-2"


def test_deferred_restore_into_model_and_optimizer_built_later(tmp_path):
    model, opt = _model()
    expected = _values(model, opt)
    path = tf.train.Checkpoint(model=model, opt=opt).save(str(tmp_path / "ckpt"))

    model2, opt2 = _model(build=False)  # no variables yet
    status = gpusaver.Checkpoint(model=model2, opt=opt2).restore(path)
    with pytest.raises(AssertionError):
        status.assert_consumed()  # nothing to restore into yet
    model2.build((None, 3))
    opt2.build(model2.trainable_variables)
    status.assert_consumed()
    _assert_same(expected, model2, opt2)


def test_gpusaver_reads_the_bytes_immediate_and_deferred(tmp_path):
    model, opt = _model()
    path = gpusaver.Checkpoint(model=model, opt=opt).write(str(tmp_path / "ckpt"))
    _corrupt_a_variable(path)

    model2, opt2 = _model(seed=3)
    with pytest.raises(gpusaver.CorruptCheckpointError):
        gpusaver.Checkpoint(model=model2, opt=opt2).read(path)

    model3, opt3 = _model(build=False)
    gpusaver.Checkpoint(model=model3, opt=opt3).read(path)  # the object graph itself is intact
    with pytest.raises(gpusaver.CorruptCheckpointError):
        model3.build((None, 3))
        opt3.build(model3.trainable_variables)


def test_failed_restore_changes_no_variable(tmp_path):
    """A CRC mismatch in the last tensor of the file, after whole groups of small variables were
    assigned: every variable keeps the value it had before the restore."""
    module = tf.Module()
    module.vs = [tf.Variable(np.full(16384, i, np.float32)) for i in range(300)]  # 64 KiB: several reads
    path = gpusaver.Checkpoint(m=module).write(str(tmp_path / "ckpt"))
    last = flip_byte(path)

    other = tf.Module()
    other.vs = [tf.Variable(np.full(16384, -1, np.float32)) for _ in range(300)]
    with pytest.raises(gpusaver.CorruptCheckpointError, match=last.replace(".", r"\.")):
        gpusaver.Checkpoint(m=other).read(path)
    for v in other.vs:
        np.testing.assert_array_equal(v.numpy(), np.full(16384, -1, np.float32))


def test_non_variable_saveables_and_strings_both_ways(tmp_path):
    def table():
        return tf.lookup.experimental.MutableHashTable(key_dtype=tf.string, value_dtype=tf.int64, default_value=-1)

    t = table()
    t.insert(tf.constant(["a", "bb", "ccc"]), tf.constant([1, 2, 3], tf.int64))
    v = tf.Variable([[1.0, 2.0]])
    path = gpusaver.Checkpoint(table=t, v=v).write(str(tmp_path / "ours"))

    t2, v2 = table(), tf.Variable([[0.0, 0.0]])
    tf.train.Checkpoint(table=t2, v=v2).read(path).assert_consumed()
    assert int(t2.lookup(tf.constant("bb")).numpy()) == 2 and int(t2.size().numpy()) == 3

    t.insert(tf.constant(["dddd"]), tf.constant([4], tf.int64))
    tf_path = tf.train.Checkpoint(table=t, v=v).write(str(tmp_path / "theirs"))
    t3, v3 = table(), tf.Variable([[0.0, 0.0]])
    gpusaver.Checkpoint(table=t3, v=v3).read(tf_path).assert_consumed()
    assert int(t3.lookup(tf.constant("dddd")).numpy()) == 4 and int(t3.size().numpy()) == 4
    np.testing.assert_array_equal(v3.numpy(), [[1.0, 2.0]])


def test_mismatched_shape_changes_nothing(tmp_path):
    path = tf.train.Checkpoint(a=tf.Variable([1.0, 2.0]), b=tf.Variable([1.0, 2.0, 3.0])).write(str(tmp_path / "c"))
    a, b = tf.Variable([0.0, 0.0]), tf.Variable([0.0, 0.0])
    with pytest.raises(gpusaver.MismatchError, match="shape"):
        gpusaver.Checkpoint(a=a, b=b).read(path)
    np.testing.assert_array_equal(a.numpy(), [0.0, 0.0])


def test_name_based_checkpoint_falls_back_to_tf(tmp_path):
    path = gpusaver.save(str(tmp_path / "named"), {"v": np.array([3.0, 4.0], np.float32)})  # no object graph
    v2 = tf.Variable([0.0, 0.0], name="v")
    gpusaver.Checkpoint(v=v2).restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(v2.numpy(), [3.0, 4.0])


def test_constructor_options_and_root(tmp_path):
    opts = gpusaver.Options()
    v = tf.Variable(2.0)
    ckpt = gpusaver.Checkpoint(options=opts, v=v)
    assert isinstance(ckpt, tf.train.Checkpoint) and ckpt.v is v
    path = ckpt.write(str(tmp_path / "c"))
    assert "options/.ATTRIBUTES/VARIABLE_VALUE" not in BundleReader(path).keys()
    # A trackable named `options` is checkpointed like any other kwarg.
    ckpt2 = gpusaver.Checkpoint(options=tf.Variable(5.0))
    path2 = ckpt2.write(str(tmp_path / "d"))
    assert "options/.ATTRIBUTES/VARIABLE_VALUE" in BundleReader(path2).keys()


def test_tf_checkpoint_manager_drives_gpusaver_checkpoint(tmp_path):
    from gpusaver.tf import Checkpoint
    assert Checkpoint is gpusaver.Checkpoint
    v = tf.Variable([1.0, 2.0])
    manager = tf.train.CheckpointManager(gpusaver.Checkpoint(v=v), str(tmp_path), max_to_keep=2)
    for _ in range(3):
        v.assign_add([1.0, 1.0])
        manager.save()
    assert manager.checkpoints == [str(tmp_path / "ckpt-2"), str(tmp_path / "ckpt-3")]
    assert not (tmp_path / "ckpt-1.index").exists()
    v2 = tf.Variable([0.0, 0.0])
    tf.train.Checkpoint(v=v2).restore(tf.train.latest_checkpoint(str(tmp_path))).assert_consumed()
    np.testing.assert_array_equal(v2.numpy(), [4.0, 5.0])


class _Notes(tf.train.experimental.PythonState):
    """Python state (a non-tensor saveable): serialized to a string tensor by TF's own code."""

    def __init__(self, text=""):
        self.text = text

    def serialize(self):
        return self.text

    def deserialize(self, string_value):
        self.text = string_value.decode("utf-8") if isinstance(string_value, bytes) else str(string_value)


def test_python_state_partial_restore_and_expect_partial(tmp_path):
    notes, v, extra = _Notes("épochs: 3"), tf.Variable(1.5), tf.Variable([9, 9])
    path = gpusaver.Checkpoint(notes=notes, v=v, extra=extra).write(str(tmp_path / "c"))

    notes2, v2 = _Notes(), tf.Variable(0.0)
    tf.train.Checkpoint(notes=notes2, v=v2).read(path).expect_partial().assert_existing_objects_matched()
    assert notes2.text == "épochs: 3" and float(v2.numpy()) == 1.5

    notes3, v3 = _Notes(), tf.Variable(0.0)
    status = gpusaver.Checkpoint(notes=notes3, v=v3).read(path)
    status.assert_existing_objects_matched()
    with pytest.raises(AssertionError):
        status.assert_consumed()  # `extra` has nothing to go into
    status.expect_partial()
    assert notes3.text == "épochs: 3" and float(v3.numpy()) == 1.5


def test_object_graph_key_is_tensorflows():
    from tensorflow.python.trackable import base as trackable_base

    from gpusaver.format.naming import OBJECT_GRAPH_KEY
    assert OBJECT_GRAPH_KEY == trackable_base.OBJECT_GRAPH_PROTO_KEY
