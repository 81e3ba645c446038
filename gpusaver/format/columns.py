"""A bundle's ``.index`` built for all its entries at once, with numpy.

A model's index holds one entry per tensor. Built entry by entry in Python (protobuf fields,
varints, prefix-compressed keys, the block layout) it cost ~10 µs a tensor, more than everything
else a save does for a small tensor. Here each step is a few numpy operations over every entry:
each part of a record (a varint, a key's unshared suffix, a proto field) is a *ragged column* — a
padded byte matrix with a length (and a start) per row — and the records are the columns joined
row by row through one boolean mask (numpy selects a 2-D array's masked elements in row-major
order, so ``matrix[mask]`` is every row's chosen bytes, one row after another).

The bytes are exactly those of :class:`~gpusaver.format.table.TableBuilder` fed
:meth:`Entry.encode`'s values — the entry-by-entry reference, which the tests compare against
and which still builds the tables too wide to lay out as one matrix.
"""
import threading
from typing import NamedTuple

import numpy as np

from gpusaver.format import proto
from gpusaver.format.proto import Entry
from gpusaver.format.table import (BLOCK_SIZE, TableBuilder, finish_table, short_successor, shortest_separator,
                                   write_block)
from gpusaver.format.wire import crc32c, fixed32, mask

_RESTART_INTERVAL = 16  # TF's data blocks: a full key every 16 entries
_MAX_MATRIX = 256 << 20  # bytes of padded matrix above which the entry-by-entry builder is used
_U64 = np.uint64


class Ragged(NamedTuple):
    """Row ``i`` is ``data[i, starts[i]:starts[i] + lengths[i]]`` (``starts`` None: from 0)."""
    data: np.ndarray  # uint8 [rows, width]
    lengths: np.ndarray  # int64 [rows]
    starts: np.ndarray | None = None

    def select(self) -> np.ndarray:
        cols = np.arange(self.data.shape[1])
        if self.starts is None:
            return cols < self.lengths[:, None]
        start = self.starts[:, None]
        return (cols >= start) & (cols < start + self.lengths[:, None])


def from_bytes(rows: list[bytes]) -> Ragged:
    """A ragged column of arbitrary byte strings (numpy pads them with zeros; the lengths keep
    any trailing zero bytes of their own)."""
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    width = int(lengths.max(initial=0))
    data = np.array(rows, dtype=f"S{max(width, 1)}").view(np.uint8).reshape(len(rows), max(width, 1))
    return Ragged(data, lengths)


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of each unsigned value's varint (1 to 10)."""
    values = values.astype(_U64, copy=False)
    n = np.ones(len(values), np.int64)
    for k in range(1, 10):
        n += values >= _U64(1 << (7 * k))
    return n


def varints(values, tag: int | None = None, omit_zero: bool = False) -> Ragged:
    """Each value's varint, after ``tag`` (one byte) if given; with ``omit_zero``, zero values
    take no bytes at all (proto3 leaves default fields out)."""
    values = np.asarray(values).astype(_U64)
    nbytes = varint_lengths(values)
    width = int(nbytes.max(initial=1))
    lead = 0 if tag is None else 1
    data = np.empty((len(values), lead + width), np.uint8)
    if tag is not None:
        data[:, 0] = tag
    for k in range(width):
        data[:, lead + k] = (values >> _U64(7 * k)) & _U64(0x7F) | np.where(k < nbytes - 1, 0x80, 0).astype(_U64)
    lengths = nbytes + lead
    if omit_zero:
        lengths = np.where(values == 0, 0, lengths)
    return Ragged(data, lengths)


def join(columns: list[Ragged]) -> tuple[np.ndarray, np.ndarray]:
    """Every row's parts, concatenated: (the flat bytes of all rows, each row's length)."""
    data = np.concatenate([c.data for c in columns], axis=1)
    chosen = np.concatenate([c.select() for c in columns], axis=1)
    return data[chosen], sum(c.lengths for c in columns)


