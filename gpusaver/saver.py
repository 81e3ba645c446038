"""``gpusaver.Saver``: the contract of ``tf.contrib.eager.Saver`` over the staging core."""
import concurrent.futures
import glob
import os
import threading
import time

import numpy as np

from gpusaver import core
from gpusaver.errors import MissingKeysError
from gpusaver.format import naming
from gpusaver.format.bundle import BundleReader
from gpusaver.format.state import CheckpointState, write_state
from gpusaver.options import Options
from gpusaver import tf_adapter
from gpusaver.staging.devices import Device


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


class Saver:
    """Saves and restores TF variables in TensorFlow's V2 checkpoint format.

    Args:
        var_list: a list of variables (named as TF names them: ``name`` up to the ``:``; Keras 3
            variables by ``path``) or a dict {checkpoint name: variable}.
        max_to_keep: keep this many most recent checkpoints written by this Saver, deleting older
            ones' files (default 5, as TF's Saver); None keeps all.
        options: :class:`gpusaver.Options` (staging budget, shards, snapshot mode, ...).

    Raises RuntimeError when eager execution is off, MismatchError when two variables share a name.
    """

    def __init__(self, var_list, *, max_to_keep: int | None = 5, options: Options | None = None):
        tf_adapter.require_eager("__init__")
        self._vars = tf_adapter.name_variables(var_list)
        self._read_all = tf_adapter.SnapshotReader(list(self._vars.values()))
        self._on_gpu = any(tf_adapter.device_of(v).is_cuda for v in self._vars.values())
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

        Memory: in the default ``snapshot="reference"`` mode the save holds the variables' current
        buffers; a variable assigned before its bytes are written keeps its old buffer alive until
        then (at most one extra copy of the model). ``snapshot="copy"`` bounds that by the budget.
        """
        tf_adapter.require_eager("save")
        prefix = os.fspath(file_prefix)
        if global_step is not None:
            prefix = f"{prefix}-{_step(global_step)}"
        with self._lock:
            self.wait(raise_errors=False)
            # Holding the tensors is the snapshot; turning them into arrays happens in the background.
            tensors = dict(zip(self._vars, self._read_all()))
            if self._on_gpu:
                # GPU buffers go to CuPy through TF's stream-less DLPack export, which is only
                # ordered once TF's device work is done: wait for it once, here, then take the
                # capsules on this thread while the devices are idle (see export_gpu).
                tf_adapter.sync_devices()
                tensors = {name: tf_adapter.export_gpu(t) for name, t in tensors.items()}
            future = core.save_async(prefix, tensors, self._options, stager=self._stager,
                                     on_done=self._commit, to_array=tf_adapter.as_array,
                                     copy_on_write=True)
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
        error = future.exception()
        if error is not None and raise_errors:
            raise error

    def _commit(self, prefix: str) -> str:
        """Runs on the save thread once the index exists: state file, then retention."""
        directory = os.path.dirname(prefix) or "."
        self._kept = [(p, t) for p, t in self._kept if p != prefix] + [(prefix, time.time())]
        removed = []
        if self._max_to_keep is not None:
            while len(self._kept) > max(self._max_to_keep, 1):
                removed.append(self._kept.pop(0)[0])
        rel = [os.path.relpath(p, directory) for p, _ in self._kept]
        write_state(directory, CheckpointState(rel[-1], rel, [t for _, t in self._kept]))
        for old in removed:  # after the state file stops naming them
            remove_checkpoint(old)
        return prefix

    def restore(self, file_prefix: str, device_map: dict | None = None):
        """Restore every variable from the checkpoint at ``file_prefix``.

        Each value is read (CRC-checked) and staged on its variable's device — uploaded straight
        into GPU memory through CuPy where the variable is on a GPU — or on ``device_map[that
        device]`` instead (e.g. ``{"/GPU:0": "/GPU:1"}``, or ``{"/GPU:0": "/CPU:0"}`` to stage on
        the host and let TF upload), then assigned; TF copies it across if the two differ. The
        checkpoint may hold more tensors than the Saver. Raises CheckpointNotFoundError,
        MissingKeysError (listing all missing names), MismatchError (dtype/shape, naming the variable
        and both values) before any variable is changed; CorruptCheckpointError on a bad CRC.
        """
        tf_adapter.require_eager("restore")
        self.wait(raise_errors=False)
        with BundleReader(os.fspath(file_prefix)) as reader:
            missing = [n for n in self._vars if n not in reader]
            if missing:
                raise MissingKeysError(missing, os.fspath(file_prefix))
            for name, var in self._vars.items():
                entry = reader.entry(name)
                tf_adapter.check_fits(name, var, entry.dtype, entry.shape)
            # Placement is per device, not per variable: thousands of variables share a few devices.
            by_device: dict[str, Device] = {}
            requests = []
            for name, var in self._vars.items():
                if var.device not in by_device:
                    by_device[var.device] = tf_adapter.target_device(var, device_map)
                requests.append((name, self._staging_device(by_device[var.device], reader.dtype(name))))
            for name, value in core.load_iter(reader, requests, self._stager):
                tf_adapter.assign(self._vars[name], value)

    def _staging_device(self, target: Device, dtype) -> Device:
        """Upload through CuPy when the target is a GPU and CuPy is there; otherwise TF uploads."""
        if target.is_cuda and dtype.kind != "O":
            try:
                self._stager.cuda()
                return target
            except ImportError:
                pass
        return Device("cpu", 0)
