"""Format layer without TensorFlow: table, protos, strings, naming, state file, corruption."""
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gpusaver.errors import CheckpointNotFoundError, CorruptCheckpointError, MismatchError
from gpusaver.format import BundleReader, BundleWriter
from gpusaver.format import snappy, state
from gpusaver.format.naming import slice_key
from gpusaver.format.proto import Entry, Extent, Header
from gpusaver.format.table import TableBuilder, read_table, short_successor, shortest_separator


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.binary(min_size=1, max_size=40), st.binary(max_size=300), max_size=300),
       st.sampled_from([64, 256, 4096, 262144]))
def test_table_round_trip(items, block_size):
    builder = TableBuilder(block_size)
    for key in sorted(items):
        builder.add(key, items[key])
    table = read_table(builder.finish())
    assert {k: bytes(v) for k, v in table.items()} == items


def test_table_rejects_unsorted_keys():
    builder = TableBuilder()
    builder.add(b"b", b"1")
    with pytest.raises(ValueError, match="strictly increasing"):
        builder.add(b"a", b"2")


def test_separator_and_successor():
    assert shortest_separator(b"abcd", b"abzz") == b"abd"
    assert shortest_separator(b"abc", b"abd") == b"abc"
    assert shortest_separator(b"ab", b"abc") == b"ab"
    assert short_successor(b"\xff\xffa") == b"\xff\xffb"
    assert short_successor(b"\xff") == b"\xff"


def test_header_bytes_match_tf():
    assert Header().encode() == bytes.fromhex("0801 1a02 0801")


def test_entry_round_trip_and_scalar_shape():
    e = Entry(1, (), 0, 0, 4, 0x12345678)
    assert e.encode()[:4] == bytes.fromhex("0801 1200")
    assert Entry.decode(e.encode()) == e
    sliced = Entry(1, (4, 3), slices=((Extent(0, 2), Extent(0, None)),))
    assert Entry.decode(sliced.encode()) == sliced


def test_slice_key_matches_format_doc():
    assert slice_key("p", (Extent(0, 2), Extent(0, None))) == bytes.fromhex("00 70 00 01 01 02 80 82 80 7f")


def test_snappy_literal_and_overlapping_copy():
    # "abcabcabcab": literal "abc", then copy offset 3 length 8 (tag kind 1: len-4 in bits 2..4)
    data = bytes([11, 2 << 2, ord("a"), ord("b"), ord("c"), 1 | ((8 - 4) << 2), 3])
    assert snappy.decompress(data) == b"abcabcabcab"
    with pytest.raises(ValueError):
        snappy.decompress(bytes([5, 1 | (0 << 2), 9]))  # copy before any output


def _write(prefix, tensors, **kw):
    with BundleWriter(str(prefix), **kw) as w:
        for name, value in tensors.items():
            w.add_array(name, value)


def test_streaming_writer_many_chunks_any_buffer(tmp_path):
    data = np.random.default_rng(0).random(100_000).astype(np.float32)
    raw = data.tobytes()
    with BundleWriter(str(tmp_path / "c")) as w:
        w.begin("x", np.float32, data.shape)
        view = memoryview(raw)
        for start in range(0, len(raw), 4093):  # odd chunk size, memoryview slices
            w.write(view[start:start + 4093])
        w.end()
    with BundleReader(str(tmp_path / "c")) as r:
        np.testing.assert_array_equal(r.read("x"), data)


