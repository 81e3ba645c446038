"""The numpy mirrors of kernels/*.cu and the host-side CRC combination, against the crc32c
package. These pin down the kernels' arithmetic on machines without a GPU."""

import re

import crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpusaver.staging.cuda import crc as C
from gpusaver.staging.cuda.kernels import kernel_sources

SIZES = [0, 1, 7, 15, 16, 17, 255, 4095, 4096, 4097, 65537, (1 << 20) + 3]
SEGMENTS = [1, 3, 16, 17, 4095, 4096, 4097, 65536, 1 << 20]


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(1234).integers(0, 256, (1 << 20) + 64, dtype=np.uint8)


def _segment_crcs(view, segment):
    return [crc32c.crc32c(view[i:i + segment]) for i in range(0, view.size, segment)]


# The reference's cost grows with the segment count; tiny segments are run on small sizes.
CASES = [(size, seg) for size in SIZES for seg in SEGMENTS if size // seg <= 20000]


@pytest.mark.parametrize("size, segment", CASES)
def test_reference_segments_and_combine(data, size, segment):
    for offset in (0, 5) if size > 70000 else range(8):
        view = data[offset:offset + size]
        got = C.crc32c_segments_reference(view, segment)
        assert got.dtype == np.uint32
        assert got.tolist() == _segment_crcs(view, segment)
        assert C.combine_segments(got, segment, size) == crc32c.crc32c(view)


@pytest.mark.parametrize("address", range(16))
def test_reference_independent_of_alignment(data, address):
    # Alignment changes how the kernel splits a segment (pad, shift, lanes), never the CRCs.
    view = data[:20000]
    for segment in (4096, 4111, 8192):
        got = C.crc32c_segments_reference(view, segment, address=address)
        assert got.tolist() == _segment_crcs(view, segment)


def test_reference_accepts_bytes_and_typed_arrays(data):
    raw = bytes(data[:1000])
    assert C.crc32c_segments_reference(raw, 300).tolist() == _segment_crcs(data[:1000], 300)
    floats = np.arange(250, dtype=np.float32)
    assert C.combine_segments(C.crc32c_segments_reference(floats, 64), 64, floats.nbytes) \
        == crc32c.crc32c(floats.tobytes())


def test_reference_rejects_bad_input(data):
    with pytest.raises(ValueError):
        C.crc32c_segments_reference(data[:100], 0)
    with pytest.raises(ValueError):
        C.crc32c_segments_reference(data[:100:2], 16)
    assert C.crc32c_segments_reference(b"", 16).size == 0


def test_threads_match_kernel_source():
    src = kernel_sources()["crc32c"]
    m = re.search(r"#define\s+CRC_THREADS\s+(\d+)", src)
    assert m and int(m.group(1)) == C.THREADS


def test_combine_segments_edge_cases():
    assert C.combine_segments([], 16, 0) == 0
    one = crc32c.crc32c(b"abc")
    assert C.combine_segments([one], 16, 3) == one
    with pytest.raises(ValueError):
        C.combine_segments([one, one], 16, 3)
    with pytest.raises(ValueError):
        C.combine_segments([one], 0, 3)
    with pytest.raises(ValueError):
        C.combine_segments([1 << 32], 16, 3)


def test_combine_many_segments_is_fast(data):
    # Thousands of segments fold through cached 4x256 tables.
    view = data[:40000]
    crcs = _segment_crcs(view, 8)
    assert C.combine_segments(crcs, 8, view.size) == crc32c.crc32c(view)


def test_combine_argument_checks():
    assert C.crc32c_combine(0x12345678, 0, 0) == 0x12345678
    with pytest.raises(ValueError):
        C.crc32c_combine(1, 2, -1)
    with pytest.raises(ValueError):
        C.crc32c_combine(1 << 32, 2, 1)
    assert C.crc32c_combine(np.uint32(crc32c.crc32c(b"a")), np.uint32(crc32c.crc32c(b"b")),
                            np.int64(1)) == crc32c.crc32c(b"ab")


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000))
def test_combine_property(a, b):
    assert C.crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=5000), segment=st.integers(1, 700), address=st.integers(0, 15))
def test_reference_property(data, segment, address):
    got = C.crc32c_segments_reference(data, segment, address=address)
    assert C.combine_segments(got, segment, len(data)) == crc32c.crc32c(data)


def test_combine_long_lengths():
    # Lengths past 4 GiB use high powers of x: zero runs built by doubling must agree with
    # combining them in another grouping (associativity) and with short runs done directly.
    zeros = b"\0" * (1 << 12)
    z = {12: crc32c.crc32c(zeros)}
    assert C.crc32c_combine(z[12], z[12], len(zeros)) == crc32c.crc32c(zeros * 2)
    for k in range(13, 35):  # up to 16 GiB of zeros
        z[k] = C.crc32c_combine(z[k - 1], z[k - 1], 1 << (k - 1))
    a, b, c = crc32c.crc32c(b"head"), z[34], z[33]
    left = C.crc32c_combine(C.crc32c_combine(a, b, 1 << 34), c, 1 << 33)
    right = C.crc32c_combine(a, C.crc32c_combine(b, c, 1 << 33), (1 << 34) + (1 << 33))
    assert left == right


# --- pack / unpack ------------------------------------------------------------------------


def _arrays():
    rng = np.random.default_rng(7)
    return [
        rng.standard_normal(17).astype(np.float32),
        np.zeros(0, dtype=np.float64),
        rng.integers(0, 255, (3, 5), dtype=np.uint8),
        np.array(3.5, dtype=np.float16),
        rng.integers(-9, 9, 1001, dtype=np.int64),
        np.frombuffer(b"odd", dtype=np.uint8),
    ]


@pytest.mark.parametrize("align", [1, 4, 16, 256])
def test_pack_unpack_round_trip(align):
    arrays = _arrays()
    before = [a.copy() for a in arrays]
    buf, offsets = C.pack_reference(arrays, align=align)
    assert buf.dtype == np.uint8 and offsets.dtype == np.int64
    assert all(o % align == 0 for o in offsets.tolist())
    sizes = [a.nbytes for a in arrays]
    assert buf.size == offsets[-1] + sizes[-1]
    back = C.unpack_reference(buf, offsets, sizes)
    for a, b, orig in zip(arrays, back, before):
        assert b.dtype == np.uint8
        assert b.tobytes() == a.tobytes()
        np.testing.assert_array_equal(a, orig)  # inputs untouched
    # Padding is zero, so the packed buffer is deterministic.
    mask = np.ones(buf.size, dtype=bool)
    for o, s in zip(offsets.tolist(), sizes):
        mask[o:o + s] = False
    assert not buf[mask].any()


def test_pack_layout():
    offsets, total = C.pack_layout([5, 0, 16, 1], align=16)
    assert offsets.tolist() == [0, 16, 16, 32] and total == 33
    assert C.pack_layout([], 16)[1] == 0
    with pytest.raises(ValueError):
        C.pack_layout([1], align=3)
    with pytest.raises(ValueError):
        C.pack_layout([-1])


def test_unpack_reference_bounds():
    buf, offsets = C.pack_reference([np.arange(4, dtype=np.uint8)])
    with pytest.raises(ValueError):
        C.unpack_reference(buf, offsets, [5])
    with pytest.raises(ValueError):
        C.unpack_reference(buf, [0, 1], [1])
    with pytest.raises(ValueError):
        C.pack_reference([np.arange(10)[::2]])
