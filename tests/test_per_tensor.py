"""The per-tensor fast paths (issue 14) give exactly what the general paths give: the same entry
bytes and fields, the same table, the same checkpoint files, the same loaded values."""
import filecmp
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpusaver
from gpusaver.format import BundleReader
from gpusaver.format import proto
from gpusaver.format.proto import Entry
from gpusaver.format.table import TableBuilder, _common_prefix, read_table
from gpusaver.format.wire import crc32c, crc32c_many, encode_varint, mask, mask_many, unmask
from gpusaver.staging.pool import ALIGN

U64 = (1 << 64) - 1


def _varint(value: int) -> bytes:  # protobuf's encoding, written from its definition
    value &= U64
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _reference_entry(dtype, shape, shard, offset, size, crc) -> bytes:
    """BundleEntryProto as FORMAT.md spells it: fields in order, zeros omitted, shape always."""
    def field(tag, value):
        return bytes([tag]) + _varint(value) if value else b""
    dims = b"".join(b"\x12" + _varint(len(field(0x08, d))) + field(0x08, d) for d in shape)
    out = field(0x08, dtype) + b"\x12" + _varint(len(dims)) + dims
    out += field(0x18, shard) + field(0x20, offset) + field(0x28, size)
    return out + (b"\x35" + struct.pack("<I", crc) if crc else b"")


INT64 = st.integers(min_value=0, max_value=(1 << 63) - 1)
ENTRIES = st.tuples(st.integers(0, 300), st.lists(st.one_of(st.integers(0, 300), INT64), max_size=5).map(tuple),
                    st.integers(0, 1 << 16), INT64, INT64, st.integers(0, (1 << 32) - 1))


@settings(max_examples=300, deadline=None)
@given(ENTRIES)
def test_entry_encoding_is_protobufs_and_decodes_back(fields):
    encoded = Entry(*fields).encode()
    assert encoded == _reference_entry(*fields)
    assert Entry.decode(encoded) == Entry(*fields)
    assert Entry.decode(memoryview(encoded)) == Entry(*fields)  # what the table hands over
    assert Entry(*fields).encode() == encoded  # the cached shape encoding gives the same bytes


@settings(max_examples=500, deadline=None)
@given(ENTRIES, st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=4),
       st.integers(0, 40), st.binary(max_size=6))
def test_entry_fast_decoder_agrees_with_the_full_parser_on_any_bytes(fields, flips, cut, tail):
    """Whatever the bytes (flipped, truncated, extended), decode gives what the full parser gives,
    or raises ValueError as it does."""
    raw = bytearray(Entry(*fields).encode() + tail)
    for pos, byte in flips:
        if pos < len(raw):
            raw[pos] = byte
    raw = bytes(raw[:len(raw) - cut] if cut < len(raw) else raw)
    try:
        expected = Entry(*proto._decode_fields(raw))
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e)[:20]):
            Entry.decode(raw)
    else:
        got = Entry.decode(raw)
        assert got == expected and got.slices == expected.slices and hash(got) == hash(expected)


def test_decoded_entries_are_frozen_and_replaceable():
    e = Entry.decode(Entry(1, (3, 4), 0, 10, 48, 7).encode())
    with pytest.raises(AttributeError):
        e.size = 1
    assert e._replace(shard_id=2) == Entry(1, (3, 4), 2, 10, 48, 7)
    assert repr(e) == repr(Entry(1, (3, 4), 0, 10, 48, 7))


def test_entries_with_slices_and_unusual_layouts_take_the_full_parser():
    sliced = Entry(1, (4, 3), 0, 0, 0, 0, ((proto.Extent(0, 2), proto.Extent(0, None)),))
    assert Entry.decode(sliced.encode()) == sliced
    reordered = b"\x28\x10" + b"\x08\x01" + b"\x12\x04\x12\x02\x08\x04"  # size before dtype and shape
    assert Entry.decode(reordered) == Entry(1, (4,), 0, 0, 16, 0)
    with pytest.raises(ValueError, match="negative"):
        Entry.decode(b"\x08\x01\x12\x00\x20" + _varint(-5))


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, (1 << 21) - 1, 1 << 21, (1 << 28) - 1,
                                   1 << 28, 1 << 40, U64,
                                   -1, -(1 << 63), np.int64(5), np.int64(70000)])