class IndexColumns:
    """A checkpoint's index entries as columns, appended one tensor or one batch at a time (the
    writer's small-tensor batches), encoded together by :meth:`encode`. Not thread-safe: the
    writer appends under its lock."""

    def __init__(self):
        self._names: list[str] = []
        self._dtypes: list[int] = []
        self._shapes: list[tuple] = []
        self._shards: list[int] = []
        self._offsets: list[int] = []
        self._sizes: list[int] = []
        self._crcs: list[int] = []  # masked, as stored
        self._sliced: dict[int, Entry] = {}  # rows of partitioned tensors, encoded one by one
        self.layout: _Layout | None = None  # set by encode() where the table can be refilled

    def add(self, name: str, entry: Entry):
        if entry.slices:
            self._sliced[len(self._names)] = entry
        self.extend([name], [int(entry.dtype)], [entry.shape], entry.shard_id, [entry.offset], [entry.size],
                    [entry.crc32c])

    def extend(self, names: list[str], dtypes: list[int], shapes: list[tuple], shard_id: int,
               offsets: list[int], sizes: list[int], masked_crcs: list[int]):
        self._names += names
        self._dtypes += dtypes
        self._shapes += shapes
        self._shards += [shard_id] * len(names)
        self._offsets += offsets
        self._sizes += sizes
        self._crcs += masked_crcs

    def encode(self, header: bytes, block_size: int = BLOCK_SIZE) -> bytes:
        """The ``.index`` table: ``header`` (BundleHeaderProto bytes) under the empty key, then
        every entry under its name (UTF-8) in byte order — the bytes TF writes for them.
        ValueError for a name given twice or an empty one."""
        keys = [name.encode("utf-8") for name in self._names]
        widest = max(map(len, keys), default=0) + max((len(e.encode()) for e in self._sliced.values()), default=0)
        if len(keys) * (widest + 64) > _MAX_MATRIX:  # names too long to lay out as one matrix
            return self._encode_slowly(header, keys, block_size)
        values = self._values(header)
        try:
            return self._table(keys, np.argsort(np.array(keys, dtype=bytes), kind="stable"), values, block_size)
        except ValueError:  # numpy's order of bytes ignores trailing NULs: Python's decides
            return self._table(keys, sorted(range(len(keys)), key=keys.__getitem__), values, block_size)

    def _encode_slowly(self, header: bytes, keys: list[bytes], block_size: int) -> bytes:
        table = TableBuilder(block_size)
        table.add(b"", header)
        for key, i in sorted(zip(keys, range(len(keys)))):
            entry = self._sliced.get(i) or Entry(self._dtypes[i], self._shapes[i], self._shards[i], self._offsets[i],
                                                 self._sizes[i], self._crcs[i])
            table.add(key, entry.encode())
        return table.finish()

    def _table(self, keys: list[bytes], order, values: Ragged, block_size: int) -> bytes:
        rows = np.concatenate([[0], np.asarray(order, np.int64) + 1]).astype(np.int64)
        layout = {}
        table = build_table([b""] + [keys[i] for i in order], Ragged(values.data[rows], values.lengths[rows]),
                            block_size, layout)
        if "ends" in layout and self._refillable():
            crc_at = np.empty(len(keys), np.int64)  # entry i's CRC field ends its record: its 4 bytes
            crc_at[np.asarray(order, np.int64)] = layout["ends"][1:] - 4
            self.layout = _Layout(table, crc_at, layout["blocks"])
        return table

    def _refillable(self) -> bool:
        """Whether a table of these entries can be refilled with new CRCs: no partitioned entries
        (encoded one by one) and no zero CRC (a proto3 default, left out of the entry's bytes)."""
        return not self._sliced and 0 not in self._crcs

    def same_but_crcs(self, other: "IndexColumns") -> bool:
        """Whether ``other`` holds the same entries, but for their CRCs, and is refillable."""
        return (self._names == other._names and self._offsets == other._offsets and self._sizes == other._sizes
                and self._shards == other._shards and self._dtypes == other._dtypes
                and self._shapes == other._shapes and other._refillable())

    def _values(self, header: bytes) -> Ragged:
        """Row 0 the header, row i + 1 entry i's encoding (:meth:`Entry.encode`)."""
        n = len(self._names) + 1
        special = {0: header} | {i + 1: e.encode() for i, e in self._sliced.items()}
        whole = from_bytes([special.get(i, b"") for i in range(n)]) if len(special) > 1 else _one_row(header, n)
        plain = np.ones(n, bool)
        plain[list(special)] = False

        def field(values, tag):
            column = varints(np.array([0] + values, _U64), tag, omit_zero=True)
            return column._replace(lengths=np.where(plain, column.lengths, 0))

        unique = list(dict.fromkeys(self._shapes))
        row_of = {shape: i for i, shape in enumerate(unique)}
        shapes = from_bytes([proto.shape_field(shape) for shape in unique] or [b""])
        # Row 0 (the header) takes any shape row: its length is masked out below.
        rows = np.concatenate([[0], np.fromiter(map(row_of.__getitem__, self._shapes), np.int64, n - 1)])
        shape = Ragged(shapes.data[rows], np.where(plain, shapes.lengths[rows], 0))
        crcs = np.array([0] + self._crcs, "<u4")
        tagged = np.concatenate([np.full((n, 1), proto.T_CRC, np.uint8), crcs.view(np.uint8).reshape(n, 4)], axis=1)
        crc = Ragged(tagged, np.where(plain & (crcs != 0), 5, 0))
        columns = [whole, field(self._dtypes, proto.T_DTYPE), shape, field(self._shards, proto.T_SHARD),
                   field(self._offsets, proto.T_OFFSET), field(self._sizes, proto.T_SIZE), crc]
        flat, lengths = join(columns)
        out = np.zeros((n, int(lengths.max())), np.uint8)
        out[np.arange(out.shape[1]) < lengths[:, None]] = flat
        return Ragged(out, lengths)


