"""The storage layer (issue 13): one protocol, served by local POSIX files and by fsspec
(``file://``, ``memory://``, ``s3://`` against the SeaweedFS server of tests/seaweed.py, and
``gs://`` against the fake-gcs-server emulator of tests/gcs.py)."""
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import CheckpointIOError, CheckpointNotFoundError, CorruptCheckpointError
from gpusaver.storage import LocalStorage, for_url, is_url, scheme


@pytest.fixture(params=["local", "file", "memory", "s3", "gs"])
def store(request, tmp_path):
    """(storage, a directory path or URL in it that holds nothing yet)."""
    kind = request.param
    if kind == "local":
        return for_url(str(tmp_path)), str(tmp_path / "d")
    pytest.importorskip("fsspec")
    if kind == "file":
        return for_url("file://"), f"file://{tmp_path}/d"
    if kind == "memory":
        url = f"memory://gpusaver-tests/{uuid.uuid4().hex}/d"
        return for_url(url), url
    if kind == "gs":
        url = request.getfixturevalue("gs_url")
        gcs = request.getfixturevalue("gcs")
        return for_url(url, gpusaver.Options(storage_options=gcs.storage_options())), url
    url = request.getfixturevalue("s3_url")
    seaweed = request.getfixturevalue("seaweed")
    return for_url(url, gpusaver.Options(storage_options=seaweed.storage_options())), url


def _put(storage, path, data: bytes, pieces: int = 3):
    storage.makedirs(storage.dirname(path))
    stream = storage.open_write(path)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        stream.write(memoryview(data)[i:i + step])
    stream.close()
    stream.commit()


def test_for_url_picks_the_storage_by_scheme(tmp_path):
    assert isinstance(for_url(str(tmp_path)), LocalStorage)
    assert isinstance(for_url(tmp_path), LocalStorage)  # os.PathLike
    assert scheme("S3://bucket/x") == "s3" and scheme("/data/ckpt") is None and scheme("c:\\x") is None
    assert is_url("memory://x/y") and not is_url("relative/dir/model")
    pytest.importorskip("fsspec")
    assert not isinstance(for_url("memory://x/y"), LocalStorage)


def test_an_object_appears_only_at_commit(store):
    storage, base = store
    path = storage.join(base, "obj")
    storage.makedirs(base)
    stream = storage.open_write(path)
    stream.write(b"a" * 1000)
    stream.write(memoryview(np.arange(10, dtype=np.int64)))
    stream.close()
    assert not storage.exists(path)
    stream.commit()
    assert storage.isfile(path) and not storage.isdir(path)
    assert storage.read_bytes(path) == b"a" * 1000 + np.arange(10, dtype=np.int64).tobytes()
    assert storage.list(base) == [path]  # no temporary object left beside it


def test_commit_replaces_and_discard_leaves_no_trace(store):
    storage, base = store
    path = storage.join(base, "obj")
    _put(storage, path, b"old")
    stream = storage.open_write(path)
    stream.write(b"new" * 10)
    stream.close()
    stream.discard()
    stream.discard()  # idempotent
    assert storage.read_bytes(path) == b"old" and storage.list(base) == [path]
    _put(storage, path, b"new")
    assert storage.read_bytes(path) == b"new"


def test_ranged_reads_fill_several_buffers(store):
    storage, base = store
    path = storage.join(base, "data")
    data = os.urandom(3 << 20)
    _put(storage, path, data, pieces=7)
    handle = storage.open_read(path)
    try:
        assert handle.size == len(data) and handle.read_size >= 1 << 20
        a, b, c = bytearray(5), bytearray(1 << 20), bytearray(0)
        handle.readinto(12345, [memoryview(a), memoryview(c), memoryview(b)], "t")
        assert bytes(a) + bytes(b) == data[12345:12345 + 5 + (1 << 20)]
        with pytest.raises(CorruptCheckpointError, match="unexpected end of file in 't'"):
            handle.readinto(len(data) - 2, [memoryview(bytearray(4))], "t")
    finally:
        handle.close()


def test_missing_objects_and_directories(store):
    storage, base = store
    missing = storage.join(base, "nothing")
    with pytest.raises(CheckpointNotFoundError, match="nothing"):
        storage.open_read(missing)
    with pytest.raises(CheckpointNotFoundError, match="nothing"):
        storage.read_bytes(missing)
    assert not storage.exists(missing) and storage.list(missing) == []
    storage.delete(missing)  # nothing to delete: no error
    _put(storage, storage.join(base, "sub/x"), b"1")
    assert storage.isdir(storage.join(base, "sub"))
    with pytest.raises(CheckpointNotFoundError):
        storage.open_read(storage.join(base, "sub"))


