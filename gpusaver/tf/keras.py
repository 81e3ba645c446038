"""``gpusaver.keras.CheckpointCallback``: resumable ``model.fit`` checkpoints written in the background.

The callback keeps model + optimizer (and where training stands: the epoch and the step within it)
in one :class:`gpusaver.Checkpoint`, saved through a checkpoint manager (numbered ``ckpt-N``
files, the ``checkpoint`` state file, retention). A save holds a consistent snapshot on the
training thread and writes it while ``fit`` goes on; the next save, and ``on_train_end``, wait for
the one before. With ``resume=True`` a restarted ``fit`` restores the newest complete checkpoint
and skips the work it already holds, as ``keras.callbacks.BackupAndRestore`` does:

- Keras 3 starts ``fit`` at the saved epoch (``model._initial_epoch``); Keras 3 cannot start
  inside an epoch, so a checkpoint taken mid-epoch (``save_freq=int``) resumes at the start of
  that epoch, with the weights of the checkpoint (as Keras 3's own ``BackupAndRestore``).
- tf-keras (Keras 2) starts at the saved epoch *and step* (``model._training_state``, the hook
  its ``BackupAndRestore`` uses); like that callback, it does not skip the dataset's first batches.

Works with Keras 3 on the TensorFlow backend and with tf-keras models; one class serves both, as
it speaks both callback protocols.
"""
import numbers
import os

import keras
import tensorflow as tf

from gpusaver.errors import InvalidArgumentError, InvalidTypeError, MismatchError
from gpusaver.format.state import latest_checkpoint
from gpusaver.manager import CheckpointManager, check_max_to_keep
from gpusaver.tf.checkpoint import Checkpoint

__all__ = ["CheckpointCallback"]


class _TfKerasResume:
    """What tf-keras's ``fit`` asks of ``model._training_state`` (its ``WorkerTrainingState``):
    the epoch and step to start at, called right after ``on_train_begin``."""

    def __init__(self, epoch: int, step: int):
        self.epoch, self.step = epoch, step

    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch, initial_epoch, mode=None):
        if steps_per_epoch and self.step >= steps_per_epoch:  # saved after an epoch's last batch
            return self.epoch + 1, 0
        return self.epoch, self.step


def _check_args(directory, save_freq, max_to_keep, keep_checkpoint_every_n_hours) -> str:
    if not isinstance(directory, (str, os.PathLike)):
        raise InvalidTypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__} "
                               f"{directory!r}")
    directory = os.fspath(directory)
    if not directory:
        raise InvalidArgumentError("directory is empty: pass the folder to keep the checkpoints in, e.g. 'ckpts'")
    if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, numbers.Integral)):
        raise InvalidTypeError(f"save_freq must be 'epoch' or a number of batches (int), got "
                               f"{type(save_freq).__name__} {save_freq!r}")
    if save_freq != "epoch" and save_freq < 1:
        raise InvalidArgumentError(f"save_freq={save_freq!r}: a number of batches must be at least 1 "
                                   "(or pass save_freq='epoch')")
    check_max_to_keep(max_to_keep, allow_zero=False)
    if keep_checkpoint_every_n_hours is not None:
        if isinstance(keep_checkpoint_every_n_hours, bool) or not isinstance(keep_checkpoint_every_n_hours,
                                                                             numbers.Real):
            raise InvalidTypeError("keep_checkpoint_every_n_hours must be a number of hours or None, got "
                                   f"{type(keep_checkpoint_every_n_hours).__name__}")
        if not keep_checkpoint_every_n_hours > 0:
            raise InvalidArgumentError(f"keep_checkpoint_every_n_hours={keep_checkpoint_every_n_hours!r} "
                                       "must be > 0 (hours), or None")
    return directory


