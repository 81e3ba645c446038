"""The two protos a bundle stores — BundleHeaderProto and BundleEntryProto — in proto3 wire format.

Hand-encoded (a few fields each) so the format layer needs no protobuf runtime. Field order and the
omission of default values follow what protobuf's serializer emits, so the bytes match TF's.
"""
import dataclasses
import itertools
import struct
import typing

from gpusaver.format.wire import decode_varint, encode_varint

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MAX_DIMS = 254  # TensorShape's own limit; a larger count can only be garbage
_U32 = struct.Struct("<I")
# Tags of BundleEntryProto's scalar fields (field << 3 | wire type), as the fast paths meet them.
T_DTYPE, T_SHAPE, T_SHARD, T_OFFSET, T_SIZE, T_CRC = 0x08, 0x12, 0x18, 0x20, 0x28, 0x35
# A model's tensors share a handful of shapes: their encodings are kept, so a checkpoint of
# 30,000 tensors encodes (and decodes) each distinct shape once. Bounded: cleared when full.
_SHAPE_CACHE_MAX = 4096
_shape_bytes: dict[tuple, bytes] = {}
_shape_tuples: dict[bytes, tuple] = {}
_tuple_new = tuple.__new__
_DTYPE_FIELD = tuple(b"\x08" + bytes((i,)) for i in range(0x80))  # field 1 of every dtype enum there is


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


class Entry(typing.NamedTuple):
    """BundleEntryProto: where one tensor lives and how to check it. ``crc32c`` is the masked value.

    A named tuple, not a dataclass: a checkpoint of 30,000 tensors makes 30,000 of them when it is
    opened, and a tuple is built in C (``Entry.many``: ~0.3 µs each, a frozen dataclass ~1.7 µs)."""
    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    slices: tuple[tuple[Extent, ...], ...] = ()

    def encode(self) -> bytes:
        # Fields in number order, zeros omitted: what protobuf's serializer (and so TF) writes.
        dtype = self.dtype
        out = (_DTYPE_FIELD[dtype] if 0 < dtype < 0x80 else _varint_field(1, dtype)) + shape_field(self.shape)
        if self.shard_id:
            out += b"\x18" + encode_varint(self.shard_id)
        if self.offset:
            out += b"\x20" + encode_varint(self.offset)
        if self.size:
            out += b"\x28" + encode_varint(self.size)
        if self.crc32c:
            out += b"\x35" + _U32.pack(self.crc32c)
        if not self.slices:
            return out
        out = [out]
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
    def plain(cls, dtype: int, shape: tuple, shard_id: int, offset: int, size: int, crc32c: int) -> "Entry":
        """An entry without slices, from values already checked."""
        return _tuple_new(cls, (dtype, shape, shard_id, offset, size, crc32c, ()))

    @classmethod
    def many(cls, *columns) -> list["Entry"]:
        """Entries without slices from columns of checked values (dtypes, shapes, shard ids,
        offsets, sizes, crcs), all built in C."""
        return list(map(_tuple_new, itertools.repeat(cls), zip(*columns, itertools.repeat(()))))

    @classmethod
    def decode(cls, buf) -> "Entry":
        """Parse an entry; raises ValueError on malformed bytes, negative sizes or dims."""
        buf = bytes(buf)
        try:
            fields = _decode_plain(buf)
        except (ValueError, IndexError, struct.error):  # malformed: the full parser says how
            fields = None
        if fields is not None:
            return cls.plain(*fields)
        return cls(*_decode_fields(buf))


def _decode_fields(buf: bytes) -> tuple:
    """Any BundleEntryProto's fields, in Entry's order: the full parser (slices, unknown fields,
    fields out of order or repeated: the last one wins, as in protobuf)."""
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
    return dtype, tuple(shape), shard_id, offset, size, crc, tuple(slices)


def shape_field(shape: tuple) -> bytes:
    """Field 2 (TensorShapeProto) of an entry: always written, a scalar as ``12 00``."""
    if type(shape) is not tuple:
        shape = tuple(shape)
    out = _shape_bytes.get(shape)
    if out is None:
        dims = b"".join(_len_field(2, _varint_field(1, d)) for d in shape)
        out = _len_field(2, dims)
        if len(_shape_bytes) >= _SHAPE_CACHE_MAX:
            _shape_bytes.clear()
        _shape_bytes[shape] = out
    return out


def _decode_plain(buf: bytes):
    """The fields of an entry written the way protobuf serializes a whole tensor's entry (fields
    1-6 in number order, each at most once, no slices, nothing unknown: every such entry from
    gpusaver and TF), or None for anything else, which the full parser then reads.

    Straight-line code and a cached shape: the generic parser's generator and per-field copies
    cost ~15 µs an entry, most of opening a checkpoint of 30,000 small tensors.
    """
    end = len(buf)
    dtype = shard_id = offset = size = crc = 0
    pos = 0
    if pos < end and buf[pos] == T_DTYPE:
        dtype, pos = _varint(buf, pos + 1, end)
    if pos >= end or buf[pos] != T_SHAPE or buf[pos + 1] >= 0x80:
        return None
    n = buf[pos + 1]
    raw = buf[pos + 2:pos + 2 + n]
    if len(raw) != n:
        return None
    pos += 2 + n
    shape = decode_shape(raw)
    if pos < end and buf[pos] == T_SHARD:
        shard_id, pos = _varint(buf, pos + 1, end)
    if pos < end and buf[pos] == T_OFFSET:
        offset, pos = _varint(buf, pos + 1, end)
    if pos < end and buf[pos] == T_SIZE:
        size, pos = _varint(buf, pos + 1, end)
    if pos < end and buf[pos] == T_CRC and pos + 5 <= end:
        crc = _U32.unpack_from(buf, pos + 1)[0]
        pos += 5
    if pos != end or shard_id >= 1 << 63 or offset >= 1 << 63 or size >= 1 << 63:
        return None  # more fields, or negative int64s: the full parser reads (or refuses) them
    return dtype, shape, shard_id, offset, size, crc


def decode_shape(raw: bytes) -> tuple[int, ...]:
    """The dims of a TensorShapeProto's bytes, cached per distinct shape. Raises ValueError on a
    negative dim or an unknown rank."""
    shape = _shape_tuples.get(raw)
    if shape is None:
        shape = tuple(_decode_shape(raw))
        if len(_shape_tuples) >= _SHAPE_CACHE_MAX:
            _shape_tuples.clear()
        _shape_tuples[raw] = shape
    return shape


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A varint of at most 10 bytes at ``buf[pos]``; IndexError if truncated (``end`` is the
    message's end: ``len(buf)``), ValueError if longer."""
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    value, shift = b & 0x7F, 7
    for pos in range(pos + 1, min(pos + 10, end)):
        b = buf[pos]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos + 1
        shift += 7
    raise ValueError("truncated or over-long varint")


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
