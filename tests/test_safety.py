"""Data safety (issue 11, item 1): atomic overwrites, clean failure paths, no silent async
failures, all-or-nothing restore, checked partitioned entries, one error hierarchy."""
import errno
import io
import os
import re
import threading
import time

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import CorruptCheckpointError, GpusaverError
from gpusaver.format import naming
from gpusaver.storage import local as local_storage  # where the files are opened (issue 13)
from gpusaver.staging.stager import DESCRIBE_BATCH
from gpusaver.format.dtypes import DataType
from gpusaver.format.proto import Entry, Extent, Header
from gpusaver.format.table import TableBuilder
from gpusaver.format.wire import crc32c, mask

from corrupt import flip_byte


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


class _Crash(BaseException):
    """Stands for the process dying at an injected point (not an Exception: nothing may catch it)."""


# -- 1. atomic overwrite -------------------------------------------------------------------------
def test_overwrite_never_leaves_the_prefix_without_an_index(tmp_path, monkeypatch):
    prefix = str(tmp_path / "m")
    gpusaver.save(prefix, {"a": np.arange(10, dtype=np.float32)})
    index = naming.index_path(prefix)
    seen = []
    real_replace, real_remove = os.replace, os.remove

    def watch(fn):
        def wrapped(*args, **kw):
            seen.append(os.path.exists(index))
            out = fn(*args, **kw)
            seen.append(os.path.exists(index))
            return out
        return wrapped

    monkeypatch.setattr(os, "replace", watch(real_replace))
    monkeypatch.setattr(os, "remove", watch(real_remove))
    gpusaver.save(prefix, {"a": np.arange(10, 20, dtype=np.float32)})
    monkeypatch.undo()
    assert seen and all(seen)
    np.testing.assert_array_equal(gpusaver.load(prefix)["a"], np.arange(10, 20, dtype=np.float32))


@pytest.mark.parametrize("crash_at", [".index", ".data-00000-of-00001"])
def test_overwrite_failing_between_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch, crash_at):
    prefix = str(tmp_path / "m")
    old = {"a": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.int64)}
    gpusaver.save(prefix, old)
    before = _files(tmp_path)
    real_replace, failed = os.replace, []

    def replace(src, dst, *a, **kw):
        if str(dst).endswith(crash_at) and ".tempstate" in str(src) and not failed:
            failed.append(dst)  # once: the rollback's own renames go through
            raise _Crash()
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Crash):
        gpusaver.save(prefix, {"a": np.zeros(1000, np.float32), "b": np.zeros(3, np.int64)})
    monkeypatch.undo()
    assert _files(tmp_path) == before
    np.testing.assert_array_equal(gpusaver.load(prefix)["a"], old["a"])


_KILL_MIDWAY = """
import os, signal, sys
import numpy as np
import gpusaver
prefix, kill_at = sys.argv[1], sys.argv[2]
def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies here: no cleanup runs
real_replace = os.replace
def replace(src, dst, *a, **kw):
    if str(dst).endswith(kill_at) and ".tempstate" in str(src):
        die()
    return real_replace(src, dst, *a, **kw)
os.replace = replace
new = {"a": np.zeros(1000, np.float32), "b": np.zeros(3, np.int64)}
gpusaver.save_async(prefix, new, on_done=die if kill_at == "on_commit" else None).result()
"""


@pytest.mark.parametrize("kill_at, survivor", [(".data-00000-of-00001", "old"), (".index", "old"),
                                               ("on_commit", "new")])
