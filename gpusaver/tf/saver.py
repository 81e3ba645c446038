"""``gpusaver.Saver``: the contract of ``tf.contrib.eager.Saver`` over the staging core."""
import concurrent.futures
import functools
import os
import re
import threading
import time

from gpusaver import core, gcpause, storage
from gpusaver.errors import InvalidArgumentError, MissingKeysError, NotConsumedError, closest_names, without_numbering
from gpusaver.format import paths
from gpusaver.format.dtypes import enum_to_dtype
from gpusaver.format.naming import OBJECT_GRAPH_KEY
from gpusaver.format.reader import BundleReader
from gpusaver.log import log_done
from gpusaver.futures import SaveFuture, raise_unobserved
from gpusaver.manager import Retention, as_int, check_max_to_keep
from gpusaver.options import Options
from gpusaver.tf import distribute
from gpusaver.tf import placement
from gpusaver.tf import variables as tfvars
from gpusaver.tf.assign import Assigner
from gpusaver.staging.devices import Device

_SHOWN = 20  # names listed in a message


def _missing_fix(missing: list[str], keys: list[str], closest: dict) -> str:
    """What to do when the checkpoint (names ``keys``) lacks some of the Saver's names."""
    pair = next(((m, near[0]) for m, near in closest.items() if near), None)
    mapping = (f"gpusaver.Saver({{{pair[1]!r}: <the variable now named {pair[0]!r}>, ...}})" if pair
               else "gpusaver.Saver({'name in the checkpoint': variable, ...})")
    fix = f"pass var_list as a dict mapping the checkpoint's names to your variables, e.g. {mapping}"
    if OBJECT_GRAPH_KEY in keys or any(k.endswith("/.ATTRIBUTES/VARIABLE_VALUE") for k in keys):
        return (fix + "; this checkpoint is object-based (written by tf.train.Checkpoint or gpusaver.Checkpoint): "
                "restore it with gpusaver.Checkpoint(model=..., optimizer=...), which matches by object "
                "structure, not by name")
    plain = {without_numbering(k) for k in keys}
    if any(without_numbering(m) in plain for m in missing):
        return (fix + ". The names differ only in auto-numbering suffixes: Keras 3 names variables by "
                "path, and a second model built in one process is 'sequential_1/dense_2/...' where the "
                "first was 'sequential/dense/...'. For Keras models prefer gpusaver.Checkpoint(model=model), "
                "which matches by object structure, not by name")
    return fix + "; for object-based checkpoints use gpusaver.Checkpoint"


class RestoreStatus:
    """What :meth:`Saver.restore` did.

    Attributes: ``path`` (the checkpoint prefix read), ``restored`` (checkpoint names assigned,
    one per variable), ``unused_keys`` (checkpoint tensors that matched no variable, sorted; the
    object-graph metadata of object-based checkpoints is not counted).
    """

    def __init__(self, path: str, restored: list[str], unused_keys: list[str]):
        self.path = path
        self.restored = list(restored)
        self.unused_keys = sorted(unused_keys)

    def assert_consumed(self) -> "RestoreStatus":
        """Return self if every checkpoint tensor was restored into a variable; else raise
        NotConsumedError (an AssertionError) listing those that were not."""
        if self.unused_keys:
            shown = ", ".join(map(repr, self.unused_keys[:_SHOWN]))
            more = f" and {len(self.unused_keys) - _SHOWN} more" if len(self.unused_keys) > _SHOWN else ""
            raise NotConsumedError(
                f"{len(self.unused_keys)} tensor(s) in checkpoint {self.path!r} matched no variable and were "
                f"not restored: {shown}{more}. Add variables for them to var_list (a dict var_list maps "
                "checkpoint names to variables), or don't call assert_consumed() if a partial restore is "
                "intended", unused=self.unused_keys)
        return self

    def assert_existing_objects_matched(self) -> "RestoreStatus":
        """Return self: every variable of the Saver was restored (a restore that misses one raises)."""
        return self

    def expect_partial(self) -> "RestoreStatus":
        """Return self (for code written against TF's status objects)."""
        return self

    def __repr__(self):
        return (f"RestoreStatus(path={self.path!r}, restored={len(self.restored)}, "
                f"unused_keys={len(self.unused_keys)})")


