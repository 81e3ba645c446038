"""gpusaver.CheckpointManager against tf.train.CheckpointManager: numbering, retention, interval checks,
recovery after a restart, commit order of asynchronous saves, and the state file both ways."""
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import CheckpointIOError, InvalidArgumentError
from gpusaver.format.state import CheckpointState, read_state, write_state

tf = pytest.importorskip("tensorflow")


def _indexes(directory) -> list[str]:
    return sorted(p.name[:-len(".index")] for p in directory.glob("*.index"))


def _names(paths) -> list[str]:
    return [os.path.basename(p) if p is not None else None for p in paths]


def test_numbering_retention_and_state_file_match_tf(tmp_path):
    ours_v, theirs_v = tf.Variable([1.0, 2.0]), tf.Variable([1.0, 2.0])
    ours = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=ours_v), tmp_path / "ours", max_to_keep=2)
    theirs = tf.train.CheckpointManager(tf.train.Checkpoint(v=theirs_v), tmp_path / "theirs", max_to_keep=2)
    got = {"ours": [], "theirs": []}
    for number in [None, None, 10, None]:
        for key, manager, v in [("ours", ours, ours_v), ("theirs", theirs, theirs_v)]:
            v.assign_add([1.0, 1.0])
            got[key].append(manager.save(checkpoint_number=number))
    assert _names(got["ours"]) == _names(got["theirs"]) == ["ckpt-1", "ckpt-2", "ckpt-10", "ckpt-4"]
    assert got["ours"][-1] == str(tmp_path / "ours" / "ckpt-4")
    assert _names(ours.checkpoints) == _names(theirs.checkpoints) == ["ckpt-10", "ckpt-4"]
    assert _indexes(tmp_path / "ours") == _indexes(tmp_path / "theirs") == ["ckpt-10", "ckpt-4"]
    assert ours.latest_checkpoint == tf.train.latest_checkpoint(str(tmp_path / "ours")) == got["ours"][-1]
    assert int(ours.checkpoint.save_counter.numpy()) == 4  # a numbered save counts too, as in TF
    assert ours.directory == os.fspath(tmp_path / "ours")
    state = tf.train.get_checkpoint_state(str(tmp_path / "ours"))
    assert list(state.all_model_checkpoint_paths) == ours.checkpoints
    assert len(state.all_model_checkpoint_timestamps) == 2
    # TF restores our newest checkpoint by its object graph.
    v2 = tf.Variable([0.0, 0.0])
    tf.train.Checkpoint(v=v2).restore(ours.latest_checkpoint).assert_consumed()
    np.testing.assert_array_equal(v2.numpy(), [5.0, 6.0])


def test_max_to_keep_none_keeps_all_and_zero_is_refused(tmp_path):
    manager = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=tf.Variable(1.0)), tmp_path, max_to_keep=None)
    for _ in range(7):
        manager.save()
    assert len(manager.checkpoints) == 7 and len(_indexes(tmp_path)) == 7
    for bad in [0, -1]:  # as TF's CheckpointManager (unlike its Saver, where 0 keeps all)
        with pytest.raises(ValueError):
            tf.train.CheckpointManager(tf.train.Checkpoint(), tmp_path, max_to_keep=bad)
        with pytest.raises(InvalidArgumentError, match="None to keep every"):
            gpusaver.CheckpointManager(gpusaver.Checkpoint(), tmp_path, max_to_keep=bad)
    with pytest.raises(InvalidArgumentError, match="step_counter"):
        gpusaver.CheckpointManager(gpusaver.Checkpoint(), tmp_path, checkpoint_interval=5)


