"""The Saver contract of tf.contrib.eager.Saver, naming, retention and bad input."""
import os

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import CheckpointNotFoundError, CorruptCheckpointError, MismatchError, MissingKeysError

tf = pytest.importorskip("tensorflow")


def _vars():
    return [tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="scope/w"),
            tf.Variable(np.int64(7), name="step_count"),
            tf.Variable(["a", "ü"], name="vocab")]


def test_save_returns_prefix_and_restores(tmp_path):
    vs = _vars()
    saver = gpusaver.Saver(vs)
    prefix = str(tmp_path / "sub" / "dir" / "model")  # directory created on demand
    assert saver.save(prefix) == prefix
    assert tf.train.latest_checkpoint(str(tmp_path / "sub" / "dir")) == prefix
    for v in vs:
        v.assign(tf.zeros_like(v))
    saver.restore(prefix)
    np.testing.assert_array_equal(vs[0].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert vs[1].numpy() == 7 and list(vs[2].numpy()) == [b"a", "ü".encode()]


@pytest.mark.parametrize("step", [3, np.int32(3), "tensor", "variable"])
def test_global_step_forms(tmp_path, step):
    if step == "tensor":
        step = tf.constant(3)
    elif step == "variable":
        step = tf.Variable(3, dtype=tf.int64)
    saver = gpusaver.Saver(_vars())
    assert saver.save(str(tmp_path / "m"), global_step=step) == str(tmp_path / "m-3")
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-3")


def test_names_list_dict_and_keras(tmp_path):
    keras = pytest.importorskip("keras")
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    v = tf.Variable(1.0, name="outer/thing")
    saver = gpusaver.Saver([v, *layer.weights])
    assert set(saver.variables) == {"outer/thing", "dense/kernel", "dense/bias"} or \
        set(saver.variables) == {"outer/thing", f"{layer.name}/kernel", f"{layer.name}/bias"}
    prefix = saver.save(str(tmp_path / "k"))
    kernel = layer.kernel.numpy()
    layer.kernel.assign(np.zeros_like(kernel))
    saver.restore(prefix)
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    by_dict = gpusaver.Saver({"custom key/ü": v})
    assert tf.train.list_variables(by_dict.save(str(tmp_path / "d"))) == [("custom key/ü", [])]


def test_duplicate_names_are_an_error():
    a, b = tf.Variable(1.0, name="same"), tf.Variable(2.0, name="same")
    with pytest.raises(MismatchError, match="'same'"):
        gpusaver.Saver([a, b])
    assert gpusaver.Saver([a, a]).variables == {"same": a}  # one variable twice is fine


def test_requires_eager():
    with tf.Graph().as_default():
        v = tf.compat.v1.Variable(1.0, name="g")
        with pytest.raises(RuntimeError, match="eager"):
            gpusaver.Saver([v])


def test_checkpoint_with_more_tensors_restores(tmp_path):
    vs = _vars()
    prefix = gpusaver.Saver(vs).save(str(tmp_path / "all"))
    only = tf.Variable(np.zeros((2, 3), np.float32), name="scope/w")
    gpusaver.Saver([only]).restore(prefix)
    np.testing.assert_array_equal(only.numpy(), vs[0].numpy())


def test_missing_keys_listed(tmp_path):
    prefix = gpusaver.Saver([tf.Variable(1.0, name="a")]).save(str(tmp_path / "c"))
    saver = gpusaver.Saver([tf.Variable(1.0, name="a"), tf.Variable(1.0, name="b"), tf.Variable(1.0, name="c")])
    with pytest.raises(MissingKeysError, match="2 key.*: b, c") as e:
        saver.restore(prefix)
    assert e.value.missing == ["b", "c"]


@pytest.mark.parametrize("var, message", [
    (lambda: tf.Variable(np.zeros((3, 2), np.float32), name="scope/w"), r"'scope/w'.*shape.*\(2, 3\).*\(3, 2\)"),
    (lambda: tf.Variable(np.zeros((2, 3), np.float64), name="scope/w"), r"'scope/w'.*dtype.*float32.*float64"),
])
def test_dtype_and_shape_mismatch_name_the_variable(tmp_path, var, message):
    prefix = gpusaver.Saver(_vars()).save(str(tmp_path / "c"))
    target = var()
    before = target.numpy().copy()
    with pytest.raises(MismatchError, match=message):
        gpusaver.Saver([target]).restore(prefix)
    np.testing.assert_array_equal(target.numpy(), before)


def test_missing_files(tmp_path):
    saver = gpusaver.Saver(_vars())
    with pytest.raises(CheckpointNotFoundError, match="nothing.index"):
        saver.restore(str(tmp_path / "nothing"))
    prefix = saver.save(str(tmp_path / "c"))
    os.remove(prefix + ".data-00000-of-00001")
    with pytest.raises(CheckpointNotFoundError, match="data-00000-of-00001"):
        saver.restore(prefix)


def test_corruption_is_reported_with_tensor_and_file(tmp_path):
    w = tf.Variable(np.arange(1000, dtype=np.float32), name="w")
    prefix = gpusaver.Saver([w]).save(str(tmp_path / "c"))
    data = tmp_path / "c.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(raw)
    with pytest.raises(CorruptCheckpointError, match="CRC32C mismatch in tensor 'w'"):
        gpusaver.Saver([w]).restore(prefix)
    (tmp_path / "c.index").write_bytes(b"garbage" * 3)
    with pytest.raises(CorruptCheckpointError, match="c.index"):
        gpusaver.Saver([w]).restore(prefix)


def test_retention_keeps_five_and_lists_them(tmp_path):
    saver = gpusaver.Saver(_vars())
    for step in range(8):
        saver.save(str(tmp_path / "m"), global_step=step)
    kept = [f"m-{i}" for i in range(3, 8)]
    assert sorted(p.name for p in tmp_path.glob("*.index")) == sorted(k + ".index" for k in kept)
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_paths) == [str(tmp_path / k) for k in kept]
    assert state.model_checkpoint_path == str(tmp_path / "m-7")


