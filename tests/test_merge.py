"""The merge step (format/merge.py) against TensorFlow's own MergeV2Checkpoints, byte for byte."""
import shutil

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import MismatchError
from gpusaver.format.merge import merge

tf = pytest.importorskip("tensorflow")


def _parts(root):
    """Three worker bundles with disjoint tensors; the second has two data shards."""
    parts = {
        "w0": {"dense/kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.int64(7)},
        "w1": {"dense/bias": np.ones(4, np.float32), "emb": np.arange(1000, dtype=np.float64),
               "names": np.array([b"a", b"bc"], dtype=object)},
        "w2": {"zz": np.zeros((0, 3), np.int32)},
    }
    prefixes = []
    for name, arrays in parts.items():
        options = gpusaver.Options(num_shards=2) if name == "w1" else None
        prefixes.append(gpusaver.save(str(root / "tmp" / name), arrays, options))
    return parts, prefixes


def _tree(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_merge_matches_tensorflow_byte_for_byte(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    parts, prefixes = _parts(ours)
    shutil.copytree(ours, theirs)
    merge(prefixes, str(ours / "ckpt"))
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[p.replace(str(ours), str(theirs)) for p in prefixes],
                                  destination_prefix=str(theirs / "ckpt"), delete_old_dirs=False)
    assert _tree(ours) == _tree(theirs)
    assert sorted(p.name for p in ours.iterdir()) == [
        "ckpt.data-00000-of-00004", "ckpt.data-00001-of-00004", "ckpt.data-00002-of-00004",
        "ckpt.data-00003-of-00004", "ckpt.index", "tmp"]
    reader = tf.train.load_checkpoint(str(ours / "ckpt"))
    loaded = gpusaver.load(str(ours / "ckpt"))
    for arrays in parts.values():
        for key, value in arrays.items():
            np.testing.assert_array_equal(reader.get_tensor(key), value)
            np.testing.assert_array_equal(loaded[key], value)


def test_merge_refuses_a_tensor_saved_twice_and_leaves_the_inputs(tmp_path):
    a = gpusaver.save(str(tmp_path / "a"), {"x": np.ones(3), "y": np.ones(2)})
    b = gpusaver.save(str(tmp_path / "b"), {"x": np.zeros(3)})
    before = _tree(tmp_path)
    with pytest.raises(MismatchError, match=r"'x' is in both .*a.* and .*b"):
        merge([a, b], str(tmp_path / "m"))
    assert _tree(tmp_path) == before


def test_merge_into_one_of_its_inputs(tmp_path):
    """A worker's own prefix may be the destination (the chief merging into its bundle's name)."""
    a = gpusaver.save(str(tmp_path / "ckpt"), {"x": np.arange(3.0)})
    b = gpusaver.save(str(tmp_path / "part1"), {"y": np.arange(4.0)})
    merge([a, b], a)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt.data-00000-of-00002", "ckpt.data-00001-of-00002", "ckpt.index"]
    loaded = gpusaver.load(a)
    np.testing.assert_array_equal(loaded["x"], np.arange(3.0))
    np.testing.assert_array_equal(loaded["y"], np.arange(4.0))


def test_merge_gathers_the_slices_of_a_partitioned_tensor_as_tensorflow_does(tmp_path):
    """Two workers each saved half of one partitioned variable (TF's SaveV2 with slice specs)."""
    full = np.arange(8, dtype=np.float32).reshape(4, 2)
    for root in ("ours", "theirs"):
        for i, spec in enumerate(["4 2 0,2:-", "4 2 2,2:-"]):
            tf.raw_ops.SaveV2(prefix=str(tmp_path / root / f"w{i}"), tensor_names=["p"], shape_and_slices=[spec],
                              tensors=[tf.constant(full[2 * i:2 * i + 2])])
    merge([str(tmp_path / "ours" / "w0"), str(tmp_path / "ours" / "w1")], str(tmp_path / "ours" / "ckpt"))
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[str(tmp_path / "theirs" / "w0"), str(tmp_path / "theirs" / "w1")],
                                  destination_prefix=str(tmp_path / "theirs" / "ckpt"), delete_old_dirs=False)
    assert _tree(tmp_path / "ours") == _tree(tmp_path / "theirs")
    np.testing.assert_array_equal(gpusaver.load(str(tmp_path / "ours" / "ckpt"))["p"], full)


def test_merge_on_the_command_line(tmp_path):
    from gpusaver.cli import main
    a = gpusaver.save(str(tmp_path / "a"), {"x": np.arange(3.0)})
    b = gpusaver.save(str(tmp_path / "b"), {"y": np.arange(2.0)})
    assert main(["merge", str(tmp_path / "m"), a, b]) == 0
    assert sorted(gpusaver.load(str(tmp_path / "m"))) == ["x", "y"]
    assert not (tmp_path / "a.index").exists()
    c = gpusaver.save(str(tmp_path / "c"), {"x": np.arange(3.0)})
    assert main(["merge", str(tmp_path / "n"), str(tmp_path / "m"), c]) == 1  # 'x' twice: refused
