"""Multi-worker saves on ``tf.distribute.MultiWorkerMirroredStrategy``: every worker writes a share.

TF requires every worker to call ``save`` (its collectives need all of them). Rather than have
each worker write the whole model (TF's way: non-chief workers write full copies to temporary
directories that are then deleted), gpusaver splits the tensors across the workers by bytes:

1. Each worker writes its share as a bundle of its own, ``PREFIX.worker-I-of-N.tmp``, in parallel.
2. A barrier (an all-reduce of "my part is complete") tells every worker whether all parts are.
3. The chief merges them into one checkpoint at ``PREFIX`` (:mod:`gpusaver.format.merge`:
   the data files are renamed, or on an object store copied by the server and deleted, one
   ``.index`` is written last), then runs the commit callback (the ``checkpoint`` state file,
   retention).
4. A second barrier carries the chief's verdict, so every worker returns the same prefix or
   raises the same failure.

If any worker fails or dies, no checkpoint is committed and the previous one stays the latest;
the survivors raise :class:`~gpusaver.errors.CheckpointIOError` after at most
``Options.collective_timeout`` seconds instead of hanging; the parts written are removed. The
workers must share the checkpoint directory, as the chief moves the others' files: one machine, a
shared file system, or an object store URL (``s3://``, ``gs://``: every worker uploads its part
with ``Options.storage_options``, and the chief merges them by server-side copies, so no tensor
bytes travel twice).
"""
import concurrent.futures

import numpy as np
import tensorflow as tf

from gpusaver import core
from gpusaver.errors import CheckpointIOError
from gpusaver.format.merge import merge
from gpusaver.manager import remove_checkpoint
from gpusaver.storage import for_url


class Cluster:
    """This process's place in a multi-worker strategy: ``num_workers``, ``task_id``, ``is_chief``."""

    def __init__(self, strategy, num_workers: int, task_id: int, is_chief: bool):
        self.strategy = strategy
        self.num_workers = num_workers
        self.task_id = task_id
        self.is_chief = is_chief

    def barrier(self, flag: bool, timeout: float) -> int:
        """Sum ``flag`` over all workers (an all-reduce every worker must call); raises
        CheckpointIOError when a worker does not arrive within ``timeout`` seconds."""
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        try:
            mine = self.strategy.run(lambda: tf.constant(int(flag), tf.int32))
            total = self.strategy.extended.reduce_to(tf.distribute.ReduceOp.SUM, mine, destinations="/cpu:0",
                                                     options=options)
            return int(total)
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.CancelledError,
                tf.errors.InternalError, tf.errors.AbortedError) as e:
            raise CheckpointIOError(f"worker {self.task_id} of {self.num_workers}: the other workers did not "
                                    f"reach the checkpoint barrier within {timeout:g} s (a worker failed or "
                                    f"was stopped): {type(e).__name__}") from None


def cluster_of(variables) -> Cluster | None:
    """The multi-worker cluster the variables (or other trackables) were created in, or None."""
    # TF's graph walk wraps objects with legacy saveables (distributed variables among them) in a
    # converter that keeps the object as ``_obj``.
    strategies = (getattr(getattr(v, "_obj", v), "_distribute_strategy", None) for v in variables)
    strategy = next((s for s in strategies if s is not None), None)
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return None
    spec = resolver.cluster_spec().as_dict()
    tasks = len(spec.get("chief", [])) + len(spec.get("worker", []))
    if tasks <= 1:
        return None
    # The chief (task 0 of "chief", or worker 0 without one) commits; ids count the chief first.
    task_id = resolver.task_id + (1 if resolver.task_type == "worker" and "chief" in spec else 0)
    return Cluster(strategy, tasks, task_id, bool(strategy.extended.should_checkpoint))


