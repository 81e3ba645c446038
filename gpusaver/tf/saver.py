"""``gpusaver.Saver``: the contract of ``tf.contrib.eager.Saver`` over the staging core."""
import concurrent.futures
import glob
import logging
import os
import threading
import time

import numpy as np

from gpusaver import core
from gpusaver.errors import MissingKeysError
from gpusaver.format import naming, paths
from gpusaver.format.reader import BundleReader
from gpusaver.format.state import CheckpointState, write_state
from gpusaver.log import log_done
from gpusaver.options import Options
from gpusaver.tf import variables as tfvars
from gpusaver.staging.devices import Device

logger = logging.getLogger("gpusaver")


def _step(global_step) -> int:
    if hasattr(global_step, "numpy"):
        global_step = global_step.numpy()
    return int(np.asarray(global_step))


def remove_checkpoint(prefix: str):
    """Delete a checkpoint's files (index first, so it stops being a checkpoint before data goes)."""
    for path in [naming.index_path(prefix), *glob.glob(glob.escape(prefix) + ".data-?????-of-?????"),
                 prefix + ".meta"]:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class _SaveFuture(concurrent.futures.Future):
    """The future :meth:`Saver.save_async` returns: it notes whether anyone looked at its outcome
    (``result()``, ``exception()``), so a failure nobody saw is raised by the Saver's next call."""

    observed = False

    def result(self, timeout=None):
        self.observed = True
        return super().result(timeout)

    def exception(self, timeout=None):
        self.observed = True
        return super().exception(timeout)

    def cancel(self):  # the save runs on; its outcome still arrives here
        return False

    @classmethod
    def following(cls, inner: concurrent.futures.Future) -> "_SaveFuture":
        outer = cls()

        def copy(f):
            error = f.exception()
            if error is None:
                outer.set_result(f.result())
            else:
                outer.set_exception(error)
        inner.add_done_callback(copy)
        return outer


