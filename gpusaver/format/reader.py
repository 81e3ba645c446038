"""Checked bundle reader: looks entries up in a checkpoint's ``.index``, checks every size and offset
against the files before reading or allocating, verifies each tensor's CRC32C, and assembles
partitioned (sliced) variables. Bytes come from the storage layer (:mod:`gpusaver.storage`): local
files through ``preadv``, object stores through concurrent ranged reads.
"""
import os
import threading

import numpy as np

from gpusaver.errors import CheckpointNotFoundError, CorruptCheckpointError, MismatchError, UnsupportedError
from gpusaver.format import entries, naming, strings
from gpusaver.format.bundle import MAX_SHARDS, align_up, byte_view, num_elements
from gpusaver.format.dtypes import DataType, enum_to_dtype
from gpusaver.format.proto import Entry, Header
from gpusaver.format.table import TableFormatError, read_table
from gpusaver.format.wire import crc32c, crc32c_many, mask, mask_many
from gpusaver.storage import LocalStorage, ReadHandle, Storage, commit, for_url

_READ_PIECE = 1 << 20  # local reads go in pieces this size (cache-sized: each is checksummed while hot)


def _new_buffer(entry: Entry, allocate=None) -> np.ndarray:
    """The uint8 buffer a numeric tensor is read into: ``allocate(nbytes)`` if given."""
    return np.empty(entry.size, dtype=np.uint8) if allocate is None else allocate(entry.size)



def run_layout(sizes: list[int]) -> tuple[list[int], int, list[tuple[int, int]]]:
    """Where a run of tensors of these byte ``sizes``, back to back in a file, goes in one buffer:
    ``(starts, nbytes, pieces)``, each tensor at the next 64-byte boundary (ALIGN), the buffer
    ``nbytes`` long, and the ``[start, stop)`` pieces the file's bytes fill in order (one piece
    while every size is a multiple of 64, as most tensors' are)."""
    starts, pieces, pos = [], [], 0
    for n in sizes:
        if pieces and pieces[-1][1] == pos:
            pieces[-1] = (pieces[-1][0], pos + n)
        else:
            pieces.append((pos, pos + n))
        starts.append(pos)
        pos = align_up(pos + n)
    return starts, (starts[-1] + sizes[-1] if sizes else 0), pieces


def _label(name: str, extents) -> str:
    return name + "[" + ",".join(f"{e.start}:{'' if e.length is None else e.start + e.length}" for e in extents) + "]"