class Saver:
    """Saves and restores TF variables in TensorFlow's V2 checkpoint format.

    Args:
        var_list: a list of variables (named as TF names them: ``name`` up to the ``:``; Keras 3
            variables by ``path``) or a dict {checkpoint name: variable}.
        max_to_keep: keep this many most recent checkpoints per directory, deleting older ones'
            files (default 5, as TF's Saver); None or 0 keep all (as TF's Saver). Retention is
            :class:`gpusaver.manager.Retention`, as for :class:`gpusaver.CheckpointManager`: on
            the first save into a directory the Saver picks up the checkpoints of the same name
            (``model`` or ``model-<N>`` for a save to ``dir/model``) that its state file lists, so
            a restarted process deletes them in turn; other files there are never touched.
            Old checkpoints are deleted only once the new one is durable (fsynced).
        options: :class:`gpusaver.Options` (staging budget, shards, snapshot mode, ...).

    Raises RuntimeError when eager execution is off, MismatchError when two variables share a name,
    InvalidTypeError naming any element of ``var_list`` that is not a variable,
    InvalidArgumentError for a negative ``max_to_keep``.

    Failed background saves are never dropped: if a :meth:`save_async` fails and nobody called
    its future's ``result()`` or ``exception()``, the Saver's next :meth:`save`,
    :meth:`save_async` or :meth:`wait` raises that error (once; the call after goes ahead).
    """

    def __init__(self, var_list, *, max_to_keep: int | None = 5, options: Options | None = None):
        tfvars.require_eager("__init__")
        self._vars = tfvars.name_variables(var_list)
        # {name: (variable, its device)}: a variable's device never changes, and its property costs
        # ~0.5 µs a call, twice per variable in a restore.
        self._placed = {name: (var, var.device) for name, var in self._vars.items()}
        self._read_all = tfvars.SnapshotReader(list(self._vars.values()))
        self._fits = tfvars.FitChecker(self._vars)
        self._on_gpu = any(placement.device_of(v).is_cuda for v in self._vars.values())
        self._cluster = distribute.cluster_of(self._vars.values())  # None unless multi-worker
        self._options = options or Options()
        # Host variables in one order can be read while the save runs (see _save_fed).
        self._can_feed = (not self._on_gpu and self._cluster is None and self._read_all.in_order
                          and self._options.snapshot_mode(copy_on_write=True) == "reference")
        self._stager = core.Stager(self._options)
        self._max_to_keep = check_max_to_keep(max_to_keep, allow_zero=True)
        self._ledgers: dict[str, Retention] = {}  # directory -> its retention, made on the first save there
        self._inflight: SaveFuture | None = None
        self._lock = threading.Lock()

    def _snapshot(self) -> dict:
        """{id(variable): its current value} for every variable (GPUs', other tasks': see restore)."""
        return self._read_all.by_id()

    @property
    def variables(self) -> dict:
        """{checkpoint name: tf.Variable}, a copy."""
        return dict(self._vars)

    def save_async(self, file_prefix: str, global_step=None) -> concurrent.futures.Future:
        """Start a save and return a future as soon as a consistent snapshot is held.

        ``result()`` returns the prefix written (``file_prefix-<step>`` when ``global_step`` is
        given) and re-raises any error from the background. At most one save per Saver is in flight:
        a second call first waits for the previous one to finish. The state file ``checkpoint`` is
        updated (and old checkpoints deleted, see ``max_to_keep``) only after the new checkpoint's
        files are complete. The interpreter does not exit while a save is in flight.

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
        return self._start(file_prefix, global_step, overlap_reads=False)

    def save(self, file_prefix: str, global_step=None) -> str:
        """Save and return the prefix written; see :meth:`save_async`. The caller waits for the
        files anyway, so host variables are read while the first ones are written."""
        return self._start(file_prefix, global_step, overlap_reads=True).result()

    def _start(self, file_prefix: str, global_step, overlap_reads: bool) -> SaveFuture:
        tfvars.require_eager("save")
        prefix = paths.for_write(file_prefix, "Saver.save", self._options)
        base = os.path.basename(prefix)
        if global_step is not None:
            prefix = f"{prefix}-{as_int(global_step, 'global_step')}"
        return self._gpusaver_write(prefix, functools.partial(self._commit, base=base), overlap_reads=overlap_reads)

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

    @property
    def _gpusaver_options(self) -> Options:
        return self._options

    def _gpusaver_write(self, prefix: str, on_commit, options=None, overlap_reads: bool = False) -> SaveFuture:
        """Snapshot the variables and write them at exactly ``prefix``; ``on_commit(prefix)`` runs
        on the save thread once the files are in place (a CheckpointManager's retention, or the
        Saver's own) and is the future's result. Used by :class:`gpusaver.CheckpointManager`.
        ``overlap_reads``: read the variables while the save writes the first ones where it can
        (:meth:`_save_fed`): a shorter save, a longer return (the reads share the CPU with it).
        Raises InvalidArgumentError for ``options`` (CheckpointOptions are for checkpoint objects)."""
        tfvars.require_eager("save")
        if options is not None:
            raise InvalidArgumentError("options (tf.train.CheckpointOptions) apply to checkpoint objects, not to "
                                       "gpusaver.Saver; pass gpusaver.Options to the Saver instead")
        with self._lock, gcpause.paused():
            raise_unobserved(self._inflight)
            # Holding the tensors is the snapshot; turning them into arrays happens in the background.
            if overlap_reads and self._can_feed:
                future = self._save_fed(prefix, on_commit)
            else:
                future = self._save_read(prefix, on_commit)
            future = SaveFuture.following(future)
            self._inflight = future
        return future

    def _save_read(self, prefix: str, on_commit) -> concurrent.futures.Future:
        """Read every variable, then start the save (GPU variables, several workers)."""
        tensors = dict(zip(self._vars, self._read_all()))
        if self._on_gpu:
            # GPU buffers go to CuPy through TF's stream-less DLPack export, which is only
            # ordered once TF's device work is done: wait for it once, here, then take the
            # capsules on this thread while the devices are idle (see export_gpu).
            tfvars.sync_devices()
            tensors = {name: tfvars.export_gpu(t) for name, t in tensors.items()}
        if self._cluster is not None:
            # Every worker writes a share and the chief commits; not in the background.
            return distribute.save_future(self._cluster, prefix, tensors, self._options, stager=self._stager,
                                          to_array=tfvars.as_array, on_commit=on_commit)
        return self._core_save(prefix, tensors, on_commit)

    def _save_fed(self, prefix: str, on_commit) -> concurrent.futures.Future:
        """Start the save, then read the variables group by group into it: the save thread writes
        the first groups while this thread reads the next (TF's read takes ~3.5 µs a variable:
        36 ms for 10,000, 0.1 s for 30,000, before the first write otherwise). Saves of 30,000
        variables of 8 KiB took 23% less time (10,000 of 105 KiB: 5%), but the reads took 30-60%
        longer, sharing the CPU with the save: so for :meth:`save`, whose caller waits anyway, not
        for :meth:`save_async`, whose caller waits only for the reads."""
        feed = core.Feed()
        future = self._core_save(prefix, feed, on_commit)
        names, start = list(self._vars), 0
        try:
            for values in self._read_all.groups():
                feed.put(names[start:start + len(values)], values)
                start += len(values)
        except BaseException as e:
            feed.abort(e)
            concurrent.futures.wait([future])  # the save's temporary files are gone before we raise
            raise
        feed.close()
        return future

    def _core_save(self, prefix: str, values, on_commit) -> concurrent.futures.Future:
        """The core's save of ``values`` (a dict of read tensors or arrays, or a Feed) at ``prefix``."""
        return core.save_async(prefix, values, self._options, stager=self._stager, on_done=on_commit,
                               to_array=tfvars.as_array, copy_on_write=True)

    def _commit(self, prefix: str, base: str) -> str:
        """Runs on the save thread once the files are in place: the directory's retention (state
        file, then deletions). Saves of one Saver commit one at a time, so the ledgers need no lock."""
        directory = os.path.dirname(prefix) or "."
        ledger = self._ledgers.get(directory)
        if ledger is None:
            same_name = re.compile(re.escape(base) + r"(-\d+)?")
            ledger = Retention(directory, self._max_to_keep, manages=lambda n: bool(same_name.fullmatch(n)),
                               fsync=self._options.fsync, options=self._options)
            self._ledgers[directory] = ledger
        return ledger.commit(prefix)

    def restore(self, file_prefix: str, device_map: dict | None = None):
        """Restore every variable from the checkpoint at ``file_prefix``.

        Each value is read (CRC-checked) and staged on its variable's device — uploaded straight
        into GPU memory through CuPy where the variable is on a GPU — or on ``device_map[that
        device]`` instead (e.g. ``{"/GPU:0": "/GPU:1"}``, or ``{"/GPU:0": "/CPU:0"}`` to stage on
        the host and let TF upload), then assigned; TF copies it across if the two differ. The
        checkpoint may hold more tensors than the Saver. ``file_prefix`` may also be a directory (its
        latest checkpoint) or one of the checkpoint's files.

        Returns a :class:`RestoreStatus`: what was restored and the checkpoint tensors no variable
        matched (``unused_keys``); its ``assert_consumed()`` raises NotConsumedError if there are any.

        All or nothing: if anything fails, every variable keeps the value it had before the call.
        Raises CheckpointNotFoundError (listing the checkpoints nearby), InvalidTypeError for None,
        MissingKeysError (listing all missing names, the closest names the checkpoint has, and
        the fix: a dict var_list, or gpusaver.Checkpoint for object-based checkpoints),
        MismatchError (dtype/shape, naming the variable and both values) before any variable is
        changed; CorruptCheckpointError (a bad CRC, naming tensor and file) or CheckpointIOError, after which the variables are put back.
        """
        tfvars.require_eager("restore")
        self.wait(raise_errors=False)
        started = time.perf_counter()
        prefix = paths.for_read(file_prefix, "Saver.restore", self._options)
        with gcpause.paused(), BundleReader(prefix, storage.for_url(prefix, self._options)) as reader:
            missing = [n for n in self._vars if n not in reader]
            if missing:
                # Only the names no variable took are candidates for the ones missing.
                untaken = [k for k in reader.keys() if k not in self._vars]
                missing.sort()
                closest = closest_names(missing[:MissingKeysError.SHOWN],
                                        [k for k in untaken if k != OBJECT_GRAPH_KEY], pair_from=missing)
                raise MissingKeysError(missing, prefix, fix=_missing_fix(missing, untaken, closest),
                                       closest=closest)
            entries = [reader.entry(name) for name in self._vars]
            self._fits.check(entries)
            # Placement is per device and dtype, not per variable: thousands of variables share a few.
            staging: dict[tuple[str, int], Device] = {}
            requests = []
            for (name, (var, device)), entry in zip(self._placed.items(), entries):
                where = staging.get((device, entry.dtype))
                if where is None:
                    target = placement.target_device(var, device_map)
                    where = staging[device, entry.dtype] = self._stager.staging_device(
                        target, enum_to_dtype(entry.dtype))
                requests.append((name, where))
            # Values arrive in file order and are assigned as they come (overlapping reads), small
            # host ones in groups. Each variable's previous value is kept from just before it is
            # assigned (copy-on-write reads, in the groups' own calls) and put back if anything
            # fails, so a failed restore changes nothing (see gpusaver.tf.assign).
            assigner = Assigner(keep_previous=True, snapshot=self._snapshot)
            try:
                for name, value in core.load_iter(reader, requests, self._stager):
                    var, device = self._placed[name]
                    assigner.add(var, value, device)
                assigner.flush()
            except BaseException:
                assigner.put_back()
                raise
            assigner.release()
            log_done("restore", prefix, sum(e.size for e in entries),
                     time.perf_counter() - started)
            unused = [k for k in reader.keys() if k not in self._vars and k != OBJECT_GRAPH_KEY]
        return RestoreStatus(prefix, list(self._vars), unused)