def test_restart_deletes_older_managed_checkpoints_and_nothing_else(tmp_path):
    v = tf.Variable(1.0)
    first = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=v), tmp_path, max_to_keep=None)
    for _ in range(5):
        first.save()
    # Files the manager does not manage: another name in the directory, a checkpoint elsewhere that
    # the state file also names, an unrelated file.
    other = gpusaver.Checkpoint(v=v).write(str(tmp_path / "other-1"))
    outside = gpusaver.Checkpoint(v=v).write(str(tmp_path.parent / f"{tmp_path.name}-outside" / "ckpt-9"))
    (tmp_path / "notes.txt").write_text("keep me")
    state = read_state(str(tmp_path))
    write_state(str(tmp_path), CheckpointState(
        state.model_checkpoint_path, ["other-1", outside] + state.all_model_checkpoint_paths,
        state.all_model_checkpoint_timestamps[:1] * 2 + state.all_model_checkpoint_timestamps,
        state.last_preserved_timestamp))

    # A "restarted process": a new checkpoint object restored from the latest, a new manager.
    v2 = tf.Variable(0.0)
    ckpt2 = gpusaver.Checkpoint(v=v2)
    second = gpusaver.CheckpointManager(ckpt2, tmp_path, max_to_keep=2)
    assert _names(second.checkpoints) == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4", "ckpt-5"]
    assert second.latest_checkpoint == str(tmp_path / "ckpt-5")
    assert second.restore_or_initialize() == str(tmp_path / "ckpt-5")
    assert int(ckpt2.save_counter.numpy()) == 5
    assert second.save() == str(tmp_path / "ckpt-6")  # the numbering continues from the restored counter
    assert _names(second.checkpoints) == ["ckpt-5", "ckpt-6"]
    assert _indexes(tmp_path) == ["ckpt-5", "ckpt-6", "other-1"]
    assert os.path.exists(other + ".index") and os.path.exists(outside + ".index")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert read_state(str(tmp_path)).all_model_checkpoint_paths == ["ckpt-5", "ckpt-6"]


def test_state_file_both_ways_with_tf_manager(tmp_path):
    v = tf.Variable(1.0)
    theirs = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), tmp_path, max_to_keep=None)
    for _ in range(4):
        theirs.save()
    ours = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=v), tmp_path, max_to_keep=2)
    assert ours.checkpoints == theirs.checkpoints  # recovered from TF's state file, timestamps included
    ours.restore_or_initialize()
    assert ours.save() == str(tmp_path / "ckpt-5")
    assert _indexes(tmp_path) == ["ckpt-4", "ckpt-5"]
    # ... and TF's manager recovers ours the same way.
    again = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), tmp_path, max_to_keep=1)
    assert again.checkpoints == ours.checkpoints and again.latest_checkpoint == ours.latest_checkpoint


def test_keep_checkpoint_every_n_hours_matches_tf(tmp_path):
    # Checkpoints "written" 5, 4 and 1 hours ago (timestamps in the state file; real files).
    now = time.time()
    setup = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=tf.Variable(1.0)), tmp_path / "ours", max_to_keep=None)
    for _ in range(3):
        setup.save()
    write_state(str(tmp_path / "ours"), CheckpointState(
        "ckpt-3", ["ckpt-1", "ckpt-2", "ckpt-3"], [now - 5 * 3600, now - 4 * 3600, now - 3600], now - 10 * 3600))
    shutil.copytree(tmp_path / "ours", tmp_path / "theirs")

    results = {}
    for key, make in [("ours", lambda d: gpusaver.CheckpointManager(gpusaver.Checkpoint(v=tf.Variable(1.0)), d,
                                                                     max_to_keep=1, keep_checkpoint_every_n_hours=2)),
                      ("theirs", lambda d: tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), d,
                                                                      max_to_keep=1, keep_checkpoint_every_n_hours=2))]:
        manager = make(tmp_path / key)
        manager.save(checkpoint_number=4)
        # ckpt-1 (5 h old) is preserved, ckpt-2 is only 1 h after it: deleted, ckpt-3 preserved.
        after_first = _indexes(tmp_path / key)
        manager.save(checkpoint_number=5)  # ckpt-4 is newer than 2 h after ckpt-3: deleted
        results[key] = (after_first, _indexes(tmp_path / key), _names(manager.checkpoints),
                        read_state(str(tmp_path / key)).last_preserved_timestamp)
    assert results["ours"][:3] == results["theirs"][:3] == (
        ["ckpt-1", "ckpt-3", "ckpt-4"], ["ckpt-1", "ckpt-3", "ckpt-5"], ["ckpt-5"])
    assert results["ours"][3] == pytest.approx(now - 3600) == results["theirs"][3]

    # Preserved checkpoints are never deleted by a later manager, whatever its settings.
    later = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=tf.Variable(1.0)), tmp_path / "ours", max_to_keep=1)
    assert _names(later.checkpoints) == ["ckpt-5"]
    later.save(checkpoint_number=6)
    assert _indexes(tmp_path / "ours") == ["ckpt-1", "ckpt-3", "ckpt-6"]


