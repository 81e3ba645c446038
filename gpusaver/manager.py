"""Which checkpoints to keep, the ``checkpoint`` state file that lists them, and the order of a commit.

One implementation serves :class:`CheckpointManager` (over ``gpusaver.Checkpoint``,
``gpusaver.Saver`` or ``tf.train.Checkpoint``) and ``gpusaver.Saver``'s own ``max_to_keep``:

- **Retention** as ``tf.train.CheckpointManager`` does it: the newest ``max_to_keep`` checkpoints
  form the active set (``None`` keeps all); one leaving it is deleted unless it is at least
  ``keep_checkpoint_every_n_hours`` newer than the last one preserved that way.
- **Recovery**: a ledger starts from the state file already in its directory (paths, timestamps,
  ``last_preserved_timestamp``), so a restarted process deletes what the previous one would have.
  It adopts only the checkpoints it manages (its own name, in its directory); anything else the
  state file names is left on disk, untouched.
- **Commit order**, run on the save thread once the new files are in place (the writer's
  ``on_commit``): make the new checkpoint durable (only when something older is about to go, or
  when asked), write the state file (atomic; durable likewise), then delete what left the active
  set. If the state file cannot be written the writer rolls the new files back and nothing here
  changes; a failed deletion is only logged (the new checkpoint is committed either way).

Imports no TensorFlow: the adapters are driven through a small protocol (see :class:`CheckpointManager`).
"""
import concurrent.futures
import glob
import logging
import operator
import os
import re
import threading
import time

from gpusaver import storage
from gpusaver.errors import CorruptCheckpointError, InvalidArgumentError, InvalidTypeError, io_error
from gpusaver.format import naming
from gpusaver.storage import commit
from gpusaver.format.state import CheckpointState, read_state, resolve, sync_dir, write_state
from gpusaver.futures import SaveFuture, raise_unobserved

logger = logging.getLogger("gpusaver")


_DATA = re.compile(r"\.data-\d{5}-of-\d{5}")


def remove_checkpoint(prefix: str, store=None):
    """Delete a checkpoint's files or objects, index first (so it stops being a checkpoint before
    its data goes), then its data, a TF ``.meta`` and a leftover commit journal."""
    store = store if store is not None else storage.for_url(prefix)
    data = sorted(p for p in store.list(store.dirname(prefix))
                  if p.startswith(prefix) and _DATA.fullmatch(p[len(prefix):]))
    for path in [naming.index_path(prefix), *data, prefix + ".meta", commit.journal_path(prefix)]:
        store.delete(path)


def _make_durable(prefix: str):
    """fsync a committed local checkpoint's files and directory (an object store's completed
    upload is durable already). Raises CheckpointIOError naming the file."""
    if storage.is_url(prefix):
        return
    path = prefix
    try:
        for path in [*glob.glob(glob.escape(prefix) + ".data-?????-of-?????"), naming.index_path(prefix)]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        path = os.path.dirname(prefix) or "."
        sync_dir(path)
    except OSError as e:
        raise io_error(e, path, "syncing the new checkpoint before deleting older ones") from e


def check_max_to_keep(max_to_keep, allow_zero: bool) -> int | None:
    """``max_to_keep`` as None (keep all) or a positive int; InvalidArgumentError otherwise.
    ``allow_zero``: 0 means keep all (TF's ``Saver``) rather than an error (``CheckpointManager``)."""
    if max_to_keep is None:
        return None
    try:
        if isinstance(max_to_keep, bool):  # an int to Python, never meant as a count
            raise TypeError
        n = operator.index(max_to_keep)
    except TypeError:
        raise InvalidTypeError(f"max_to_keep must be an int or None, got {type(max_to_keep).__name__}: "
                               f"{max_to_keep!r}") from None
    if n == 0 and allow_zero:
        return None
    if n <= 0:
        raise InvalidArgumentError(f"max_to_keep must be a positive int, or None to keep every checkpoint; "
                                   f"got {n}")
    return n


