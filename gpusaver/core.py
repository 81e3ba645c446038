"""Framework-neutral save and load of arrays: the engine every adapter (TF, Keras) sits on.

Works with anything exposing ``__cuda_array_interface__``, ``__dlpack__`` or the buffer protocol
(numpy, CuPy, torch, TF tensors) and imports neither TensorFlow nor CuPy until a CUDA array is seen.
"""
import concurrent.futures
import functools
from typing import Any, Iterable, Mapping

from gpusaver.errors import MismatchError, MissingKeysError, UnsupportedError
from gpusaver.format.bundle import BundleReader
from gpusaver.format.dtypes import dtype_to_enum
from gpusaver.options import Options
from gpusaver.staging import devices, pipeline
from gpusaver.staging.devices import Device
from gpusaver.staging.host import HostEngine, as_host_array
from gpusaver.staging.io_types import SaveItem
from gpusaver.staging.pool import BufferPool, aligned_empty


class Stager:
    """The copy engines and staging buffers of one Saver (or of the module-level functions).

    The host pool is used in copy mode only; the CUDA engine (and its pinned pool, allocated once
    and reused because page-locking is slow) is created on the first CUDA array.
    """

    def __init__(self, options: Options):
        self.options = options
        self.host = HostEngine(BufferPool(options.buffer_budget, options.effective_chunk),
                               copy=options.snapshot == "copy")
        self._cuda = None

    def cuda(self):
        if self._cuda is None:
            from gpusaver.staging.cuda.engine import CudaEngine  # imports CuPy; only when a GPU array appears
            self._cuda = CudaEngine(self.options)
        return self._cuda

    def engine_for(self, item: SaveItem):
        return self.cuda() if item.device.is_cuda else self.host

    def item(self, name: str, array) -> SaveItem:
        """Describe one array to save. Raises ValueError / UnsupportedError naming the tensor."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        device = devices.of_array(array)
        if device.is_cuda:
            array = self.cuda().prepare(array)
        else:
            array = as_host_array(array)
        try:
            dtype_to_enum(array.dtype)
        except UnsupportedError as e:
            raise UnsupportedError(f"tensor {name!r}: {e}") from None
        return SaveItem(name, array, device, array.dtype, tuple(int(d) for d in array.shape))

    def fetch(self, reader: BundleReader, batch: list[tuple[str, Device]]) -> list:
        """Read each (name, device) of ``batch`` (CRC-checked) onto its device: numpy arrays on the
        host (64-byte aligned, so TF and CUDA uploads adopt them without a copy), CuPy on a GPU."""
        host = [name for name, device in batch if not device.is_cuda]
        values = iter(reader.read_many(host, allocate=aligned_empty))
        return [self._fetch_cuda(reader, name, device) if device.is_cuda else next(values)
                for name, device in batch]

    def _fetch_cuda(self, reader: BundleReader, name: str, device: Device):
        entry = reader.entry(name)
        if reader.dtype(name).kind == "O":
            raise MismatchError(f"tensor {name!r} holds strings, which cannot live on {device}")
        if entry.slices:
            return self.cuda().upload(reader.read(name, allocate=aligned_empty), device)
        return self.cuda().load(reader, name, entry, device)


@functools.lru_cache(maxsize=4)
def _default_stager(options: Options) -> Stager:
    return Stager(options)


def save_async(file_prefix: str, arrays: Mapping[str, Any], options: Options | None = None, *,
               stager: Stager | None = None, on_done=None, to_array=None) -> concurrent.futures.Future:
    """Start writing ``arrays`` (name → array) as a TF checkpoint at ``file_prefix``.

    Returns a future once a consistent snapshot is held (see :class:`Options` ``snapshot``);
    ``result()`` gives ``on_done(file_prefix)`` if given, else the prefix, and re-raises any error
    from the background — a bad dtype (UnsupportedError) or name (ValueError) included.
    ``to_array``: an adapter's conversion applied to each value on the save thread (the TF adapter
    turns tensors into zero-copy arrays there, keeping that work out of the caller's stall).
    """
    options = options or Options()
    stager = stager or _default_stager(options)
    values = dict(arrays)  # the caller's mapping may change once we return
    convert = to_array or (lambda a: a)

    def items():
        return [stager.item(name, convert(value)) for name, value in values.items()]

    job = pipeline.SaveJob(str(file_prefix), items, options, stager.engine_for, on_done).start()
    job.snapshot_held.wait()
    return job.future


def save(file_prefix: str, arrays: Mapping[str, Any], options: Options | None = None) -> str:
    """Write ``arrays`` as a TF checkpoint at ``file_prefix`` and return the prefix."""
    return save_async(file_prefix, arrays, options).result()


def load_iter(reader: BundleReader, requests: Iterable[tuple[str, Device]], stager: Stager):
    """Yield ``(name, array)`` for (name, device) requests, in file order; see :func:`pipeline.load_iter`."""
    return pipeline.load_iter(reader, requests, stager.options, lambda batch: stager.fetch(reader, batch))


def load(file_prefix: str, keys: Iterable[str] | None = None, device="cpu",
         options: Options | None = None) -> dict[str, Any]:
    """Read tensors of a TF checkpoint (all, or ``keys``) onto ``device``.

    ``device``: "cpu" (numpy arrays), "cuda:N" (CuPy arrays on GPU N), or a dict name → device.
    Raises CheckpointNotFoundError, MissingKeysError (listing every missing key),
    CorruptCheckpointError (naming tensor and file).
    """
    options = options or Options()
    stager = _default_stager(options)
    with BundleReader(file_prefix) as reader:
        names = reader.keys() if keys is None else list(keys)
        missing = [n for n in names if n not in reader]
        if missing:
            raise MissingKeysError(missing, str(file_prefix))
        if isinstance(device, Mapping):
            requests = [(n, devices.parse(device.get(n, "cpu"))) for n in names]
        else:
            target = devices.parse(device)
            requests = [(n, target) for n in names]
        values = dict(load_iter(reader, requests, stager))
        return {n: values[n] for n in names}
