"""Streaming bundle writer: a checkpoint prefix's ``.data`` shards plus its ``.index``.

Each tensor is declared (name, dtype, shape), then its bytes appended in any number of chunks
from any buffer; the CRC32C is extended per chunk, so no tensor is ever joined into one ``bytes``.
Bytes go to the storage layer (:mod:`gpusaver.storage`) as temporary objects and are committed
under their final names at :meth:`BundleWriter.finish`, data first and the index last. On local
disks that is a rename under the directory lock and commit journal of :mod:`gpusaver.storage.commit`,
so a failed or interrupted save leaves the previous checkpoint as it was; on object stores the
data objects' uploads are completed first and the index's last.
"""
import functools
import itertools
import os
import threading

import numpy as np

from gpusaver.errors import MismatchError, io_error
from gpusaver.format import naming, strings
from gpusaver.format.columns import IndexCache, IndexColumns
from gpusaver.format.bundle import MAX_SHARDS, byte_view, num_elements
from gpusaver.format.dtypes import DataType, dtype_to_enum, enum_to_dtype
from gpusaver.format.proto import Entry, Header
from gpusaver.format.wire import crc32c, crc32c_combine, mask, mask_many
from gpusaver.storage import LocalStorage, Storage, commit, for_url


@functools.lru_cache(maxsize=None)
def _itemsize(dtype: int) -> int:
    """Bytes per element of a numeric DataType (cached: an Enum lookup costs more than the rest)."""
    if dtype == DataType.STRING:
        raise ValueError("string tensors go through add_strings()")
    return enum_to_dtype(dtype).itemsize


@functools.lru_cache(maxsize=4096)
def _nbytes(dtype: int, shape: tuple) -> int:
    """Bytes of a numeric tensor (cached: a model's tensors share a few dtypes and shapes)."""
    return num_elements(shape) * _itemsize(dtype)


class ShardWriter:
    """Appends tensors to one data file. One thread at a time; several shards may run in parallel."""

    def __init__(self, bundle: "BundleWriter", shard_id: int):
        self._bundle = bundle
        self.shard_id = shard_id
        self.final_path = naming.data_path(bundle.prefix, shard_id, bundle.num_shards)
        self._stream = bundle.storage.open_write(self.final_path, bundle._fsync)
        self.offset = 0
        self._open = None  # (name, dtype, shape, start offset, expected bytes, running crc)

    def begin(self, name: str, dtype, shape):
        """Declare a numeric tensor; its ``prod(shape) * itemsize`` bytes follow through :meth:`write`.

        ``dtype`` is a DataType or numpy dtype. Raises MismatchError if ``name`` was already added.
        """
        if self._open is not None:
            raise RuntimeError(f"tensor {self._open[0]!r} is still open on shard {self.shard_id}")
        dtype = dtype if isinstance(dtype, DataType) else dtype_to_enum(dtype)
        if dtype == DataType.STRING:
            raise ValueError(f"tensor {name!r}: string tensors go through add_strings()")
        shape = tuple(int(d) for d in shape)
        self._bundle._reserve(name)
        self._open = [name, dtype, shape, self.offset, _nbytes(dtype, shape), 0]

    def write(self, buf, crc: int | None = None):
        """Append the next chunk of the open tensor (any C-contiguous buffer; nothing is joined).

        ``crc``: the chunk's own CRC32C if the caller computed it already (e.g. on another thread
        or on the GPU); it is combined into the tensor's CRC instead of re-reading the bytes.
        """
        view = byte_view(buf)
        state = self._open
        if self.offset + len(view) - state[3] > state[4]:
            raise MismatchError(f"tensor {state[0]!r}: more than the {state[4]} bytes its shape holds")
        state[5] = crc32c(view, state[5]) if crc is None else crc32c_combine(state[5], crc, len(view))
        self._put(view, state[0])
        self.offset += len(view)

    @property
    def temp_path(self) -> str | None:
        """The local temp file being written (None on object stores)."""
        return getattr(self._stream, "temp_path", None)

    def _put(self, data, name: str | None):
        self._stream.write(data, name)

    def end(self):
        """Close the open tensor and record its index entry. Raises MismatchError if bytes are missing."""
        name, dtype, shape, start, expected, crc = self._open
        self._open = None
        if self.offset - start != expected:
            raise MismatchError(f"tensor {name!r}: got {self.offset - start} bytes, shape {shape} "
                                f"of {DataType(dtype).name} needs {expected}")
        self._bundle._record(name, Entry(int(dtype), shape, self.shard_id, start, expected, mask(crc)))

    def add_views(self, names: list[str], dtypes: list, shapes: list[tuple], views: list, crcs: list[int]):
        """Append whole numeric tensors at once: ``views[i]`` (the complete bytes, a flat byte
        memoryview) with its CRC32C ``crcs[i]`` is tensor ``names[i]`` of ``dtypes[i]`` (DataType)
        and ``shapes[i]`` (a tuple of ints). The same checks and bytes as begin/write/end per
        tensor, done for the batch at once (a model's thousands of small tensors cost ~1 µs each
        here instead of ~15). Raises MismatchError for a name added twice or a view whose size
        does not fit its shape (nothing is written then).
        """
        if self._open is not None:
            raise RuntimeError(f"tensor {self._open[0]!r} is still open on shard {self.shard_id}")
        sizes = [len(view) for view in views]
        expected = list(map(_nbytes, dtypes, shapes))
        if sizes != expected:
            i = next(i for i, (got, want) in enumerate(zip(sizes, expected)) if got != want)
            raise MismatchError(f"tensor {names[i]!r}: got {sizes[i]} bytes, shape {shapes[i]} "
                                f"of {DataType(dtypes[i]).name} needs {expected[i]}")
        offsets = list(itertools.accumulate(sizes, initial=self.offset))
        self._bundle._reserve_many(names)
        self._stream.write_many(views, names)
        self.offset = offsets.pop()
        self._bundle._record_many(names, dtypes, shapes, self.shard_id, offsets, sizes, mask_many(crcs))

    def add_array(self, name: str, array):
        """Add a whole host array (numeric, or str/bytes/object for DT_STRING) in one call."""
        array = np.asarray(array)
        if array.dtype.kind in "OSU":
            self.add_strings(name, array.shape, strings.as_bytes_list(array, name))
            return
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        self.begin(name, array.dtype, array.shape)
        self.write(array if array.flags.c_contiguous else array.copy(order="C"))
        self.end()

    def add_strings(self, name: str, shape, items: list[bytes]):
        """Add a DT_STRING tensor from its row-major elements."""
        shape = tuple(int(d) for d in shape)
        if len(items) != num_elements(shape):
            raise MismatchError(f"tensor {name!r}: {len(items)} strings for shape {shape}")
        self._bundle._reserve(name)
        data, crc = strings.encode(items)
        self._put(data, name)
        self._bundle._record(name, Entry(int(DataType.STRING), shape, self.shard_id, self.offset,
                                         len(data), crc))
        self.offset += len(data)

    def _close(self):
        if self._open is not None:
            raise RuntimeError(f"tensor {self._open[0]!r} was begun but never ended")
        self._stream.close()  # every byte sent (and fsync'd if asked), still under the temp name


