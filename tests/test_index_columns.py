"""The index built and decoded for all entries at once (format/columns.py, format/entries.py)
gives exactly what the entry-by-entry reference (TableBuilder over Entry.encode, Entry.decode)
gives, on every layout the format allows."""
import math
import random

import pytest

from gpusaver.format import columns, entries
from gpusaver.format.dtypes import enum_to_dtype
from gpusaver.format.proto import Entry, Extent, Header
from gpusaver.format.table import TableBuilder, read_table


def _reference(header: bytes, table: dict[str, Entry], block_size: int) -> bytes:
    builder = TableBuilder(block_size)
    builder.add(b"", header)
    for key, name in sorted((name.encode("utf-8"), name) for name in table):
        builder.add(key, table[name].encode())
    return builder.finish()


def _columns(table: dict[str, Entry], batched: bool) -> columns.IndexColumns:
    index = columns.IndexColumns()
    if batched:
        rows = list(table.values())
        index.extend(list(table), [e.dtype for e in rows], [e.shape for e in rows], 0, [e.offset for e in rows],
                     [e.size for e in rows], [e.crc32c for e in rows])
    else:
        for name, entry in table.items():
            index.add(name, entry)
    return index


def _random_entry(rng: random.Random, sliced: bool) -> Entry:
    shape = tuple(rng.choice([0, 1, 7, 300, 70000]) for _ in range(rng.randint(0, 3)))
    slices = ((Extent(0, 2), Extent()),) if sliced else ()
    return Entry(rng.choice([0, 1, 2, 9, 14, 19, 23]), shape, rng.choice([0, 0, 1, 200]),
                 rng.choice([0, 5, 1 << 40, rng.randint(0, (1 << 62))]), rng.choice([0, 8192, 1 << 35]),
                 rng.choice([0, rng.getrandbits(32)]), slices)


@pytest.mark.parametrize("seed", range(40))
def test_columnar_index_is_byte_identical_to_entry_by_entry(seed):
    rng = random.Random(seed)
    count = rng.choice([0, 1, 2, 3, 17, 100, 1000, 3000])
    block_size = rng.choice([64, 256, 1024, 4096, 262144])  # small blocks: many block boundaries
    names = set()
    while len(names) < count:  # shared prefixes, NULs, non-ASCII, keys past 127 bytes (2-byte varints)
        names.add("".join(rng.choice("ab/\0_éz") for _ in range(rng.randint(1, rng.choice([3, 40, 300])))))
    table = {name: _random_entry(rng, sliced=rng.random() < 0.05) for name in names}
    batched = not any(e.slices for e in table.values()) and rng.random() < 0.5
    if batched:  # one writer batch: one shard
        table = {name: Entry(e.dtype, e.shape, 0, e.offset, e.size, e.crc32c) for name, e in table.items()}
    header = Header(num_shards=rng.randint(1, 300)).encode()
    assert _columns(table, batched).encode(header, block_size) == _reference(header, table, block_size)


def test_names_equal_but_for_trailing_nuls_sort_as_bytes():
    # numpy orders bytes ignoring trailing NULs; the index must not.
    table = {name: Entry(1, (2,), 0, 8 * i, 8, i + 1) for i, name in enumerate(["a\0", "a", "a\0\0", "b", "a\0b"])}
    header = Header().encode()
    built = _columns(table, batched=True).encode(header)
    assert built == _reference(header, table, 262144)
    assert list(read_table(built)) == [b"", b"a", b"a\0", b"a\0\0", b"a\0b", b"b"]


@pytest.mark.parametrize("names", [["w", "w"], [""]])
def test_a_name_twice_or_empty_is_refused(names):
    index = columns.IndexColumns()
    for name in names:
        index.add(name, Entry(1, (1,), 0, 0, 4, 1))
    with pytest.raises(ValueError, match="strictly increasing"):
        index.encode(Header().encode())