class BundleReader:
    """Reads a checkpoint written by TF or gpusaver. Raises CheckpointNotFoundError if the index is
    missing and CorruptCheckpointError if it is not a valid bundle index.

    ``storage``: where the files are (:mod:`gpusaver.storage`); default ``for_url(prefix)``."""

    def __init__(self, prefix: str, storage: Storage | None = None):
        self.prefix = os.fspath(prefix)
        self.index_path = naming.index_path(self.prefix)
        self.storage = storage if storage is not None else for_url(self.prefix)
        self._fds: dict[int, ReadHandle | Exception] = {}
        self._lock = threading.Lock()
        if not isinstance(self.storage, LocalStorage):
            # Object stores have no rename window to guard: an index appears only after its data.
            self._read_index()
            self._open_data()
            return
        # The index and every data file are opened together under the directory's shared lock, so
        # a save replacing this checkpoint cannot slip new data under the old index (see commit.py).
        for _ in range(3):
            with commit.directory_lock(self.prefix, exclusive=False):
                if not os.path.lexists(commit.journal_path(self.prefix)):
                    self._read_index()
                    self._open_data()
                    return
            with commit.directory_lock(self.prefix, exclusive=True):
                commit.recover(self.prefix)  # its writer died mid-commit (it would hold the lock)
        raise CorruptCheckpointError(f"{commit.journal_path(self.prefix)}: the checkpoint under "
                                     f"{self.prefix!r} keeps being left mid-commit")

    def _read_index(self):
        try:
            data = self.storage.read_bytes(self.index_path, "reading the checkpoint index")
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"checkpoint index {self.index_path!r} not found (prefix {self.prefix!r})") from None
        try:
            self._raw = read_table(data)
            header = Header.decode(self._raw[b""])
        except (TableFormatError, ValueError) as e:
            raise CorruptCheckpointError(f"{self.index_path}: corrupt checkpoint index: {e}") from None
        except KeyError:
            raise CorruptCheckpointError(f"{self.index_path}: index has no bundle header") from None
        if header.endianness != 0:
            raise UnsupportedError(f"{self.index_path}: big-endian checkpoints are not supported")
        if not 1 <= header.num_shards <= MAX_SHARDS:
            raise CorruptCheckpointError(f"{self.index_path}: header claims {header.num_shards} shards")
        self.header = header
        self.num_shards = header.num_shards
        # Every plain entry decoded and checked at once; the rest (None here: slices, strings,
        # anything odd) one by one on first use, by the full parser, which names what is wrong.
        self._entries: dict[bytes, Entry | None] = dict(zip(self._raw, entries.decode(list(self._raw.values()),
                                                                                     self.num_shards)))

    def _open_data(self):
        """Open every data file now; a missing or unreadable one is reported when first read from
        (listing a checkpoint needs only its index)."""
        for shard in range(self.num_shards):
            path = naming.data_path(self.prefix, shard, self.num_shards)
            try:
                self._fds[shard] = self.storage.open_read(path)
            except CheckpointNotFoundError as e:  # "'<path>' not found", "... is not a regular file"
                self._fds[shard] = CheckpointNotFoundError(f"checkpoint data file {e}")
            except OSError as e:  # CheckpointIOError naming the file
                self._fds[shard] = e

    # -- lookup ---------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, sorted as in the index (slice keys of partitioned variables excluded)."""
        return [k.decode("utf-8", "replace") for k in self._raw if k and not k.startswith(b"\0")]

    def raw_keys(self) -> list[bytes]:
        """Every entry's key in index order, the slice keys of partitioned tensors included."""
        return [k for k in self._raw if k]

    def entry_at(self, key: bytes) -> Entry:
        """The checked entry under a raw index key (see :meth:`raw_keys`)."""
        return self._entry(key, key.decode("utf-8", "replace"))

    def __contains__(self, name: str) -> bool:
        return name.encode("utf-8") in self._raw

    def entry(self, name: str) -> Entry:
        """The index entry of ``name``. Raises KeyError if absent, CorruptCheckpointError if garbled."""
        return self._entry(name.encode("utf-8"), name)

    def _entry(self, key: bytes, name: str) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._decode_entry(key, name)
        return entry

    def _decode_entry(self, key: bytes, name: str) -> Entry:
        try:
            raw = self._raw[key]
        except KeyError:
            raise KeyError(name) from None
        try:
            entry = Entry.decode(raw)
        except ValueError as e:
            raise CorruptCheckpointError(f"{self.index_path}: entry of tensor {name!r} is corrupt: {e}") from None
        if not 0 <= entry.shard_id < self.num_shards:
            raise CorruptCheckpointError(f"{self.index_path}: tensor {name!r} is in shard {entry.shard_id}, "
                                         f"but the checkpoint has {self.num_shards}")
        if entry.slices:
            return entry
        try:
            dtype = enum_to_dtype(entry.dtype)
        except UnsupportedError as e:
            raise UnsupportedError(f"tensor {name!r} in {self.index_path}: {e}") from None
        if dtype.kind == "O":
            ok = entry.size >= num_elements(entry.shape) + 4  # each length takes >= 1 varint byte
        else:
            ok = entry.size == num_elements(entry.shape) * dtype.itemsize
        if not ok:
            raise CorruptCheckpointError(f"{self.index_path}: tensor {name!r} has {entry.size} bytes, "
                                         f"which cannot hold shape {entry.shape} of {dtype}")
        return entry

    def dtype(self, name: str) -> np.dtype:
        return enum_to_dtype(self.entry(name).dtype)

    # -- data -----------------------------------------------------------------------------------
    def _data_fd(self, shard: int) -> ReadHandle:
        opened = self._fds.get(shard)
        if opened is None:
            raise CheckpointNotFoundError(f"checkpoint data file {self.data_file_of(shard)!r} was closed")
        if isinstance(opened, Exception):
            raise opened
        return opened

    def data_file_of(self, shard: int) -> str:
        return naming.data_path(self.prefix, shard, self.num_shards)

    def data_file(self, entry: Entry) -> str:
        return self.data_file_of(entry.shard_id)

    def _check_extent(self, name: str, entry: Entry) -> ReadHandle:
        handle = self._data_fd(entry.shard_id)
        size = handle.size
        if entry.offset + entry.size > size:
            raise CorruptCheckpointError(
                f"{self.data_file(entry)}: tensor {name!r} needs bytes [{entry.offset}, "
                f"{entry.offset + entry.size}) but the file has {size} (truncated?)")
        return handle

    def pread_into(self, entry: Entry, name: str, view: memoryview, offset: int):
        """Fill ``view`` from the tensor's bytes starting ``offset`` bytes into it (GIL released
        for local files)."""
        self._check_extent(name, entry).readinto(entry.offset + offset, [view], name)

    def _read_piece(self, shard: int) -> int:
        """Bytes per read of this shard's storage: cache-sized locally, larger for object stores
        (each request costs a round trip; the pieces of one read are fetched concurrently)."""
        opened = self._fds.get(shard)
        return max(_READ_PIECE, opened.read_size) if isinstance(opened, ReadHandle) else _READ_PIECE

    def crc_error(self, name: str, entry: Entry, found: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.data_file(entry)}: CRC32C mismatch in tensor {name!r} "
            f"(index says {entry.crc32c:#010x}, data gives {found:#010x})")

    def check_crc(self, name: str, entry: Entry, crc: int):
        """Raise CorruptCheckpointError naming tensor and file unless ``crc`` (the CRC32C of the
        tensor's bytes, unmasked) matches the index."""
        if mask(crc) != entry.crc32c:
            raise self.crc_error(name, entry, mask(crc))

    def read_into(self, name: str, out):
        """Fill ``out`` (a writable C-contiguous buffer of exactly the tensor's byte size) with the
        tensor, verifying its CRC32C. Raises MismatchError on a size mismatch and
        CorruptCheckpointError on a bad checksum."""
        self._read_into(name, self.entry(name), byte_view(out))

    def _read_into(self, name: str, entry: Entry, view: memoryview):
        if not self._plain(entry):
            value = self._read(name, entry)
            if value.dtype.kind == "O":
                raise MismatchError(f"tensor {name!r} holds strings; use read()")
            if len(view) != value.nbytes:
                raise MismatchError(f"tensor {name!r}: buffer holds {len(view)} bytes, checkpoint has {value.nbytes}")
            view[:] = byte_view(value)
            return
        if len(view) != entry.size:
            raise MismatchError(f"tensor {name!r}: buffer holds {len(view)} bytes, checkpoint has {entry.size}")
        # Checksummed piece by piece, while each piece is still in the CPU cache.
        crc, step = 0, self._read_piece(entry.shard_id)
        for start in range(0, entry.size, step):
            piece = view[start:start + step]
            self.pread_into(entry, name, piece, start)
            crc = crc32c(piece, crc)
        self.check_crc(name, entry, crc)

    def read(self, name: str, allocate=None) -> np.ndarray:
        """The tensor as a new numpy array (bytes objects for DT_STRING), CRC-checked; partitioned
        tensors are assembled from their slices.

        ``allocate(nbytes)``, if given, makes the uint8 buffer a numeric tensor is read into (e.g.
        aligned memory another framework can adopt); it is called only after the tensor's extent
        has been checked against the data file.
        """
        return self._read(name, self.entry(name), allocate)

    def read_many(self, names: list[str], allocate=None, entries: list[Entry] | None = None) -> list[np.ndarray]:
        """``[read(name) for name in names]``, but each run of plain tensors that lie back to back
        in one data file (up to a read piece: 1 MiB locally, more on object stores) is read with
        one scatter read into one buffer, ``allocate(nbytes)`` (default ``np.empty``), each tensor
        starting on a 64-byte boundary of it (:func:`run_layout`): models have thousands of small
        tensors, and a read and a buffer each were most of their cost. The run's tensors share
        its buffer. ``entries``: the names' entries, if the caller has them already.
        """
        if entries is None:
            entries = [self.entry(n) for n in names]
        out = []
        i = 0
        while i < len(names):
            first = entries[i]
            j, end, piece = i, first.offset, self._read_piece(first.shard_id)
            while (j < len(names) and self._plain(entries[j]) and entries[j].shard_id == first.shard_id
                   and entries[j].offset == end and end + entries[j].size - first.offset <= piece):
                end += entries[j].size
                j += 1
            if j - i < 2:  # a lone or large tensor, strings or slices: the ordinary read
                out.append(self._read(names[i], first, allocate))
                i += 1
            else:
                out += self._read_run(names[i:j], entries[i:j], allocate)
                i = j
        return out

    def _read_run(self, names: list[str], entries: list[Entry], allocate) -> list[np.ndarray]:
        handle = self._check_extent(names[-1], entries[-1])  # the run's end lies in the file
        sizes = [e.size for e in entries]
        starts, nbytes, pieces = run_layout(sizes)
        buf = np.empty(nbytes, dtype=np.uint8) if allocate is None else allocate(nbytes)
        view = memoryview(buf)
        handle.readinto(entries[0].offset, [view[a:b] for a, b in pieces], names[0])
        crcs = mask_many(crc32c_many([view[s:s + n] for s, n in zip(starts, sizes)]))
        for name, entry, crc in zip(names, entries, crcs):
            if crc != entry.crc32c:
                raise self.crc_error(name, entry, crc)
        return [np.ndarray(e.shape, enum_to_dtype(e.dtype), buf, s) for e, s in zip(entries, starts)]

    @staticmethod
    def _plain(entry: Entry) -> bool:
        return not entry.slices and entry.dtype != DataType.STRING

    def _read(self, name: str, entry: Entry, allocate=None) -> np.ndarray:
        if entry.slices:
            return self._read_sliced(name, entry)
        dtype = enum_to_dtype(entry.dtype)
        self._check_extent(name, entry)  # before allocating anything sized from the index
        if dtype.kind != "O":
            buf = _new_buffer(entry, allocate)
            self._read_into(name, entry, memoryview(buf))
            return buf.view(dtype).reshape(entry.shape)
        raw = bytearray(entry.size)
        self.pread_into(entry, name, memoryview(raw), 0)
        try:
            values, crc = strings.decode(raw, num_elements(entry.shape), name)
        except ValueError as e:
            raise CorruptCheckpointError(f"{self.data_file(entry)}: {e}") from None
        if crc != entry.crc32c:
            raise self.crc_error(name, entry, crc)
        return values.reshape(entry.shape)

    def check_slices(self, name: str, entry: Entry) -> list[tuple[tuple[slice, ...], str, Entry]]:
        """Check a partitioned entry against the index and the data files, allocating nothing:
        every slice lies inside the tensor, has its own entry of the right dtype and shape whose
        bytes lie in its data file, and together they cover the tensor exactly once (no gap, no
        overlap). Returns ``[(index into the full array, label, slice entry)]``; raises
        CorruptCheckpointError naming the index file and the tensor.
        """
        where = f"{self.index_path}: partitioned tensor {name!r} (shape {entry.shape})"
        try:
            dtype = enum_to_dtype(entry.dtype)
        except UnsupportedError as e:
            raise UnsupportedError(f"tensor {name!r} in {self.index_path}: {e}") from None
        total = num_elements(entry.shape)
        # numpy cannot even describe more than 2**63 bytes; a data file cannot hold them either.
        if total * max(dtype.itemsize, 1) >= 1 << 62:
            raise CorruptCheckpointError(f"{where} claims {total} elements, more than any file holds")
        boxes, out, covered = [], [], 0
        for extents in entry.slices:
            if len(extents) != len(entry.shape):
                raise CorruptCheckpointError(f"{where}: a slice has rank {len(extents)}, the tensor {len(entry.shape)}")
            box = []
            for e, dim in zip(extents, entry.shape):
                stop = dim if e.length is None else e.start + e.length
                if not 0 <= e.start <= stop <= dim:
                    raise CorruptCheckpointError(f"{where}: slice {_label(name, extents)} lies outside the tensor")
                box.append((e.start, stop))
            label = _label(name, extents)
            for other, other_label in boxes:
                if all(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(box, other)):
                    raise CorruptCheckpointError(f"{where}: slices {other_label} and {label} overlap")
            boxes.append((box, label))
            try:
                part = self._entry(naming.slice_key(name, extents), label)
            except KeyError:
                raise CorruptCheckpointError(f"{where}: slice {label} is missing") from None
            want = tuple(b - a for a, b in box)
            if part.slices or part.shape != want or part.dtype != entry.dtype:
                raise CorruptCheckpointError(
                    f"{where}: slice {label} is stored as {enum_to_dtype(part.dtype) if not part.slices else 'slices'} "
                    f"of shape {part.shape}, expected {dtype} of shape {want}")
            self._check_extent(label, part)
            covered += num_elements(want)
            out.append((tuple(slice(a, b) for a, b in box), label, part))
        if covered != total:  # no overlaps, so a shortfall is a gap
            raise CorruptCheckpointError(f"{where}: its slices cover {covered} of its {total} elements")
        return out

    def _read_sliced(self, name: str, entry: Entry) -> np.ndarray:
        parts = self.check_slices(name, entry)  # before the full-size allocation
        full = np.empty(entry.shape, dtype=enum_to_dtype(entry.dtype))
        for index, label, part in parts:
            full[index] = self._read(label, part)
        return full

    def close(self):
        with self._lock:
            for opened in self._fds.values():
                if isinstance(opened, ReadHandle):
                    opened.close()
            self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
