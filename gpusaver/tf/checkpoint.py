"""``gpusaver.Checkpoint``: the API and object-based format of ``tf.train.Checkpoint`` over gpusaver's engine.

TensorFlow decides *what* a checkpoint holds; gpusaver moves the bytes.

- Save: TF's own graph walk (``save_util.serialize_graph_view``, the function behind
  ``tf.train.Checkpoint.write``) gives the ``TrackableObjectGraph`` proto and {checkpoint key:
  tensor} for every trackable, the ``save_counter`` and non-variable saveables included. Plain
  variables among them are read in a few batched ops (copy-on-write: holding the tensors is the
  snapshot) and everything goes to :func:`gpusaver.core.save_async`, with the proto as the
  ``_CHECKPOINTABLE_OBJECT_GRAPH`` string tensor.
- Restore: TF's own object matching (``CheckpointPosition`` and the restore coordinator that
  ``tf.train.Checkpoint.read`` uses, deferred restoration into objects created later included),
  with the coordinator's ``restore_saveables`` — the one place TF reads checkpointed values — and
  its ``CheckpointReader`` answered from gpusaver's reader, so values are read (CRC-checked) and
  staged by gpusaver and plain variables assigned straight from the staged arrays, all or nothing
  (:mod:`gpusaver.tf.object_restore`).

Delegated to ``tf.train.Checkpoint`` unchanged: graph mode (no eager execution), checkpoints
without an object graph (name-based), ``CheckpointOptions`` that ask for an I/O device or TF's async
checkpointing, and, on restore, objects with registered savers and partitioned (sliced) values.
TF's restore-on-create (variables made by ``add_weight``-style getters after a restore, e.g.
Keras 2 layers) reads those values with TF's ``RestoreV2`` from the same files.
"""
import concurrent.futures
import copy
import functools
import os
import threading

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2
from tensorflow.python.checkpoint import checkpoint as tf_checkpoint
from tensorflow.python.checkpoint import restore as restore_lib
from tensorflow.python.checkpoint import save_util
from tensorflow.python.training.saving import saveable_object

from gpusaver import core, gcpause, storage
from gpusaver.tf import distribute
from gpusaver.tf import placement
from gpusaver.tf import variables as tfvars
from gpusaver.tf.object_restore import Reader, RestoreCoordinator, call_tf, plain_variable
from gpusaver.errors import UnsupportedError
from gpusaver.format.naming import OBJECT_GRAPH_KEY
from gpusaver.format.state import CheckpointState, write_state
from gpusaver.options import Options

def _gather(saver):
    """(object graph proto, {key: tensor or SaveSpec}, {key: variable}, the multi-worker cluster the
    objects live in or None) from TF's own graph walk."""
    graph_view = saver._graph_view  # pylint: disable=protected-access
    object_map = getattr(saver, "_object_map", None)
    if hasattr(save_util, "serialize_graph_view"):  # TF >= 2.11
        serialized, _, registered, proto = call_tf(save_util.serialize_graph_view, graph_view=graph_view,
                                                 object_map=object_map, cache=None)
    else:  # pragma: no cover - older layouts keep the same walk on the saver
        serialized, _, registered, proto = saver._gather_serialized_tensors(None)  # pylint: disable=protected-access
    if registered:
        raise UnsupportedError(f"objects with registered savers ({', '.join(registered)}) cannot be written "
                               "by gpusaver.Checkpoint; use tf.train.Checkpoint for them")
    values, variables = {}, {}
    for obj, tensor_dict in serialized.items():
        if obj is None:  # the object graph tensor TF's own gather may add
            continue
        var = plain_variable(obj, tensor_dict)
        for key, value in tensor_dict.items():
            if key == OBJECT_GRAPH_KEY:
                continue
            if isinstance(value, dict):  # {slice_spec: value}
                if set(value) != {""}:
                    raise UnsupportedError(f"checkpoint value {key!r} is partitioned (slices "
                                           f"{sorted(value)}); use tf.train.Checkpoint for sliced variables")
                value = value[""]
            if isinstance(value, saveable_object.SaveSpec) and value.slice_spec:
                raise UnsupportedError(f"checkpoint value {key!r} is a slice ({value.slice_spec!r}); use "
                                       "tf.train.Checkpoint for sliced variables")
            if var is not None:
                variables[key] = var
            else:
                values[key] = value
    return proto, values, variables, distribute.cluster_of(obj for obj in serialized if obj is not None)