def test_move_replaces_the_destination_and_a_missing_source_is_not_found(store):
    storage, base = store
    src, dst = storage.join(base, "part.data"), storage.join(base, "merged.data")
    data = os.urandom(100_000)
    _put(storage, src, data)
    _put(storage, dst, b"old")
    storage.move(src, dst)
    assert storage.read_bytes(dst) == data and not storage.exists(src)
    assert storage.list(base) == [dst]
    with pytest.raises(CheckpointNotFoundError, match="part.data"):
        storage.move(src, dst)
    assert storage.read_bytes(dst) == data


def test_write_bytes_is_whole_and_delete_removes(store):
    storage, base = store
    path = storage.join(base, "checkpoint")
    storage.makedirs(base)
    storage.write_bytes(path, b"first")
    storage.write_bytes(path, b"second")
    assert storage.read_bytes(path) == b"second" and storage.list(base) == [path]
    storage.delete(path)
    assert not storage.exists(path)


def test_local_errors_name_the_file(tmp_path):
    storage = LocalStorage()
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointIOError) as info:
        storage.open_write(str(tmp_path / "no" / "such" / "f"))
    assert str(tmp_path / "no" / "such" / "f") in str(info.value)
    with pytest.raises(CheckpointNotFoundError, match="not a regular file"):
        storage.open_read(str(tmp_path / "dir"))


def test_storage_options_are_copied_compared_and_kept_out_of_repr():
    secret = {"key": "k", "secret": "s3cr3t"}
    a = gpusaver.Options(storage_options=secret)
    secret["secret"] = "changed"
    assert a.storage_options == {"key": "k", "secret": "s3cr3t"}
    assert a == gpusaver.Options(storage_options={"key": "k", "secret": "s3cr3t"}) != gpusaver.Options()
    assert hash(a) == hash(gpusaver.Options()) and "s3cr3t" not in repr(a)
    with pytest.raises(ValueError, match="storage_options"):
        gpusaver.Options(storage_options=5)


