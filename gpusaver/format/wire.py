"""Low-level encodings shared by the table and the protos: varints, fixed32, masked CRC32C."""
import struct

import crc32c as _crc32c

# LevelDB masks stored CRCs so that a CRC of data that itself contains CRCs does not degenerate.
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of any buffer, extending ``value``; the GIL is released for large buffers."""
    return _crc32c.crc32c(data, value)


def mask(crc: int) -> int:
    """Mask a CRC32C the way LevelDB / TF store it."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    r = (masked - _MASK_DELTA) & _U32
    return ((r >> 17) | (r << 15)) & _U32


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128 (protobuf varint); negative int64s are encoded as their 64-bit two's complement."""
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
# Polynomial arithmetic modulo the (reflected) Castagnoli polynomial, as in zlib's crc32_combine:
# crc(a ‖ b) = crc(a) · x^(8·len(b)) mod P  xor  crc(b). This lets chunks (and GPU segments) be
# checksummed independently, in parallel, and the tensor's CRC be assembled afterwards.
_POLY = 0x82F63B78


def _multmodp(a: int, b: int) -> int:
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


def _x8n(n: int) -> int:
    """x^(8n) mod P."""
    p, k = 1 << 31, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32C of ``a ‖ b`` given ``crc1 = crc32c(a)``, ``crc2 = crc32c(b)`` and ``len2 = len(b)`` bytes."""
    return _multmodp(_x8n(len2), crc1) ^ crc2
