"""Assigning restored values to many variables: small host values in groups, one TF call a group.

One eager ``AssignVariableOp`` costs ~16–25 µs on a CPU (2-core VM, TF 2.21), whatever the value's
size: for 30,000 small variables that was most of a restore. A traced function assigning
:data:`GROUP` values costs ~5–8 µs a variable (~12–14 µs while a restore holds the previous values,
which makes each assign allocate). Its arguments are the variables' handles and the values, so one trace per dtype
serves every group, every Saver and every Checkpoint of the process (~0.1 s once, the first time a
dtype is restored; :func:`group_function` is cached).

What goes through a group: values for variables in this process's host memory (the CPU of this
task), numpy arrays up to :data:`GROUP_MAX_BYTES` or TF tensors (the previous values a failed
restore puts back). Everything else — variables on GPUs, values on GPUs, large values, variables
of other tasks — is assigned one op at a time by :func:`gpusaver.tf.variables.assign`, as before.
"""
import functools

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context

from gpusaver.staging import devices
from gpusaver.tf import variables as tfvars

#: Values per traced call. Per variable: ~5.2 µs at 64, ~3.9 µs at 512; the trace and first call
#: grow with it (0.13 s at 64, 0.8 s at 512), so a small group is nearly as fast and cheap to build.
GROUP = 64
#: Larger values are assigned at once, one op each: a group holds its values until it is full, and
#: for large values the op's cost is nothing beside their bytes.
GROUP_MAX_BYTES = 256 << 10


@functools.lru_cache(maxsize=None)
def group_function(dtype: tf.DType):
    """The traced function ``f(handle_1, ..., handle_GROUP, value_1, ..., value_GROUP)`` assigning
    each value (of ``dtype``, any shape) to the variable behind its handle; or None where this TF's
    ConcreteFunction has no ``_call_flat`` (its public call checks each argument in Python, costing
    more than the eager ops it replaces)."""
    def assign_group(*args):
        for handle, value in zip(args[:GROUP], args[GROUP:]):
            tf.raw_ops.AssignVariableOp(resource=handle, value=value)

    specs = [tf.TensorSpec([], tf.resource)] * GROUP + [tf.TensorSpec(None, dtype)] * GROUP
    function = tf.function(assign_group, autograph=False).get_concrete_function(*specs)
    return function if callable(getattr(function, "_call_flat", None)) else None


class Assigner:
    """Assigns values to variables; :meth:`add` each, then :meth:`flush`.

    A value added may wait in its group (per device and dtype) until the group is full; every value
    added is assigned once :meth:`flush` returns. Values are assigned as they are, without checks:
    their dtypes and shapes were checked against the variables (:class:`~gpusaver.tf.variables.FitChecker`).
    Not thread-safe: one per restore.
    """

    def __init__(self):
        self._groups: dict[tuple[str, tf.DType], list] = {}  # (device, dtype) -> [(handle, tensor), ...]
        self._local_host: dict[str, bool] = {}  # device string -> whether it is this task's CPU
        self._host_space = context.context().host_address_space()  # "/job:localhost/replica:0/task:0"

    def add(self, var: tf.Variable, value):
        """Assign ``value`` (a restored array: numpy, or CuPy on its GPU; or a TF tensor) to ``var``,
        now or by the time :meth:`flush` returns."""
        device = var.device
        if not self._groups_on(device) or not _groupable(value):
            if isinstance(value, tf.Tensor):
                tfvars.assign_tensor(var, value)
            else:
                tfvars.assign(var, value)
            return
        dtype = var.dtype
        key = (device, dtype)
        group = self._groups.setdefault(key, [])
        group.append((var.handle, value if isinstance(value, tf.Tensor) else tfvars.host_tensor(value, dtype)))
        if len(group) == GROUP:
            del self._groups[key]
            _assign_group(device, dtype, group)

    def flush(self):
        """Assign the values still waiting in groups that are not full, one op each."""
        groups, self._groups = self._groups, {}
        for (device, _), group in groups.items():
            _assign_each(device, group)

    def _groups_on(self, device: str) -> bool:
        local = self._local_host.get(device)
        if local is None:
            # A variable of another task (a parameter server's) is left to the eager op, which
            # runs where the variable is; a group's function is only ever called on this host.
            parsed = devices.parse(device or "cpu")
            local = self._local_host[device] = (not parsed.is_cuda and
                                                (not device or device.startswith(self._host_space + "/")))
        return local


def _groupable(value) -> bool:
    """Whether a value for a host variable may wait in a group: numpy arrays up to
    GROUP_MAX_BYTES, and TF tensors (held by the caller anyway)."""
    if isinstance(value, np.ndarray):
        return value.nbytes <= GROUP_MAX_BYTES
    return isinstance(value, tf.Tensor)  # not tf.is_tensor: its protocol check costs ~30 µs a call


def _assign_group(device: str, dtype: tf.DType, group: list):
    """Assign a full group on ``device``: one call of the traced function, or one op each without it."""
    function = group_function(dtype)
    if function is None:
        _assign_each(device, group)
        return
    with tf.device(device):
        function._call_flat([h for h, _ in group] + [t for _, t in group], function.captured_inputs)


def _assign_each(device: str, group: list):
    """Assign a group's (handle, tensor) pairs on ``device``, one eager op each."""
    with tf.device(device):
        for handle, tensor in group:
            tf.raw_ops.AssignVariableOp(resource=handle, value=tensor)
