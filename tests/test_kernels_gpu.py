"""The CUDA kernels on a real GPU, through CuPy: device CRC-32C against the crc32c package and
the kernels' numpy mirrors, and pack/unpack round trips. Skipped without CuPy or a GPU."""

import crc32c
import numpy as np
import pytest

from gpusaver.staging.cuda import crc as C
from gpusaver.staging.cuda import kernels as K

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp(cupy_gpu):
    return cupy_gpu


@pytest.fixture(scope="module")
def host_data():
    return np.random.default_rng(99).integers(0, 256, (3 << 20) + 64, dtype=np.uint8)


@pytest.fixture(scope="module")
def dev_data(cp, host_data):
    return cp.asarray(host_data)


SIZES = [1, 7, 15, 16, 17, 255, 4095, 4096, 4097, 65537, (1 << 20) + 3, (3 << 20) + 5]
SEGMENTS = [17, 1000, 4096, 4097, 1 << 20]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("segment", SEGMENTS)
def test_device_crc_matches_crc32c(dev_data, host_data, size, segment):
    for offset in (0, 1, 3, 7, 13):  # views whose start is not 16-aligned
        view = dev_data[offset:offset + size]
        assert K.device_crc32c(view, segment=segment) == crc32c.crc32c(
            host_data[offset:offset + size]), (size, segment, offset)


@pytest.mark.parametrize("segment", [1, 5, 16, 4111, 1 << 16])
def test_kernel_matches_reference_per_segment(cp, dev_data, host_data, segment):
    # The per-segment CRCs equal the numpy mirror's, including with fewer blocks than
    # segments (the blocks' grid-stride loop).
    size = 200_003 if segment > 16 else 5_003
    for offset in (0, 9):
        view = dev_data[offset:offset + size]
        nseg = -(-size // segment)
        out = cp.zeros(nseg, dtype=cp.uint32)
        kern = K.load_kernels()["crc32c_segments"]
        for grid in (1, 3, nseg):
            out.fill(0)
            kern((grid,), (C.THREADS,), (view, np.uint64(size), np.uint64(segment), out))
            expected = C.crc32c_segments_reference(
                host_data[offset:offset + size], segment, address=view.data.ptr)
            np.testing.assert_array_equal(out.get(), expected)


def test_device_crc_typed_and_large(cp):
    rng = np.random.default_rng(5)
    host = rng.standard_normal((1024, 4099)).astype(np.float32)  # ~16 MiB, 2-D
    assert K.device_crc32c(cp.asarray(host)) == crc32c.crc32c(host)
    assert K.device_crc32c(cp.zeros(0, dtype=cp.float32)) == 0
    assert K.device_crc32c(cp.asarray(np.float64(2.5))) == crc32c.crc32c(np.float64(2.5).tobytes())


def test_device_crc_on_stream(cp, dev_data, host_data):
    cp.cuda.Device().synchronize()  # dev_data was written on another stream
    stream = cp.cuda.Stream(non_blocking=True)
    assert K.device_crc32c(dev_data, segment=1 << 18, stream=stream) == crc32c.crc32c(host_data)


def test_device_crc_rejects(cp, dev_data):
    with pytest.raises(ValueError):
        K.device_crc32c(dev_data[::2])
    with pytest.raises(ValueError):
        K.device_crc32c(dev_data, segment=0)
    with pytest.raises(TypeError):
        K.device_crc32c(np.zeros(4, dtype=np.uint8))


def _device_arrays(cp):
    rng = np.random.default_rng(11)
    raw = cp.asarray(rng.integers(0, 256, 10_000, dtype=np.uint8))
    return [
        cp.asarray(rng.standard_normal(17).astype(np.float32)),
        cp.zeros(0, dtype=cp.float64),
        cp.asarray(rng.integers(-5, 5, (33, 7), dtype=np.int64)),
        raw[3:3 + 1000],  # starts 3 bytes past an aligned address
        raw[1:6],
        cp.asarray(np.float16(1.5)),
        cp.asarray(rng.integers(0, 255, 4096 * 3 + 5, dtype=np.uint8)),
        raw[5:5 + 4096],
    ]


@pytest.mark.parametrize("align", [1, 16, 256])
def test_pack_unpack_round_trip(cp, align):
    arrays = _device_arrays(cp)
    before = [a.get() for a in arrays]
    buf, offsets = K.pack(arrays, align=align)
    expected_buf, expected_offsets = C.pack_reference(before, align=align)
    np.testing.assert_array_equal(offsets, expected_offsets)
    np.testing.assert_array_equal(buf.get(), expected_buf)

    outs = [cp.empty_like(a) for a in arrays]
    assert K.unpack(buf, offsets, outs) == outs
    for out, orig, now in zip(outs, before, arrays):
        np.testing.assert_array_equal(out.get(), orig)
        np.testing.assert_array_equal(now.get(), orig)  # sources untouched


def test_pack_into_given_buffer_on_stream(cp):
    arrays = _device_arrays(cp)
    host = [a.get() for a in arrays]
    expected, offsets = C.pack_reference(host)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:  # zeroed in the stream's order, before the kernels write
        out = cp.zeros(expected.size + 100, dtype=cp.uint8)
        dest = cp.zeros(sum(a.nbytes for a in arrays) + 64, dtype=cp.uint8)
    cp.cuda.Device().synchronize()  # the inputs were written on the default stream
    buf, got_offsets = K.pack(arrays, out=out, stream=stream)
    stream.synchronize()
    assert buf is out
    np.testing.assert_array_equal(got_offsets, offsets)
    np.testing.assert_array_equal(out.get()[:expected.size], expected)

    # Unpack into misaligned destination views: the byte-wise path.
    outs, pos = [], 1
    for a in host:
        outs.append(dest[pos:pos + a.nbytes])
        pos += a.nbytes + 1
    K.unpack(buf, offsets, outs, stream=stream)
    stream.synchronize()
    for out, a in zip(outs, host):
        assert out.get().tobytes() == a.tobytes()


def test_pack_more_tensors_than_blocks(cp):
    # More tensors than the launch's blocks: each block loops over several tensors.
    n = 66_000  # > the 65535-block launch cap
    base = cp.arange(n * 3, dtype=cp.uint8)
    arrays = [base[3 * i:3 * i + 3] for i in range(n)]
    buf, offsets = K.pack(arrays, align=4)
    assert offsets.tolist()[:3] == [0, 4, 8]
    packed = buf.get()
    host = base.get()
    got = np.stack([packed[o:o + 3] for o in offsets.tolist()]).reshape(-1)
    np.testing.assert_array_equal(got, host)


def test_pack_rejects(cp):
    a = cp.arange(10, dtype=cp.float32)
    with pytest.raises(ValueError):
        K.pack([a[::2]])
    with pytest.raises(ValueError):
        K.pack([a], out=cp.zeros(8, dtype=cp.uint8))
    buf, offsets = K.pack([a])
    with pytest.raises(ValueError):
        K.unpack(buf, offsets, [cp.empty(11, dtype=cp.float32)])
    with pytest.raises(ValueError):
        K.unpack(buf, [0, 0], [a])
