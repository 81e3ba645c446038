"""Both directions against TensorFlow itself: TF reads what we write, we read what TF writes."""
import filecmp

import ml_dtypes
import numpy as np
import pytest

import gpusaver
from gpusaver.format import BundleReader

tf = pytest.importorskip("tensorflow")

NUMERIC = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int8, np.int16, np.int32, np.int64,
           np.uint8, np.uint16, np.uint32, np.uint64, np.complex64, np.complex128, np.bool_]
SHAPES = [(), (0,), (3, 0, 2), (1,), (5, 7), (2, 3, 4, 1)]


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 100
    if np.dtype(dtype).kind == "c":
        x = x + 1j * rng.standard_normal(shape)
    if np.dtype(dtype).kind == "b":
        x = x > 0
    return np.asarray(x).astype(dtype)


def _tensors():
    out = {}
    for i, dtype in enumerate(NUMERIC):
        for j, shape in enumerate(SHAPES):
            out[f"{np.dtype(dtype).name}/{j}"] = _sample(dtype, shape, i * 10 + j)
    out["large"] = _sample(np.float32, (3 << 20,))  # 12 MiB
    out["str/scalar"] = np.array("héllo wörld", dtype=object)
    out["str/empty"] = np.array([], dtype=object)
    out["str/mixed"] = np.array([[b"", "ünïcode ✓".encode()], [b"\x00\xff", b"x" * 70000]], dtype=object)
    return out


def _tf_save(prefix, tensors):
    names = list(tensors)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])


def _assert_same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    if a.dtype.kind == "O" or b.dtype.kind == "O":
        assert [bytes(x) if not isinstance(x, str) else x.encode() for x in a.reshape(-1)] == \
               [bytes(x) if not isinstance(x, str) else x.encode() for x in b.reshape(-1)]
    else:
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a,
                                      b.view(np.uint16) if b.dtype == ml_dtypes.bfloat16 else b)


def test_byte_identical_to_tf_savev2(tmp_path):
    tensors = _tensors()
    _tf_save(tmp_path / "tf", tensors)
    gpusaver.save(str(tmp_path / "gs"), tensors)
    for suffix in (".index", ".data-00000-of-00001"):
        assert filecmp.cmp(tmp_path / f"tf{suffix}", tmp_path / f"gs{suffix}", shallow=False), suffix


def test_tf_reads_what_we_write(tmp_path):
    tensors = _tensors()
    gpusaver.save(str(tmp_path / "gs"), tensors, gpusaver.Options(num_shards=3, chunk_size=1 << 20))
    reader = tf.train.load_checkpoint(str(tmp_path / "gs"))
    assert set(reader.get_variable_to_shape_map()) == set(tensors)
    for name, value in tensors.items():
        _assert_same(reader.get_tensor(name), value)


def test_we_read_what_tf_writes(tmp_path):
    tensors = _tensors()
    _tf_save(tmp_path / "tf", tensors)
    loaded = gpusaver.load(str(tmp_path / "tf"))
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        _assert_same(loaded[name], value)


def test_many_keys_span_several_index_blocks(tmp_path):
    tensors = {f"model/encoder/layer_{i % 50:03d}/attention/sublayer_{i:05d}/kernel_with_a_long_name": np.full(2, i)
               for i in range(12000)}
    _tf_save(tmp_path / "tf", tensors)
    gpusaver.save(str(tmp_path / "gs"), tensors)
    assert (tmp_path / "gs.index").stat().st_size > 2 * 262144  # at least three data blocks
    assert filecmp.cmp(tmp_path / "tf.index", tmp_path / "gs.index", shallow=False)
    loaded = gpusaver.load(str(tmp_path / "tf"))
    assert all(loaded[k][0] == v[0] for k, v in tensors.items())


def test_partitioned_tf_tensor_is_assembled(tmp_path):
    full = np.arange(12, dtype=np.float32).reshape(4, 3)
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "p"), tensor_names=["p", "p", "plain"],
                      shape_and_slices=["4 3 0,2:-", "4 3 2,2:-", ""],
                      tensors=[tf.constant(full[:2]), tf.constant(full[2:]), tf.constant([1.0])])
    with BundleReader(str(tmp_path / "p")) as r:
        assert sorted(r.keys()) == ["p", "plain"]
        np.testing.assert_array_equal(r.read("p"), full)
    v = tf.Variable(tf.zeros((4, 3)), name="p")
    gpusaver.Saver([v]).restore(str(tmp_path / "p"))
    np.testing.assert_array_equal(v.numpy(), full)


def test_tf_v1_saver_and_checkpoint_name_based_restore_read_our_files(tmp_path):
    a = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="dense/kernel")
    b = tf.Variable(tf.constant([1.5, -2.0], tf.bfloat16), name="dense/bias")
    prefix = gpusaver.Saver([a, b]).save(str(tmp_path / "ckpt"), global_step=3)
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefix

    a2 = tf.Variable(tf.zeros((2, 3)), name="dense/kernel")
    b2 = tf.Variable(tf.zeros(2, tf.bfloat16), name="dense/bias")
    tf.compat.v1.train.Saver([a2, b2]).restore(None, prefix)
    np.testing.assert_array_equal(a2.numpy(), a.numpy())
    np.testing.assert_array_equal(b2.numpy(), b.numpy())

    # No object graph in the file → tf.train.Checkpoint falls back to name-based restore.
    a3 = tf.Variable(tf.zeros((2, 3)), name="dense/kernel")
    module = tf.Module()
    module.kernel = a3
    tf.train.Checkpoint(m=module).restore(prefix).run_restore_ops()
    np.testing.assert_array_equal(a3.numpy(), a.numpy())


def test_we_restore_tf_checkpoint_and_v1_saver_files(tmp_path):
    v = tf.Variable(np.arange(5, dtype=np.int64))
    w = tf.Variable(["a", "bé"])
    path = tf.train.Checkpoint(v=v, w=w).write(str(tmp_path / "obj"))
    v2, w2 = tf.Variable(np.zeros(5, np.int64)), tf.Variable(["", ""])
    gpusaver.Saver({"v/.ATTRIBUTES/VARIABLE_VALUE": v2, "w/.ATTRIBUTES/VARIABLE_VALUE": w2}).restore(path)
    np.testing.assert_array_equal(v2.numpy(), v.numpy())
    assert list(w2.numpy()) == [b"a", "bé".encode()]

    x = tf.Variable(np.ones((3, 3), np.float32), name="x")
    saved = tf.compat.v1.train.Saver([x]).save(None, str(tmp_path / "v1"), global_step=2)
    x2 = tf.Variable(np.zeros((3, 3), np.float32), name="x")
    gpusaver.Saver([x2]).restore(saved)
    np.testing.assert_array_equal(x2.numpy(), x.numpy())
