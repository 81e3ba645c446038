"""All-or-nothing Saver.restore with the previous values kept in the groups' own calls
(gpusaver.tf.assign): failures inside a call, as a call returns, after some groups, in the
flush, for variables assigned one op each, and variables restored twice."""
import errno

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import gpusaver  # noqa: E402
from gpusaver.tf import assign  # noqa: E402
from gpusaver.tf.assign import GROUP, Assigner  # noqa: E402


def _small_variables(count: int, dtype=np.float32, name: str = "v") -> list:
    return [tf.Variable(np.full(3, i, dtype), name=f"{name}{i:04d}") for i in range(count)]


def _saved(tmp_path, variables):
    """Save the variables, then set every one to -1; returns (saver, prefix)."""
    saver = gpusaver.Saver(variables)
    prefix = saver.save(str(tmp_path / "m"))
    for v in variables:
        v.assign(tf.fill(v.shape, tf.cast(-1, v.dtype)))
    return saver, prefix


def _assert_untouched(variables):
    for v in variables:
        np.testing.assert_array_equal(v.numpy(), np.full(v.shape, -1, v.dtype.as_numpy_dtype))


def _assert_restored(variables):
    for i, v in enumerate(variables):
        np.testing.assert_array_equal(v.numpy(), np.full(v.shape, i, v.dtype.as_numpy_dtype))


def _seen_before_put_back(monkeypatch) -> list:
    """For each put_back: {id(variable): its value as put_back starts} for the variables the
    Assigner recorded as (maybe) assigned."""
    seen, real = [], Assigner.put_back

    def spy(self):
        seen.append({id(var): var.numpy()[0] for _, variables, _ in self._kept for var in variables})
        real(self)

    monkeypatch.setattr(Assigner, "put_back", spy)
    return seen


def _groups_called(monkeypatch) -> list:
    """The variables of each group a restore assigned by one traced call, in call order (not
    those putting values back)."""
    calls, real = [], Assigner._assign_group

    def spy(self, key, group):
        if self._keep:
            calls.append([var for var, _ in group])
        real(self, key, group)

    monkeypatch.setattr(Assigner, "_assign_group", spy)
    return calls


def test_host_groups_keep_previous_values_without_a_read_of_their_own(tmp_path, monkeypatch):
    variables = _small_variables(3 * GROUP)
    saver, prefix = _saved(tmp_path, variables)
    reads = []
    real_read = assign.tfvars.read_values
    monkeypatch.setattr(assign.tfvars, "read_values", lambda *a: reads.append(len(a[1])) or real_read(*a))
    monkeypatch.setattr(saver, "_read_all", lambda: pytest.fail("every variable was read"))
    saver.restore(prefix)
    _assert_restored(variables)
    assert reads == []  # the three groups' calls pushed the previous values themselves


def test_failure_midway_through_a_group_call_puts_back_what_it_assigned(tmp_path, monkeypatch):
    variables = _small_variables(3 * GROUP)
    saver, prefix = _saved(tmp_path, variables)

    def stack_overflowing_in_second_group(self, key):
        # TF's own failure inside the traced call: the 11th push of the second group overflows.
        stack = self._stacks.get(key)
        if stack is None:
            with tf.device(key[0]):
                stack = self._stacks[key] = tf.raw_ops.StackV2(max_size=GROUP + 10, elem_type=key[1],
                                                               stack_name="test")
        return stack

    monkeypatch.setattr(Assigner, "_stack", stack_overflowing_in_second_group)
    groups = _groups_called(monkeypatch)
    seen = _seen_before_put_back(monkeypatch)
    with pytest.raises(tf.errors.InvalidArgumentError, match="overflowed"):
        saver.restore(prefix)
    assert len(groups) == 2
    # Before put_back ran, the failed call had assigned none of the variables after the 10 it
    # pushed; of those 10, the executor's order decides how many (in about one process in six,
    # none: the order is fixed once TF has instantiated the function, so retrying in the process
    # does not change it). The first group's call had assigned all of its variables.
    index = {id(v): i for i, v in enumerate(variables)}
    changed = [i for i, v in enumerate(groups[1]) if seen[0][id(v)] != -1]
    assert all(i < 10 for i in changed)
    assert all(seen[0][id(v)] == index[id(v)] for v in groups[0])
    _assert_untouched(variables)
    monkeypatch.undo()
    saver.restore(prefix)
    _assert_restored(variables)


