"""TensorFlow (and Keras 3) adapter: naming rules, variable ↔ array, device strings, assign.

The only module besides ``saver.py`` that imports TensorFlow.
"""
import ml_dtypes
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context, execute  # for the batched variable read

from gpusaver.errors import MismatchError
from gpusaver.format.dtypes import enum_to_dtype
from gpusaver.staging import devices
from gpusaver.staging.devices import Device


def require_eager(what: str):
    """Raise RuntimeError (as tf.contrib.eager.Saver did) when eager execution is off."""
    if not tf.executing_eagerly():
        raise RuntimeError(f"gpusaver.Saver.{what} requires eager execution to be enabled "
                           "(tf.compat.v1.enable_eager_execution, the TF2 default)")


def _tf_variable(var):
    """The tf.Variable behind a tf.Variable or a Keras 3 variable; TypeError for anything else."""
    if isinstance(var, tf.Variable):
        return var
    inner = getattr(var, "value", None)
    if hasattr(var, "path") and isinstance(inner, tf.Variable):
        return inner
    raise TypeError(f"expected a tf.Variable or Keras variable, got {type(var).__name__}: {var!r}")


def default_name(var) -> str:
    """Checkpoint name of a variable in a list: Keras 3 → its ``path``; TF → ``name`` up to the ':'."""
    if not isinstance(var, tf.Variable) and hasattr(var, "path"):
        return var.path
    return var.name.split(":")[0]


def name_variables(var_list) -> dict[str, tf.Variable]:
    """{checkpoint name: tf.Variable} from a list or a dict (keys verbatim), as TF's Saver names them.

    Raises MismatchError naming the name two different variables share, TypeError for non-variables.
    """
    pairs = var_list.items() if isinstance(var_list, dict) else ((default_name(v), v) for v in var_list)
    named: dict[str, tf.Variable] = {}
    for name, var in pairs:
        tf_var = _tf_variable(var)
        if name in named and named[name] is not tf_var:
            raise MismatchError(f"two different variables share the checkpoint name {name!r}")
        named[name] = tf_var
    if not named:
        raise ValueError("Saver needs at least one variable")
    return named


_READ_GROUP = 256


class SnapshotReader:
    """Reads the current value of every variable, consistent and uncopied, in few TF calls.

    Resource variables are copy-on-write: an assign or optimizer update allocates a new buffer while
    a tensor returned here is referenced, so holding these tensors is a snapshot. Variables are read
    per device with TF's batched ``_ReadVariablesOp`` (a few op calls: about 6 ms for 2000 variables,
    where 2000 eager ``read_value()`` calls take ~70–120 ms and a traced ``tf.function`` costs
    ~130 MiB of graph memory); where that internal op is unavailable, one ``ReadVariableOp`` each.
    """

    def __init__(self, variables: list[tf.Variable]):
        self._n = len(variables)
        by_device: dict[str, list[int]] = {}
        for i, v in enumerate(variables):
            by_device.setdefault(v.device, []).append(i)
        # At most _READ_GROUP variables per op call: TF builds a kernel per (N, dtypes) on first
        # use, in time that grows faster than N (1.1 s for one call over 10,000 variables, 0.04 s
        # in groups of 256; later calls are faster in groups too).
        self._groups = [(device, idx, [variables[i].handle for i in idx], [variables[i].dtype for i in idx])
                        for device, all_idx in by_device.items()
                        for idx in (all_idx[k:k + _READ_GROUP] for k in range(0, len(all_idx), _READ_GROUP))]
        self._batched = True

    def _read_group(self, device: str, handles, dtypes) -> list:
        if self._batched:
            try:
                with tf.device(device):
                    return execute.execute(b"_ReadVariablesOp", num_outputs=len(handles), inputs=handles,
                                           attrs=("N", len(handles), "dtypes", [d.as_datatype_enum for d in dtypes]),
                                           ctx=context.context())
            except Exception:  # op missing or not registered for this device in this TF build
                self._batched = False
        with tf.device(device):
            return [tf.raw_ops.ReadVariableOp(resource=h, dtype=d) for h, d in zip(handles, dtypes)]

    def __call__(self) -> list[tf.Tensor]:
        out = [None] * self._n
        for device, idx, handles, dtypes in self._groups:
            for i, value in zip(idx, self._read_group(device, handles, dtypes)):
                out[i] = value
        return out


