"""Assigning restored values to many variables: small host values in groups, one TF call a group.

One eager ``AssignVariableOp`` costs ~16–25 µs on a CPU (2-core VM, TF 2.21), whatever the value's
size: for 30,000 small variables that was most of a restore. A traced function assigning
:data:`GROUP` values costs a few µs a variable. Its arguments are the variables' handles and the
values, so one trace per dtype serves every group, every Saver and every Checkpoint of the process
(~0.1–0.2 s once, and ~0.06 s for its first call, the first time a dtype is restored;
:func:`group_function` is cached). It is called by name, as ``ConcreteFunction._call_flat`` would
call it, minus that method's Python layers (~60 µs a call: 306 → 198 µs for a group of 64), on TF's
single-threaded function executor (its ops are independent assigns of a few µs each, which the
default executor schedules one by one through the inter-op pool: 10,000 values of 8 KiB assign in
0.091 s instead of 0.107 s, minima of 21). Each value is an argument of its own, a DLPack import
of its array (~1.3 µs): passing instead one tensor per read region (the reader puts a run of
small tensors in one buffer) and slicing the values out inside the function cost more (the same
10,000 values, without keeping previous values: 0.068 s as arguments, 0.124 s sliced, 0.149 s
split).

What goes through a group: values for variables in this process's host memory (the CPU of this
task), numpy arrays up to :data:`GROUP_MAX_BYTES` or TF tensors (the previous values a failed
restore puts back). Everything else — variables on GPUs, values on GPUs, large values, variables
of other tasks — is assigned one op at a time by :func:`gpusaver.tf.variables.assign`, as before.

All or nothing (``Assigner(keep_previous=True)``, what ``Saver.restore`` uses) keeps each
variable's value from before it is assigned until :meth:`Assigner.put_back` or
:meth:`Assigner.release`. Variables are copy-on-write: a tensor read from one keeps the old buffer
while the assign writes a new one, so keeping is holding reads, never copying. The reads are made:

- for a group, in its own call: the traced function reads each variable and pushes the value onto
  a TF stack (a resource made for the restore, one per dtype) before assigning it, the pushes in
  order. Whatever stops the call — an op failing midway, a KeyboardInterrupt raised as the call
  returns — every variable it assigned has its previous value on the stack, where Python cannot
  lose it; :meth:`Assigner.put_back` pops the stacks empty and matches the values to the
  variables recorded before each call. Values returned by the call instead would be lost with
  its outputs, and a read in a call of its own passes every handle twice. Assigning 10,000
  float32 variables of 8 KiB (minima of 31, single-threaded executor) took 0.093 s keeping
  nothing, 0.096 s with the stack, 0.098 s returning the values, 0.110 s with one
  ``_ReadVariablesOp`` per group before its call, 0.116 s reading every variable before the
  first assign (what restores did before);
- for variables not in this host's memory (GPUs, other tasks), all of them at once in batched
  reads (``snapshot``), the first time one of them is assigned, as before: they are assigned one
  op each, and a read op each would cost as much again;
- otherwise (a large value, a group not full at :meth:`Assigner.flush`), in one batched read
  just before the assign.

Values still waiting in a group when a restore fails were never assigned and need nothing.
In a whole restore (``bench/restore_ab.py``) what remains of the cost is memory: with the previous
values held, every grouped assign allocates a new buffer instead of writing in place (234 MiB for
30,000 variables of 8 KiB), and large values stay held to the end: medians of 15 put many at
-2.6% and mix at -1.4%, medians of 5 between -14% and +15% (shared 2-core VM). A failed restore
pays instead: putting back pops one value per op (~0.5 s of the ~1.3 s it takes for 30,000).
"""
import functools
import itertools

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context, execute

from gpusaver.staging import devices
from gpusaver.tf import variables as tfvars

#: Values per traced call. Keeping the previous values, 10,000 values of 8 KiB assign in 0.096 s at
#: 64, 0.088 s at 128, 0.083 s at 256 (minima of 21), but the trace and first call grow with it
#: (0.11 + 0.06 s at 64, 0.21 + 0.10 s at 128, 0.38 + 0.19 s at 256, per dtype and process): a
#: larger group pays off only after hundreds of thousands of variables.
GROUP = 64
#: Larger values are assigned at once, one op each: a group holds its values until it is full, and
#: for large values the op's cost is nothing beside their bytes.
GROUP_MAX_BYTES = 256 << 10
#: The executor groups run on (see the module's docstring).
_EXECUTOR = "SINGLE_THREADED_EXECUTOR"


