"""TensorFlow (and Keras 3) adapter: naming rules, variable ↔ array, assign.

The TensorFlow-facing half of ``gpusaver.tf``; ``saver.py`` and ``checkpoint.py`` build on it.

GPU tensors cross to CuPy and back through DLPack capsules, with two TF 2.21 rules in mind:
``EagerTensor.__dlpack__`` refuses a stream (so TF's device work is waited for before its capsules
are taken) and ``tf.experimental.dlpack.from_dlpack`` takes only legacy ``"dltensor"`` capsules.
And TF numbers a capsule's CUDA device by its own logical index (``/GPU:n``), not by CUDA ordinal:
capsules are renumbered in place where the two differ (:mod:`gpusaver.tf.placement`).
"""
import logging
from typing import Iterator

import ml_dtypes
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context, execute  # for the batched variable read
from tensorflow.python.framework import ops

from gpusaver.errors import InvalidTypeError, MismatchError
from gpusaver.format.dtypes import enum_to_dtype
from gpusaver.staging import devices
from gpusaver.staging.cuda import dlpack  # ctypes only: CuPy is imported when an array needs it
from gpusaver.tf import placement

logger = logging.getLogger("gpusaver")
_DLPACK_CUDA = 2


def require_eager(what: str):
    """Raise RuntimeError (as tf.contrib.eager.Saver did) when eager execution is off."""
    if not tf.executing_eagerly():
        raise RuntimeError(f"gpusaver.Saver.{what} requires eager execution to be enabled "
                           "(tf.compat.v1.enable_eager_execution, the TF2 default)")


def tf_variable(var, where: str = "var_list element"):
    """The tf.Variable behind a tf.Variable or a Keras 3 variable; InvalidTypeError for anything else."""
    if isinstance(var, tf.Variable):
        return var
    inner = getattr(var, "value", None)
    if hasattr(var, "path") and isinstance(inner, tf.Variable):
        return inner
    text = repr(var)
    text = text if len(text) <= 80 else text[:77] + "..."
    hint = (" (a tensor holds no state: wrap it in tf.Variable)" if tf.is_tensor(var) or isinstance(var, np.ndarray)
            else "")
    raise InvalidTypeError(f"{where}: expected a tf.Variable or Keras variable, got "
                           f"{type(var).__name__}: {text}{hint}")


def default_name(var) -> str:
    """Checkpoint name of a variable in a list: Keras 3 → its ``path``; TF → ``name`` up to the ':'."""
    if not isinstance(var, tf.Variable) and hasattr(var, "path"):
        return var.path
    return var.name.split(":")[0]


def name_variables(var_list) -> dict[str, tf.Variable]:
    """{checkpoint name: tf.Variable} from a list or a dict (keys verbatim), as TF's Saver names them.

    Raises MismatchError naming the name two different variables share, InvalidTypeError naming
    an element that is not a variable (``var_list[i]`` or ``var_list[key]``) and its type.
    """
    if isinstance(var_list, (str, bytes, tf.Variable)) or tf.is_tensor(var_list) or not hasattr(var_list, "__iter__"):
        raise InvalidTypeError(f"var_list must be a list of variables or a dict {{name: variable}}, got "
                               f"{type(var_list).__name__}: {var_list!r:.80}")
    if isinstance(var_list, dict):
        items = [(f"var_list[{k!r}]", k, v) for k, v in var_list.items()]
        for where, key, _ in items:
            if not isinstance(key, str):
                raise InvalidTypeError(f"{where}: checkpoint names must be str, got {type(key).__name__}")
    else:
        items = [(f"var_list[{i}]", None, v) for i, v in enumerate(var_list)]
    named: dict[str, tf.Variable] = {}
    for where, name, var in items:
        tf_var = tf_variable(var, where)
        if name is None:
            name = default_name(var)
        if name in named and named[name] is not tf_var:
            raise MismatchError(f"two different variables share the checkpoint name {name!r}")
        named[name] = tf_var
    if not named:
        raise ValueError("Saver needs at least one variable")
    return named


_READ_GROUP = 256
_unbatched: set[str] = set()  # devices for which this TF build has no _ReadVariablesOp