class Retention:
    """The checkpoints one manager keeps in ``directory``, oldest first, and the state file listing them.

    Args:
        directory: where the checkpoints and the ``checkpoint`` state file live.
        max_to_keep: size of the active set; None (or 0) keeps every checkpoint.
        keep_checkpoint_every_n_hours: hours (float); a checkpoint leaving the active set at least
            this much newer than the last one preserved is kept on disk (and no longer listed).
        manages: ``f(name) -> bool`` for a path relative to ``directory`` (``"ckpt-3"``): which
            entries of an existing state file this ledger adopts, and so may later delete.
        fsync: always make commits durable (``Options.fsync``); otherwise only when deleting.

    A garbled existing state file is ignored (logged), as TF does; raises CheckpointIOError when it
    cannot be read at all.
    """

    def __init__(self, directory: str, max_to_keep: int | None, keep_checkpoint_every_n_hours=None,
                 manages=lambda name: True, fsync: bool = False, options=None):
        self.directory = directory
        self.store = storage.for_url(directory, options)  # Options.storage_options for URLs
        self.max_to_keep = max_to_keep
        self.every_n_hours = keep_checkpoint_every_n_hours
        self.fsync = fsync
        self._lock = threading.Lock()  # commits run on save threads, readers on the caller's
        self._active: dict[str, float] = {}  # name relative to directory -> timestamp (s), oldest first
        now = time.time()
        try:
            state = read_state(directory, self.store)
        except CorruptCheckpointError as e:  # as TF: a garbled state file is ignored (and replaced)
            logger.warning("ignoring the checkpoint state file: %s", e)
            state = None
        if state is None:
            self._latest = None
            # As TF: a little in the past, so a checkpoint saved at once can already be preserved.
            self._preserved = now - 1.0
            return
        self._latest = resolve(directory, state.model_checkpoint_path)
        self._preserved = state.last_preserved_timestamp or 0.0
        if now < self._preserved:
            logger.warning("time.time() is %.1f s behind the last preserved checkpoint's timestamp in %r",
                           self._preserved - now, directory)
            self._preserved = now
        paths = state.all_model_checkpoint_paths
        # Without timestamps TF counts every entry as preserved (never deleted); so do we.
        stamps = state.all_model_checkpoint_timestamps or [self._preserved] * len(paths)
        for path, stamp in zip(paths, stamps):
            name = self._name(path, in_state_file=True)
            if min(stamp, now) > self._preserved and manages(name):
                self._active.pop(name, None)
                self._active[name] = min(stamp, now)

    def _name(self, path: str, in_state_file: bool = False) -> str:
        # A state-file entry is relative to the directory; a caller's prefix (commit, latest) to the cwd.
        if in_state_file:
            path = resolve(self.directory, path)
        return os.path.normpath(os.path.relpath(path, self.directory or "."))

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def latest(self) -> str | None:
        """The newest committed checkpoint's prefix (after a restart: the one the state file names)."""
        with self._lock:
            return self._latest

    @property
    def checkpoints(self) -> list[str]:
        """Prefixes of the active set, oldest first (preserved ones are not listed, as in TF)."""
        with self._lock:
            return [self._path(n) for n in self._active]

    def numbers(self, name: str) -> list[int]:
        """The N of every ``<name>-N`` in the active set and the latest (to continue a numbering)."""
        pattern = re.compile(re.escape(name) + r"-(\d+)")
        with self._lock:
            names = list(self._active) + ([self._name(self._latest)] if self._latest else [])
        return [int(m.group(1)) for n in names if (m := pattern.fullmatch(n))]

    def commit(self, prefix: str) -> str:
        """Record ``prefix`` (whose files are complete) as the newest checkpoint; return it.

        Runs as the writer's ``on_commit``: durable files (when anything is deleted, or always
        with ``fsync``), then the state file (atomic), then deletion of checkpoints leaving the
        active set. Raises CheckpointIOError when the state file cannot be written, with nothing
        here changed (the writer then rolls the new files back)."""
        name = self._name(prefix)
        # Saves of one manager commit one at a time, so the lock guards only the readers: the
        # syncs below (up to a whole checkpoint's writeback) run without holding it.
        with self._lock:
            active = {n: t for n, t in self._active.items() if n != name}  # an overwrite moves to the end
            preserved = self._preserved
        active[name] = time.time()
        removed = []
        if self.max_to_keep:
            while len(active) > self.max_to_keep:
                old = next(iter(active))
                stamp = active.pop(old)
                if self.every_n_hours and stamp - self.every_n_hours * 3600.0 >= preserved:
                    preserved = stamp  # kept on disk, no longer listed: the state file stays small
                else:
                    removed.append(old)
        durable = self.fsync or bool(removed)
        if removed and not self.fsync:  # with fsync the writer synced the files already
            # Before anything older goes, the new checkpoint must survive a power loss.
            _make_durable(prefix)
        synced = write_state(self.directory, CheckpointState(name, list(active), list(active.values()), preserved),
                             fsync=durable, storage=self.store)
        with self._lock:
            self._active, self._preserved, self._latest = active, preserved, prefix
        if removed and not synced:
            logger.warning("could not sync directory %r: not deleting %s this time (their files stay)",
                           self.directory, ", ".join(removed))
            return prefix
        for old in removed:  # only now that the state file no longer names them
            try:
                remove_checkpoint(self._path(old), self.store)
            except OSError as e:  # the new checkpoint is committed: a leftover old one is no reason to undo it
                logger.warning("could not delete old checkpoint %r: %s", self._path(old), e)
        return prefix