class _Layout(NamedTuple):
    """An encoded table and where it holds each entry's CRC (4 bytes) and its data blocks."""
    table: bytes
    crc_at: np.ndarray  # int64 [entries]: the offset of entry i's CRC, in the order added
    blocks: list[tuple[int, int]]  # (offset, size) of each data block's contents

    def refill(self, masked_crcs: list[int]) -> bytes:
        """The same table with these CRCs (masked, none zero), its blocks' checksums redone."""
        out = bytearray(self.table)
        view = np.frombuffer(out, np.uint8)
        view[self.crc_at[:, None] + np.arange(4)] = np.array(masked_crcs, "<u4").view(np.uint8).reshape(-1, 4)
        for offset, size in self.blocks:
            end = offset + size
            view[end + 1:end + 5] = np.frombuffer(fixed32(mask(crc32c(out[end:end + 1], crc32c(out[offset:end])))),
                                                  np.uint8)
        return bytes(out)


class IndexCache:
    """The last index encoded through it, to encode the next save's faster: a model saved again
    has the same entries (names, dtypes, shapes, places in the file) and new CRCs, so its table
    is the last one with each CRC put in place and the data blocks' checksums redone (30,000
    entries: ~4.5 ms, where encoding them takes ~45 ms). Anything else is encoded in full. One per
    Stager, so per Saver; thread-safe."""

    def __init__(self):
        self._last: tuple[bytes, IndexColumns, _Layout] | None = None  # header, entries, their table
        self._lock = threading.Lock()

    def encode(self, index: IndexColumns, header: bytes) -> bytes:
        with self._lock:
            last = self._last
        if last is not None and last[0] == header and last[1].same_but_crcs(index):
            layout = last[2]
            table = layout.refill(index._crcs)
        else:
            table = index.encode(header)
            layout = index.layout
        if layout is not None:
            with self._lock:
                self._last = (header, index, layout)
        return table


def _one_row(row: bytes, n: int) -> Ragged:
    """A ragged column whose first row is ``row`` and the rest empty."""
    data = np.zeros((n, max(len(row), 1)), np.uint8)
    data[0, :len(row)] = np.frombuffer(row, np.uint8)
    lengths = np.zeros(n, np.int64)
    lengths[0] = len(row)
    return Ragged(data, lengths)