def read_values(device: str, handles: list, dtypes: list) -> list[tf.Tensor]:
    """The current values of the variables behind ``handles`` (of ``dtypes``), all on ``device``:
    copy-on-write reads, uncopied. One call of TF's batched ``_ReadVariablesOp``; where that
    internal op is unavailable (or the call fails: the single reads raise what is wrong), one
    ``ReadVariableOp`` each."""
    with tf.device(device):
        return _read_group(device, handles, _read_attrs(dtypes))


def _read_attrs(dtypes: list) -> tuple:
    """``_ReadVariablesOp``'s attributes for variables of ``dtypes``."""
    return ("N", len(dtypes), "dtypes", [tf.as_dtype(d).as_datatype_enum for d in dtypes])


def _read_group(device: str, handles: list, attrs: tuple) -> list[tf.Tensor]:
    """:func:`read_values` inside ``tf.device(device)``, with the attributes made once."""
    if device not in _unbatched:
        try:
            return execute.execute(b"_ReadVariablesOp", num_outputs=len(handles), inputs=handles, attrs=attrs,
                                   ctx=context.context())
        except tf.errors.NotFoundError as e:
            if "_ReadVariablesOp" in e.message:  # op or kernel not registered in this TF build
                _unbatched.add(device)  # (else e.g. a destroyed variable: the single reads name it)
        except Exception:  # e.g. an uninitialized variable: the single reads name it
            pass
    return [tf.raw_ops.ReadVariableOp(resource=h, dtype=d) for h, d in zip(handles, attrs[3])]


class SnapshotReader:
    """Reads the current value of every variable, consistent and uncopied, in few TF calls.

    Resource variables are copy-on-write: an assign or optimizer update allocates a new buffer while
    a tensor returned here is referenced, so holding these tensors is a snapshot. Variables are read
    per device in groups of ``_READ_GROUP``, one batched op call each (:func:`read_values`; about
    6 ms for 2000 variables, where 2000 eager ``read_value()`` calls take ~70–120 ms and a traced
    ``tf.function`` costs ~130 MiB of graph memory). What a call needs — handles, attributes —
    is made once, here: at 30,000 variables the attributes alone were 19 ms a snapshot, and what
    is left is TF's op, ~2.7 µs a variable (~1 µs of it making each output's tensor).
    """

    def __init__(self, variables: list[tf.Variable]):
        self._ids = [id(v) for v in variables]
        by_device: dict[str, list[int]] = {}
        for i, v in enumerate(variables):
            by_device.setdefault(v.device, []).append(i)
        # At most _READ_GROUP variables per op call: TF builds a kernel per (N, dtypes) on first
        # use, in time that grows faster than N (1.1 s for one call over 10,000 variables, 0.04 s
        # in groups of 256; later calls are faster in groups too).
        self._devices = [(device, [([variables[i].handle for i in idx], _read_attrs([variables[i].dtype for i in idx]))
                                   for idx in (all_idx[k:k + _READ_GROUP] for k in range(0, len(all_idx), _READ_GROUP))])
                         for device, all_idx in by_device.items()]
        # The values come device by device; where that is not the variables' order, this puts them back.
        read_order = [i for all_idx in by_device.values() for i in all_idx]
        self._order = None if read_order == sorted(read_order) else sorted(range(len(read_order)),
                                                                             key=read_order.__getitem__)

    @property
    def in_order(self) -> bool:
        """Whether :meth:`groups` reads the variables in the order they were given."""
        return self._order is None

    def groups(self) -> Iterator[list[tf.Tensor]]:
        """The variables' values, one group (up to ``_READ_GROUP``, one op call) at a time,
        device by device (the order given where :attr:`in_order`)."""
        for device, groups in self._devices:
            for handles, attrs in groups:
                with tf.device(device):  # not held across a yield: the caller's ops run outside it
                    values = _read_group(device, handles, attrs)
                yield values

    def __call__(self) -> list[tf.Tensor]:
        """The variables' values, in the order they were given."""
        out = [value for group in self.groups() for value in group]
        return out if self._order is None else [out[j] for j in self._order]

    def by_id(self) -> dict[int, tf.Tensor]:
        """{id(variable): its current value}: what a restore keeps for the variables it assigns
        one op each (see :class:`gpusaver.tf.assign.Assigner`)."""
        return dict(zip(self._ids, self()))