def as_int(value, what: str) -> int:
    """An int from an int, numpy integer, or a TF tensor / variable holding one."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    try:
        return operator.index(value)
    except TypeError:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InvalidTypeError(f"{what} must be an integer, an integer tensor or variable; got "
                                   f"{type(value).__name__}: {value!r}") from None


class CheckpointManager:
    """``tf.train.CheckpointManager`` over gpusaver: numbered saves, retention, asynchronous saves.

    Same signature and behaviour as TF's (2.21): checkpoints ``<directory>/<checkpoint_name>-<N>``,
    ``max_to_keep`` and ``keep_checkpoint_every_n_hours`` as described there, a ``checkpoint``
    state file TF's ``tf.train.latest_checkpoint`` / ``CheckpointManager`` read (and whose list a
    new manager picks up after a restart). Differences: a restarted manager adopts, and may later
    delete, only the checkpoints named ``<checkpoint_name>-<N>`` in ``directory`` (TF deletes
    whatever its state file lists); old checkpoints are deleted only after the new one is durable
    (fsynced) and the state file no longer names them; and :meth:`save_async`.

    Args:
        checkpoint: a ``gpusaver.Checkpoint`` (numbered by its ``save_counter``), a
            ``gpusaver.Saver`` (numbered by ``checkpoint_number``, else ``step_counter``, else the
            manager's own counter, which continues after the highest number found on restart),
            or a ``tf.train.Checkpoint`` (written by TF, synchronously).
        directory: str or os.PathLike; created on the first save.
        max_to_keep: checkpoints in the active set (default 5); None keeps all.
        keep_checkpoint_every_n_hours: hours (float) or None; see :class:`Retention`.
        checkpoint_name: file name stem (default ``"ckpt"``).
        step_counter: an integer variable; required with ``checkpoint_interval``.
        checkpoint_interval: minimum steps of ``step_counter`` between two saves, or None.
        init_fn: called by :meth:`restore_or_initialize` when there is no checkpoint.
        last_checkpoint_step: the step of the last checkpoint, to start the interval check from.

    The adapters it drives implement ``_gpusaver_write(prefix, on_commit, options) -> Future``
    (snapshot now, write exactly ``prefix``, run ``on_commit(prefix)`` on the save thread once
    the files are in place, roll them back if it raises) and ``_gpusaver_options``; anything else
    with ``write(prefix)`` is written synchronously and committed afterwards.

    Raises InvalidArgumentError (a ValueError) for ``max_to_keep`` <= 0, or ``checkpoint_interval``
    without ``step_counter``; InvalidTypeError for a ``checkpoint`` it cannot save;
    CheckpointIOError for an existing state file that cannot be read (a garbled one is ignored,
    as TF does).
    """

    def __init__(self, checkpoint, directory, max_to_keep=5, keep_checkpoint_every_n_hours=None,
                 checkpoint_name="ckpt", step_counter=None, checkpoint_interval=None, init_fn=None,
                 last_checkpoint_step=None):
        if not (hasattr(checkpoint, "_gpusaver_write") or hasattr(checkpoint, "write")):
            raise InvalidTypeError(f"checkpoint: expected a gpusaver.Checkpoint, gpusaver.Saver or "
                                   f"tf.train.Checkpoint, got {type(checkpoint).__name__}")
        if checkpoint_interval is not None and step_counter is None:
            raise InvalidArgumentError("checkpoint_interval needs step_counter (the variable counting "
                                       "steps); pass step_counter=..., or checkpoint_interval=None")
        self._checkpoint = checkpoint
        self._directory = os.fspath(directory)
        self._name = checkpoint_name
        self._prefix = os.path.join(self._directory, checkpoint_name)
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._last_checkpoint_step = last_checkpoint_step
        self._init_fn = init_fn
        pattern = re.compile(re.escape(os.path.normpath(checkpoint_name)) + r"-\d+")
        options = getattr(checkpoint, "_gpusaver_options", None)
        self._retention = Retention(self._directory, check_max_to_keep(max_to_keep, allow_zero=False),
                                    keep_checkpoint_every_n_hours, manages=lambda n: bool(pattern.fullmatch(n)),
                                    fsync=bool(getattr(options, "fsync", False)), options=options)
        self._counter = max(self._retention.numbers(os.path.normpath(checkpoint_name)), default=0)
        self._lock = threading.Lock()
        self._inflight: concurrent.futures.Future | None = None

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def checkpoint(self):
        """The checkpoint (or Saver) this manager saves."""
        return self._checkpoint

    @property
    def checkpoint_interval(self):
        return self._checkpoint_interval

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint's prefix, or None. It moves only once a save's files
        are complete and the state file names them, as ``tf.train.latest_checkpoint`` sees it."""
        return self._retention.latest

    @property
    def checkpoints(self) -> list[str]:
        """The managed checkpoints' prefixes, oldest first (ones kept by
        ``keep_checkpoint_every_n_hours`` are not listed)."""
        return self._retention.checkpoints

    def save_async(self, checkpoint_number=None, check_interval=True, options=None) -> concurrent.futures.Future:
        """Number and start a save; return a future once a consistent snapshot is held.

        ``result()`` is the new checkpoint's final prefix (None when the interval check skipped
        the save) and re-raises any error of the background write. ``latest_checkpoint``,
        ``checkpoints`` and the state file change, and old checkpoints are deleted, only once
        the new files are complete (and durable, when anything is deleted). One save is in
        flight at a time: this waits for the previous one first.

        ``checkpoint_number``: an int (or integer tensor / variable) for the name; else the
        checkpoint's ``save_counter`` (incremented by every save, as TF does) or, for a Saver,
        ``step_counter`` or the manager's own counter. ``check_interval``: with
        ``checkpoint_interval``, skip unless that many steps passed since the last save (a
        second save at the same step is always skipped). ``options``: a
        ``tf.train.CheckpointOptions`` for a checkpoint object (write callbacks run after the
        manager's commit; an I/O device or TF's async option hand the write to TF).

        Raises the error of the previous save if it failed and nobody looked at its future (this
        save is then not started). From ``result()``: CheckpointIOError naming the file, after
        which the previous checkpoints and the state file are as they were.
        """
        with self._lock:
            raise_unobserved(self._inflight)
            if self._checkpoint_interval is not None:
                current = as_int(self._step_counter, "step_counter")
                last = self._last_checkpoint_step
                if last is not None and (current == last or
                                         (check_interval and current < last + self._checkpoint_interval)):
                    return SaveFuture.done_with(None)
                self._last_checkpoint_step = current
            prefix = f"{self._prefix}-{self._number(checkpoint_number)}"
            self._inflight = self._write(prefix, options)
            return self._inflight

    def save(self, checkpoint_number=None, check_interval=True, options=None):
        """Save, wait for the files, and return the new prefix (None if the interval check
        skipped it); see :meth:`save_async`."""
        return self.save_async(checkpoint_number, check_interval, options).result()

    def sync(self):
        """Wait for the save in flight, if any; raise its error if nobody has looked at it."""
        with self._lock:
            raise_unobserved(self._inflight)

    def restore_or_initialize(self):
        """Restore the latest checkpoint into ``checkpoint`` and return its prefix; with none,
        call ``init_fn`` (if given) and return None. Waits for a save in flight first (its error,
        if any, stays for the next :meth:`save` or :meth:`sync`). Raises what ``restore`` raises."""
        future = self._inflight
        if future is not None:
            concurrent.futures.wait([future])
        latest = self.latest_checkpoint
        if latest is not None:
            self._checkpoint.restore(latest)
            if self._checkpoint_interval is not None:
                self._last_checkpoint_step = as_int(self._step_counter, "step_counter")
            return latest
        if self._init_fn is not None:
            self._init_fn()
        return None

    def _number(self, checkpoint_number) -> int:
        # Every save counts, even a numbered one (as TF's save_counter does).
        self._counter += 1
        counter = getattr(self._checkpoint, "save_counter", None)
        if counter is not None:
            counter.assign_add(1)
        if checkpoint_number is not None:
            return as_int(checkpoint_number, "checkpoint_number")
        if counter is not None:
            return as_int(counter, "save_counter")
        if self._step_counter is not None:
            return as_int(self._step_counter, "step_counter")
        return self._counter

    def _write(self, prefix: str, options) -> concurrent.futures.Future:
        write = getattr(self._checkpoint, "_gpusaver_write", None)
        if write is not None:
            future = write(prefix, self._retention.commit, options)
            # Share the adapter's own future where it tracks observation, so an error is raised once.
            return future if isinstance(future, SaveFuture) else SaveFuture.following(future)
        # Any other checkpoint (tf.train.Checkpoint): TF writes it, then it is committed here.
        # (If the state file then cannot be written, TF's files stay: nothing is deleted or listed.)
        future = SaveFuture()
        try:
            path = self._checkpoint.write(prefix) if options is None else self._checkpoint.write(prefix, options)
            future.set_result(self._retention.commit(os.fspath(path)))
        except Exception as e:
            future.set_exception(e)
        return future