def build_table(keys: list[bytes], values: Ragged, block_size: int = BLOCK_SIZE, layout: dict | None = None) -> bytes:
    """A table of ``keys`` (strictly increasing, else ValueError) with their values, laid out
    as :class:`TableBuilder` lays it out. ``layout``, if given, receives where each record ends
    in the table (``"ends"``) and each data block's (offset, size) (``"blocks"``); it stays empty
    where the table is built entry by entry."""
    n = len(keys)
    key_col = from_bytes(keys)
    width = key_col.data.shape[1] + values.data.shape[1] + 30
    if n < 2 or n * width > _MAX_MATRIX or int((key_col.lengths + values.lengths).max()) >= block_size:
        return _build_slowly(keys, values, block_size)  # huge keys or values: entry by entry
    common = _common_prefixes(key_col)
    shared, blocks = _layout(common, key_col.lengths, values.lengths, block_size)
    suffix = Ragged(key_col.data, key_col.lengths - shared, shared)
    flat, lengths = join([varints(shared), varints(suffix.lengths), varints(values.lengths), suffix, values])
    ends = np.cumsum(lengths)
    out = bytearray()
    index = []  # (separator key, handle) per data block
    if layout is not None:
        layout["ends"], layout["blocks"] = np.empty(n, np.int64), []
    for b, e in blocks:
        start = int(ends[b - 1]) if b else 0
        restarts = (ends[b:e:_RESTART_INTERVAL] - lengths[b:e:_RESTART_INTERVAL] - start).astype("<u4")
        contents = flat[start:int(ends[e - 1])].tobytes() + restarts.tobytes() + fixed32(len(restarts))
        separator = shortest_separator(keys[e - 1], keys[e]) if e < n else short_successor(keys[-1])
        if layout is not None:
            layout["ends"][b:e] = ends[b:e] - start + len(out)
            layout["blocks"].append((len(out), len(contents)))
        index.append((separator, write_block(out, contents)))
    return finish_table(out, index)


def _common_prefixes(keys: Ragged) -> np.ndarray:
    """Bytes each key shares with the one before it; ValueError unless the keys strictly increase."""
    k, lengths = keys.data, keys.lengths
    rows = np.arange(len(k) - 1)
    first_diff = np.concatenate([k[1:] != k[:-1], np.ones((len(k) - 1, 1), bool)], axis=1).argmax(axis=1)
    within = np.minimum(lengths[1:], lengths[:-1])
    at = np.minimum(first_diff, k.shape[1] - 1)
    greater = np.where(first_diff < within, k[1:][rows, at] > k[:-1][rows, at], lengths[1:] > lengths[:-1])
    if not greater.all():
        i = int(np.flatnonzero(~greater)[0]) + 1
        raise ValueError(f"table keys must be strictly increasing: {_key_at(k, lengths, i)!r} "
                         f"after {_key_at(k, lengths, i - 1)!r}")
    return np.concatenate([[0], np.minimum(first_diff, within)])


def _key_at(data: np.ndarray, lengths: np.ndarray, i: int) -> bytes:
    return data[i, :lengths[i]].tobytes()


def _layout(common: np.ndarray, key_lengths: np.ndarray, value_lengths: np.ndarray, block_size: int):
    """Split the records into data blocks as TableBuilder does: a block ends with the record that
    brings its size (records and restart array) to ``block_size``, and every 16th record of a
    block carries its whole key. Returns (bytes shared with the previous key, per record;
    [(first record, end)] per block)."""
    n = len(common)
    shared = np.empty(n, np.int64)
    blocks = []
    b = 0
    window = block_size // 3 + _RESTART_INTERVAL  # records in a block at most: each takes >= 3 bytes
    while b < n:
        e = min(n, b + window)
        j = np.arange(e - b)
        sh = np.where(j % _RESTART_INTERVAL == 0, 0, common[b:e])
        rest, vlen = key_lengths[b:e] - sh, value_lengths[b:e]
        size = varint_lengths(sh) + varint_lengths(rest) + varint_lengths(vlen) + rest + vlen
        estimate = np.cumsum(size) + 4 * (1 + j // _RESTART_INTERVAL) + 4
        full = np.flatnonzero(estimate >= block_size)
        end = b + int(full[0]) + 1 if len(full) else e
        shared[b:end] = sh[:end - b]
        blocks.append((b, end))
        b = end
    return shared, blocks


def _build_slowly(keys: list[bytes], values: Ragged, block_size: int) -> bytes:
    table = TableBuilder(block_size)
    for i, key in enumerate(keys):
        table.add(key, values.data[i, :values.lengths[i]].tobytes())
    return table.finish()