def test_retention_none_keeps_all(tmp_path):
    saver = gpusaver.Saver(_vars(), max_to_keep=None)
    for step in range(7):
        saver.save(str(tmp_path / "m"), global_step=step)
    assert len(list(tmp_path.glob("*.index"))) == 7
    assert len(tf.train.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths) == 7


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    good = tf.Variable(np.ones(4, np.float32), name="good")
    saver = gpusaver.Saver([good])
    first = saver.save(str(tmp_path / "m"), global_step=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    # An unsupported dtype is refused before anything is written ...
    with pytest.raises(gpusaver.UnsupportedError, match="'bad'"):
        gpusaver.save(str(tmp_path / "m-2"), {"good": np.ones(4), "bad": np.zeros(2, dtype="M8[s]")})
    # ... and a failure in the background (the target directory became a file) leaves no trace.
    (tmp_path / "blocked").write_text("not a directory")
    with pytest.raises(OSError):
        saver.save(str(tmp_path / "blocked" / "m"), global_step=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "blocked"} == before
    assert tf.train.latest_checkpoint(str(tmp_path)) == first


def test_save_failing_midway_keeps_the_checkpoint_it_would_replace(tmp_path):
    prefix = str(tmp_path / "same")
    old = {"a": np.arange(1 << 20, dtype=np.float32), "s": np.array([b"x"], dtype=object)}
    gpusaver.save(prefix, old)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # The string tensor's bad element is met by the writer after 'a' has been written.
    bad = {"a": np.zeros(1 << 20, np.float32), "s": np.array([b"ok", 3], dtype=object)}
    with pytest.raises(TypeError, match="not str or bytes"):
        gpusaver.save(prefix, bad)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    np.testing.assert_array_equal(gpusaver.load(prefix)["a"], old["a"])


def test_retention_zero_keeps_all_as_tf_saver(tmp_path):
    # TF's Saver: max_to_keep None or 0 keeps every checkpoint (gpusaver used to keep only the newest for 0).
    for keep in [0, None]:
        directory = tmp_path / str(keep)
        saver = gpusaver.Saver(_vars(), max_to_keep=keep)
        theirs = tf.compat.v1.train.Saver(_vars(), max_to_keep=keep)
        for step in range(4):
            saver.save(str(directory / "m"), global_step=step)
            theirs.save(None, str(tmp_path / f"tf{keep}" / "m"), global_step=step)
        assert [p.name for p in sorted(directory.glob("*.index"))] == [f"m-{i}.index" for i in range(4)]
        assert len(list((tmp_path / f"tf{keep}").glob("*.index"))) == 4
    with pytest.raises(gpusaver.InvalidArgumentError, match="max_to_keep"):
        gpusaver.Saver(_vars(), max_to_keep=-1)


def test_restarted_saver_deletes_its_older_checkpoints_only(tmp_path):
    first = gpusaver.Saver(_vars(), max_to_keep=None)
    for step in range(4):
        first.save(str(tmp_path / "m"), global_step=step)
    gpusaver.Saver(_vars()).save(str(tmp_path / "other"), global_step=1)  # another name: a state file of its own list
    first.save(str(tmp_path / "m"), global_step=4)  # the state file lists m-0..m-4 again
    second = gpusaver.Saver(_vars(), max_to_keep=2)  # a new process, same prefix
    second.save(str(tmp_path / "m"), global_step=5)
    assert sorted(p.name for p in tmp_path.glob("*.index")) == ["m-4.index", "m-5.index", "other-1.index"]
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_paths) == [str(tmp_path / "m-4"), str(tmp_path / "m-5")]


