"""Low-level encodings shared by the table and the protos: varints, fixed32, masked CRC32C."""
import functools
import operator
import struct

import crc32c as _crc32c
import numpy as np

# LevelDB masks stored CRCs so that a CRC of data that itself contains CRCs does not degenerate.
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


_GIL_RELEASE_BYTES = 512 << 10  # below this the checksum (~25 us) is cheaper than a GIL hand-off


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of any buffer, extending ``value``; the GIL is released for large buffers only:
    releasing it for each of thousands of small tensors made the threads queue for it."""
    nbytes = data.nbytes if isinstance(data, (memoryview, np.ndarray)) else len(data)
    return _crc32c.crc32c(data, value, int(nbytes >= _GIL_RELEASE_BYTES))


def crc32c_many(buffers) -> list[int]:
    """The CRC-32C of each of many flat byte buffers (``len`` = bytes), in one call.

    Models have tens of thousands of small tensors; one call per batch instead of one wrapper
    call per tensor keeps the checksum (about 0.3 µs for 8 KiB) from costing several times that
    in Python. As in :func:`crc32c`, the GIL is released for large buffers only.
    """
    crc, limit = _crc32c.crc32c, _GIL_RELEASE_BYTES
    return [crc(b, 0, len(b) >= limit) for b in buffers]


def mask(crc: int) -> int:
    """Mask a CRC32C the way LevelDB / TF store it."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


_MASK_DELTA32, _15, _17 = np.uint32(_MASK_DELTA), np.uint32(15), np.uint32(17)


def mask_many(crcs: list[int]) -> list[int]:
    """:func:`mask` of each CRC, for a batch at once (in uint32, whose shifts and sum wrap as
    the mask's do)."""
    if len(crcs) < 32:  # numpy's fixed cost is more than a few Python calls
        return [mask(c) for c in crcs]
    c = np.array(crcs, np.uint32)
    return (((c >> _15) | (c << _17)) + _MASK_DELTA32).tolist()


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    r = (masked - _MASK_DELTA) & _U32
    return ((r >> 17) | (r << 15)) & _U32


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))  # dtypes, dims, lengths: most varints


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128 (protobuf varint); negative int64s are encoded as their 64-bit two's complement."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    if 0 < value < 0x10000000:  # two to four bytes: the offsets and sizes in files below 256 MiB
        if value < 0x4000:
            return bytes((value & 0x7F | 0x80, value >> 7))
        if value < 0x200000:
            return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14 & 0x7F | 0x80, value >> 21))
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf, pos: int, limit: int, max_bytes: int = 10) -> tuple[int, int]:
    """Decode a varint of at most ``max_bytes`` bytes from ``buf[pos:limit]``; return (value, new_pos).

    Raises ValueError on truncation or an over-long varint (garbage never loops or allocates).
    """
    if pos < limit and buf[pos] < 0x80:  # one byte: most keys, lengths, dtypes and dims
        return buf[pos], pos + 1
    result = 0
    shift = 0
    for i in range(max_bytes):
        if pos >= limit:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint too long")


def fixed32(value: int) -> bytes:
    return struct.pack("<I", value & _U32)


def read_fixed32(buf, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos)[0]


# --- CRC32C combination: crc(a ‖ b) from crc(a), crc(b) and len(b) -------------------------------
# Polynomials mod the Castagnoli P in the reflected form of the CRC register (bit 31 is the
# coefficient of x^0). Appending n bytes multiplies a CRC by x^(8n) mod P, so
# crc(a ‖ b) = crc(a) · x^(8·len(b)) xor crc(b) (zlib's crc32_combine). This lets chunks and GPU
# segments be checksummed independently, in parallel, and the tensor's CRC assembled afterwards.
POLY = 0x82F63B78
_ONE = 0x80000000  # the polynomial 1
_X8 = 0x00800000  # x^8


def gf_mul(a: int, b: int) -> int:
    """a · b mod P (reflected representation); at most 32 steps."""
    p = 0
    while a:
        if a & _ONE:
            p ^= b
        a = (a << 1) & _U32
        b = (b >> 1) ^ (POLY if b & 1 else 0)
    return p


@functools.lru_cache(maxsize=None)
def _xpow(k: int) -> int:
    """x^(8 · 2**k) mod P: advancing by 2**k zero bytes."""
    if k == 0:
        return _X8
    half = _xpow(k - 1)
    return gf_mul(half, half)


@functools.lru_cache(maxsize=4096)
def x8n(nbytes: int) -> int:
    """x^(8 · nbytes) mod P. Cached: callers combine many pieces of one length."""
    result, k = _ONE, 0
    while nbytes:
        if nbytes & 1:
            result = gf_mul(result, _xpow(k))
        nbytes >>= 1
        k += 1
    return result


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32C of ``a ‖ b`` from ``crc1 = crc32c(a)``, ``crc2 = crc32c(b)`` and ``len2 = len(b)`` bytes.

    Raises ValueError if ``len2`` is negative or a CRC is outside 0..2**32-1, TypeError for
    non-integers.
    """
    crc1, crc2, len2 = operator.index(crc1), operator.index(crc2), operator.index(len2)
    if not (0 <= crc1 <= _U32 and 0 <= crc2 <= _U32):
        raise ValueError(f"CRCs must be 32-bit unsigned values, got {crc1}, {crc2}")
    if len2 < 0:
        raise ValueError(f"len2 must be >= 0 bytes, got {len2}")
    if crc1 == 0:  # 0 · x^n = 0: the first chunk of every tensor skips the multiply
        return crc2
    return gf_mul(x8n(len2), crc1) ^ crc2