def test_decode_agrees_with_entry_decode_and_leaves_the_rest_to_it():
    rng = random.Random(7)
    values = []
    for _ in range(5000):
        entry = _random_entry(rng, sliced=rng.random() < 0.05)
        entry = Entry(rng.choice([entry.dtype, 1, 7, 150]), entry.shape, entry.shard_id, entry.offset,
                      rng.choice([entry.size, math.prod(entry.shape) * 4]), entry.crc32c, entry.slices)
        raw = entry.encode()
        damage = rng.random()
        if damage < 0.1:  # a byte changed, cut short or one too many: odd layouts
            raw = bytearray(raw)
            raw[rng.randrange(len(raw))] = rng.getrandbits(8)
            raw = bytes(raw)
        elif damage < 0.15:
            raw = raw[:rng.randrange(len(raw) + 1)]
        elif damage < 0.2:
            raw += bytes([rng.getrandbits(8)])
        values.append(raw)
    decoded = entries.decode(values, num_shards=150)
    accepted = 0
    for i, raw in enumerate(values):
        entry = decoded[i]
        if entry is None:
            continue
        accepted += 1
        assert entry == Entry.decode(raw)  # the reference parse, field for field
        assert not entry.slices and entry.shard_id < 150
        assert entry.size == math.prod(entry.shape) * enum_to_dtype(entry.dtype).itemsize
    assert accepted > 500  # the plain rows are taken here, not all left to the slow path


@pytest.mark.parametrize("entry", [
    Entry(1, (2, 3), 0, 0, 25, 1),  # 25 bytes cannot hold 6 float32s
    Entry(1, (2,), 4, 0, 8, 1),  # shard 4 of 4
    Entry(7, (2,), 0, 0, 30, 1),  # strings: their own checks
    Entry(1, (4,), 0, 0, 16, 1, ((Extent(0, 2),),)),  # a partitioned tensor's slices
    Entry(1, (1 << 61, 8), 0, 0, 1 << 63 - 1, 1),  # more elements than int64 bytes hold
])
def test_decode_leaves_what_it_does_not_check_to_the_reader(entry):
    good = Entry(1, (2,), 0, 0, 8, 1)
    decoded = entries.decode([good.encode(), entry.encode()], num_shards=4)
    assert decoded[0] == good
    assert decoded[1] is None


def test_names_too_long_for_one_matrix_take_the_entry_by_entry_path(monkeypatch):
    monkeypatch.setattr(columns, "_MAX_MATRIX", 4096)  # as if the names were megabytes long
    table = {f"{i % 7}/" + "x" * (i % 300): Entry(1, (2,), 0, 8 * i, 8, i + 1) for i in range(500)}
    header = Header().encode()
    assert _columns(table, batched=True).encode(header, 1024) == _reference(header, table, 1024)


def _model_entries(rng: random.Random, n: int) -> dict[str, Entry]:
    """A model's index: long names, a few shapes, consecutive offsets, CRCs that are never zero."""
    table, offset = {}, 0
    for i in range(n):
        shape = rng.choice([(128,), (64, 64), (3, 3, 32, 32)])
        size = 4 * math.prod(shape)
        table[f"model/layer_{i:05d}/{rng.choice(['kernel', 'bias', 'gamma'])}/.ATTRIBUTES/VARIABLE_VALUE"] = \
            Entry(1, shape, 0, offset, size, rng.randrange(1, 1 << 32))
        offset += size
    return table


@pytest.mark.parametrize("block_size", [columns.BLOCK_SIZE, 4096])
def test_an_index_saved_again_with_new_crcs_is_refilled_byte_for_byte(block_size, monkeypatch):
    """IndexCache: the same entries with new CRCs give the table a full encode gives (several data
    blocks, each with its own checksum); any other change is encoded in full."""
    encoded = []  # full encodes
    monkeypatch.setattr(columns.IndexColumns, "encode", lambda self, h, real=columns.IndexColumns.encode:
                        encoded.append(len(self._names)) or real(self, h, block_size))
    rng = random.Random(7)
    header = Header(num_shards=1).encode()
    first = _model_entries(rng, 6000)
    cache = columns.IndexCache()
    assert cache.encode(_columns(first, True), header) == _reference(header, first, block_size)
    encoded.clear()
    again = {name: e._replace(crc32c=rng.randrange(1, 1 << 32)) for name, e in first.items()}
    table = cache.encode(_columns(again, True), header)
    assert encoded == [] and table == _reference(header, again, block_size)
    read = dict(read_table(table))  # every block's checksum holds
    assert len(read) == len(again) + 1
    moved = dict(again)
    name = next(iter(moved))
    moved[name] = moved[name]._replace(offset=moved[name].offset + 1)
    zero = {**again, name: again[name]._replace(crc32c=0)}  # a CRC field left out: lengths change
    for changed in (moved, zero):
        assert cache.encode(_columns(changed, True), header) == _reference(header, changed, block_size)
    assert len(encoded) == 2