def sync_devices():
    """Block until the work TF has queued on its devices (GPUs included) is done.

    The GPU tensors of a snapshot are then complete, so their stream-less DLPack capsules
    (:func:`export_gpu`) may be read on any stream. ``tf.test.experimental.sync_devices``
    (TF >= 2.14) does this; without it, one host read per GPU waits for TF's compute streams.
    Raises RuntimeError outside eager execution (inside a ``tf.function``).
    """
    sync = getattr(getattr(tf.test, "experimental", None), "sync_devices", None)
    if sync is not None:
        sync()
        return
    context.async_wait()
    for device in tf.config.list_logical_devices("GPU"):
        with tf.device(device.name):
            # A device-to-host copy is ordered after everything queued on the device's compute stream.
            (tf.zeros([]) + 1.0).numpy()


def _dlpack_device(value) -> tuple[int, int]:
    """(DLPack device type, TF's logical index) of an eager tensor; TF 2.16's tensors have no
    ``__dlpack_device__``, their device string says the same."""
    get = getattr(value, "__dlpack_device__", None)
    if get is not None:
        return tuple(get())
    device = devices.parse(value.device)
    return (_DLPACK_CUDA if device.is_cuda else 1, device.index)


def _capsule(value):
    """A tensor's legacy DLPack capsule (TF 2.16's tensors have no ``__dlpack__``)."""
    export = getattr(value, "__dlpack__", None)
    return export() if export is not None else tf.experimental.dlpack.to_dlpack(value)


def export_gpu(value):
    """A snapshot tensor ready for the save thread: GPU tensors become their DLPack capsules
    (numbered by CUDA ordinal); anything else is returned as it is.

    Call on the caller's thread, after :func:`sync_devices`. TF's capsule export synchronises the
    tensor's device holding the GIL (``TFE_TensorHandleDevicePointer`` calls ``Device::Sync``), so
    on the save thread each export would wait for whatever training has queued since, and stall
    every Python thread meanwhile; here, right after the sync, each export finds the device idle
    (TF's call costs ~1.5 µs a tensor on the CPU, plus an idle device's sync on a GPU). Tensors
    whose GPU TF cannot number for CUDA (see :func:`gpusaver.tf.placement.logical_cuda_ordinals`) or whose dtype TF
    cannot export are copied to the host by TF.
    """
    if value.dtype == tf.string:  # strings live in host memory whatever the device says
        return value
    dev_type, tf_index = _dlpack_device(value)
    if dev_type != _DLPACK_CUDA:
        return value
    ordinal = placement.cuda_ordinal(tf_index)
    if ordinal is not None:
        try:
            capsule = _capsule(value)
        except tf.errors.OpError:  # a dtype this TF's DLPack export refuses
            pass
        else:
            if ordinal != tf_index:
                dlpack.device_field(capsule)[1] = ordinal
            return dlpack.CapsuleProducer(capsule, (_DLPACK_CUDA, ordinal))
    with tf.device("/CPU:0"):
        return tf.identity(value)


_DT_STRING = tf.string.as_datatype_enum
_EagerTensor = ops.EagerTensor


def as_array(value):
    """A snapshot value as an array the core can stage, without copying it where TF allows.

    CPU tensors become numpy views of their buffers: ``_numpy()``, what TF's ``numpy()`` returns
    before copying it and what ``__array__`` returns, shares the buffer (bfloat16 included) in
    ~1.5 µs a tensor, where a DLPack export took ~4.5 µs. GPU tensors exported by
    :func:`export_gpu` pass as they are (the core imports them into CuPy by DLPack). Strings are
    copied (TF stores them as C++ objects). This runs once per tensor of every save: a model's
    30,000 tensors cost ~2 µs each here.
    """
    if type(value) is _EagerTensor and value._datatype_enum() != _DT_STRING and value.device in _host_devices:
        return value._numpy()  # the common case, checked first: 2.2 µs a tensor here, 2.6 µs below
    if isinstance(value, (dlpack.CapsuleProducer, np.ndarray)):
        return value
    if value._datatype_enum() == _DT_STRING:  # the enum: 0.1 µs, where DType.__eq__ costs ~1 µs
        return np.asarray(value.numpy(), dtype=object)  # a scalar string's numpy() is bytes
    device = value.device
    if device not in _host_devices:
        if devices.parse(device).is_cuda:  # not exported: the core's DLPack import handles it
            return value
        _host_devices.add(device)
    return value._numpy()