def _read_values(values: dict, variables: dict) -> dict:
    """The snapshot: every value as a tensor, read on the caller's thread (variables batched)."""
    out = {}
    if variables:
        try:
            out.update(zip(variables, tfvars.SnapshotReader(list(variables.values()))()))
        except (tf.errors.OpError, ValueError):
            # An uninitialized variable fails the batched read; TF's own closures skip it.
            for key, var in variables.items():
                value = var._serialize_to_tensors()  # pylint: disable=protected-access
                values[key] = next(iter(value.values()))
    for key, value in values.items():
        if isinstance(value, saveable_object.SaveSpec):
            value = value.tensor  # runs TF's read closure; None for an uninitialized variable
        if value is None:
            continue  # as TF's saver: an uninitialized variable is not written
        out[key] = value
    return out


class _State:
    """gpusaver's per-Checkpoint state, one plain object (AutoTrackable would track containers)."""

    def __init__(self, options: Options):
        self.options = options
        self.stager = core.Stager(options)
        self.lock = threading.Lock()
        self.inflight: concurrent.futures.Future | None = None


def _use_tf(options) -> bool:
    """Whether ``tf.train.CheckpointOptions`` ask for something only TF's own path does."""
    return bool(options is not None and (getattr(options, "experimental_io_device", None)
                                         or getattr(options, "experimental_enable_async_checkpoint", False)))