def test_encode_varint(value):
    assert encode_varint(value) == _varint(int(value))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert _common_prefix(a, b) == n


def test_table_values_are_bytes_and_round_trip():
    builder = TableBuilder(256)
    items = {f"k{i:04d}".encode(): bytes([i % 256]) * (i % 200) for i in range(500)}
    for k in sorted(items):
        builder.add(k, items[k])
    table = read_table(builder.finish())
    assert table == items and all(type(v) is bytes for v in table.values())


def test_batched_checksums_equal_single_ones():
    views = [memoryview(np.random.default_rng(i).bytes(n)) for i, n in enumerate([0, 1, 7, 8192, 100000, 1 << 20])]
    assert crc32c_many(views) == [crc32c(v) for v in views]


@pytest.mark.parametrize("count", [5, 31, 32, 1000])
def test_batched_masks_equal_single_ones(count):
    """The batch's uint32 arithmetic wraps as the single mask's does, edges included."""
    rng = np.random.default_rng(count)
    crcs = [0, 1, 0x7FFF, 0x8000, 0x5D7D1527, 0xFFFFFFFF] + rng.integers(0, 1 << 32, count, dtype=np.uint64).tolist()
    masked = mask_many(crcs[:count])
    assert masked == [mask(c) for c in crcs[:count]] and [unmask(m) for m in masked] == crcs[:count]
    assert all(type(m) is int for m in masked)


def _mixed_model():
    """A run of small tensors of every kind the fast paths must keep apart: dtypes, 0-d, empty,
    non-contiguous, big-endian, strings between them, one large tensor."""
    rng = np.random.default_rng(1)
    out = {}
    for i in range(300):
        kind = i % 7
        if kind == 0:
            out[f"t{i:03d}"] = rng.random(37, dtype=np.float32)
        elif kind == 1:
            out[f"t{i:03d}"] = rng.random((3, 5)).astype(ml_dtypes.bfloat16)
        elif kind == 2:
            out[f"t{i:03d}"] = np.array(i, dtype=np.int64)
        elif kind == 3:
            out[f"t{i:03d}"] = np.zeros((0, 4), dtype=np.float16)
        elif kind == 4:
            out[f"t{i:03d}"] = rng.random((6, 8))[:, ::2]  # not contiguous
        elif kind == 5:
            out[f"t{i:03d}"] = np.arange(9, dtype=">i4")  # big-endian
        else:
            out[f"t{i:03d}"] = rng.random(20) > 0.5
    out["t150s"] = np.array([b"a", b"bc"], dtype=object)
    out["t151big"] = rng.random(300_000, dtype=np.float32)  # > 1 MiB: begin / chunks / end
    return out


@pytest.mark.parametrize("options", [gpusaver.Options(snapshot="copy", buffer_budget=1 << 20, chunk_size=1 << 16),
                                     gpusaver.Options(snapshot="copy", pack_threshold=0),
                                     gpusaver.Options(chunk_size=4096),
                                     gpusaver.Options(num_shards=3)])
def test_views_path_writes_the_same_files_as_staged_copies(tmp_path, options):
    """Reference mode hands small host tensors to the writer as views; copy mode stages them
    through pool buffers and pack groups: the files are byte for byte the same."""
    tensors = _mixed_model()
    gpusaver.save(str(tmp_path / "views"), tensors, gpusaver.Options(num_shards=options.num_shards))
    gpusaver.save(str(tmp_path / "other"), tensors, options)
    suffixes = [".index"] + [f".data-{i:05d}-of-{options.num_shards:05d}" for i in range(options.num_shards)]
    for suffix in suffixes:
        assert filecmp.cmp(tmp_path / f"views{suffix}", tmp_path / f"other{suffix}", shallow=False), suffix
    loaded = gpusaver.load(str(tmp_path / "views"))
    for name, value in tensors.items():
        if value.dtype.kind == "O":
            assert list(loaded[name]) == list(value)
        else:
            assert loaded[name].dtype == value.dtype.newbyteorder("=") and loaded[name].shape == value.shape
            native = np.ascontiguousarray(value, value.dtype.newbyteorder("="))
            assert np.array_equal(loaded[name].reshape(-1).view(np.uint8), native.reshape(-1).view(np.uint8)), name


