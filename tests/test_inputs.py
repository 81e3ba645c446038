"""Inputs users get wrong (issue 11, item 2): each is answered with the fix."""
import sys

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import CheckpointNotFoundError, GpusaverError


def _save(prefix, value=1.0):
    return gpusaver.save(str(prefix), {"a": np.full(3, value, np.float32)})


# -- where a prefix is expected -------------------------------------------------------------------
def test_load_a_directory_reads_its_latest_checkpoint(tmp_path):
    tf = pytest.importorskip("tensorflow")
    v = tf.Variable(np.arange(3, dtype=np.float32), name="a")
    saver = gpusaver.Saver([v])
    saver.save(str(tmp_path / "m"), global_step=1)
    v.assign([7.0, 8.0, 9.0])
    saver.save(str(tmp_path / "m"), global_step=2)
    np.testing.assert_array_equal(gpusaver.load(str(tmp_path))["a"], [7, 8, 9])
    np.testing.assert_array_equal(gpusaver.load(tmp_path)["a"], [7, 8, 9])  # a pathlib.Path too
    v.assign([0.0, 0.0, 0.0])
    saver.restore(str(tmp_path))
    np.testing.assert_array_equal(v.numpy(), [7, 8, 9])


def test_directory_without_state_file_lists_the_prefixes(tmp_path):
    _save(tmp_path / "first")
    _save(tmp_path / "second")
    with pytest.raises(CheckpointNotFoundError, match="first.*second"):
        gpusaver.load(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        gpusaver.load(str(empty))


@pytest.mark.parametrize("suffix", [".index", ".data-00000-of-00001"])
def test_a_checkpoint_file_resolves_to_its_prefix(tmp_path, suffix):
    _save(tmp_path / "m", 4.0)
    np.testing.assert_array_equal(gpusaver.load(str(tmp_path / "m") + suffix)["a"], [4, 4, 4])


def test_missing_prefix_names_the_ones_that_exist(tmp_path):
    _save(tmp_path / "model-10")
    with pytest.raises(CheckpointNotFoundError, match="model-10"):
        gpusaver.load(str(tmp_path / "model-1"))


@pytest.mark.parametrize("bad", [None, 3])
def test_none_or_non_path_prefix(tmp_path, bad):
    for call in (lambda: gpusaver.load(bad), lambda: gpusaver.save(bad, {"a": np.ones(2)})):
        with pytest.raises(TypeError) as info:
            call()
        assert isinstance(info.value, GpusaverError) and "prefix" in str(info.value)


@pytest.mark.parametrize("bad", ["", "sub/"])
def test_empty_prefix_is_refused(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        gpusaver.save(bad, {"a": np.ones(2)})
    assert isinstance(info.value, GpusaverError) and "prefix" in str(info.value)
    tf = pytest.importorskip("tensorflow")
    with pytest.raises(ValueError):
        gpusaver.Saver([tf.Variable(1.0, name="x")]).save(bad)
    assert list(tmp_path.rglob("*")) == ([tmp_path / "sub"] if bad == "sub/" and (tmp_path / "sub").exists() else [])


def test_saving_to_a_directory_or_index_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="directory") as info:
        gpusaver.save(str(tmp_path), {"a": np.ones(2)})
    assert isinstance(info.value, GpusaverError)
    with pytest.raises(ValueError, match="'.*m'"):
        gpusaver.save(str(tmp_path / "m.index"), {"a": np.ones(2)})
    assert list(tmp_path.iterdir()) == []


# -- var_list, keys, shapes -----------------------------------------------------------------------
def test_non_variables_in_var_list_name_the_element_and_type():
    tf = pytest.importorskip("tensorflow")
    v = tf.Variable(1.0, name="x")
    with pytest.raises(TypeError, match=r"var_list\[1\].*ndarray") as info:
        gpusaver.Saver([v, np.ones(2)])
    assert isinstance(info.value, GpusaverError)
    with pytest.raises(TypeError, match=r"var_list\['t'\].*EagerTensor"):
        gpusaver.Saver({"x": v, "t": tf.constant(1.0)})
    with pytest.raises(TypeError, match="str"):
        gpusaver.Saver("x")


def test_load_keys_as_one_string(tmp_path):
    gpusaver.save(str(tmp_path / "m"), {"x": np.ones(2), "xy": np.zeros(3)})
    out = gpusaver.load(str(tmp_path / "m"), keys="x")
    assert list(out) == ["x"]
    np.testing.assert_array_equal(out["x"], np.ones(2))


def test_variable_of_unknown_shape_restores_as_tf_does(tmp_path):
    tf = pytest.importorskip("tensorflow")
    v = tf.Variable(np.arange(3, dtype=np.float32), shape=tf.TensorShape(None), name="u")
    partial = tf.Variable(np.ones((2, 3), np.float32), shape=tf.TensorShape([None, 3]), name="p")
    saver = gpusaver.Saver([v, partial])
    prefix = saver.save(str(tmp_path / "m"))
    gpusaver.save(str(tmp_path / "other"), {"u": np.arange(5, dtype=np.float32),
                                            "p": np.zeros((4, 3), np.float32)})
    saver.restore(str(tmp_path / "other"))
    np.testing.assert_array_equal(v.numpy(), np.arange(5))
    assert partial.numpy().shape == (4, 3)
    saver.restore(prefix)
    np.testing.assert_array_equal(v.numpy(), np.arange(3))
    gpusaver.save(str(tmp_path / "bad"), {"u": np.ones(1, np.float32), "p": np.zeros((4, 2), np.float32)})
    with pytest.raises(gpusaver.MismatchError, match="'p'"):
        saver.restore(str(tmp_path / "bad"))


# -- missing optional dependencies ----------------------------------------------------------------
def test_missing_tensorflow_names_the_extra(monkeypatch):
    import gpusaver as pkg
    for mod in ("gpusaver.tf.saver", "gpusaver.tf.variables"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[tf\]'"):
        pkg.__getattr__("Saver")


def test_missing_cupy_names_the_extras(monkeypatch):
    from gpusaver.staging.cuda import kernels
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match=r"\.\[cuda13\].*\.\[cuda12\]|\.\[cuda12\].*\.\[cuda13\]") as info:
        kernels._import_cupy()
    assert "pip install -e" in str(info.value)
