"""Framework-neutral save and load of arrays: the engine every adapter (TF, Keras) sits on.

Works with anything exposing ``__cuda_array_interface__``, ``__dlpack__`` or the buffer protocol
(numpy, CuPy, torch, TF tensors) and imports neither TensorFlow nor CuPy until a CUDA array is seen.
"""
import concurrent.futures
import functools
import threading
from typing import Any, Iterable, Mapping

from gpusaver import gcpause, storage
from gpusaver.errors import InvalidArgumentError, MissingKeysError
from gpusaver.format import paths
from gpusaver.format.reader import BundleReader
from gpusaver.options import Options
from gpusaver.staging import devices, load_pipeline, save_pipeline
from gpusaver.staging.devices import Device
from gpusaver.staging.feed import Feed
from gpusaver.staging.pool import HostSlabs
from gpusaver.staging.stager import Stager


_default_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _cached_stager(options: Options) -> Stager:
    return Stager(options)


def _default_stager(options: Options) -> Stager:
    with _default_lock:  # one Stager per Options, even when the first saves race
        return _cached_stager(options)


def save_async(file_prefix: str, arrays: Mapping[str, Any] | Feed, options: Options | None = None, *,
               stager: Stager | None = None, on_done=None, to_array=None,
               copy_on_write: bool = False) -> concurrent.futures.Future:
    """Start writing ``arrays`` (name → array) as a TF checkpoint at ``file_prefix``.

    Returns a future once the snapshot the mode promises is held (see :class:`Options`
    ``snapshot``: with the default ``"auto"``, arrays that may be mutated in place are copied to
    host memory before this returns, about the device-to-host time); ``result()`` gives
    ``on_done(file_prefix)`` if given, else the prefix, and re-raises any error from the
    background — a bad dtype (UnsupportedError) or name (ValueError) included.

    Device arrays are imported and ordered on this thread: the save reads them after every
    kernel this thread's current CuPy stream (or, through DLPack, torch's/JAX's current stream)
    had queued. ``copy_on_write``: the values are snapshots nobody mutates (TF variable reads),
    so ``"auto"`` may hold them instead of copying. ``to_array``: an adapter's conversion applied
    to each value on the save thread; such an adapter orders its device work itself (the TF
    adapter synchronises TF's devices first). ``arrays`` may be a :class:`Feed` that the caller
    fills while the save runs (an adapter's snapshot read in batches: the first are written while
    the next are read); its arrays are taken as they are, neither ordered nor copied here, so it
    is for adapters that order their device work themselves and whose values are snapshots
    (the ``"reference"`` mode only).

    Raises InvalidTypeError / InvalidArgumentError (at once) for a prefix that is None, empty, a
    directory or a checkpoint file's name; CheckpointIOError (from ``result()``) naming the file
    when writing fails, the previous checkpoint under that prefix left as it was.
    """
    file_prefix = paths.for_write(file_prefix, "save", options)
    options = options or Options()
    stager = stager or _default_stager(options)
    mode = options.snapshot_mode(copy_on_write)
    if isinstance(arrays, Feed):
        if mode != "reference":  # the other modes wait here for staging, which waits for the feed
            raise InvalidArgumentError(f"a Feed is saved in the 'reference' snapshot mode, not {mode!r}")
        values, ready = arrays, {}
    else:
        values = dict(arrays)  # the caller's mapping may change once we return
        ready = stager.hold(values) if to_array is None else {}
    convert = to_array or (lambda a: a)

    job = save_pipeline.SaveJob(file_prefix, lambda: stager.describe(values, convert, ready), options, mode,
                           lambda items: stager.buffers(items, mode, ready),
                           on_done, stager.index_cache).start()
    if mode == "copy" or (mode == "host" and not copy_on_write):
        job.snapshot_held.wait()
    return job.future


def save(file_prefix: str, arrays: Mapping[str, Any], options: Options | None = None) -> str:
    """Write ``arrays`` as a TF checkpoint at ``file_prefix`` and return the prefix.

    The caller is blocked until the files are complete, so the arrays are held, not copied
    (``"auto"`` resolves to ``"reference"``)."""
    return save_async(file_prefix, arrays, options, copy_on_write=True).result()


def load_iter(reader: BundleReader, requests: Iterable[tuple[str, Device]], stager: Stager):
    """Yield ``(name, array)`` for (name, device) requests, in file order; see
    :func:`gpusaver.staging.load_pipeline.load_iter`. Host arrays of up to 4 MiB share 32 MiB slabs
    (see :class:`HostSlabs`)."""
    slabs = HostSlabs()
    return load_pipeline.load_iter(reader, requests, stager.options, lambda batch: stager.fetch(reader, batch, slabs))


def load(file_prefix: str, keys: Iterable[str] | None = None, device="cpu",
         options: Options | None = None) -> dict[str, Any]:
    """Read tensors of a TF checkpoint (all, or ``keys``: names, or one name as a str) onto ``device``.

    ``file_prefix``: a checkpoint prefix, a directory (its latest checkpoint, per its state file)
    or one of the checkpoint's files (``.index``, ``.data-*``).
    ``device``: "cpu" (numpy arrays), "cuda:N" (CuPy arrays on GPU N), or a dict name → device.
    Raises CheckpointNotFoundError (listing the checkpoints that do exist nearby), MissingKeysError
    (listing every missing key), CorruptCheckpointError (naming tensor and file), ImportError
    naming the extra to install for a CUDA device without CuPy.
    """
    file_prefix = paths.for_read(file_prefix, "load", options)
    if isinstance(keys, (str, bytes)):  # one key, not its characters
        keys = [keys.decode() if isinstance(keys, bytes) else keys]
    options = options or Options()
    stager = _default_stager(options)
    with gcpause.paused(), BundleReader(file_prefix, storage.for_url(file_prefix, options)) as reader:
        names = reader.keys() if keys is None else list(keys)
        missing = [n for n in names if n not in reader] if keys is not None else []  # keys(): all there
        if missing:
            raise MissingKeysError(missing, file_prefix)
        if isinstance(device, Mapping):
            requests = [(n, devices.parse(device.get(n, "cpu"))) for n in names]
        else:
            target = devices.parse(device)
            requests = [(n, target) for n in names]
        values = dict(load_iter(reader, requests, stager))
        return {n: values[n] for n in names}
