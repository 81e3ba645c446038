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


def _upload(directory, url, store) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            store.write_bytes(url + "/" + path.relative_to(directory).as_posix(), path.read_bytes())


def _objects(url, store) -> dict:
    """{name: bytes} of the objects directly under ``url``."""
    return {p.rsplit("/", 1)[-1]: store.read_bytes(p) for p in store.list(url)}


def test_merge_on_s3_moves_the_data_on_the_server_and_matches_the_local_merge(tmp_path, seaweed, s3_url):
    """The same parts merged on a local disk and in a bucket give the same bytes; the bucket's
    parts are gone afterwards (their data now the merged checkpoint's)."""
    from gpusaver.storage import for_url

    url = s3_url.rsplit("/", 1)[0]
    store = for_url(url, gpusaver.Options(storage_options=seaweed.storage_options()))
    _, prefixes = _parts(tmp_path / "local")
    _upload(tmp_path / "local" / "tmp", url + "/tmp", store)
    merge(prefixes, str(tmp_path / "local" / "ckpt"))
    remote = [url + "/tmp/" + p.rsplit("/", 1)[-1] for p in prefixes]
    assert merge(remote, url + "/ckpt", storage=store) == url + "/ckpt"
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir() if p.is_file()}
    assert _objects(url, store) == local
    # (SeaweedFS may list an emptied folder as an object of its own name: only bundle files count.)
    assert [p for p in store.list(url + "/tmp") if ".index" in p or ".data-" in p] == []


def test_merge_on_s3_that_fails_gives_the_inputs_their_data_back(tmp_path, seaweed, s3_url):
    from gpusaver.errors import CheckpointNotFoundError
    from gpusaver.format import naming
    from gpusaver.storage import for_url

    url = s3_url.rsplit("/", 1)[0]
    store = for_url(url, gpusaver.Options(storage_options=seaweed.storage_options()))
    _, prefixes = _parts(tmp_path)
    _upload(tmp_path / "tmp", url + "/tmp", store)
    remote = [url + "/tmp/" + p.rsplit("/", 1)[-1] for p in prefixes]
    store.delete(naming.data_path(remote[2], 0, 1))  # the last input lost its data: its move fails
    before = _objects(url + "/tmp", store)
    with pytest.raises(CheckpointNotFoundError, match="w2.data-00000-of-00001"):
        merge(remote, url + "/ckpt", storage=store)
    assert _objects(url + "/tmp", store) == before  # the moved data went back
    assert _objects(url, store) == {}  # no merged index, no merged data