def as_array(value: tf.Tensor):
    """A tensor as an array the core can stage, without copying it where TF allows.

    CPU tensors become zero-copy numpy views (DLPack; bfloat16 through a bitcast, since numpy's
    DLPack knows no bfloat16); GPU tensors stay TF tensors, which the core imports by DLPack.
    Strings are copied (TF stores them as C++ objects).
    """
    if devices.parse(value.device).is_cuda:
        return value
    if value.dtype == tf.string:
        return value.numpy()
    if value.dtype == tf.bfloat16:
        return np.from_dlpack(tf.bitcast(value, tf.uint16)).view(ml_dtypes.bfloat16)
    try:
        return np.from_dlpack(value)
    except (RuntimeError, TypeError, BufferError):
        return value.numpy()


def check_fits(name: str, var: tf.Variable, dtype_enum: int, shape: tuple[int, ...]):
    """Raise MismatchError naming the variable if a checkpoint tensor cannot be assigned to it."""
    want_dtype = np.dtype(object) if var.dtype == tf.string else np.dtype(var.dtype.as_numpy_dtype)
    found = enum_to_dtype(dtype_enum)
    if found != want_dtype:
        raise MismatchError(f"variable {name!r}: dtype in checkpoint is {found}, variable is {want_dtype}")
    want_shape = tuple(var.shape.as_list())
    if tuple(shape) != want_shape:
        raise MismatchError(f"variable {name!r}: shape in checkpoint is {tuple(shape)}, variable is {want_shape}")


def device_of(var: tf.Variable) -> Device:
    return devices.parse(var.device or "cpu")


def target_device(var: tf.Variable, device_map: dict | None) -> Device:
    """Where ``var``'s restored value is placed: ``device_map`` applied to its device (keys and values
    are any device spelling: "/GPU:0", "cuda:0", a full TF string), else the variable's own device."""
    own = device_of(var)
    for src, dst in (device_map or {}).items():
        s = devices.parse(src)
        if (s.kind, s.index) == (own.kind, own.index):
            return devices.parse(dst)
    return own


def _host_tensor(value: np.ndarray, dtype: tf.DType) -> tf.Tensor:
    """A TF tensor over a restored host array, zero-copy through DLPack where TF allows.

    The arrays come from the reader, 64-byte aligned and never reused, so TF may adopt the buffer
    (``convert_to_tensor`` would copy it: one more pass over every restored byte).
    """
    if value.dtype.kind == "O":
        return tf.convert_to_tensor(value, dtype=dtype)
    if value.dtype == ml_dtypes.bfloat16:  # numpy's DLPack has no bfloat16: go through uint16
        return tf.bitcast(_host_tensor(value.view(np.uint16), tf.uint16), tf.bfloat16)
    try:
        return tf.experimental.dlpack.from_dlpack(value.__dlpack__())
    except Exception:  # e.g. a dtype TF's DLPack import refuses
        return tf.convert_to_tensor(value, dtype=dtype)


def assign(var: tf.Variable, value):
    """Assign a restored array (numpy, or CuPy already on its target GPU) to ``var``.

    The value's dtype and shape were checked against the variable (:func:`check_fits`), so the raw
    op is used: ``Variable.assign``'s Python layers cost ~200 µs a call, most of a small tensor's
    restore. If the value is on another device than the variable, the op copies it across.
    """
    if hasattr(value, "__cuda_array_interface__"):
        tensor = tf.experimental.dlpack.from_dlpack(value.toDlpack())
    else:
        tensor = _host_tensor(value, var.dtype)
    tf.raw_ops.AssignVariableOp(resource=var.handle, value=tensor)