@functools.lru_cache(maxsize=None)
def group_function(dtype: tf.DType, keep: bool = False):
    """The traced function ``f(handle_1, ..., handle_GROUP, value_1, ..., value_GROUP)`` assigning
    each value (of ``dtype``, any shape) to the variable behind its handle; with ``keep``,
    ``f(stack, handles..., values...)`` first pushes each variable's value onto ``stack`` (pushes in
    handle order, each before its variable's assign). Called by its name (``Assigner._assign_group``);
    the cache keeps it, and so its registration with TF's context, alive."""
    def assign_group(*args):
        for handle, value in zip(args[:GROUP], args[GROUP:]):
            tf.raw_ops.AssignVariableOp(resource=handle, value=value)

    def keep_and_assign_group(stack, *args):
        pushed = []
        for handle, value in zip(args[:GROUP], args[GROUP:]):
            with tf.control_dependencies(pushed):  # the previous push: stack order is handle order
                pushed = [tf.raw_ops.StackPushV2(handle=stack,
                                                 elem=tf.raw_ops.ReadVariableOp(resource=handle, dtype=dtype))]
            with tf.control_dependencies(pushed):
                tf.raw_ops.AssignVariableOp(resource=handle, value=value)

    specs = [tf.TensorSpec([], tf.resource)] * GROUP + [tf.TensorSpec(None, dtype)] * GROUP
    if keep:
        return tf.function(keep_and_assign_group, autograph=False).get_concrete_function(
            tf.TensorSpec([], tf.resource), *specs)
    return tf.function(assign_group, autograph=False).get_concrete_function(*specs)


