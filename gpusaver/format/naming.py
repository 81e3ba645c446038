"""File names of a bundle and the OrderedCode keys of partitioned-variable slices."""
from gpusaver.format.proto import Extent

# The tensor an object-based checkpoint (tf.train.Checkpoint) keeps its TrackableObjectGraph in:
# metadata, not a value.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def index_path(prefix: str) -> str:
    return f"{prefix}.index"


def data_path(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def _num_increasing(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(raw)]) + raw


def _string(s: bytes) -> bytes:
    return s.replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff") + b"\x00\x01"


_HEADER_BITS = [(0, 0), (0x80, 0), (0xC0, 0), (0xE0, 0), (0xF0, 0), (0xF8, 0), (0xFC, 0), (0xFE, 0),
                (0xFF, 0), (0xFF, 0x80), (0xFF, 0xC0)]


def _signed_num_increasing(value: int) -> bytes:
    x = ~value if value < 0 else value
    if x < 64:
        return bytes([(_HEADER_BITS[1][0] ^ value) & 0xFF])
    length = x.bit_length() // 7 + 1
    raw = bytearray(value.to_bytes(10, "big", signed=True)[10 - length:])
    raw[0] ^= _HEADER_BITS[length][0]
    raw[1] ^= _HEADER_BITS[length][1]
    return bytes(raw)


def slice_key(name: str, extents: tuple[Extent, ...]) -> bytes:
    """Key under which one slice of a partitioned tensor is stored (EncodeTensorNameSlice)."""
    out = _num_increasing(0) + _string(name.encode("utf-8")) + _num_increasing(len(extents))
    for e in extents:
        out += _signed_num_increasing(e.start)
        out += _signed_num_increasing(-1 if e.length is None else e.length)
    return out