class CheckpointCallback(keras.callbacks.Callback):
    """Save model + optimizer during ``fit`` without stalling it, and resume a restarted ``fit``.

    Args:
        directory: folder of the checkpoints (``directory/ckpt-N`` and the ``checkpoint`` state
            file); created if missing. Use one folder per training run.
        save_freq: ``"epoch"`` (default): save at the end of every epoch; an int N: save every N
            training batches (counted across epochs, as Keras counts them).
        max_to_keep: how many of the newest checkpoints to keep (older ones are deleted once a
            newer one is complete); ``None`` keeps all.
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per this many hours
            (a float, hours), as ``tf.train.CheckpointManager`` does; ``None``: no such rule.
        resume: at the start of ``fit``, restore the newest checkpoint in ``directory`` (if any)
            and continue where it was taken. ``False``: start from the model as it is (new
            checkpoints are numbered after the existing ones, which are kept).

    Raises InvalidTypeError / InvalidArgumentError for arguments it cannot use (here, not
    inside ``fit``); from ``on_train_begin``, MismatchError when the newest checkpoint does
    not fit the model (another model's folder) and CorruptCheckpointError /
    CheckpointNotFoundError for damaged files; from ``on_train_end`` (and the next save), the
    error a background write ended with.

    After ``fit`` returns, :attr:`latest_checkpoint` names the newest complete checkpoint. A
    ``fit`` whose checkpoints say it already finished runs no epochs again.
    """

    def __init__(self, directory, save_freq="epoch", max_to_keep=5, keep_checkpoint_every_n_hours=None,
                 resume=True):
        super().__init__()
        self.directory = _check_args(directory, save_freq, max_to_keep, keep_checkpoint_every_n_hours)
        self.save_freq = save_freq
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self.resume = bool(resume)
        self._checkpoint = self._manager = self._for_model = None
        self._epoch = 0  # the epoch being trained (0-based)
        self._last_batch = -1  # index of the last batch done in this epoch
        self._since_save = 0  # batches since the last save (save_freq=int)
        self._restored_initial_epoch = False
        self._resume_at = None  # (epoch, step) a resumed fit starts at, until that epoch begins
        # tf-keras's callback protocol, beside Keras 3's (which the base class brings).
        self.validation_data = None
        self._chief_worker_only = None
        self._supports_tf_logs = True  # logs unused: spares tf-keras a per-batch conversion to numpy
        if save_freq != "epoch":
            # An instance attribute, not a method, so that with save_freq="epoch" the class keeps
            # Keras 3's default on_train_batch_end and with it Keras 3's asynchronous batch-callback
            # dispatch. A batch-counting callback must run on the training thread, in step: the
            # snapshot is only consistent between two steps.
            self.on_train_batch_end = self._count_batch

    # -- the checkpoint --------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Checkpoint | None:
        """The :class:`gpusaver.Checkpoint` saved (``model``, ``optimizer``, ``epoch``, ``step``);
        ``None`` before the first ``fit``."""
        return self._checkpoint

    @property
    def latest_checkpoint(self) -> str | None:
        """Path prefix of the newest complete checkpoint in :attr:`directory`, or ``None``."""
        if self._manager is not None:
            return self._manager.latest_checkpoint
        return latest_checkpoint(self.directory)

    def _setup(self, model):
        if self._for_model is model:
            return
        # The training position lives in the checkpoint, beside the weights it belongs to, so
        # one file is the whole state (no side-car file that could disagree with it).
        with tf.device("/cpu:0"):
            self._epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self._step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        parts = {"model": model, "epoch": self._epoch_var, "step": self._step_var}
        if getattr(model, "optimizer", None) is not None:
            parts["optimizer"] = model.optimizer
        self._checkpoint = Checkpoint(**parts)
        # gpusaver's manager: save_async returns once the snapshot is held; the state file and
        # retention follow when the files are complete.
        self._manager = CheckpointManager(self._checkpoint, self.directory, max_to_keep=self.max_to_keep,
                                          keep_checkpoint_every_n_hours=self.keep_checkpoint_every_n_hours)
        self._for_model = model

    def _save(self, epoch: int, step: int):
        """Start a checkpoint of the state after ``step`` batches of epoch ``epoch``."""
        self._epoch_var.assign(epoch)
        self._step_var.assign(step)
        # The future is not kept: the manager raises a failed write's error at the next save or
        # at sync() (on_train_end), on the training thread, where fit can stop.
        self._manager.save_async()

    def _wait(self):
        """Wait for the save in flight; re-raise the error it ended with."""
        if self._manager is not None:
            self._manager.sync()

    # -- resume ----------------------------------------------------------------------------------
    def _restore(self, model):
        """Restore the newest checkpoint; return (epoch, step) to continue at, or None."""
        path = self._manager.latest_checkpoint
        if path is None:
            return None
        _build_optimizer(model)  # its slots must exist to be matched now, not left for later
        try:
            self._checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, MismatchError) as e:  # another structure / other shapes
            raise MismatchError(f"checkpoint {path!r} does not fit this model ({e}); it was written for "
                                f"another model: give CheckpointCallback a fresh directory, or resume=False "
                                f"to start over beside it") from e
        return int(self._epoch_var.numpy()), int(self._step_var.numpy())

    # -- callback hooks --------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        model = self.model
        self._setup(model)
        self._since_save = 0
        start = self._restore(model) if self.resume else None
        if start is None:
            if not self.resume:
                self._continue_numbering()
            return
        epoch, step = start
        if _is_keras3(model):
            # Keras 3 reads this once, right after on_train_begin; it cannot start mid-epoch.
            self._saved_initial_epoch = model._initial_epoch
            model._initial_epoch = epoch
            self._restored_initial_epoch = True
            step = 0
        else:
            model._training_state = _TfKerasResume(epoch, step)
        self._resume_at = (epoch, step)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        resume = self._resume_at
        self._last_batch = resume[1] - 1 if resume and resume[0] == epoch else -1
        self._resume_at = None
        self._release_model_hooks()

    def _count_batch(self, batch, logs=None):
        # ``batch`` is the index of the last batch the step ran (steps_per_execution may run several).
        self._since_save += batch - self._last_batch
        self._last_batch = batch
        if self._since_save >= self.save_freq:
            self._since_save = 0
            self._save(self._epoch, batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq == "epoch":
            self._save(epoch + 1, 0)

    def on_train_end(self, logs=None):
        self._release_model_hooks()
        self._resume_at = None
        self._wait()

    def _release_model_hooks(self):
        """Undo what on_train_begin set on the model, so a later ``fit`` without this callback
        starts where its caller says (Keras 3's BackupAndRestore leaves ``_initial_epoch`` set)."""
        model = self._for_model
        if model is None:
            return
        if self._restored_initial_epoch:
            model._initial_epoch = self._saved_initial_epoch
            self._restored_initial_epoch = False
        if isinstance(getattr(model, "_training_state", None), _TfKerasResume):
            model._training_state = None

    def _continue_numbering(self):
        # resume=False: number new checkpoints after the folder's newest, so none is overwritten.
        path = self._manager.latest_checkpoint
        number = path.rsplit("-", 1)[-1] if path else ""
        if number.isdigit() and int(number) > int(self._checkpoint.save_counter.numpy()):
            self._checkpoint.save_counter.assign(int(number))

    # tf-keras asks these to decide which hooks to call at all.
    def _implements_train_batch_hooks(self):
        return self.save_freq != "epoch"

    def _implements_test_batch_hooks(self):
        return False

    def _implements_predict_batch_hooks(self):
        return False


def _is_keras3(model) -> bool:
    return isinstance(model, keras.Model)


def _build_optimizer(model):
    """Create the optimizer's variables (slots, iterations) if it has not yet, as BackupAndRestore
    does before loading: a checkpoint's optimizer values then land at restore time."""
    optimizer = getattr(model, "optimizer", None)
    build = getattr(optimizer, "build", None)
    if optimizer is None or not callable(build) or not getattr(model, "built", True):
        return
    built = getattr(optimizer, "built", None)
    if built is None:
        built = getattr(optimizer, "_built", False)  # tf-keras optimizers set it in build()
    if not built:
        build(model.trainable_variables)