def test_loaded_small_tensors_are_aligned_and_independent(tmp_path):
    """Small tensors of a batch share one slab: each still starts on a 64-byte boundary, and
    writing to one changes no other."""
    tensors = {f"v{i:04d}": np.full(i % 50 + 1, i, dtype=np.float32) for i in range(2000)}
    gpusaver.save(str(tmp_path / "c"), tensors)
    loaded = gpusaver.load(str(tmp_path / "c"))
    for value in loaded.values():
        assert value.ctypes.data % ALIGN == 0 and value.flags.writeable
    for value in loaded.values():
        value[...] = -1
    assert all((v == -1).all() for v in loaded.values())
    again = gpusaver.load(str(tmp_path / "c"))
    for name, value in tensors.items():
        assert np.array_equal(again[name], value)


def test_load_in_any_order_gives_each_key_its_value(tmp_path):
    tensors = {f"k{i:05d}": np.full(3, i, dtype=np.int32) for i in range(3000)}
    gpusaver.save(str(tmp_path / "c"), tensors, gpusaver.Options(num_shards=2))
    keys = list(np.random.default_rng(0).permutation(list(tensors)))[:1500]
    loaded = gpusaver.load(str(tmp_path / "c"), keys=keys)
    assert list(loaded) == keys
    assert all(np.array_equal(loaded[k], tensors[k]) for k in keys)
    with BundleReader(str(tmp_path / "c")) as reader:
        assert reader.entry("k00007") == Entry.decode(Entry(**reader.entry("k00007")._asdict()).encode())


def test_add_views_writes_the_same_bytes_as_begin_write_end(tmp_path):
    from gpusaver.format.dtypes import DataType
    from gpusaver.format.wire import crc32c
    from gpusaver.format.writer import BundleWriter
    arrays = {f"t{i:03d}": np.arange(i + 1, dtype=np.float32 if i % 2 else np.int64) for i in range(50)}
    enums = {np.dtype(np.float32): DataType.FLOAT, np.dtype(np.int64): DataType.INT64}
    with BundleWriter(str(tmp_path / "one")) as w:
        for name, a in arrays.items():
            w.begin(name, enums[a.dtype], a.shape)
            w.write(memoryview(a).cast("B"))
            w.end()
    with BundleWriter(str(tmp_path / "many")) as w:
        views = [memoryview(a).cast("B") for a in arrays.values()]
        w.shard(0).add_views(list(arrays), [enums[a.dtype] for a in arrays.values()],
                             [a.shape for a in arrays.values()], views, [crc32c(v) for v in views])
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / ("one" + suffix)).read_bytes() == (tmp_path / ("many" + suffix)).read_bytes()


def test_add_views_refuses_a_wrong_size_or_a_name_twice_before_writing(tmp_path):
    from gpusaver.errors import MismatchError
    from gpusaver.format.dtypes import DataType
    from gpusaver.format.writer import BundleWriter
    w = BundleWriter(str(tmp_path / "m"))
    shard = w.shard(0)
    v = memoryview(np.ones(4, np.float32)).cast("B")
    with pytest.raises(MismatchError, match="'b'.*16 bytes.*needs 20"):
        shard.add_views(["a", "b"], [DataType.FLOAT] * 2, [(4,), (5,)], [v, v], [0, 0])
    with pytest.raises(MismatchError, match="'a' added twice"):
        shard.add_views(["a", "a"], [DataType.FLOAT] * 2, [(4,), (4,)], [v, v], [0, 0])
    assert shard.offset == 0  # nothing was written
    shard.add_views(["a"], [DataType.FLOAT], [(4,)], [v], [0])
    with pytest.raises(MismatchError, match="'a' added twice"):
        shard.add_views(["a"], [DataType.FLOAT], [(4,)], [v], [0])
    w.abort()
