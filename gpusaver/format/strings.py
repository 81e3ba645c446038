"""DT_STRING tensors: ``varint64 len_i ...``, a 4-byte checksum of the lengths, then the bytes.

The CRC is not over the bytes as stored: each length enters it as a 4-byte (or 8-byte, if it does
not fit in 32 bits) little-endian integer, then the masked length-checksum as stored, then the
string bytes (tensor_bundle.cc, WriteStringTensor).
"""
import struct

import numpy as np

from gpusaver.errors import InvalidTypeError
from gpusaver.format.wire import crc32c, decode_varint, encode_varint, mask


def _length_crc(lengths, crc: int = 0) -> int:
    for n in lengths:
        crc = crc32c(struct.pack("<Q" if n > 0xFFFFFFFF else "<I", n), crc)
    return crc


def as_bytes_list(array: np.ndarray, name: str | None = None) -> list[bytes]:
    """The elements of a str/bytes/object array as bytes (str is UTF-8 encoded), row-major.

    Raises InvalidTypeError (a TypeError) naming the tensor ``name`` and the element's position."""
    out = []
    for i, item in enumerate(np.asarray(array, dtype=object).reshape(-1)):
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview, np.bytes_)):
            tensor = f"tensor {name!r}: " if name is not None else ""
            raise InvalidTypeError(f"{tensor}string tensor element {i} ({item!r:.60}, a {type(item).__name__}) "
                                   "is not str or bytes; convert it, or save it as a numeric array")
        out.append(bytes(item))
    return out


def encode(items: list[bytes]) -> tuple[bytes, int]:
    """Encode string elements; return (stored bytes, masked entry CRC)."""
    lengths = [len(s) for s in items]
    length_crc = _length_crc(lengths)
    field = struct.pack("<I", mask(length_crc))
    crc = crc32c(field, length_crc)
    for s in items:
        crc = crc32c(s, crc)
    data = b"".join(encode_varint(n) for n in lengths) + field + b"".join(items)
    return data, mask(crc)


def decode(data, count: int, name: str) -> tuple[np.ndarray, int]:
    """Parse ``count`` elements from stored bytes; return (object array of bytes, masked CRC).

    Raises ValueError (naming ``name``) if the lengths do not fit the stored size or their
    checksum does not match.
    """
    data = memoryview(data)
    n = len(data)
    pos = 0
    lengths = []
    for _ in range(count):
        length, pos = decode_varint(data, pos, n)
        lengths.append(length)
    if pos + 4 + sum(lengths) != n:
        raise ValueError(f"string tensor {name!r}: lengths add up to {pos + 4 + sum(lengths)} bytes, "
                         f"entry says {n}")
    length_crc = _length_crc(lengths)
    stored = data[pos:pos + 4]
    if struct.unpack("<I", stored)[0] != mask(length_crc):
        raise ValueError(f"string tensor {name!r}: checksum of the element lengths does not match")
    crc = crc32c(stored, length_crc)
    pos += 4
    out = np.empty(count, dtype=object)
    for i, length in enumerate(lengths):
        out[i] = bytes(data[pos:pos + length])
        pos += length
    crc = crc32c(data[pos - sum(lengths):pos], crc)
    return out, mask(crc)