class Checkpoint(tf.train.Checkpoint):
    """``tf.train.Checkpoint`` whose files are written and read by gpusaver.

    A drop-in for ``tf.train.Checkpoint(root=None, **kwargs)``: the same object graph, checkpoint
    keys (``model/layer/kernel/.ATTRIBUTES/VARIABLE_VALUE``), ``_CHECKPOINTABLE_OBJECT_GRAPH``
    tensor, ``save_counter``, ``prefix-N`` names and ``checkpoint`` state file, so each side reads
    the other's files. Add :meth:`save_async` (returns once a consistent snapshot is held) and
    :meth:`sync`.

    Args:
        root, **kwargs: the objects to checkpoint, as for ``tf.train.Checkpoint``.
        options: a :class:`gpusaver.Options` (staging budget, shards, snapshot mode). Any other
            value passed as ``options`` is a trackable to checkpoint under that name.

    Raises ValueError for kwargs that are not trackable (as TF does).
    """

    def __init__(self, root=None, *, options=None, **kwargs):
        if options is not None and not isinstance(options, Options):
            kwargs["options"] = options
            options = None
        super().__init__(root, **kwargs)
        self._gpusaver = _State(options or Options())

    # -- save ----------------------------------------------------------------------------------
    def save_async(self, file_prefix, options=None) -> concurrent.futures.Future:
        """Number and start a save like :meth:`save`; return a future once the snapshot is held.

        ``save_counter`` is incremented now and the path is ``f"{file_prefix}-{save_counter}"``;
        ``result()`` returns it and re-raises any error from the background. The ``checkpoint``
        state file is rewritten only once that checkpoint's files are complete, so
        ``tf.train.latest_checkpoint`` only ever names complete checkpoints. At most one save is in
        flight: a second call first waits for the previous one. Memory: see
        :meth:`gpusaver.Saver.save_async` (the snapshot holds the variables' current buffers).
        ``options`` (``tf.train.CheckpointOptions``): write callbacks are run, with the path,
        after the state file is written; an I/O device or TF's async option hand the save to
        ``tf.train.Checkpoint.save`` (a completed future is returned).
        """
        if _use_tf(options) or not tf.executing_eagerly():
            return _done_future(super().save(file_prefix, options))
        prefix = os.fspath(file_prefix)
        with self._gpusaver.lock:
            self._wait(raise_errors=False)
            number = int(self.save_counter.assign_add(1, read_value=True).numpy())
            return self._start(f"{prefix}-{number}", options, update_state=True)

    def save(self, file_prefix, options=None) -> str:
        """Save a numbered checkpoint and update the state file; return its path. See :meth:`save_async`."""
        return self.save_async(file_prefix, options).result()

    def write(self, file_prefix, options=None) -> str:
        """Write a checkpoint at exactly ``file_prefix`` (no numbering, no state file); return it."""
        return self._write(os.fspath(file_prefix), options)

    def write_async(self, file_prefix, options=None) -> concurrent.futures.Future:
        """:meth:`write` returning once the snapshot is held; ``result()`` gives the path."""
        if _use_tf(options) or not tf.executing_eagerly():
            return _done_future(super()._write(os.fspath(file_prefix), options))
        with self._gpusaver.lock:
            self._wait(raise_errors=False)
            return self._start(os.fspath(file_prefix), options, update_state=False)

    def _write(self, file_prefix, options=None):
        # tf.train.Checkpoint.write and tf.train.CheckpointManager call this.
        return self.write_async(file_prefix, options).result()

    @property
    def _gpusaver_options(self) -> Options:
        return self._gpusaver.options

    def _gpusaver_write(self, prefix: str, on_commit, options=None) -> concurrent.futures.Future:
        """:meth:`write_async` at exactly ``prefix`` with ``on_commit(prefix)`` run on the save thread
        once the files are in place, before ``options``' write callbacks (if it raises, the new
        files are rolled back). How :class:`gpusaver.CheckpointManager` commits its state file and
        retention. Options only TF handles: TF writes, with ``on_commit`` as its write callback."""
        prefix = os.fspath(prefix)
        if _use_tf(options) or not tf.executing_eagerly():
            options = copy.copy(options) if options is not None else tf.train.CheckpointOptions()
            options.experimental_write_callbacks = [on_commit, *(options.experimental_write_callbacks or [])]
            return _done_future(super()._write(prefix, options))
        with self._gpusaver.lock:
            self._wait(raise_errors=False)
            return self._start(prefix, options, update_state=False, on_commit=on_commit)

    def _start(self, prefix: str, options, update_state: bool, on_commit=None) -> concurrent.futures.Future:
        with gcpause.paused():  # the snapshot's per-variable objects: see gpusaver.gcpause
            proto, values, variables, cluster = _gather(self._saver)
            tensors = _read_values(values, variables)
            tensors[OBJECT_GRAPH_KEY] = np.asarray(proto.SerializeToString(), dtype=object)
            if any(placement.device_of(v).is_cuda for v in variables.values()):
                # As in gpusaver.Saver: wait for TF's device work once, then take the capsules here.
                tfvars.sync_devices()
                tensors = {k: v if isinstance(v, np.ndarray) else tfvars.export_gpu(v) for k, v in tensors.items()}
            callbacks = list(getattr(options, "experimental_write_callbacks", None) or [])
            state = self._gpusaver
            commit = functools.partial(_commit, update_state=update_state, callbacks=callbacks,
                                       on_commit=on_commit, fsync=state.options.fsync,
                                       store=storage.for_url(prefix, state.options))
            if cluster is not None:  # every worker writes a share, the chief commits; not in the background
                future = distribute.save_future(cluster, prefix, tensors, state.options, stager=state.stager,
                                                to_array=tfvars.as_array, on_commit=commit)
            else:
                future = core.save_async(prefix, tensors, state.options, stager=state.stager, on_done=commit,
                                         to_array=tfvars.as_array, copy_on_write=True)
            state.inflight = future
            return future

    def sync(self):
        """Wait for the save in flight (and TF's own async save, if one was asked for); re-raise
        the error it ended with, if any."""
        tf_sync = getattr(super(), "sync", None)  # TF's own async saves (TF >= 2.13)
        if tf_sync is not None:
            tf_sync()
        self._wait(raise_errors=True)

    def _wait(self, raise_errors: bool):
        future = self._gpusaver.inflight
        if future is None:
            return
        error = future.exception()
        if error is not None and raise_errors:
            raise error

    # -- restore -------------------------------------------------------------------------------
    def restore(self, save_path, options=None):
        """``tf.train.Checkpoint.restore`` (the save counter included), values read by :meth:`read`."""
        # TF creates the save counter after reading, so TF's own RestoreV2 would fill it from the
        # files on creation (and RestoreV2 cannot open s3:// URLs); made first, it is read with the rest.
        make_counter = getattr(self, "_maybe_create_save_counter", None)
        if make_counter is not None and tf.executing_eagerly():
            make_counter()
        return super().restore(save_path, options)

    def read(self, save_path, options=None):
        """Read a checkpoint written by :meth:`write` or :meth:`save` (here or by TF).

        Objects are matched by TF's own object-graph code (the same status object:
        ``assert_consumed()``, ``assert_existing_objects_matched()``, ``expect_partial()``; values
        for objects created later are restored when they are created); values are read and staged
        by gpusaver. Raises CheckpointNotFoundError, MissingKeysError, MismatchError (before any
        plain variable is assigned), CorruptCheckpointError. A checkpoint without an object graph
        (name-based) is read by ``tf.train.Checkpoint.read``.
        """
        self._wait(raise_errors=False)  # a save of this very path may be in flight
        if _use_tf(options) or not tf.executing_eagerly() or save_path is None:
            return super().read(save_path, options)
        save_path = os.fspath(save_path)
        reader = Reader(save_path, self._gpusaver.options)
        if OBJECT_GRAPH_KEY not in reader.bundle:
            reader.close()
            return super().read(save_path, options)
        return self._restore_object_graph(save_path, reader, options or tf.train.CheckpointOptions())

    def _restore_object_graph(self, save_path: str, reader: Reader, options):
        # Mirrors TrackableSaver.restore (TF 2.16-2.21) with gpusaver's reader and coordinator.
        saver = self._saver
        graph_view = saver._graph_view  # pylint: disable=protected-access
        proto = trackable_object_graph_pb2.TrackableObjectGraph()
        proto.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
        with tf.device("/cpu:0"):
            path_tensor = tf.constant(save_path)
        coordinator = RestoreCoordinator(
            reader, self._gpusaver.stager, object_graph_proto=proto, save_path=save_path,
            save_path_tensor=path_tensor, restore_op_cache=getattr(saver, "_restore_op_cache", {}),
            graph_view=graph_view, options=options, saveables_cache=getattr(saver, "_saveables_cache", None))
        restore_lib.CheckpointPosition(checkpoint=coordinator, proto_id=0).restore(graph_view.root, reader)
        # Attached dependencies (a root given with kwargs) hang off the root in the proto only.
        for ref in getattr(graph_view, "attached_dependencies", None) or []:
            if ref.name == "root":
                continue
            proto_id = next((c.node_id for c in proto.nodes[0].children if c.local_name == ref.name), None)
            if proto_id is None or proto_id in coordinator.object_by_proto_id:
                continue
            restore_lib.CheckpointPosition(checkpoint=coordinator, proto_id=proto_id).restore(ref.ref, reader)
        return call_tf(tf_checkpoint.CheckpointLoadStatus, checkpoint=coordinator, graph_view=graph_view,
                     feed_dict=None, options=options)


def _commit(prefix: str, update_state: bool, callbacks, on_commit=None, fsync: bool = False, store=None) -> str:
    """Runs on the save thread once the checkpoint's index exists: the state file (as
    ``tf.train.Checkpoint.save`` writes it: this checkpoint only, relative; on ``store``, the
    storage of the prefix) or a manager's commit, then callbacks. If one raises, the writer rolls
    the new files back."""
    if update_state:
        name = os.path.basename(prefix)
        write_state(os.path.dirname(prefix) or ".", CheckpointState(name, [name]), fsync=fsync, storage=store)
    if on_commit is not None:
        on_commit(prefix)
    for callback in callbacks:
        callback(prefix)
    return prefix


def _done_future(value) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(value)
    return future