def test_check_interval_matches_tf(tmp_path):
    sequences = {}
    for key in ["ours", "theirs"]:
        step = tf.Variable(0, dtype=tf.int64)
        if key == "ours":
            manager = gpusaver.CheckpointManager(gpusaver.Checkpoint(step=step), tmp_path / key, max_to_keep=None,
                                                 step_counter=step, checkpoint_interval=10)
        else:
            manager = tf.train.CheckpointManager(tf.train.Checkpoint(step=step), tmp_path / key, max_to_keep=None,
                                                 step_counter=step, checkpoint_interval=10)
        out = []
        for value, check in [(0, True), (5, True), (5, False), (5, False), (12, True), (15, True), (16, False),
                             (30, True)]:
            step.assign(value)
            out.append(manager.save(check_interval=check))
        sequences[key] = _names(out)
    assert sequences["ours"] == sequences["theirs"] == [
        "ckpt-1", None, "ckpt-2", None, None, "ckpt-3", "ckpt-4", "ckpt-5"]


def test_restore_or_initialize(tmp_path):
    calls = []
    v = tf.Variable([1.0, 2.0])
    step = tf.Variable(0, dtype=tf.int64)
    manager = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=v, step=step), tmp_path, init_fn=lambda: calls.append(1),
                                         step_counter=step, checkpoint_interval=5)
    assert manager.restore_or_initialize() is None and calls == [1]
    step.assign(7)
    path = manager.save()
    v.assign([9.0, 9.0])

    v2, step2 = tf.Variable([0.0, 0.0]), tf.Variable(0, dtype=tf.int64)
    again = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=v2, step=step2), tmp_path, step_counter=step2,
                                       checkpoint_interval=5, init_fn=lambda: calls.append(2))
    assert again.restore_or_initialize() == path and calls == [1]
    np.testing.assert_array_equal(v2.numpy(), [1.0, 2.0])
    assert int(step2.numpy()) == 7
    assert again.save() is None  # the restored step counts as the last checkpoint's step
    step2.assign(12)
    assert again.save() == str(tmp_path / "ckpt-2")


def test_saver_through_the_manager(tmp_path):
    w = tf.Variable(np.arange(4, dtype=np.float32), name="w")
    saver = gpusaver.Saver([w], max_to_keep=None)  # the manager's retention applies, not the Saver's
    manager = gpusaver.CheckpointManager(saver, tmp_path, max_to_keep=2)
    assert _names([manager.save(), manager.save(), manager.save(checkpoint_number=40), manager.save()]) == [
        "ckpt-1", "ckpt-2", "ckpt-40", "ckpt-4"]
    assert _indexes(tmp_path) == ["ckpt-4", "ckpt-40"]
    assert tf.train.list_variables(manager.latest_checkpoint) == [("w", [4])]

    # Restarted: the counter continues after the highest managed number; restore goes through the Saver.
    w2 = tf.Variable(np.zeros(4, np.float32), name="w")
    again = gpusaver.CheckpointManager(gpusaver.Saver([w2]), tmp_path, max_to_keep=2)
    assert again.restore_or_initialize() == str(tmp_path / "ckpt-4")
    np.testing.assert_array_equal(w2.numpy(), np.arange(4))
    assert again.save() == str(tmp_path / "ckpt-41")
    step = tf.Variable(100, dtype=tf.int64)
    by_step = gpusaver.CheckpointManager(gpusaver.Saver([w2]), tmp_path, max_to_keep=2, step_counter=step)
    assert by_step.save() == str(tmp_path / "ckpt-100")
    assert _indexes(tmp_path) == ["ckpt-100", "ckpt-41"]


def test_plain_tf_checkpoint_is_written_by_tf_and_managed(tmp_path):
    v = tf.Variable(3.0)
    manager = gpusaver.CheckpointManager(tf.train.Checkpoint(v=v), tmp_path, max_to_keep=1)
    manager.save()
    assert manager.save() == str(tmp_path / "ckpt-2")
    assert _indexes(tmp_path) == ["ckpt-2"]
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-2")
    with pytest.raises(gpusaver.InvalidTypeError, match="gpusaver.Checkpoint"):
        gpusaver.CheckpointManager(object(), tmp_path)