class Assigner:
    """Assigns values to variables; :meth:`add` each, then :meth:`flush`.

    A value added may wait in its group (per device and dtype) until the group is full; every value
    added is assigned once :meth:`flush` returns. Values are assigned as they are, without checks:
    their dtypes and shapes were checked against the variables (:class:`~gpusaver.tf.variables.FitChecker`).
    Not thread-safe: one per restore.

    With ``keep_previous``, every variable keeps its value from before this Assigner first assigned
    it (see the module's docstring) until :meth:`put_back` assigns them back or :meth:`release` lets
    them go; one of the two must follow. ``snapshot()`` returns ``{id(variable): current value}``
    for the variables of the restore: called once, for the first variable not in this host's memory.
    """

    def __init__(self, keep_previous: bool = False, snapshot=None):
        self._groups: dict[tuple[str, tf.DType], list] = {}  # (device, dtype) -> [(var, tensor), ...]
        self._local_host: dict[str, bool] = {}  # device string -> whether it is this task's CPU
        self._context = context.context()
        self._host_space = self._context.host_address_space()  # "/job:localhost/replica:0/task:0"
        # What ConcreteFunction._call_flat would pass TF for a group's call, executor included.
        self._call_attrs = ("executor_type", _EXECUTOR,
                            "config_proto", self._context.function_call_options.config_proto_serialized)
        self._keep = keep_previous
        self._snapshot, self._snapshot_values = snapshot, None
        self._stacks: dict[tuple[str, tf.DType], tf.Tensor] = {}  # (device, dtype) -> stack of previous values
        # What was kept, in order: (stack key, variables, None) for a group's call, whose values
        # are on that stack; (None, variables, their values) for values read here.
        self._kept: list[tuple] = []

    def add(self, var: tf.Variable, value, device: str | None = None):
        """Assign ``value`` (a restored array: numpy, or CuPy on its GPU; or a TF tensor) to ``var``,
        now or by the time :meth:`flush` returns. ``device``: ``var.device``, where the caller has
        it (the property costs ~0.5 µs, a tenth of a grouped assign)."""
        if device is None:
            device = var.device
        if not self._groups_on(device) or not _groupable(value):
            if self._keep:
                self._keep_lone(var, device)
            if isinstance(value, tf.Tensor):
                tfvars.assign_tensor(var, value)
            else:
                tfvars.assign(var, value)
            return
        dtype = var.dtype
        key = (device, dtype)
        group = self._groups.setdefault(key, [])
        group.append((var, value if isinstance(value, tf.Tensor) else tfvars.host_tensor(value, dtype)))
        if len(group) == GROUP:
            del self._groups[key]
            self._assign_group(key, group)

    def flush(self):
        """Assign the values still waiting in groups that are not full, one op each."""
        groups, self._groups = self._groups, {}
        for (device, _), group in groups.items():
            if self._keep:
                self._read_and_keep(device, [var for var, _ in group])
            _assign_each(device, group)

    def put_back(self):
        """Assign every variable this Assigner assigned (or may have: a failed call is counted) the
        value it had before the first time; then :meth:`release`. Values still waiting in groups
        are dropped: their variables were never assigned."""
        self._groups = {}
        popped = {key: iter(_pop_all(stack, *key)) for key, stack in self._stacks.items()}
        first = {}  # id(var) -> (var, its value before the first assign)
        for key, variables, values in self._kept:
            kept = values if key is None else itertools.islice(popped[key], len(variables))
            # A failed call's pushes stop short: the variables after them were not assigned.
            for var, value in zip(variables, kept):
                first.setdefault(id(var), (var, value))
        undo = Assigner()
        try:
            for var, value in first.values():
                undo.add(var, value)
            undo.flush()
        finally:
            self.release()

    def release(self):
        """Let the kept values go (the restore succeeded, or they were put back)."""
        stacks, self._stacks = self._stacks, {}
        self._kept, self._snapshot_values = [], None
        for stack in stacks.values():
            tf.raw_ops.DestroyResourceOp(resource=stack)

    def _assign_group(self, key: tuple[str, tf.DType], group: list):
        """Assign a full group: one call of the traced function, keeping the previous values on the
        dtype's stack."""
        device, dtype = key
        args = [var.handle for var, _ in group] + [tensor for _, tensor in group]
        if self._keep:
            args.insert(0, self._stack(key))
            self._kept.append((key, [var for var, _ in group], None))  # before the call: it may fail midway
        with tf.device(device):
            execute.execute(group_function(dtype, self._keep).name, num_outputs=0, inputs=args,
                            attrs=self._call_attrs, ctx=self._context)

    def _stack(self, key: tuple[str, tf.DType]) -> tf.Tensor:
        stack = self._stacks.get(key)
        if stack is None:
            with tf.device(key[0]):
                stack = self._stacks[key] = tf.raw_ops.StackV2(max_size=-1, elem_type=key[1],
                                                               stack_name="gpusaver_previous")
        return stack

    def _keep_lone(self, var: tf.Variable, device: str):
        """Keep the value of a variable about to be assigned alone: from the snapshot if it is not
        in this host's memory, else read now."""
        if self._snapshot is None or self._groups_on(device):
            self._read_and_keep(device, [var])
            return
        if self._snapshot_values is None:
            self._snapshot_values = self._snapshot()
        self._kept.append((None, [var], [self._snapshot_values[id(var)]]))

    def _read_and_keep(self, device: str, variables: list):
        """Read the variables' values (one batched call; all on ``device``, of one dtype) and keep them."""
        values = tfvars.read_values(device, [v.handle for v in variables], [v.dtype for v in variables])
        self._kept.append((None, variables, values))

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


def _pop_all(stack: tf.Tensor, device: str, dtype: tf.DType) -> list[tf.Tensor]:
    """Everything on a stack, in the order it was pushed."""
    values = []
    with tf.device(device):
        while True:
            try:
                values.append(tf.raw_ops.StackPopV2(handle=stack, elem_type=dtype))
            except tf.errors.InvalidArgumentError:  # "Stack[...] is empty"
                break
    values.reverse()
    return values


def _assign_each(device: str, group: list):
    """Assign a group's (variable, tensor) pairs on ``device``, one eager op each."""
    with tf.device(device):
        for var, tensor in group:
            tf.raw_ops.AssignVariableOp(resource=var.handle, value=tensor)