def test_restore_status_lists_unmatched_checkpoint_tensors(tmp_path):
    vs = _vars()
    prefix = gpusaver.Saver(vs).save(str(tmp_path / "all"))
    status = gpusaver.Saver(vs).restore(prefix)
    assert status.assert_consumed() is status and status.unused_keys == []
    assert sorted(status.restored) == ["scope/w", "step_count", "vocab"] and status.path == prefix

    only = tf.Variable(np.zeros((2, 3), np.float32), name="scope/w")
    status = gpusaver.Saver([only]).restore(prefix)
    np.testing.assert_array_equal(only.numpy(), vs[0].numpy())  # still restored: the checkpoint may hold more
    assert status.unused_keys == ["step_count", "vocab"]
    assert status.expect_partial() is status and status.assert_existing_objects_matched() is status
    with pytest.raises(AssertionError, match=r"2 tensor\(s\).*'step_count', 'vocab'.*var_list") as e:
        status.assert_consumed()
    assert isinstance(e.value, gpusaver.NotConsumedError) and e.value.unused == ["step_count", "vocab"]

    # Object-based checkpoints: the object graph is metadata, not a value nobody took.
    v = tf.Variable(1.0)
    path = gpusaver.Checkpoint(v=v).write(str(tmp_path / "obj"))
    status = gpusaver.Saver({"v/.ATTRIBUTES/VARIABLE_VALUE": v}).restore(path)
    status.assert_consumed()


def test_missing_keys_name_the_closest_and_the_fix_for_keras_models(tmp_path):
    keras = pytest.importorskip("keras")

    def model():
        m = keras.Sequential([keras.layers.Dense(3), keras.layers.Dense(1)])
        m.build((None, 4))
        return m

    m1, m2 = model(), model()  # one process: the second model's variables are auto-numbered apart
    prefix = gpusaver.Saver(m1.weights).save(str(tmp_path / "k"))
    saver2 = gpusaver.Saver(m2.weights)
    before = [w.numpy() for w in m2.weights]
    with pytest.raises(MissingKeysError) as e:
        saver2.restore(prefix)
    message = str(e.value)
    first_name, second_name = m1.weights[0].path, m2.weights[0].path
    assert first_name.split("/")[0] != second_name.split("/")[0]  # e.g. sequential vs sequential_1
    assert f"4 key(s) not found in checkpoint {prefix!r}" in message
    assert f"{second_name!r}: {first_name!r}" in message  # the closest name, first
    assert "dict" in message and "gpusaver.Checkpoint(model=model)" in message and "auto-numbering" in message
    assert e.value.missing == sorted(w.path for w in m2.weights)
    for w, b in zip(m2.weights, before):  # all or nothing
        np.testing.assert_array_equal(w.numpy(), b)

    # The fix the message gives: a dict var_list from the checkpoint's names to the variables.
    mapping = {e.value.closest[name][0]: var for name, var in saver2.variables.items()}
    gpusaver.Saver(mapping).restore(prefix).assert_consumed()
    for a, b in zip(m1.weights, m2.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_missing_keys_in_object_based_checkpoint_point_to_checkpoint(tmp_path):
    path = gpusaver.Checkpoint(w=tf.Variable(1.0)).write(str(tmp_path / "obj"))
    with pytest.raises(MissingKeysError, match=r"(?s)'w'.*'w/.ATTRIBUTES/VARIABLE_VALUE'.*object-based.*"
                                               r"gpusaver.Checkpoint"):
        gpusaver.Saver([tf.Variable(1.0, name="w")]).restore(path)


# -- many small variables: grouped assigns (gpusaver.tf.assign), one dtype/shape check -----------
def _spy_groups(monkeypatch):
    """Count the full groups assigned by one traced call each; returns the list of group sizes."""
    from gpusaver.tf.assign import Assigner
    real, sizes = Assigner._assign_group, []

    def spy(self, key, group):
        sizes.append((key[1], len(group)))
        real(self, key, group)

    monkeypatch.setattr(Assigner, "_assign_group", spy)
    return sizes


_MANY_DTYPES = [np.float32, np.float64, np.float16, "bfloat16", np.int8, np.int32, np.int64, np.uint8,
                np.bool_, np.complex64, "string"]
_MANY_SHAPES = [(), (0,), (3,), (2, 3, 4), (1, 1)]


def _many_values(seed: int) -> dict:
    """{name: array}: 150 float32 vectors, 70 values of every dtype cycling through edge shapes
    (a full group each), and one large value, under names that interleave dtypes in file order."""
    import ml_dtypes
    rng = np.random.default_rng(seed)
    values = {f"{i:03d}/f32": rng.standard_normal(7 + i % 5).astype(np.float32) for i in range(150)}
    for i, dtype in enumerate(_MANY_DTYPES):
        for j in range(70):
            shape = _MANY_SHAPES[j % len(_MANY_SHAPES)]
            if dtype == "string":
                value = np.array([f"s{seed}-{k}".encode() for k in range(int(np.prod(shape)))],
                                 dtype=object).reshape(shape)
            else:
                dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
                value = (rng.standard_normal(shape) * 50).astype(dt)
            values[f"{j:03d}/{i:02d}"] = value
    values["large"] = rng.standard_normal(100_000).astype(np.float32)  # 400 KB: assigned on its own
    return values


def _assert_same(variables: dict, values: dict):
    """Each variable holds exactly its value: dtype, shape and bytes (strings: the same bytes)."""
    for name, value in values.items():
        got = np.asarray(variables[name].numpy())  # a scalar string's numpy() is bytes
        assert got.shape == value.shape, name
        if value.dtype == object:
            assert got.tolist() == value.tolist(), name
        else:
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), name