def test_a_url_without_fsspec_names_the_extra(tmp_path):
    # A real interpreter in which fsspec cannot be imported (as on an install without the extra).
    code = ("import sys; sys.modules['fsspec'] = None\n"
            "from gpusaver.storage import for_url\n"
            "for_url(sys.argv[1])")
    run = subprocess.run([sys.executable, "-c", code, "s3://bucket/ckpt/model"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "gpusaver[remote]" in run.stderr and "s3://bucket" in run.stderr


@pytest.mark.parametrize("scheme_", ["memory", "file"])
def test_save_load_round_trip_through_fsspec(tmp_path, scheme_):
    pytest.importorskip("fsspec")
    base = f"memory://gpusaver-tests/{uuid.uuid4().hex}" if scheme_ == "memory" else f"file://{tmp_path}"
    arrays = {"w": np.arange(3 << 18, dtype=np.float32).reshape(-1, 256), "b": np.ones(7, np.int16),
              "s": np.array([b"x", b"yz"], dtype=object), **{f"n{i}": np.full(3, i) for i in range(20)}}
    prefix = gpusaver.save(base + "/ckpt/model", arrays, gpusaver.Options(num_shards=2))
    storage = for_url(base)
    assert [p.rsplit("/", 1)[-1] for p in storage.list(base + "/ckpt")] == [
        "model.data-00000-of-00002", "model.data-00001-of-00002", "model.index"]
    got = gpusaver.load(prefix)
    assert set(got) == set(arrays) and all(got[k].tolist() == v.tolist() for k, v in arrays.items())
    assert gpusaver.load(prefix + ".index", ["b"])["b"].tolist() == [1] * 7  # a file's name works too
    with pytest.raises(CheckpointNotFoundError, match="model-9.index"):
        gpusaver.load(base + "/ckpt/model-9")


def test_state_file_and_latest_checkpoint_on_memory():
    pytest.importorskip("fsspec")
    from gpusaver.format.state import CheckpointState, read_state, write_state

    base = f"memory://gpusaver-tests/{uuid.uuid4().hex}/ckpt"
    assert gpusaver.latest_checkpoint(base) is None
    gpusaver.save(base + "/m-1", {"a": np.zeros(2)})
    write_state(base, CheckpointState("m-1", ["m-1"]))
    assert read_state(base).all_model_checkpoint_paths == ["m-1"]
    assert gpusaver.latest_checkpoint(base) == base + "/m-1"
    assert gpusaver.load(base)["a"].tolist() == [0, 0]  # a directory URL: its latest checkpoint


def test_a_read_larger_than_one_batch_of_ranges():
    pytest.importorskip("fsspec")
    from gpusaver.storage import fsspec as fsspec_storage

    url = f"memory://gpusaver-tests/{uuid.uuid4().hex}/big"
    storage = for_url(url)
    data = np.random.default_rng(0).integers(0, 255, fsspec_storage.READ_SIZE + 3 * fsspec_storage.RANGE_SIZE // 2,
                                             dtype=np.uint8).tobytes()
    _put(storage, url, data, pieces=5)
    out = bytearray(len(data) - 7)
    storage.open_read(url).readinto(7, [memoryview(out)[:100], memoryview(out)[100:]], "big")
    assert bytes(out) == data[7:]
    storage.delete(url)


def test_write_many_keeps_order_with_buffered_writes_on_every_storage(store):
    """A batch of tensors (large ones go out by writev on local files) lands after what was
    buffered before it and before what follows, zero-length tensors included."""
    storage, base = store
    path = storage.join(base, "obj")
    storage.makedirs(base)
    rng = np.random.default_rng(0)
    small = [memoryview(rng.bytes(n)) for n in (3, 0, 100)]
    large = [memoryview(rng.bytes(n)) for n in (70_000, 0, 200_000, 5)]
    stream = storage.open_write(path)
    stream.write(b"head")
    stream.write_many(large, ["a", "b", "c", "d"])
    stream.write_many(small, ["e", "f", "g"])
    stream.write(b"tail")
    stream.close()
    stream.commit()
    assert storage.read_bytes(path) == b"".join([b"head", *map(bytes, large), *map(bytes, small), b"tail"])


def test_local_write_many_resumes_short_writes_and_names_the_failing_tensor(tmp_path, monkeypatch):
    from gpusaver.storage import local
    real_writev, failing = os.writev, {"after": None}

    def short_writev(fd, buffers):  # at most 50,000 bytes a call; ENOSPC once "after" calls ran
        if failing["after"] is not None:
            if failing["after"] == 0:
                raise OSError(28, "No space left on device")
            failing["after"] -= 1
        data = b"".join(bytes(b) for b in buffers)[:50_000]
        return real_writev(fd, [data])

    monkeypatch.setattr(local.os, "writev", short_writev)
    views = [memoryview(bytes([i]) * 64_000) for i in range(4)]
    path = str(tmp_path / "f")
    stream = LocalStorage().open_write(path)
    stream.write_many(views, ["t0", "t1", "t2", "t3"])
    stream.close()
    stream.commit()
    assert open(path, "rb").read() == b"".join(bytes(v) for v in views)

    failing["after"] = 3  # 150,000 bytes written: the third tensor was being written
    stream = LocalStorage().open_write(str(tmp_path / "g"))
    with pytest.raises(CheckpointIOError, match="t2") as info:
        stream.write_many(views, ["t0", "t1", "t2", "t3"])
    assert str(tmp_path / "g") in str(info.value) and "disk full" in str(info.value)
    stream.discard()


def test_local_write_many_of_more_views_than_one_writev_takes(tmp_path, monkeypatch):
    """Past Linux's 1024 buffers a call, writev goes in groups; a group cut short (here at
    3,000,000 bytes a call) resumes inside its view, and every byte lands in order."""
    from gpusaver.storage import local
    real_writev, calls = os.writev, []

    def capped_writev(fd, buffers):
        calls.append(len(buffers))
        assert len(buffers) <= 1024
        data = b"".join(bytes(b) for b in buffers)
        return real_writev(fd, [data[:cap]])

    monkeypatch.setattr(local.os, "writev", capped_writev)
    rng = np.random.default_rng(1)
    views = [memoryview(rng.bytes(5000 + i % 7)) for i in range(2500)]
    expected = b"".join(bytes(v) for v in views)
    for cap, name in ((1 << 40, "whole"), (3_000_000, "short")):
        calls.clear()
        stream = LocalStorage().open_write(str(tmp_path / name))
        stream.write_many(views, [f"t{i}" for i in range(len(views))])
        stream.close()
        stream.commit()
        assert open(tmp_path / name, "rb").read() == expected
        assert len(calls) == (3 if cap > len(expected) else 5), calls