_host_devices: set[str] = set()  # TF device names seen to be host memory


def check_fits(name: str, var: tf.Variable, dtype_enum: int, shape: tuple[int, ...]):
    """Raise MismatchError naming the variable if a checkpoint tensor cannot be assigned to it."""
    want_dtype = np.dtype(object) if var.dtype == tf.string else np.dtype(var.dtype.as_numpy_dtype)
    found = enum_to_dtype(dtype_enum)
    if found != want_dtype:
        raise MismatchError(f"variable {name!r}: dtype in checkpoint is {found}, variable is {want_dtype}")
    # A variable made with an unknown (or partly known) shape takes any shape that fits it, as
    # with TF's Saver.
    if not var.shape.is_compatible_with(tuple(shape)):
        want = tuple(var.shape.as_list()) if var.shape.rank is not None else var.shape
        raise MismatchError(f"variable {name!r}: shape in checkpoint is {tuple(shape)}, variable is {want}")


class FitChecker:
    """:func:`check_fits` for all of a Saver's variables at once.

    What each variable takes (its dtype's enum and, where fully known, its shape) is worked out once:
    a variable's dtype and declared shape never change. A checkpoint's entries are then compared as
    one list (a few ms for 30,000 variables, where 30,000 :func:`check_fits` calls take ~0.2 s); only
    the variables whose entry differs, or whose shape is not fully known, go through
    :func:`check_fits`, which accepts them or raises MismatchError naming them.
    """

    def __init__(self, named: dict[str, tf.Variable]):
        self._named = list(named.items())
        self._expected = [(v.dtype.as_datatype_enum, tuple(v.shape.as_list()) if v.shape.is_fully_defined() else None)
                          for v in named.values()]

    def check(self, entries: list):
        """Raise MismatchError unless each entry (in the order of the variables given) fits its variable."""
        found = [(e.dtype, tuple(e.shape)) for e in entries]
        if found == self._expected:
            return
        for (name, var), entry, got, expected in zip(self._named, entries, found, self._expected, strict=True):
            if got != expected:
                check_fits(name, var, entry.dtype, entry.shape)


def host_tensor(value: np.ndarray, dtype: tf.DType) -> tf.Tensor:
    """A TF tensor over a restored host array, zero-copy through DLPack where TF allows.

    The arrays come from the reader, 64-byte aligned and never reused, so TF may adopt the buffer
    (``convert_to_tensor`` would copy it: one more pass over every restored byte).
    """
    if value.dtype.kind == "O":
        return tf.convert_to_tensor(value, dtype=dtype)
    if value.dtype == ml_dtypes.bfloat16:  # numpy's DLPack has no bfloat16: go through uint16
        return tf.bitcast(host_tensor(value.view(np.uint16), tf.uint16), tf.bfloat16)
    try:
        return tf.experimental.dlpack.from_dlpack(value.__dlpack__())
    except Exception:  # e.g. a dtype TF's DLPack import refuses
        return tf.convert_to_tensor(value, dtype=dtype)


def assign_tensor(var: tf.Variable, tensor: tf.Tensor):
    """Assign a TF tensor (e.g. a value read before a failed restore) to ``var``, as it is."""
    tf.raw_ops.AssignVariableOp(resource=var.handle, value=tensor)


def assign(var: tf.Variable, value):
    """Assign a restored array (numpy, or a complete CuPy array on its target GPU) to ``var``.

    The value's dtype and shape were checked against the variable (:func:`check_fits`), so the raw
    op is used: ``Variable.assign``'s Python layers cost ~200 µs a call, most of a small tensor's
    restore. If the value is on another device than the variable, the op copies it across.
    """
    if hasattr(value, "__cuda_array_interface__"):
        # The core hands back complete arrays, so the stream-less legacy capsule (the only kind
        # TF takes) needs no ordering.
        capsule = dlpack.legacy_capsule(value)
        ordinal = devices.of_array(value).index
        tf_index = placement.tf_index(ordinal, placement.device_of(var))
        if tf_index != ordinal:  # TF reads the capsule's device_id as its own /GPU:n
            dlpack.device_field(capsule)[1] = tf_index
        tensor = tf.experimental.dlpack.from_dlpack(capsule)
    else:
        tensor = host_tensor(value, var.dtype)
    tf.raw_ops.AssignVariableOp(resource=var.handle, value=tensor)
