"""The restore side of ``gpusaver.Checkpoint``: TF's restore coordinator with gpusaver's reader.

TF matches checkpoint keys to objects (``CheckpointPosition``, deferred restoration into objects
created later) and calls its coordinator's ``restore_saveables`` — the one place TF reads
checkpointed values. :class:`RestoreCoordinator` answers that call with gpusaver's reader
(:class:`Reader`, also what TF's ``CheckpointReader`` is asked), so values are read, CRC-checked
and staged by gpusaver and plain variables assigned straight from the staged arrays
(:func:`restore_values`, all or nothing for them).
"""
import inspect

import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint as tf_checkpoint
from tensorflow.python.ops import resource_variable_ops
from tensorflow.python.training.saving import saveable_object_util

from gpusaver import core, gcpause, storage
from gpusaver.errors import MissingKeysError
from gpusaver.format.reader import BundleReader
from gpusaver.options import Options
from gpusaver.staging.devices import CPU
from gpusaver.tf import placement
from gpusaver.tf import variables as tfvars
from gpusaver.tf.assign import Assigner

#: The checkpoint key suffix of a plain variable's value.
VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def call_tf(fn, **kwargs):
    """Call a TF internal with the keyword arguments its signature (in this TF version) accepts."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def plain_variable(obj, tensor_dict):
    """The resource variable behind ``obj`` when its only checkpoint value is that variable's value
    (tf.Variable, Keras 3 variable); else None (any other saveable keeps TF's own conversion)."""
    if len(tensor_dict) != 1 or not next(iter(tensor_dict)).endswith(VARIABLE_SUFFIX):
        return None
    try:
        var = tfvars.tf_variable(obj)
    except TypeError:
        return None
    return var if isinstance(var, resource_variable_ops.BaseResourceVariable) else None


class Reader:
    """What TF's restore coordinator asks of a ``CheckpointReader``, answered by gpusaver's reader."""

    def __init__(self, prefix: str, options: Options):
        self.prefix = prefix
        self.bundle = BundleReader(prefix, storage.for_url(prefix, options))

    def has_tensor(self, key: str) -> bool:
        return key in self.bundle

    def get_variable_to_dtype_map(self) -> dict:
        return {k: tf.as_dtype(self.bundle.entry(k).dtype) for k in self.bundle.keys()}

    def get_variable_to_shape_map(self) -> dict:
        return {k: list(self.bundle.entry(k).shape) for k in self.bundle.keys()}

    def get_tensor(self, key: str):
        if key not in self.bundle:
            raise MissingKeysError([key], self.prefix)
        value = self.bundle.read(key)
        return value[()] if value.ndim == 0 else value  # TF gives scalars as numpy scalars / bytes

    def close(self):
        self.bundle.close()


class RestoreCoordinator(tf_checkpoint._CheckpointRestoreCoordinator):  # pylint: disable=protected-access
    """TF's restore coordinator (object matching, deferred restoration, status bookkeeping) with the
    values read and staged by gpusaver instead of TF's ``RestoreV2``."""

    def __init__(self, gs_reader: Reader, stager, **kwargs):
        self._gs_reader = gs_reader
        self._gs_stager = stager
        call_tf(super().__init__, reader=gs_reader, **kwargs)

    def restore_saveables(self, tensor_saveables, python_positions, registered_savers=None, reader=None):
        for position in python_positions:
            key = position.object_proto.attributes[0].checkpoint_key
            position.trackable.deserialize(self._gs_reader.get_tensor(key))
        flat = saveable_object_util.validate_and_slice_inputs(tensor_saveables) if tensor_saveables else []
        sliced = [s for s in flat if any(spec.slice_spec for spec in s.specs)]
        if registered_savers or sliced:  # TF restores these itself, from the same files
            call_tf(super().restore_saveables, tensor_saveables=sliced, python_positions=[],
                    registered_savers=registered_savers, reader=None)
        with gcpause.paused():
            restore_values(self._gs_reader, self._gs_stager, [s for s in flat if s not in sliced])
        return []


def _simple_target(saveable):
    """The resource variable a saveable restores by plain assignment, or None."""
    if len(saveable.specs) != 1 or not saveable.specs[0].name.endswith(VARIABLE_SUFFIX):
        return None
    obj = getattr(saveable, "_trackable", None)
    return None if obj is None else plain_variable(obj, {saveable.specs[0].name: None})


def restore_values(reader: Reader, stager, saveables: list):
    """Read every saveable's values with gpusaver and hand them over: plain variables are assigned
    from the staged arrays, other saveables get tensors through their own ``restore``. Dtypes and
    shapes of plain variables are checked before anything is assigned."""
    if not saveables:
        return
    bundle = reader.bundle
    missing = [spec.name for s in saveables for spec in s.specs if spec.name not in bundle]
    if missing:
        raise MissingKeysError(missing, reader.prefix)
    plain, other = {}, []
    for s in saveables:
        var = _simple_target(s)
        if var is None:
            other.append(s)
        else:
            key = s.specs[0].name
            entry = bundle.entry(key)
            tfvars.check_fits(key, var, entry.dtype, entry.shape)
            plain[key] = var
    requests = [(key, stager.staging_device(placement.target_device(var, None), bundle.dtype(key)))
                for key, var in plain.items()]
    requests += [(spec.name, CPU) for s in other for spec in s.specs]
    # Small host values are assigned in groups, and each variable keeps its previous value until
    # everything is in: a failed read (a CRC mismatch in a late tensor, an I/O error) puts the plain
    # variables back (see gpusaver.tf.assign). Other saveables are restored last, once every value
    # was read; what their own restore changes is theirs.
    variables = list(plain.values())
    assigner = Assigner(keep_previous=True, snapshot=lambda: tfvars.SnapshotReader(variables).by_id())
    arrays = {}
    try:
        for key, value in core.load_iter(bundle, list(dict(requests).items()), stager):
            if key in plain:
                assigner.add(plain[key], value)
            else:
                arrays[key] = value
        assigner.flush()
        for s in other:
            tensors = [tf.convert_to_tensor(arrays[spec.name], dtype=spec.dtype) for spec in s.specs]
            s.restore(tensors, None)
    except BaseException:
        assigner.put_back()
        raise
    assigner.release()
