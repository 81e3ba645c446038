"""The two protos a bundle stores — BundleHeaderProto and BundleEntryProto — in proto3 wire format.

Hand-encoded (a few fields each) so the format layer needs no protobuf runtime. Field order and the
omission of default values follow what protobuf's serializer emits, so the bytes match TF's.
"""
import dataclasses
import struct

from gpusaver.format.wire import decode_varint, encode_varint

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MAX_DIMS = 254  # TensorShape's own limit; a larger count can only be garbage


def _key(field: int, wire_type: int) -> bytes:
    return encode_varint((field << 3) | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + encode_varint(len(payload)) + payload


def _varint_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + encode_varint(value) if value else b""


def parse_fields(buf, start: int = 0, end: int | None = None):
    """Yield (field, wire_type, value) for each field of a message in ``buf[start:end]``.

    ``value`` is an int for varint/fixed fields and bytes for length-delimited ones.
    Raises ValueError on any malformed or truncated input.
    """
    buf = bytes(buf)  # messages are small; indexing bytes is faster than a memoryview
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = decode_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = decode_varint(buf, pos, end)
        elif wire_type == _LEN:
            n, pos = decode_varint(buf, pos, end)
            if n > end - pos:
                raise ValueError(f"field {field}: length {n} runs past the message end")
            value, pos = buf[pos:pos + n], pos + n
        elif wire_type == _FIXED32:
            if pos + 4 > end:
                raise ValueError("truncated fixed32")
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire_type == _FIXED64:
            if pos + 8 > end:
                raise ValueError("truncated fixed64")
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        yield field, wire_type, value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclasses.dataclass(frozen=True)
class Header:
    """BundleHeaderProto: shard count, endianness (0 = little) and the producer version."""
    num_shards: int = 1
    endianness: int = 0
    producer: int = 1
    min_consumer: int = 0

    def encode(self) -> bytes:
        version = _varint_field(1, self.producer) + _varint_field(2, self.min_consumer)
        return (_varint_field(1, self.num_shards) + _varint_field(2, self.endianness)
                + _len_field(3, version))

    @classmethod
    def decode(cls, buf) -> "Header":
        fields = {"num_shards": 0, "endianness": 0, "producer": 0, "min_consumer": 0}
        for field, wt, value in parse_fields(buf):
            if field == 1 and wt == _VARINT:
                fields["num_shards"] = _int64(value)
            elif field == 2 and wt == _VARINT:
                fields["endianness"] = value
            elif field == 3 and wt == _LEN:
                for f, w, v in parse_fields(value):
                    if f == 1 and w == _VARINT:
                        fields["producer"] = _int64(v)
                    elif f == 2 and w == _VARINT:
                        fields["min_consumer"] = _int64(v)
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Extent:
    """One dimension of a TensorSliceProto; ``length`` None means the whole dimension."""
    start: int = 0
    length: int | None = None


@dataclasses.dataclass(frozen=True)
class Entry:
    """BundleEntryProto: where one tensor lives and how to check it. ``crc32c`` is the masked value."""
    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    slices: tuple[tuple[Extent, ...], ...] = ()

    def encode(self) -> bytes:
        dims = b"".join(_len_field(2, _varint_field(1, d)) for d in self.shape)
        out = [_varint_field(1, self.dtype), _len_field(2, dims), _varint_field(3, self.shard_id),
               _varint_field(4, self.offset), _varint_field(5, self.size)]
        if self.crc32c:
            out.append(_key(6, _FIXED32) + struct.pack("<I", self.crc32c))
        for extents in self.slices:
            body = b""
            for e in extents:
                ext = _varint_field(1, e.start)
                if e.length is not None:  # oneof: an explicit length is written even when 0
                    ext += _key(2, _VARINT) + encode_varint(e.length)
                body += _len_field(1, ext)
            out.append(_len_field(7, body))
        return b"".join(out)

    @classmethod
    def decode(cls, buf) -> "Entry":
        """Parse an entry; raises ValueError on malformed bytes, negative sizes or dims."""
        dtype = shard_id = offset = size = crc = 0
        shape: list[int] = []
        slices = []
        for field, wt, value in parse_fields(buf):
            if field == 1 and wt == _VARINT:
                dtype = value
            elif field == 2 and wt == _LEN:
                shape = _decode_shape(value)
            elif field == 3 and wt == _VARINT:
                shard_id = _int64(value)
            elif field == 4 and wt == _VARINT:
                offset = _int64(value)
            elif field == 5 and wt == _VARINT:
                size = _int64(value)
            elif field == 6 and wt == _FIXED32:
                crc = value
            elif field == 7 and wt == _LEN:
                slices.append(_decode_slice(value))
        if shard_id < 0 or offset < 0 or size < 0:
            raise ValueError(f"negative shard/offset/size ({shard_id}, {offset}, {size})")
        return cls(dtype, tuple(shape), shard_id, offset, size, crc, tuple(slices))


def _decode_shape(buf) -> list[int]:
    dims = []
    for field, wt, value in parse_fields(buf):
        if field == 2 and wt == _LEN:
            size = 0
            for f, w, v in parse_fields(value):
                if f == 1 and w == _VARINT:
                    size = _int64(v)
            if size < 0:
                raise ValueError(f"dimension of unknown or negative size ({size})")
            dims.append(size)
            if len(dims) > _MAX_DIMS:
                raise ValueError("too many dimensions")
        elif field == 3 and wt == _VARINT and value:
            raise ValueError("shape of unknown rank")
    return dims


def _decode_slice(buf) -> tuple[Extent, ...]:
    extents = []
    for field, wt, value in parse_fields(buf):
        if field == 1 and wt == _LEN:
            start, length = 0, None
            for f, w, v in parse_fields(value):
                if f == 1 and w == _VARINT:
                    start = _int64(v)
                elif f == 2 and w == _VARINT:
                    length = _int64(v)
            extents.append(Extent(start, length))
    return tuple(extents)
