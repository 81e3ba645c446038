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