def test_save_async_path_is_final_and_latest_moves_only_when_complete(tmp_path):
    big = tf.Variable(tf.random.normal([1 << 22]))  # 16 MiB: the write takes a while
    ckpt = gpusaver.Checkpoint(big=big)
    manager = gpusaver.CheckpointManager(ckpt, tmp_path, max_to_keep=1)
    first = manager.save()
    future = manager.save_async()
    seen = set()
    while not future.done():
        latest = manager.latest_checkpoint
        seen.add(latest)
        if latest != first:  # it moved: the files it names are complete
            assert os.path.exists(latest + ".index")
            assert tf.train.latest_checkpoint(str(tmp_path)) == latest
    second = future.result()
    assert second == str(tmp_path / "ckpt-2") and manager.latest_checkpoint == second
    assert first in seen and seen <= {first, second}  # the write takes ~0.2 s here; save_async ~0.01 s
    assert _indexes(tmp_path) == ["ckpt-2"]
    manager.sync()  # nothing pending, nothing raised


def _block_state_file(directory):
    os.remove(directory / "checkpoint")
    (directory / "checkpoint").mkdir()  # the state file can no longer be replaced


@pytest.mark.parametrize("then", ["save", "save_async", "sync"])
def test_failed_commit_rolls_back_and_unobserved_error_is_raised_next(tmp_path, then):
    v = tf.Variable([1.0, 2.0])
    manager = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=v), tmp_path, max_to_keep=1)
    manager.save()
    kept = manager.save()
    _block_state_file(tmp_path)
    done = threading.Event()
    future = manager.save_async()
    future.add_done_callback(lambda f: done.set())
    assert done.wait(60)
    # The new checkpoint's files were rolled back; nothing older was deleted; nothing moved.
    assert _indexes(tmp_path) == ["ckpt-2"]
    assert manager.latest_checkpoint == kept and manager.checkpoints == [kept]
    with pytest.raises(CheckpointIOError, match="checkpoint state file"):
        getattr(manager, then)()
    # Raised once: the next call goes ahead (and works once the state file can be written).
    (tmp_path / "checkpoint").rmdir()
    assert manager.save() == str(tmp_path / "ckpt-4")
    assert _indexes(tmp_path) == ["ckpt-4"]


def test_observed_error_is_not_raised_again(tmp_path):
    manager = gpusaver.CheckpointManager(gpusaver.Saver([tf.Variable(1.0, name="x")]), tmp_path)
    manager.save()
    _block_state_file(tmp_path)
    with pytest.raises(CheckpointIOError):
        manager.save()
    manager.sync()
    (tmp_path / "checkpoint").rmdir()
    assert manager.save() == str(tmp_path / "ckpt-3")


def test_write_state_fsync_reports_durable(tmp_path):
    state = CheckpointState("ckpt-1", ["ckpt-1"], [1.0], 0.5)
    assert write_state(str(tmp_path), state, fsync=True) is True
    assert write_state(str(tmp_path), state) is False
    assert read_state(str(tmp_path)) == state
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp file left


def test_exported_lazily_without_tensorflow():
    assert "CheckpointManager" in gpusaver.__all__
    assert gpusaver.CheckpointManager.__module__ == "gpusaver.manager"
    code = "import sys, gpusaver.manager, gpusaver; gpusaver.CheckpointManager; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_checkpoint_options_callbacks_and_tf_io_device(tmp_path):
    seen = []
    manager = gpusaver.CheckpointManager(gpusaver.Checkpoint(v=tf.Variable(1.0)), tmp_path, max_to_keep=1)
    # Write callbacks run after the manager's commit: the state file already names the new checkpoint.
    callback = tf.train.CheckpointOptions(
        experimental_write_callbacks=[lambda path: seen.append((path, tf.train.latest_checkpoint(str(tmp_path))))])
    path = manager.save(options=callback)
    assert seen == [(path, path)]
    # An I/O device: TF writes the files, the manager still commits and deletes.
    second = manager.save(options=tf.train.CheckpointOptions(experimental_io_device="/job:localhost"))
    assert second == str(tmp_path / "ckpt-2") == manager.latest_checkpoint
    assert _indexes(tmp_path) == ["ckpt-2"] and len(seen) == 1
    saver_manager = gpusaver.CheckpointManager(gpusaver.Saver([tf.Variable(1.0, name="s")]), tmp_path / "s")
    with pytest.raises(InvalidArgumentError, match="gpusaver.Options"):
        saver_manager.save(options=callback)