def test_writer_rejects_wrong_byte_count_and_duplicates(tmp_path):
    w = BundleWriter(str(tmp_path / "c"))
    w.begin("x", np.float32, (4,))
    w.write(b"\0" * 8)
    with pytest.raises(MismatchError, match="'x'.*8 bytes.*needs 16"):
        w.end()
    w.add_array("y", np.zeros(2))
    with pytest.raises(MismatchError, match="'y' added twice"):
        w.add_array("y", np.zeros(2))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_final_files(tmp_path):
    prefix = tmp_path / "c"
    with pytest.raises(RuntimeError):
        with BundleWriter(str(prefix)) as w:
            w.add_array("a", np.ones(3))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_missing_index_and_data(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nope.index"):
        BundleReader(str(tmp_path / "nope"))
    _write(tmp_path / "c", {"a": np.ones(3)})
    os.remove(tmp_path / "c.data-00000-of-00001")
    with BundleReader(str(tmp_path / "c")) as r, pytest.raises(CheckpointNotFoundError, match="data-00000"):
        r.read("a")


def test_corrupt_data_names_tensor_and_file(tmp_path):
    _write(tmp_path / "c", {"a": np.arange(100, dtype=np.int64), "b": np.ones(4)})
    path = tmp_path / "c.data-00000-of-00001"
    raw = bytearray(path.read_bytes())
    raw[17] ^= 0x40
    path.write_bytes(raw)
    with BundleReader(str(tmp_path / "c")) as r:
        np.testing.assert_array_equal(r.read("b"), np.ones(4))
        with pytest.raises(CorruptCheckpointError, match=r"CRC32C mismatch in tensor 'a'.*") as e:
            r.read("a")
        assert "c.data-00000-of-00001" in str(e.value)


def test_truncated_data_file(tmp_path):
    _write(tmp_path / "c", {"a": np.arange(100, dtype=np.int64)})
    path = tmp_path / "c.data-00000-of-00001"
    path.write_bytes(path.read_bytes()[:300])
    with BundleReader(str(tmp_path / "c")) as r, pytest.raises(CorruptCheckpointError, match="truncated"):
        r.read("a")


def _mixed_tensors():
    rng = np.random.default_rng(1)
    return {"big": rng.random(300_000),  # 2.4 MB: more than one coalesced read
            **{f"s{i:02d}": rng.integers(0, 100, size=i % 5 + 1, dtype=np.int32) for i in range(30)},
            "text": np.array([b"ab", b""], dtype=object), "empty": np.zeros((0, 3), np.float32),
            "tail": np.arange(7, dtype=np.int16)}


def test_read_many_matches_read_whatever_the_order(tmp_path):
    tensors = _mixed_tensors()
    _write(tmp_path / "c", tensors)
    names = list(tensors)
    rng = np.random.default_rng(2)
    with BundleReader(str(tmp_path / "c")) as r:
        for order in (names, names[::-1], list(rng.permutation(names)), ["s03", "s03", "s04"]):
            for name, value in zip(order, r.read_many(order)):
                expected = tensors[name]
                assert value.dtype == expected.dtype and value.shape == expected.shape, name
                assert value.tolist() == expected.tolist(), name


def test_short_reads_continue_where_they_stopped(tmp_path, monkeypatch):
    tensors = _mixed_tensors()
    _write(tmp_path / "c", tensors)
    real = os.preadv

    def short_preadv(fd, buffers, offset):  # as a kernel may: a few bytes of the first buffer
        return real(fd, [memoryview(buffers[0])[:7]], offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    with BundleReader(str(tmp_path / "c")) as r:
        names = [n for n in tensors if n != "big"]
        for name, value in zip(names, r.read_many(names)):
            assert value.tolist() == tensors[name].tolist(), name


def test_read_many_names_the_corrupt_tensor_in_a_coalesced_run(tmp_path):
    tensors = {f"s{i}": np.full(4, i, np.int64) for i in range(10)}
    _write(tmp_path / "c", tensors)
    path = tmp_path / "c.data-00000-of-00001"
    raw = bytearray(path.read_bytes())
    raw[6 * 32 + 3] ^= 0x01  # a byte of s6: each tensor is 32 bytes, written in order
    path.write_bytes(raw)
    with BundleReader(str(tmp_path / "c")) as r:
        with pytest.raises(CorruptCheckpointError, match=r"CRC32C mismatch in tensor 's6'"):
            r.read_many(list(tensors))
        assert r.read_many(["s5", "s7"])[1].tolist() == [7] * 4
        path.write_bytes(raw[:8 * 32 + 5])  # truncated inside s8
    with BundleReader(str(tmp_path / "c")) as r, pytest.raises(CorruptCheckpointError, match="truncated"):
        r.read_many(["s7", "s8", "s9"])


def test_every_truncation_and_many_bit_flips_of_the_index_fail_cleanly(tmp_path):
    _write(tmp_path / "c", {f"t{i}": np.full(3, i) for i in range(40)})
    index = (tmp_path / "c.index").read_bytes()
    bad = tmp_path / "bad"
    for cut in range(len(index)):
        (tmp_path / "bad.index").write_bytes(index[:cut])
        with pytest.raises(CorruptCheckpointError):
            BundleReader(str(bad))
    rng = np.random.default_rng(1)
    (tmp_path / "bad.data-00000-of-00001").write_bytes((tmp_path / "c.data-00000-of-00001").read_bytes())
    for _ in range(300):
        raw = bytearray(index)
        raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
        (tmp_path / "bad.index").write_bytes(raw)
        # A flip inside a checksummed block is caught by its CRC; one in the footer's padding is
        # harmless (TF ignores it too) — then every tensor must still read back correctly.
        try:
            with BundleReader(str(bad)) as r:
                values = {k: r.read(k) for k in r.keys()}
        except CorruptCheckpointError:
            continue
        assert sorted(values) == sorted(f"t{i}" for i in range(40))
        for i in range(40):
            np.testing.assert_array_equal(values[f"t{i}"], np.full(3, i))


def test_garbage_entry_sizes_never_allocate(tmp_path):
    # A structurally valid index whose entry claims an absurd shape: refused, not allocated.
    builder = TableBuilder()
    builder.add(b"", Header().encode())
    builder.add(b"huge", Entry(1, (1 << 40, 1 << 20), 0, 0, 16, 0).encode())
    (tmp_path / "g.index").write_bytes(builder.finish())
    (tmp_path / "g.data-00000-of-00001").write_bytes(b"\0" * 16)
    with BundleReader(str(tmp_path / "g")) as r, pytest.raises(CorruptCheckpointError, match="'huge'"):
        r.read("huge")


def test_state_file_round_trip_with_odd_characters(tmp_path):
    st_ = state.CheckpointState('mo"del-2', ["mo\"del-1", 'mo"del-2', "é\\x"], [1.5, 2.5], 3.0)
    state.write_state(str(tmp_path), st_)
    assert state.read_state(str(tmp_path)) == st_
    assert state.latest_checkpoint(str(tmp_path)) is None  # no index for it
    (tmp_path / 'mo"del-2.index').write_bytes(b"")
    assert state.latest_checkpoint(str(tmp_path)) == str(tmp_path / 'mo"del-2')


def test_string_tensor_crc_layout(tmp_path):
    _write(tmp_path / "s", {"e": np.array([], dtype=object), "s": np.array([b"", b"ab", "é" * 3], dtype=object)})
    data = (tmp_path / "s.data-00000-of-00001").read_bytes()
    assert data[:4] == bytes.fromhex("d8ea82a2")  # empty string tensor: mask(0) alone
    with BundleReader(str(tmp_path / "s")) as r:
        assert list(r.read("s")) == [b"", b"ab", "ééé".encode()]
        assert r.entry("e").size == 4 and r.read("e").shape == (0,)
    assert struct.unpack("<I", data[:4])[0] == 0xA282EAD8