def test_overwrite_killed_midway_reads_old_or_new_and_is_repaired(tmp_path, kill_at, survivor):
    """SIGKILL inside the commit (before the data rename, between data and index, after the index
    while the state file is written): the next reader finishes or undoes the commit, leaves no
    litter, and TF then reads the same values."""
    import subprocess
    import sys
    prefix = str(tmp_path / "m")
    old = {"a": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.int64)}
    new = {"a": np.zeros(1000, np.float32), "b": np.zeros(3, np.int64)}
    gpusaver.save(prefix, old)
    proc = subprocess.run([sys.executable, "-c", _KILL_MIDWAY, prefix, kill_at], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (tmp_path / "m.gpusaver-journal").exists()  # the commit was cut short
    want = old if survivor == "old" else new
    loaded = gpusaver.load(prefix)
    for k in want:
        np.testing.assert_array_equal(loaded[k], want[k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data-00000-of-00001", "m.index"]
    import tensorflow as tf
    np.testing.assert_array_equal(tf.train.load_checkpoint(prefix).get_tensor("a"), want["a"])


def test_readers_racing_an_overwrite_see_old_or_new_never_a_mix(tmp_path):
    prefix = str(tmp_path / "m")
    gpusaver.save(prefix, {"a": np.zeros(50_000, np.int64), "b": np.zeros(10, np.int64)})
    stop, errors = threading.Event(), []

    def overwrite():
        k = 0
        while not stop.is_set():
            k += 1
            try:
                gpusaver.save(prefix, {"a": np.full(50_000 + k % 3, k, np.int64), "b": np.full(10, k, np.int64)})
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    writer = threading.Thread(target=overwrite)
    writer.start()
    try:
        for _ in range(300):
            got = gpusaver.load(prefix)
            assert got["a"][0] == got["b"][0] and (got["a"] == got["a"][0]).all()
    finally:
        stop.set()
        writer.join()
    assert not errors


def test_a_reader_opened_before_an_overwrite_keeps_reading_the_old_checkpoint(tmp_path):
    from gpusaver.format.reader import BundleReader
    prefix = str(tmp_path / "m")
    gpusaver.save(prefix, {"a": np.arange(10, dtype=np.float32)})
    with BundleReader(prefix) as reader:
        gpusaver.save(prefix, {"a": np.zeros(10, np.float32)})
        np.testing.assert_array_equal(reader.read("a"), np.arange(10, dtype=np.float32))
    np.testing.assert_array_equal(gpusaver.load(prefix)["a"], np.zeros(10, np.float32))


def test_on_commit_may_read_the_checkpoint_it_commits(tmp_path):
    """The commit holds the directory lock while ``on_done`` runs; a read from that thread must not
    wait for it (it would wait forever)."""
    from gpusaver.format.reader import BundleReader
    prefix = str(tmp_path / "m")
    gpusaver.save(prefix, {"a": np.arange(3.0)})
    future = gpusaver.save_async(prefix, {"a": np.arange(4.0)}, on_done=lambda p: BundleReader(p).read("a"))
    np.testing.assert_array_equal(future.result(timeout=60), np.arange(4.0))


# -- 2. disk full while writing the index or the state file --------------------------------------
class _FullFile(io.FileIO):
    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_full_for(module, monkeypatch, suffix):
    real_open = open

    def fake_open(path, mode="r", *args, **kw):
        if "w" in mode and re.sub(r"\.tempstate\d+$", "", os.fspath(path)).endswith(suffix):
            return _FullFile(path, "w")
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_disk_full_writing_the_index_removes_what_the_save_created(tmp_path, monkeypatch):
    tf = pytest.importorskip("tensorflow")
    v = tf.Variable(np.arange(4, dtype=np.float32), name="v")
    saver = gpusaver.Saver([v])
    first = saver.save(str(tmp_path / "m"), global_step=1)
    before = _files(tmp_path)
    _disk_full_for(local_storage, monkeypatch, ".index")
    with pytest.raises(OSError) as info:
        saver.save(str(tmp_path / "m"), global_step=2)
    assert isinstance(info.value, GpusaverError) and info.value.errno == errno.ENOSPC
    assert "m-2.index" in str(info.value)
    assert _files(tmp_path) == before  # no data file of m-2, no *.tempstate*
    assert tf.train.latest_checkpoint(str(tmp_path)) == first


def test_disk_full_writing_the_state_file_keeps_the_overwritten_checkpoint(tmp_path, monkeypatch):
    tf = pytest.importorskip("tensorflow")
    v = tf.Variable(np.arange(4, dtype=np.float32), name="v")
    saver = gpusaver.Saver([v])
    prefix = saver.save(str(tmp_path / "m"))
    before = _files(tmp_path)
    v.assign(np.zeros(4, np.float32))
    _disk_full_for(local_storage, monkeypatch, "checkpoint")
    with pytest.raises(OSError) as info:
        saver.save(str(tmp_path / "m"))
    assert isinstance(info.value, GpusaverError) and info.value.errno == errno.ENOSPC
    assert os.path.join(str(tmp_path), "checkpoint") in str(info.value)
    monkeypatch.undo()
    assert _files(tmp_path) == before
    saver.restore(prefix)
    np.testing.assert_array_equal(v.numpy(), np.arange(4, dtype=np.float32))


def test_disk_full_writing_a_data_file_names_file_and_tensor(tmp_path, monkeypatch):
    prefix = str(tmp_path / "m")

    class Full:
        def __init__(self, path):
            self.name = path
            self._f = open(path, "wb")

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, attr):
            return getattr(self._f, attr)

    real_open = open
    monkeypatch.setattr(local_storage, "open",
                        lambda p, m="r", *a, **k: Full(p) if ".data-" in p else real_open(p, m, *a, **k),
                        raising=False)
    with pytest.raises(OSError) as info:
        gpusaver.save(prefix, {"weights": np.ones(10, np.float32)})
    assert isinstance(info.value, GpusaverError) and info.value.errno == errno.ENOSPC
    assert "m.data-00000-of-00001" in str(info.value) and "'weights'" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_a_tensor_refused_after_others_were_written_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save describes its tensors batch by batch while the first ones are written: a tensor
    refused late (a dtype TF has no enum for, after three batches) fails the save naming it, and
    the checkpoint it would have replaced, the state file included, is as it was."""
    prefix = str(tmp_path / "m")
    gpusaver.save(prefix, {"old": np.arange(5.0)})
    before = _files(tmp_path)
    arrays = {f"t{i:05d}": np.full(1000, i, np.float32) for i in range(3 * DESCRIBE_BATCH)}
    arrays["zz_late"] = np.zeros(3, "datetime64[s]")
    writes = []
    real = local_storage.LocalWriteStream.write_many
    monkeypatch.setattr(local_storage.LocalWriteStream, "write_many",
                        lambda self, views, names: writes.append(names[-1]) or real(self, views, names))
    with pytest.raises(gpusaver.UnsupportedError, match="'zz_late'"):
        gpusaver.save(prefix, arrays)
    assert writes  # tensors of the first batches had gone to the data file
    assert _files(tmp_path) == before
    assert len(arrays) == 3 * DESCRIBE_BATCH + 1  # the caller's mapping is left alone


def test_saver_read_failing_after_the_first_groups_were_written_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Saver.save reads the variables group by group while the first groups are written: a
    read failing late (here of a variable that no longer exists) fails the save with TF's error,
    the previous checkpoint and state file are as they were, and the next save goes ahead."""
    tf = pytest.importorskip("tensorflow")
    from gpusaver.tf import variables as tfvars
    variables = [tf.Variable(np.full(500, i, np.float32), name=f"v{i:04d}") for i in range(3 * tfvars._READ_GROUP)]
    saver = gpusaver.Saver(variables)
    saver.save(str(tmp_path / "m"))
    before = _files(tmp_path)
    writes = []
    real = local_storage.LocalWriteStream.write_many
    monkeypatch.setattr(local_storage.LocalWriteStream, "write_many",
                        lambda self, views, names: writes.append(names[-1]) or real(self, views, names))
    groups = tfvars.SnapshotReader.groups
    gone = tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[500], shared_name="gpusaver_test_gone")

    def failing_late(self):
        for k, values in enumerate(groups(self)):
            if k == 2:
                while not writes:  # the first groups are in the data file
                    time.sleep(0.001)
                tfvars.read_values(variables[0].device, [gone], [tf.float32])
            yield values

    monkeypatch.setattr(tfvars.SnapshotReader, "groups", failing_late)
    with pytest.raises(tf.errors.FailedPreconditionError, match="gpusaver_test_gone"):
        saver.save(str(tmp_path / "m"))
    assert writes
    assert _files(tmp_path) == before
    monkeypatch.setattr(tfvars.SnapshotReader, "groups", groups)
    assert saver.save(str(tmp_path / "m")) == str(tmp_path / "m")


# -- 3. an unobserved save_async failure surfaces ------------------------------------------------
def _failing_saver(tf, tmp_path):
    v = tf.Variable(np.ones(3, np.float32), name="v")
    saver = gpusaver.Saver([v])
    (tmp_path / "blocked").write_text("a file where a directory should be")
    return saver, saver.save_async(str(tmp_path / "blocked" / "m"))


@pytest.mark.parametrize("then", ["save", "save_async", "wait"])
def test_unobserved_async_failure_is_raised_by_the_next_call(tmp_path, then):
    tf = pytest.importorskip("tensorflow")
    saver, future = _failing_saver(tf, tmp_path)
    concurrent_wait = threading.Event()
    future.add_done_callback(lambda f: concurrent_wait.set())
    concurrent_wait.wait(30)
    with pytest.raises(OSError):
        getattr(saver, then)(*([str(tmp_path / "ok")] if then != "wait" else []))
    # Raised once: the next save goes ahead.
    assert saver.save(str(tmp_path / "ok")) == str(tmp_path / "ok")


def test_observed_async_failure_is_not_raised_again(tmp_path):
    tf = pytest.importorskip("tensorflow")
    saver, future = _failing_saver(tf, tmp_path)
    with pytest.raises(OSError):
        future.result()
    assert saver.save(str(tmp_path / "ok")) == str(tmp_path / "ok")


# -- 4. all-or-nothing restore --------------------------------------------------------------------
def test_restore_failing_late_changes_no_variable(tmp_path):
    tf = pytest.importorskip("tensorflow")
    # 400 KB each: several read batches, so earlier tensors arrive before the bad one is read.
    vs = [tf.Variable(np.full(100_000, i, np.float32), name=f"v{i:02d}") for i in range(20)]
    saver = gpusaver.Saver(vs)
    prefix = saver.save(str(tmp_path / "m"))
    last = flip_byte(prefix, at=5)
    for v in vs:
        v.assign(tf.fill(v.shape, -1.0))
    with pytest.raises(CorruptCheckpointError, match=last):
        saver.restore(prefix)
    for v in vs:
        np.testing.assert_array_equal(v.numpy(), np.full(100_000, -1, np.float32))


def _count_groups(monkeypatch, fail_at: int | None = None) -> list:
    """Count the full groups of small values assigned by one traced call each (gpusaver.tf.assign);
    with ``fail_at``, that call (1-based) raises an injected error after assigning nothing."""
    from gpusaver.tf.assign import Assigner
    real, calls = Assigner._assign_group, []

    def spy(self, key, group):
        calls.append(len(group))
        if len(calls) == fail_at:
            raise OSError(errno.EIO, "injected failure of a group assign")
        real(self, key, group)

    monkeypatch.setattr(Assigner, "_assign_group", spy)
    return calls


def _failing_midway(monkeypatch, after: int):
    """Make the restore's value stream raise an I/O error once ``after`` values were handed over."""
    from gpusaver import core
    real_load_iter = core.load_iter

    def load_iter(*args, **kwargs):
        values = real_load_iter(*args, **kwargs)
        try:
            for i, item in enumerate(values):
                if i == after:
                    raise OSError(errno.EIO, "injected I/O error")
                yield item
        finally:
            values.close()

    monkeypatch.setattr(core, "load_iter", load_iter)


def test_restore_io_error_midway_changes_no_variable(tmp_path, monkeypatch):
    tf = pytest.importorskip("tensorflow")
    from gpusaver.tf.assign import GROUP
    # Many small variables: whole groups are assigned, and others wait in a group, when the error comes.
    vs = [tf.Variable(np.full(10, i, np.float32), name=f"v{i:03d}") for i in range(200)] + \
         [tf.Variable(np.full(100_000, 7, np.float32), name="v_large")]  # assigned on its own, first
    saver = gpusaver.Saver(vs)
    prefix = saver.save(str(tmp_path / "m"))
    for v in vs:
        v.assign(tf.fill(v.shape, -1.0))
    groups = _count_groups(monkeypatch)
    _failing_midway(monkeypatch, after=150)
    with pytest.raises(OSError, match="injected I/O error"):
        saver.restore(prefix)
    assert groups[:150 // GROUP] == [GROUP] * (150 // GROUP)  # values were assigned before the failure
    for v in vs:
        np.testing.assert_array_equal(v.numpy(), np.full(v.shape, -1, np.float32))


def test_restore_crc_failure_late_among_many_small_variables_changes_no_variable(tmp_path, monkeypatch):
    tf = pytest.importorskip("tensorflow")
    vs = [tf.Variable(np.full(2048, i, np.float32), name=f"v{i:04d}") for i in range(1000)]
    saver = gpusaver.Saver(vs)
    prefix = saver.save(str(tmp_path / "m"))
    last = flip_byte(prefix, at=-1)
    for v in vs:
        v.assign(tf.fill(v.shape, -1.0))
    groups = _count_groups(monkeypatch)
    with pytest.raises(CorruptCheckpointError, match=last):
        saver.restore(prefix)
    assert len(groups) >= 2  # groups were assigned (and put back) before the bad tensor was read
    for v in vs:
        np.testing.assert_array_equal(v.numpy(), np.full(2048, -1, np.float32))


def test_restore_group_assign_failing_puts_back_the_groups_before(tmp_path, monkeypatch):
    tf = pytest.importorskip("tensorflow")
    from gpusaver.tf.assign import GROUP
    vs = [tf.Variable(np.full(4, i, np.int32), name=f"v{i:03d}") for i in range(3 * GROUP)]
    saver = gpusaver.Saver(vs)
    prefix = saver.save(str(tmp_path / "m"))
    for v in vs:
        v.assign(tf.fill(v.shape, -1))
    groups = _count_groups(monkeypatch, fail_at=2)
    with pytest.raises(OSError, match="injected failure of a group assign"):
        saver.restore(prefix)
    assert len(groups) >= 2
    for v in vs:
        np.testing.assert_array_equal(v.numpy(), np.full(4, -1, np.int32))
    monkeypatch.undo()
    saver.restore(prefix)  # and a restore after the failure goes through
    for i, v in enumerate(vs):
        np.testing.assert_array_equal(v.numpy(), np.full(4, i, np.int32))


# -- 5. partitioned entries are checked before anything is allocated ------------------------------
def _craft(prefix, entries: dict, data: bytes = b""):
    """Write an index holding ``entries`` (name or raw key → Entry) and one data file."""
    with open(naming.data_path(prefix, 0, 1), "wb") as f:
        f.write(data)
    table = TableBuilder()
    table.add(b"", Header(num_shards=1).encode())
    for key in sorted(k.encode() if isinstance(k, str) else k for k in entries):
        entry = entries[key.decode() if not key.startswith(b"\0") else key]
        table.add(key, entry.encode())
    with open(naming.index_path(prefix), "wb") as f:
        f.write(table.finish())


def _slice_entry(values: np.ndarray, offset: int) -> Entry:
    return Entry(int(DataType.FLOAT), values.shape, 0, offset, values.nbytes, mask(crc32c(values.tobytes())))


def _partitioned(prefix, shape, parts):
    """parts: list of (extents, values); the full entry lists exactly those slices."""
    entries, data = {}, b""
    for extents, values in parts:
        entries[naming.slice_key("p", extents)] = _slice_entry(values, len(data))
        data += values.tobytes()
    entries["p"] = Entry(int(DataType.FLOAT), shape, slices=tuple(e for e, _ in parts))
    _craft(prefix, entries, data)


def test_partitioned_entry_assembles(tmp_path):
    prefix = str(tmp_path / "ok")
    top, bottom = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(6, 12, dtype=np.float32).reshape(2, 3)
    _partitioned(prefix, (4, 3), [((Extent(0, 2), Extent(0, None)), top),
                                  ((Extent(2, 2), Extent(0, None)), bottom)])
    np.testing.assert_array_equal(gpusaver.load(prefix)["p"], np.concatenate([top, bottom]))


@pytest.mark.parametrize("case", ["gap", "overlap", "outside"])
def test_partitioned_entry_not_covering_exactly_once_is_refused(tmp_path, case):
    prefix = str(tmp_path / case)
    half = np.ones((2, 3), np.float32)
    first = ((Extent(0, 2), Extent(0, None)), half)
    second = {"gap": [], "overlap": [((Extent(1, 2), Extent(0, None)), half), ((Extent(3, 1), Extent(0, None)),
                                                                                  np.ones((1, 3), np.float32))],
              "outside": [((Extent(3, 2), Extent(0, None)), half)]}[case]
    _partitioned(prefix, (4, 3), [first, *second])
    with pytest.raises(CorruptCheckpointError, match=r"'p'.*ok\.index|" + case + r"\.index.*'p'"):
        gpusaver.load(prefix)


def test_huge_partitioned_shape_is_refused_before_allocating(tmp_path):
    prefix = str(tmp_path / "huge")
    _partitioned(prefix, (1 << 40, 3), [((Extent(0, 2), Extent(0, None)), np.ones((2, 3), np.float32))])
    with pytest.raises(CorruptCheckpointError, match="'p'"):
        gpusaver.load(prefix)


def test_huge_partitioned_shape_covered_by_huge_slices_is_refused(tmp_path):
    prefix = str(tmp_path / "huge2")
    shape = (1 << 40, 1 << 30)
    entries = {naming.slice_key("p", (Extent(0, None), Extent(0, None))):
               Entry(int(DataType.FLOAT), shape, 0, 0, (1 << 70) * 4, 0),
               "p": Entry(int(DataType.FLOAT), shape, slices=((Extent(0, None), Extent(0, None)),))}
    _craft(prefix, entries, b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match="'p'"):
        gpusaver.load(prefix)


def test_huge_plain_shapes_are_refused_before_allocating(tmp_path):
    prefix = str(tmp_path / "plain")
    _craft(prefix, {"f": Entry(int(DataType.FLOAT), (1 << 40,), 0, 0, 4 << 40, 0),
                    "s": Entry(int(DataType.STRING), (1 << 29,), 0, 0, (1 << 29) + 4, 0)}, b"\0" * 64)
    for key in ("f", "s"):
        with pytest.raises(CorruptCheckpointError, match=f"'{key}'.*truncated|plain.data.*'{key}'"):
            gpusaver.load(prefix, keys=[key])


# -- 6. every error is a GpusaverError naming the file --------------------------------------------
@pytest.mark.parametrize("line", ['model_checkpoint_path: "a\\xZZ"', 'model_checkpoint_path: "a\\9"',
                                  'model_checkpoint_path: "a\\q"'])
def test_bad_escape_in_state_file(tmp_path, line):
    (tmp_path / "checkpoint").write_text(line + "\n")
    with pytest.raises(CorruptCheckpointError, match="checkpoint"):
        gpusaver.latest_checkpoint(str(tmp_path))


def test_array_too_big_is_a_corrupt_checkpoint(tmp_path):
    prefix = str(tmp_path / "big")
    shape = (1 << 62, 1 << 62)
    _craft(prefix, {"p": Entry(int(DataType.FLOAT), shape, slices=((Extent(0, None), Extent(0, None)),)),
                    naming.slice_key("p", (Extent(0, None), Extent(0, None))):
                    Entry(int(DataType.FLOAT), shape, 0, 0, 16, 0)}, b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match=r"big\.index.*'p'|'p'.*big\.index"):
        gpusaver.load(prefix)


def test_state_file_that_is_a_directory(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    assert gpusaver.latest_checkpoint(str(tmp_path)) is None
    with pytest.raises(GpusaverError, match="checkpoint"):
        tf = pytest.importorskip("tensorflow")
        gpusaver.Saver([tf.Variable(1.0, name="x")]).save(str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_index_that_is_a_directory(tmp_path):
    (tmp_path / "m.index").mkdir()
    with pytest.raises(GpusaverError, match=r"m\.index"):
        gpusaver.load(str(tmp_path / "m"))
    with pytest.raises(GpusaverError, match=r"m\.index"):
        gpusaver.save(str(tmp_path / "m"), {"a": np.ones(2)})


def test_restore_none_is_a_gpusaver_type_error():
    tf = pytest.importorskip("tensorflow")
    saver = gpusaver.Saver([tf.Variable(1.0, name="x")])
    with pytest.raises(TypeError) as info:
        saver.restore(None)
    assert isinstance(info.value, GpusaverError) and "latest_checkpoint" in str(info.value)


def test_data_file_that_is_a_directory(tmp_path):
    prefix = str(tmp_path / "m")
    gpusaver.save(prefix, {"a": np.ones(3)})
    data = naming.data_path(prefix, 0, 1)
    os.remove(data)
    os.mkdir(data)
    with pytest.raises(GpusaverError, match=r"m\.data-00000-of-00001"):
        gpusaver.load(prefix)


def test_bad_string_element_and_empty_name_are_gpusaver_errors(tmp_path):
    with pytest.raises(TypeError, match=r"'s'.*element 1") as info:
        gpusaver.save(str(tmp_path / "m"), {"s": np.array([b"ok", 3], dtype=object)})
    assert isinstance(info.value, GpusaverError)
    with pytest.raises(ValueError, match="non-empty") as info:
        gpusaver.save(str(tmp_path / "m"), {"": np.ones(2)})
    assert isinstance(info.value, GpusaverError)
    assert os.listdir(tmp_path) == []
