"""Snappy decompression for the rare ``.index`` blocks written with compression type 1.

TF itself never compresses bundle indexes, but tables written by other LevelDB writers may; the
format is small enough (literals and back-references) that a dependency is not worth it.
"""
from gpusaver.format.wire import decode_varint


def decompress(src) -> bytes:
    """Decompress one raw Snappy block. Raises ValueError on malformed input."""
    src = memoryview(src)
    n = len(src)
    expected, pos = decode_varint(src, 0, n, 5)
    out = bytearray()
    while pos < n:
        tag = src[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                length = int.from_bytes(src[pos:pos + extra], "little")
                pos += extra
            length += 1
            if pos + length > n:
                raise ValueError("snappy literal runs past the input")
            out += src[pos:pos + length]
            pos += length
            continue
        if kind == 1:
            length, width = ((tag >> 2) & 7) + 4, 1
            offset = (tag >> 5) << 8
        else:
            length, width, offset = (tag >> 2) + 1, 2 if kind == 2 else 4, 0
        if pos + width > n:
            raise ValueError("snappy copy runs past the input")
        offset |= int.from_bytes(src[pos:pos + width], "little")
        pos += width
        if offset == 0 or offset > len(out):
            raise ValueError(f"snappy copy offset {offset} is outside the {len(out)} bytes produced")
        if len(out) + length > expected:
            raise ValueError("snappy output longer than its declared length")
        start = len(out) - offset
        for i in range(length):  # byte by byte: copies may overlap their own output
            out.append(out[start + i])
    if len(out) != expected:
        raise ValueError(f"snappy output is {len(out)} bytes, header says {expected}")
    return bytes(out)