def test_keyboard_interrupt_as_a_group_call_returns_puts_its_group_back(tmp_path, monkeypatch):
    variables = _small_variables(3 * GROUP)
    saver, prefix = _saved(tmp_path, variables)
    real, calls = assign.execute.execute, []

    class Interrupting:
        """The second group's call runs to its end; the interrupt arrives before Python sees it return."""
        @staticmethod
        def execute(*args, **kwargs):
            out = real(*args, **kwargs)
            if len(kwargs["inputs"]) == 2 * GROUP + 1:  # a restore's call (stack, handles, values)
                calls.append(args[0])
                if len(calls) == 2:
                    raise KeyboardInterrupt
            return out

    monkeypatch.setattr(assign, "execute", Interrupting)
    seen = _seen_before_put_back(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        saver.restore(prefix)
    assert len(calls) == 2
    assert sum(value != -1 for value in seen[0].values()) == 2 * GROUP  # both calls had assigned
    _assert_untouched(variables)


def test_keyboard_interrupt_after_some_groups_changes_no_variable(tmp_path, monkeypatch):
    from gpusaver import core
    variables = _small_variables(4 * GROUP + 7)
    saver, prefix = _saved(tmp_path, variables)
    real_load_iter = core.load_iter

    def interrupted(*args, **kwargs):
        values = real_load_iter(*args, **kwargs)
        try:
            for i, item in enumerate(values):
                if i == 3 * GROUP + 5:
                    raise KeyboardInterrupt
                yield item
        finally:
            values.close()

    monkeypatch.setattr(core, "load_iter", interrupted)
    groups = _groups_called(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        saver.restore(prefix)
    assert len(groups) == 3
    _assert_untouched(variables)


def test_failure_in_the_flush_puts_back_groups_and_the_partial_group(tmp_path, monkeypatch):
    small = _small_variables(2 * GROUP + 22)
    large = [tf.Variable(np.full(100_000, i, np.float32), name=f"w{i}") for i in range(3)]  # one op each
    saver, prefix = _saved(tmp_path, small + large)
    real_each, assigned = assign._assign_each, []

    def failing_halfway(device, group):
        if assigned:  # putting back
            return real_each(device, group)
        real_each(device, group[:len(group) // 2])
        assigned.extend(var for var, _ in group[:len(group) // 2])
        raise OSError(errno.EIO, "injected failure in the flush")

    monkeypatch.setattr(assign, "_assign_each", failing_halfway)
    with pytest.raises(OSError, match="injected failure in the flush"):
        saver.restore(prefix)
    assert len(assigned) == 11
    _assert_untouched(small + large)


def test_variables_assigned_one_op_each_are_put_back_from_one_snapshot(tmp_path, monkeypatch):
    # As on a GPU or another task: no groups, the previous values read all at once.
    variables = _small_variables(150)
    saver, prefix = _saved(tmp_path, variables)
    monkeypatch.setattr(Assigner, "_groups_on", lambda self, device: False)
    snapshots, real_snapshot = [], saver._snapshot
    monkeypatch.setattr(saver, "_snapshot", lambda: snapshots.append(1) or real_snapshot())
    from gpusaver import core
    real_load_iter = core.load_iter

    def failing_late(*args, **kwargs):
        values = real_load_iter(*args, **kwargs)
        try:
            for i, item in enumerate(values):
                if i == 140:
                    raise OSError(errno.EIO, "injected I/O error")
                yield item
        finally:
            values.close()

    monkeypatch.setattr(core, "load_iter", failing_late)
    with pytest.raises(OSError, match="injected I/O error"):
        saver.restore(prefix)
    assert snapshots == [1]
    _assert_untouched(variables)
    monkeypatch.setattr(core, "load_iter", real_load_iter)
    saver.restore(prefix)
    _assert_restored(variables)


def test_a_variable_restored_under_two_names_gets_its_first_value_back(tmp_path, monkeypatch):
    from gpusaver.format import naming
    names = [f"v{i:04d}" for i in range(3 * GROUP)]
    # 8 KiB each: the last third lies in a later read batch than the first two thirds.
    prefix = gpusaver.Saver({n: tf.Variable(np.full(2048, i, np.float32)) for i, n in enumerate(names)}).save(
        str(tmp_path / "c"))
    mapping = {n: tf.Variable(np.full(2048, -1, np.float32)) for n in names}
    # Adjacent names share a group's call (there the second read sees the first assign); far ones do not.
    shared = mapping[names[1]]
    mapping.update({names[2]: shared, names[GROUP + 5]: shared})
    saver = gpusaver.Saver(mapping)
    with gpusaver.format.BundleReader(prefix) as r:
        assert max(r.keys(), key=lambda n: r.entry(n).offset) == names[-1]
    data = naming.data_path(prefix, 0, 1)
    raw = bytearray(open(data, "rb").read())
    raw[-1] ^= 0xFF  # the last tensor fails its CRC
    open(data, "wb").write(bytes(raw))
    groups = _groups_called(monkeypatch)
    with pytest.raises(gpusaver.errors.CorruptCheckpointError, match=names[-1]):
        saver.restore(prefix)
    assert len(groups) == 2  # both calls holding `shared` ran
    for v in mapping.values():
        np.testing.assert_array_equal(v.numpy(), np.full(2048, -1, np.float32))


def test_kept_values_are_let_go_after_success_and_after_failure(tmp_path, monkeypatch):
    ints, floats = _small_variables(2 * GROUP, np.int32, "i"), _small_variables(GROUP, np.float64, "f")
    saver, prefix = _saved(tmp_path, ints + floats)
    made, real_stack = [], Assigner._stack

    def spy(self, key):
        stack = real_stack(self, key)
        if all(stack is not s for s, _ in made):
            made.append((stack, key[1]))
        return stack

    def assert_all_destroyed():
        assert {dtype for _, dtype in made} == {tf.int32, tf.float64}
        for stack, dtype in made:
            with pytest.raises(tf.errors.NotFoundError):  # destroyed, with what it held
                tf.raw_ops.StackPopV2(handle=stack, elem_type=dtype)
        made.clear()

    monkeypatch.setattr(Assigner, "_stack", spy)
    saver.restore(prefix)
    _assert_restored(ints), _assert_restored(floats)
    assert_all_destroyed()

    for v in ints + floats:
        v.assign(tf.fill(v.shape, tf.cast(-1, v.dtype)))
    groups, real_group = [], Assigner._assign_group

    def interrupted_after_the_last(self, key, group):
        real_group(self, key, group)
        groups.append(key)
        if len(groups) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Assigner, "_assign_group", interrupted_after_the_last)
    with pytest.raises(KeyboardInterrupt):
        saver.restore(prefix)
    _assert_untouched(ints + floats)
    assert_all_destroyed()