def shares(sizes: dict[str, int], num_workers: int) -> list[list[str]]:
    """Split names across workers so each writes about the same number of bytes (largest first to
    the least loaded worker; deterministic, so every worker computes the same split)."""
    load = [0] * num_workers
    out: list[list[str]] = [[] for _ in range(num_workers)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        worker = min(range(num_workers), key=lambda w: (load[w], w))
        out[worker].append(name)
        load[worker] += sizes[name]
    return out


def part_prefix(prefix: str, task_id: int, num_workers: int) -> str:
    return f"{prefix}.worker-{task_id}-of-{num_workers}.tmp"


def save(cluster: Cluster, prefix: str, tensors: dict, options, *, stager, to_array, on_commit) -> str:
    """Save ``tensors`` ({name: tensor}, the same names on every worker) across ``cluster`` to ``prefix``.

    Every worker must call this with the same names. Returns ``on_commit(prefix)``'s result on
    the chief and ``prefix`` elsewhere; raises the worker's own error if its part failed, else
    CheckpointIOError when another worker's part, the merge or the commit failed.
    """
    sizes = {name: _nbytes(t) for name, t in tensors.items()}
    mine = shares(sizes, cluster.num_workers)[cluster.task_id]
    parts = [part_prefix(prefix, i, cluster.num_workers) for i in range(cluster.num_workers)]
    error = None
    try:
        core.save_async(parts[cluster.task_id], {name: tensors[name] for name in mine}, options,
                        stager=stager, to_array=to_array, copy_on_write=True).result()
    except Exception as e:  # noqa: BLE001 - every worker must still reach the barrier
        error = e
    try:
        return _commit(cluster, prefix, parts, error, options, on_commit)
    except BaseException:
        # Nothing committed: this worker's part goes; the chief also removes what a worker that
        # died after writing its part left (deletes are idempotent, so the two may overlap).
        for part in (parts if cluster.is_chief else [parts[cluster.task_id]]):
            _discard(part, options)
        raise


def save_future(cluster: Cluster, prefix: str, tensors: dict, options, **kwargs) -> concurrent.futures.Future:
    """:func:`save`, finished before it returns, as a future (the API of a background save). The
    barriers are collectives, which run on the caller's thread: a multi-worker save is synchronous."""
    future = concurrent.futures.Future()
    try:
        future.set_result(save(cluster, prefix, tensors, options, **kwargs))
    except Exception as e:  # noqa: BLE001 - delivered through the future, as a background save's
        future.set_exception(e)
    return future


def _commit(cluster: Cluster, prefix: str, parts: list[str], error, options, on_commit) -> str:
    """Barrier, the chief's merge and commit, barrier; raises unless the chief committed."""
    complete = cluster.barrier(error is None, options.collective_timeout)
    committed, commit_error = prefix, None
    if complete == cluster.num_workers and cluster.is_chief:
        try:
            merge(parts, prefix, fsync=options.fsync, storage=for_url(prefix, options))
            committed = on_commit(prefix) if on_commit else prefix
        except Exception as e:  # noqa: BLE001 - the other workers wait for this verdict
            commit_error = e
    verdict = cluster.barrier(cluster.is_chief and complete == cluster.num_workers and commit_error is None,
                              options.collective_timeout)
    if verdict == 1:
        return committed
    if error is not None:
        raise error
    if commit_error is not None:
        raise commit_error
    if complete != cluster.num_workers:
        raise CheckpointIOError(f"{prefix}: not saved: {cluster.num_workers - complete} of {cluster.num_workers} "
                                "workers could not write their part (see their errors)")
    raise CheckpointIOError(f"{prefix}: not saved: the chief could not commit the merged checkpoint "
                            "(see its error)")


def _nbytes(tensor) -> int:
    """About the bytes ``tensor`` will take, only to balance the split (every worker computes the
    same): from its static shape, with no TF op per tensor."""
    if isinstance(tensor, np.ndarray):  # e.g. the object graph of an object-based checkpoint
        return tensor.size * 16 if tensor.dtype == object else tensor.nbytes
    if getattr(tensor, "shape", None) is None:  # a GPU tensor already exported as a DLPack capsule
        return 1  # its size is not at hand here: such tensors are split by count
    count = tensor.shape.num_elements() or 0
    return count * 16 if tensor.dtype == tf.string else count * tensor.dtype.size


def _discard(part: str, options):
    """Remove this worker's part, if any of it is left (cleanup under another error: best effort)."""
    try:
        remove_checkpoint(part, for_url(part, options))
    except OSError:
        pass