def test_many_small_variables_restore_exactly_through_groups(tmp_path, monkeypatch):
    sizes = _spy_groups(monkeypatch)
    first, second = _many_values(1), _many_values(2)
    variables = {name: tf.Variable(value) for name, value in first.items()}
    saver = gpusaver.Saver(variables)
    prefix = saver.save(str(tmp_path / "m"))
    for name, var in variables.items():
        var.assign(second[name])
    sizes.clear()
    status = saver.restore(prefix)
    _assert_same(variables, first)
    assert sorted(status.restored) == sorted(first)
    from gpusaver.tf.assign import GROUP
    # Full groups, one traced call each (the rest one op each): float32 has 150 + 70 values.
    assert all(size == GROUP for _, size in sizes)
    assert sorted(dtype.name for dtype, _ in sizes) == sorted(
        ["float32"] * ((150 + 70) // GROUP) + [tf.as_dtype(d).name for d in _MANY_DTYPES if d != np.float32])
    # Again, into the values it now holds, and from a checkpoint TF's own Saver wrote.
    for name, var in variables.items():
        var.assign(second[name])
    tf_prefix = tf.compat.v1.train.Saver(variables).save(None, str(tmp_path / "tf"))
    for name, var in variables.items():
        var.assign(first[name])
    saver.restore(tf_prefix)
    _assert_same(variables, second)


def test_variable_of_unknown_shape_takes_any_shape_and_partial_shapes_are_checked(tmp_path):
    prefix = gpusaver.Saver({**{f"v{i:03d}": tf.Variable(np.zeros(4, np.float32)) for i in range(100)},
                             "free": tf.Variable(np.arange(10, dtype=np.float32)),
                             "rows": tf.Variable(np.ones((5, 3), np.float32))}).save(str(tmp_path / "c"))
    free = tf.Variable(np.zeros(2, np.float32), shape=tf.TensorShape(None))
    rows = tf.Variable(np.zeros((2, 3), np.float32), shape=tf.TensorShape([None, 3]))
    others = {f"v{i:03d}": tf.Variable(np.ones(4, np.float32)) for i in range(100)}
    gpusaver.Saver({**others, "free": free, "rows": rows}).restore(prefix)
    np.testing.assert_array_equal(free.numpy(), np.arange(10, dtype=np.float32))
    np.testing.assert_array_equal(rows.numpy(), np.ones((5, 3), np.float32))
    assert all((v.numpy() == 0).all() for v in others.values())
    wide = tf.Variable(np.zeros((2, 4), np.float32), shape=tf.TensorShape([None, 4]))
    with pytest.raises(MismatchError, match=r"'rows'.*shape in checkpoint is \(5, 3\)"):
        gpusaver.Saver({**others, "rows": wide}).restore(prefix)


def test_mismatch_of_the_last_of_many_variables_is_named_before_any_assign(tmp_path):
    names = [f"v{i:03d}" for i in range(200)]
    prefix = gpusaver.Saver({n: tf.Variable(np.full(3, i, np.float32)) for i, n in enumerate(names)}).save(
        str(tmp_path / "c"))
    targets = {n: tf.Variable(np.full(3, -1, np.float32)) for n in names[:-1]}
    targets[names[-1]] = tf.Variable(np.full(3, -1, np.float64))
    with pytest.raises(MismatchError, match=r"'v199'.*dtype in checkpoint is float32, variable is float64"):
        gpusaver.Saver(targets).restore(prefix)
    assert all((v.numpy() == -1).all() for v in targets.values())


def test_groups_form_only_for_this_hosts_cpu():
    from gpusaver.tf.assign import Assigner
    assigner = Assigner()
    local = tf.Variable(1.0).device
    assert assigner._groups_on(local) and assigner._groups_on("")
    assert not assigner._groups_on(local.replace("CPU:0", "GPU:0"))
    assert not assigner._groups_on("/job:ps/replica:0/task:1/device:CPU:0")


def test_save_and_save_async_write_the_same_bytes(tmp_path):
    """save() reads the variables while the first ones are written (a Feed), save_async() reads
    them all first: the same checkpoint either way, byte for byte, over several read groups and
    every kind of value (strings, bfloat16, scalars)."""
    from gpusaver.tf.variables import _READ_GROUP
    variables = [tf.Variable(np.full((i % 7) * 100, i, np.float32), name=f"v{i:04d}") for i in range(2 * _READ_GROUP + 5)]
    variables += _vars() + [tf.Variable(tf.constant([1.5, -2.0], tf.bfloat16), name="half")]
    saver = gpusaver.Saver(variables)
    saver.save(str(tmp_path / "a"))
    saver.save_async(str(tmp_path / "b")).result()
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
    reader = tf.train.load_checkpoint(str(tmp_path / "a"))
    assert reader.get_tensor("v0260").tolist() == [260.0] * 100 and list(reader.get_tensor("vocab")) == [b"a", "ü".encode()]


def test_a_feed_is_saved_in_reference_mode_only(tmp_path):
    from gpusaver import core
    with pytest.raises(gpusaver.InvalidArgumentError, match="reference"):
        core.save_async(str(tmp_path / "m"), core.Feed(), gpusaver.Options(snapshot="copy"), copy_on_write=True)
    assert os.listdir(tmp_path) == []


def test_a_saver_saving_again_writes_what_a_new_saver_writes(tmp_path):
    """A Saver's second save refills its last index with the new CRCs (IndexCache): the files
    are those a fresh Saver writes, and TF reads the new values from them."""
    variables = [tf.Variable(np.full(300, i, np.float32), name=f"v{i:04d}") for i in range(600)]
    saver = gpusaver.Saver(variables)
    saver.save(str(tmp_path / "a"))
    for i, v in enumerate(variables):
        v.assign(np.full(300, -i, np.float32))
    saver.save(str(tmp_path / "b"))
    gpusaver.Saver(variables).save(str(tmp_path / "c"))
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / f"b{suffix}").read_bytes() == (tmp_path / f"c{suffix}").read_bytes()
    assert (tmp_path / "a.index").read_bytes() != (tmp_path / "b.index").read_bytes()  # the CRCs changed
    assert tf.train.load_checkpoint(str(tmp_path / "b")).get_tensor("v0599").tolist() == [-599.0] * 300


@pytest.mark.parametrize("message, batched_after", [
    ("Resource localhost/_0_v/N10tensorflow3VarE does not exist.", True),  # e.g. a variable deleted
    ("No registered '_ReadVariablesOp' OpKernel for 'XPU' devices", False),  # the op itself missing
])
def test_only_a_missing_op_turns_the_batched_read_off(monkeypatch, message, batched_after):
    """A batched read failing with NotFoundError falls back to one read per variable; later reads
    on the device go batched again unless the op itself is what was not found."""
    from gpusaver.tf import variables as tfvars
    variables = [tf.Variable(np.full(3, i, np.float32)) for i in range(3)]
    device, handles, dtypes = variables[0].device, [v.handle for v in variables], [v.dtype for v in variables]
    batched, real = [], tfvars.execute

    class FailingOnce:
        @staticmethod
        def execute(*args, **kwargs):
            batched.append(args[0])
            if len(batched) == 1:
                raise tf.errors.NotFoundError(None, None, message)
            return real.execute(*args, **kwargs)

    monkeypatch.setattr(tfvars, "execute", FailingOnce)
    monkeypatch.setattr(tfvars, "_unbatched", set())
    for _ in range(2):
        values = tfvars.read_values(device, handles, dtypes)
        assert [v.numpy().tolist() for v in values] == [[float(i)] * 3 for i in range(3)]
    assert len(batched) == (2 if batched_after else 1)
