"""gpusaver.keras.CheckpointCallback with real Keras 3 and tf-keras models: a killed and restarted
``fit`` ends where an uninterrupted one does, save_freq in batches, retention, resuming at the saved
epoch/step, the wait at the end of training, and the errors for arguments it cannot use."""
import os
import subprocess
import sys

import numpy as np
import pytest

import gpusaver
from gpusaver.errors import GpusaverError

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras")
import gpusaver.keras  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FLAVORS = ["keras3", "tf_keras"]
BATCHES_PER_EPOCH = 4  # 32 samples, batch 8


def _keras(flavor):
    if flavor == "keras3":
        import keras
        return keras
    return pytest.importorskip("tf_keras")


def _data():
    rng = np.random.RandomState(0)
    x = rng.rand(32, 4).astype("float32")
    return x, (x @ np.arange(1, 5, dtype="float32")[:, None] + 0.5).astype("float32")


def _model(flavor, hidden=(8,)):
    """A small compiled model whose starting weights are fixed numbers (not the RNG's), so every
    process starts from the same point."""
    k = _keras(flavor)
    model = k.Sequential([k.Input((4,))] + [k.layers.Dense(n, activation="tanh") for n in hidden] + [k.layers.Dense(1)])
    rng = np.random.RandomState(1)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    model.compile(optimizer=k.optimizers.Adam(learning_rate=0.05), loss="mse")
    return model


def _state(model):
    """Weights and optimizer variables (Adam's step count and slots) as numpy arrays."""
    opt = model.optimizer.variables
    opt = opt() if callable(opt) else opt  # tf-keras 2.x legacy optimizers had a method
    return [np.array(v) for v in model.get_weights()] + [np.array(v.numpy()) for v in opt]


def _batch_counter(flavor):
    """A callback recording (epoch, batch) of every training batch run."""
    k = _keras(flavor)

    class Counter(k.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen, self.epoch = [], None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            self.seen.append((self.epoch, batch))

    return Counter()


def _fit(flavor, directory, epochs, model=None, extra=(), **kwargs):
    model = model or _model(flavor)
    callback = gpusaver.keras.CheckpointCallback(directory, **kwargs)
    counter = _batch_counter(flavor)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback, counter, *extra])
    return model, callback, counter.seen