class BundleWriter:
    """Writes one checkpoint: ``prefix.index`` and ``prefix.data-0000i-of-0000n``.

    Use as a context manager, or call :meth:`finish` (success) or :meth:`abort` (failure). Tensors
    go through :meth:`shard` (one :class:`ShardWriter` per thread); with one shard the writer's own
    ``begin/write/end/add_array/add_strings`` forward to shard 0. ``fsync=True`` syncs files and the
    directory before each rename (durable across power loss, slower); TF does not.

    ``on_commit(prefix)``, if given, runs once the files are in place (e.g. to write the state
    file); its result is :attr:`committed`. If it raises, the save is rolled back: the files it
    replaced are put back, the ones it created removed (on object stores, which cannot put an
    object back, a new checkpoint is removed, index first; an overwritten one stays, complete).

    ``storage``: where the files go (:mod:`gpusaver.storage`); default ``for_url(prefix)``, the
    local file system for a plain path, fsspec for a URL such as ``s3://bucket/dir/model``.
    ``index_cache``: an :class:`IndexCache` that saves of the same tensors share (a Saver's).
    """

    def __init__(self, prefix: str, num_shards: int = 1, fsync: bool = False, on_commit=None,
                 storage: Storage | None = None, index_cache: IndexCache | None = None):
        if not 1 <= num_shards <= MAX_SHARDS:
            raise ValueError(f"num_shards must be in [1, {MAX_SHARDS}], got {num_shards}")
        self.prefix = os.fspath(prefix)
        self.num_shards = num_shards
        self._fsync = fsync
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self._index = IndexColumns()
        self._index_cache = index_cache
        self._on_commit = on_commit
        self.committed = None
        self.storage = storage if storage is not None else for_url(self.prefix)
        self._index_stream = None
        directory = os.path.dirname(self.prefix)
        if directory:
            self.storage.makedirs(directory)
        self._shards = []
        try:
            for i in range(num_shards):
                self._shards.append(ShardWriter(self, i))
        except BaseException:
            self.abort()
            raise

    def shard(self, i: int) -> ShardWriter:
        return self._shards[i]

    def __getattr__(self, attr):
        if attr in ("begin", "write", "end", "add_array", "add_strings"):
            return getattr(self._shards[0], attr)
        raise AttributeError(attr)

    def _reserve(self, name: str):
        with self._lock:
            if name in self._names:
                raise MismatchError(f"tensor name {name!r} added twice to checkpoint {self.prefix!r}")
            self._names.add(name)

    def _reserve_many(self, names: list[str]):
        with self._lock:
            if len(set(names)) != len(names) or not self._names.isdisjoint(names):
                seen = set(self._names)
                twice = next(n for n in names if n in seen or seen.add(n))
                raise MismatchError(f"tensor name {twice!r} added twice to checkpoint {self.prefix!r}")
            self._names.update(names)

    def _record_many(self, *columns):
        """Record a batch of entries (see :meth:`IndexColumns.extend`)."""
        with self._lock:
            self._index.extend(*columns)

    def _record(self, name: str, entry: Entry):
        with self._lock:
            self._index.add(name, entry)

    def finish(self):
        """Close the data files, write the index, then rename them into place: data first, the
        index last (a checkpoint exists once its index does), then run ``on_commit``.

        An old checkpoint under the same prefix is replaced file by file, never deleted first. The
        renames and ``on_commit`` happen under the directory lock and a commit journal
        (:mod:`gpusaver.storage.commit`): gpusaver's readers see the old checkpoint or the new one,
        never a mix; on any failure the replaced files are put back and the new ones removed; after
        a crash in that window the next gpusaver reader or writer of the prefix finishes or undoes
        the commit. Raises CheckpointIOError naming the file on any OS error (disk full, a
        directory in the way).
        """
        try:
            for s in self._shards:
                s._close()
            header = Header(num_shards=self.num_shards).encode()
            table = (self._index_cache.encode(self._index, header) if self._index_cache is not None
                     else self._index.encode(header))
            index = naming.index_path(self.prefix)
            self._index_stream = self.storage.open_write(index, self._fsync, "writing the checkpoint index")
            self._index_stream.write(table)
            self._index_stream.close()
            if isinstance(self.storage, LocalStorage):
                files = [(s.temp_path, s.final_path) for s in self._shards] + [(self._index_stream.temp_path, index)]
                with commit.directory_lock(self.prefix, exclusive=True):
                    commit.recover(self.prefix)  # a writer that died mid-commit before us
                    self.committed = self._replace(files)
            else:
                self.committed = self._commit_objects(index)
        except BaseException:
            self.abort()
            raise
        return self.committed

    def _commit_objects(self, index: str):
        """Commit on a store without rename (or journal): every data object is complete before the
        index appears (the index is what makes a checkpoint exist), and ``on_commit`` (the state
        object) runs after it.

        Overwriting a prefix that holds a checkpoint has a window no order can close: each object
        is replaced atomically, but not several at once, and TF's names are fixed, so the new data
        cannot be written elsewhere first. Data first, then the index (this order) means a reader
        in that window meets the old index over new data and raises CorruptCheckpointError (each
        entry's CRC32C, or its size), never returns wrong values; reading again after the save
        gives the new checkpoint. The other orders are worse: the index first gives the same
        window and, if the save then fails, a new index over old data for good; deleting the old
        index first leaves neither checkpoint in the window, and none if the save fails. A save
        that fails after some data objects were replaced leaves the old index over them (readers
        fail its CRC): object stores cannot put an object back. Save to a new prefix (a step
        number, as ``Saver`` and ``CheckpointManager`` do) to keep the previous checkpoint whole."""
        new = not self.storage.exists(index)
        for s in self._shards:
            s._stream.commit()
        self._index_stream.commit()
        try:
            return self._on_commit(self.prefix) if self._on_commit else self.prefix
        except BaseException:
            if new:  # withdraw the checkpoint this save created: index first, then its data
                for path in [index] + [s.final_path for s in self._shards]:
                    try:
                        self.storage.delete(path)
                    except OSError:
                        pass
            raise

    def _replace(self, files: list[tuple[str, str]]):
        journal = commit.Journal.begin(self.prefix, files, self._fsync)
        try:
            for src, dst in files:
                try:
                    os.replace(src, dst)
                except OSError as e:
                    raise io_error(e, dst, "renaming the checkpoint file into place") from e
            if self._fsync:
                self.storage.sync_dir(os.path.dirname(self.prefix) or ".")
            committed = self._on_commit(self.prefix) if self._on_commit else self.prefix
        except BaseException:
            try:
                journal.roll_back()
            except OSError:  # the journal stays: the next reader or writer of the prefix repairs it
                pass
            raise
        journal.finish()
        return committed

    def abort(self):
        """Remove the temporary files (abort the uploads); nothing under the final names is touched."""
        for s in self._shards:
            s._stream.discard()
        if self._index_stream is not None:
            self._index_stream.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        else:
            self.abort()