class Saver:
    """Saves and restores TF variables in TensorFlow's V2 checkpoint format.

    Args:
        var_list: a list of variables (named as TF names them: ``name`` up to the ``:``; Keras 3
            variables by ``path``) or a dict {checkpoint name: variable}.
        max_to_keep: keep this many most recent checkpoints written by this Saver, deleting older
            ones' files (default 5, as TF's Saver); None keeps all.
        options: :class:`gpusaver.Options` (staging budget, shards, snapshot mode, ...).

    Raises RuntimeError when eager execution is off, MismatchError when two variables share a name,
    InvalidTypeError naming any element of ``var_list`` that is not a variable.

    Failed background saves are never dropped: if a :meth:`save_async` fails and nobody called
    its future's ``result()`` or ``exception()``, the Saver's next :meth:`save`,
    :meth:`save_async` or :meth:`wait` raises that error (once; the call after goes ahead).
    """

    def __init__(self, var_list, *, max_to_keep: int | None = 5, options: Options | None = None):
        tfvars.require_eager("__init__")
        self._vars = tfvars.name_variables(var_list)
        self._read_all = tfvars.SnapshotReader(list(self._vars.values()))
        self._on_gpu = any(tfvars.device_of(v).is_cuda for v in self._vars.values())
        self._options = options or Options()
        self._stager = core.Stager(self._options)
        self._max_to_keep = max_to_keep
        self._kept: list[tuple[str, float]] = []  # (prefix, timestamp), oldest first
        self._inflight: concurrent.futures.Future | None = None
        self._lock = threading.Lock()

    @property
    def variables(self) -> dict:
        """{checkpoint name: tf.Variable}, a copy."""
        return dict(self._vars)

    def save_async(self, file_prefix: str, global_step=None) -> concurrent.futures.Future:
        """Start a save and return a future as soon as a consistent snapshot is held.

        ``result()`` returns the prefix written (``file_prefix-<step>`` when ``global_step`` is
        given) and re-raises any error from the background. At most one save per Saver is in flight:
        a second call first waits for the previous one to finish. The state file ``checkpoint`` is
        updated only after the new checkpoint's files are complete. The interpreter does not exit
        while a save is in flight.

        Memory: with the default ``snapshot="auto"`` (``"reference"`` for these copy-on-write
        variable reads) the save holds the variables' current buffers; a variable assigned before its
        bytes are written keeps its old buffer alive until then (at most one extra copy of the
        model, on its device). ``"host"`` copies everything to a reused page-locked host buffer at
        link speed and lets device buffers go at once; ``"copy"`` bounds host memory by the budget.

        Raises the error of the previous save_async if it failed and nobody looked at its future
        (this save is then not started); InvalidTypeError / InvalidArgumentError for a prefix that
        is None, empty, a directory or a checkpoint file's name. From ``result()``:
        CheckpointIOError naming the file (disk full, ...), after which the previous checkpoint
        under that prefix and the state file are as they were.
        """
        tfvars.require_eager("save")
        prefix = paths.for_write(file_prefix, "Saver.save")
        if global_step is not None:
            prefix = f"{prefix}-{_step(global_step)}"
        with self._lock:
            self._raise_unobserved()
            # Holding the tensors is the snapshot; turning them into arrays happens in the background.
            tensors = dict(zip(self._vars, self._read_all()))
            if self._on_gpu:
                # GPU buffers go to CuPy through TF's stream-less DLPack export, which is only
                # ordered once TF's device work is done: wait for it once, here, then take the
                # capsules on this thread while the devices are idle (see export_gpu).
                tfvars.sync_devices()
                tensors = {name: tfvars.export_gpu(t) for name, t in tensors.items()}
            future = core.save_async(prefix, tensors, self._options, stager=self._stager,
                                     on_done=self._commit, to_array=tfvars.as_array,
                                     copy_on_write=True)
            future = _SaveFuture.following(future)
            self._inflight = future
        return future

    def save(self, file_prefix: str, global_step=None) -> str:
        """Save and return the prefix written; see :meth:`save_async`."""
        return self.save_async(file_prefix, global_step).result()

    def wait(self, raise_errors: bool = True):
        """Block until the save in flight (if any) has finished; re-raise its error if asked."""
        future = self._inflight
        if future is None:
            return
        if raise_errors:
            error = future.exception()  # marks it seen
            if error is not None:
                raise error
        else:
            concurrent.futures.wait([future])

    def _raise_unobserved(self):
        """Wait for the save in flight; raise its error if it failed and nobody has seen it."""
        future = self._inflight
        if future is None:
            return
        concurrent.futures.wait([future])
        if not future.observed and future.exception() is not None:
            raise future.exception()

    def _commit(self, prefix: str) -> str:
        """Runs on the save thread once the files are in place: state file, then retention. If
        the state file cannot be written, nothing here changes and the writer rolls back."""
        directory = os.path.dirname(prefix) or "."
        kept = [(p, t) for p, t in self._kept if p != prefix] + [(prefix, time.time())]
        removed = []
        if self._max_to_keep is not None:
            while len(kept) > max(self._max_to_keep, 1):
                removed.append(kept.pop(0)[0])
        rel = [os.path.relpath(p, directory) for p, _ in kept]
        write_state(directory, CheckpointState(rel[-1], rel, [t for _, t in kept]))
        self._kept = kept
        for old in removed:  # after the state file stops naming them
            try:
                remove_checkpoint(old)
            except OSError as e:  # the new checkpoint is committed: a leftover old one is no reason to undo it
                logger.warning("could not delete old checkpoint %r: %s", old, e)
        return prefix

    def restore(self, file_prefix: str, device_map: dict | None = None):
        """Restore every variable from the checkpoint at ``file_prefix``.

        Each value is read (CRC-checked) and staged on its variable's device — uploaded straight
        into GPU memory through CuPy where the variable is on a GPU — or on ``device_map[that
        device]`` instead (e.g. ``{"/GPU:0": "/GPU:1"}``, or ``{"/GPU:0": "/CPU:0"}`` to stage on
        the host and let TF upload), then assigned; TF copies it across if the two differ. The
        checkpoint may hold more tensors than the Saver. ``file_prefix`` may also be a directory (its
        latest checkpoint) or one of the checkpoint's files.

        All or nothing: if anything fails, every variable keeps the value it had before the call.
        Raises CheckpointNotFoundError (listing the checkpoints nearby), InvalidTypeError for None,
        MissingKeysError (listing all missing names), MismatchError (dtype/shape, naming the
        variable and both values) before any variable is changed; CorruptCheckpointError (a bad
        CRC, naming tensor and file) or CheckpointIOError, after which the variables are put back.
        """
        tfvars.require_eager("restore")
        self.wait(raise_errors=False)
        started = time.perf_counter()
        prefix = paths.for_read(file_prefix, "Saver.restore")
        with BundleReader(prefix) as reader:
            missing = [n for n in self._vars if n not in reader]
            if missing:
                raise MissingKeysError(missing, prefix)
            for name, var in self._vars.items():
                entry = reader.entry(name)
                tfvars.check_fits(name, var, entry.dtype, entry.shape)
            # Placement is per device, not per variable: thousands of variables share a few devices.
            by_device: dict[str, Device] = {}
            requests = []
            for name, var in self._vars.items():
                if var.device not in by_device:
                    by_device[var.device] = tfvars.target_device(var, device_map)
                requests.append((name, self._stager.staging_device(by_device[var.device], reader.dtype(name))))
            # Values arrive in file order and are assigned as they come (overlapping reads); the
            # previous values are held (copy-on-write reads: no copy, a few batched op calls) and
            # put back if a later tensor fails, so a failed restore changes nothing. They are read
            # once the first value is in, while the reader threads fetch the next batches.
            previous: dict | None = None
            assigned = []
            try:
                for name, value in core.load_iter(reader, requests, self._stager):
                    if previous is None:
                        previous = dict(zip(self._vars, self._read_all()))
                    assigned.append(name)
                    tfvars.assign(self._vars[name], value)
            except BaseException:
                for name in assigned:
                    tfvars.assign_tensor(self._vars[name], previous[name])
                raise
            log_done("restore", prefix, sum(reader.entry(n).size for n in self._vars),
                     time.perf_counter() - started)