def _saved_position(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return (int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")),
            int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")))


KILL_AT = (2, 2)  # (epoch, batch): mid-epoch, after the end-of-epoch saves of epochs 0 and 1
KILL_EPOCHS = 4


def _crash_callback(flavor, action):
    """A callback that calls ``action()`` before batch KILL_AT[1] of epoch KILL_AT[0] runs."""
    k = _keras(flavor)

    class Crash(k.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if (self.epoch, batch) == KILL_AT:
                action()

    return Crash()


class _Crashed(Exception):
    pass


def _crashed_runs(base: str):
    """Runs in a child process (one TensorFlow start-up for both flavors): a tf-keras fit that dies
    of an exception mid-epoch, then a Keras 3 fit killed mid-epoch by os._exit(): no on_train_end,
    no flush, no atexit, a write in flight cut off."""
    import importlib.util

    def crash():
        raise _Crashed()

    if importlib.util.find_spec("tf_keras") is not None:
        try:
            _fit("tf_keras", os.path.join(base, "tf_keras"), KILL_EPOCHS, extra=[_crash_callback("tf_keras", crash)])
        except _Crashed:
            pass
        else:
            os._exit(1)
    _fit("keras3", os.path.join(base, "keras3"), KILL_EPOCHS, extra=[_crash_callback("keras3", lambda: os._exit(17))])
    os._exit(0)  # reaching here means the kill did not happen: the test sees exit 0, not 17


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Folder holding the checkpoints the crashed runs of both flavors left ({base}/{flavor})."""
    base = str(tmp_path_factory.mktemp("crashed"))
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_keras; test_keras._crashed_runs({base!r})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, f"the child was not killed where asked (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return base


# --- kill and resume -----------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", FLAVORS)
def test_killed_fit_resumes_and_ends_with_the_same_weights(tmp_path, flavor, crashed):
    _keras(flavor)
    directory = os.path.join(crashed, flavor)
    latest = tf.train.latest_checkpoint(directory)
    assert latest is not None, "the killed run left no complete checkpoint"
    saved_epoch, saved_step = _saved_position(latest)
    assert saved_step == 0 and saved_epoch in (1, 2)  # 2 unless epoch 1's write was cut off by the kill

    resumed, callback, seen = _fit(flavor, directory, KILL_EPOCHS)
    assert seen == [(e, b) for e in range(saved_epoch, KILL_EPOCHS) for b in range(BATCHES_PER_EPOCH)]
    assert callback.latest_checkpoint == os.path.join(directory, f"ckpt-{KILL_EPOCHS}")

    straight, _, _ = _fit(flavor, str(tmp_path / "straight"), KILL_EPOCHS)
    got, expected = _state(resumed), _state(straight)
    assert len(got) == len(expected) > 4  # the optimizer's step and slots are compared too
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)  # deterministic CPU ops: bit for bit
    # and a run that restarted from scratch would not have matched: the comparison can fail
    fresh = _state(_fit(flavor, str(tmp_path / "fresh"), KILL_EPOCHS - saved_epoch)[0])
    assert not all(np.allclose(a, b) for a, b in zip(fresh[:4], expected[:4]))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_restore_continues_at_the_saved_epoch(tmp_path, flavor):
    directory = str(tmp_path / "ckpts")
    first, _, seen = _fit(flavor, directory, epochs=2)
    assert [e for e, _ in seen][::BATCHES_PER_EPOCH] == [0, 1]
    model = _model(flavor)
    _, callback, seen = _fit(flavor, directory, epochs=5, model=model)
    assert sorted({e for e, _ in seen}) == [2, 3, 4]
    assert _saved_position(callback.latest_checkpoint) == (5, 0)
    # The restarted position is not left on the model: a plain fit afterwards runs every epoch.
    counter = _batch_counter(flavor)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[counter])
    assert sorted({e for e, _ in counter.seen}) == [0, 1]
    # A fit whose checkpoints say it is done runs no epoch again.
    _, _, seen = _fit(flavor, directory, epochs=5)
    assert seen == []


@pytest.mark.parametrize("flavor", FLAVORS)
def test_resume_mid_epoch_from_a_batch_checkpoint(tmp_path, flavor):
    """A checkpoint taken after batch 3 of epoch 0: tf-keras continues at that step (as its
    BackupAndRestore), Keras 3 at the start of that epoch (Keras 3 cannot start mid-epoch)."""
    directory = str(tmp_path / "ckpts")
    _, callback, _ = _fit(flavor, directory, epochs=1, save_freq=3)
    assert _saved_position(callback.latest_checkpoint) == (0, 3)
    _, callback, seen = _fit(flavor, directory, epochs=2, save_freq=3)
    if flavor == "tf_keras":
        assert seen == [(0, 3)] + [(1, b) for b in range(BATCHES_PER_EPOCH)]
    else:
        assert seen == [(e, b) for e in range(2) for b in range(BATCHES_PER_EPOCH)]


# --- saving --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", FLAVORS)
def test_save_freq_in_batches(tmp_path, flavor):
    directory = str(tmp_path / "ckpts")
    _, callback, _ = _fit(flavor, directory, epochs=3, save_freq=3, max_to_keep=None)
    # 12 batches, a save after every 3rd: (epoch, batches done in it)
    positions = [_saved_position(os.path.join(directory, f"ckpt-{n}")) for n in range(1, 5)]
    assert positions == [(0, 3), (1, 2), (2, 1), (2, 4)]
    assert not os.path.exists(os.path.join(directory, "ckpt-5.index"))
    assert callback.latest_checkpoint == os.path.join(directory, "ckpt-4")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_max_to_keep_retention(tmp_path, flavor):
    directory = str(tmp_path / "ckpts")
    _fit(flavor, directory, epochs=5, max_to_keep=2)
    assert sorted(os.listdir(directory)) == ["checkpoint", "ckpt-4.data-00000-of-00001", "ckpt-4.index",
                                             "ckpt-5.data-00000-of-00001", "ckpt-5.index"]
    state = tf.train.get_checkpoint_state(directory)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-4", "ckpt-5"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_on_train_end_waits_for_the_last_save(tmp_path, flavor):
    directory = str(tmp_path / "ckpts")
    last = os.path.join(directory, "ckpt-3")
    k = _keras(flavor)
    seen_at_end = []

    class AtTrainEnd(k.callbacks.Callback):  # runs right after the checkpoint callback's on_train_end
        def on_train_end(self, logs=None):
            seen_at_end.append((tf.train.latest_checkpoint(directory), os.path.exists(last + ".index")))

    # 4 M weights + Adam's slots, 48 MiB: a write that takes long enough to be caught unfinished
    model, callback, _ = _fit(flavor, directory, epochs=3, model=_model(flavor, hidden=(2048, 2048)),
                              extra=[AtTrainEnd()])
    assert seen_at_end == [(last, True)]
    # After fit, with nothing else waited for: the newest checkpoint is the last epoch's,
    # complete, named by the state file, and holds exactly the model's final state.
    assert callback.latest_checkpoint == last == tf.train.latest_checkpoint(directory)
    assert sorted(os.listdir(directory))[-2:] == ["ckpt-3.data-00000-of-00001", "ckpt-3.index"]
    assert _saved_position(last) == (3, 0)
    check = tf.train.Checkpoint(model=_model(flavor, hidden=(2048, 2048)))
    check.restore(last).expect_partial()
    for a, b in zip(check.model.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert all(".tmp" not in n for n in os.listdir(directory))  # no half-written file left behind


def test_relative_directory(tmp_path, monkeypatch):
    """As a script passes it (``CheckpointCallback("ckpts")``): relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    _fit("keras3", "ckpts", epochs=4, max_to_keep=2)
    assert sorted(os.listdir("ckpts")) == ["checkpoint", "ckpt-3.data-00000-of-00001", "ckpt-3.index",
                                           "ckpt-4.data-00000-of-00001", "ckpt-4.index"]
    _, callback, seen = _fit("keras3", "ckpts", epochs=5, max_to_keep=2)
    assert sorted({e for e, _ in seen}) == [4]
    assert callback.latest_checkpoint == os.path.join("ckpts", "ckpt-5") == tf.train.latest_checkpoint("ckpts")


def test_resume_false_keeps_old_checkpoints_and_numbers_after_them(tmp_path):
    directory = str(tmp_path / "ckpts")
    _fit("keras3", directory, epochs=2, max_to_keep=None)
    _, callback, seen = _fit("keras3", directory, epochs=2, max_to_keep=None, resume=False)
    assert sorted({e for e, _ in seen}) == [0, 1]  # started over
    assert callback.latest_checkpoint == os.path.join(directory, "ckpt-4")
    assert {f"ckpt-{n}.index" for n in range(1, 5)} <= set(os.listdir(directory))


# The unmatched-objects message reprs Keras variables, and Keras warns on the way.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")
@pytest.mark.parametrize("widths", [(8, 8, 1), (8, 1, 1)], ids=["other-shapes", "extra-layer"])
def test_checkpoint_of_another_model_is_refused(tmp_path, widths):
    import keras
    directory = str(tmp_path / "ckpts")
    _fit("keras3", directory, epochs=1)
    other = keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(w) for w in widths])
    other.compile(optimizer="adam", loss="mse")
    x, y = _data()
    with pytest.raises(gpusaver.MismatchError, match="ckpt-1"):
        other.fit(x, y, epochs=1, verbose=0, callbacks=[gpusaver.keras.CheckpointCallback(directory)])


# --- arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, words", [
    ({"save_freq": 0}, gpusaver.InvalidArgumentError, "at least 1"),
    ({"save_freq": "batch"}, gpusaver.InvalidTypeError, "'epoch' or a number of batches"),
    ({"save_freq": 2.5}, gpusaver.InvalidTypeError, "number of batches"),
    ({"save_freq": True}, gpusaver.InvalidTypeError, "number of batches"),
    ({"max_to_keep": 0}, gpusaver.InvalidArgumentError, "None to keep every checkpoint"),
    ({"max_to_keep": True}, gpusaver.InvalidTypeError, "an int or None"),
    ({"keep_checkpoint_every_n_hours": -1}, gpusaver.InvalidArgumentError, "hours"),
    ({"directory": ""}, gpusaver.InvalidArgumentError, "directory is empty"),
    ({"directory": None}, gpusaver.InvalidTypeError, "directory must be a path"),
])
def test_arguments_it_cannot_use_are_refused_at_once(tmp_path, kwargs, error, words):
    kwargs = {"directory": str(tmp_path), **kwargs}
    with pytest.raises(error, match=words) as info:
        gpusaver.keras.CheckpointCallback(**kwargs)
    assert isinstance(info.value, GpusaverError) and isinstance(info.value, (ValueError, TypeError))


def test_public_module():
    from gpusaver.tf.keras import CheckpointCallback
    assert gpusaver.keras.CheckpointCallback is CheckpointCallback
    assert gpusaver.keras.__all__ == ["CheckpointCallback"]
