"""Every entry of a bundle's ``.index`` decoded and checked at once, with numpy.

Opening a checkpoint of 30,000 small tensors decoded 30,000 BundleEntryProtos one by one
(~5 µs each, a fifth of restoring such a tensor). Entries written the way protobuf serializes a
whole tensor's entry — fields 1 to 6 in order, each at most once, no slices, nothing unknown:
every entry gpusaver and TF write for an unpartitioned tensor — are decoded here field by field
for all rows together: a varint is ten byte gathers and a few masks over every row at once.

Rows this does not decode (slices, strings, unknown dtypes, odd layouts, sizes that do not fit
their shape) are left to the reader's entry-by-entry path, which reads them or names what is wrong.
"""
import math
import numpy as np

from gpusaver.format import proto
from gpusaver.format.dtypes import DataType, enum_to_dtype
from gpusaver.errors import UnsupportedError

_I64 = np.int64
_MAX_VARINT = 9  # bytes: values below 2**63 (larger ones are negative int64s: the slow path's)
_ITEMSIZE = np.zeros(256, _I64)  # bytes per element of each numeric DataType below 256; 0: not here
for _value in DataType:
    if _value != DataType.STRING and _value < 256:
        try:
            _ITEMSIZE[_value] = enum_to_dtype(_value).itemsize
        except UnsupportedError:
            pass


def decode(values: list[bytes], num_shards: int) -> list[proto.Entry | None]:
    """Decode and check every entry: the Entry of each row whose layout is the plain one, dtype
    numeric and known, shard below ``num_shards`` and size exactly its shape's bytes; None for
    the other rows (the reader's entry-by-entry path reads them, or says what is wrong)."""
    n = len(values)
    lengths = np.fromiter(map(len, values), _I64, n)
    ends = np.cumsum(lengths)
    data = np.frombuffer(b"".join(values) + bytes(_MAX_VARINT + 2), np.uint8)
    pos = ends - lengths
    ok = np.ones(n, bool)

    def varint_field(tag: int):
        """The optional varint field ``tag`` at each row's position (0 where absent), one byte
        position at a time for all rows, as far as the longest varint goes."""
        nonlocal pos, ok
        has = (pos < ends) & (data[pos] == tag)
        at = np.where(has, pos + 1, len(data) - _MAX_VARINT - 1)  # absent: read the zero padding
        value = np.zeros(n, np.uint64)
        nbytes = np.zeros(n, _I64)
        more = has  # rows whose varint goes on at byte k
        for k in range(_MAX_VARINT):
            byte = data[at + k]
            value |= np.where(more, (byte & 0x7F).astype(np.uint64) << np.uint64(7 * k), np.uint64(0))
            nbytes += more
            more = more & (byte >= 0x80)
            if not more.any():
                break
        ok &= ~more  # longer varints (values of 2**63 and up): the slow path's
        pos = pos + nbytes + has
        return value.astype(_I64)

    dtype = varint_field(proto.T_DTYPE)
    # The shape is always written (a scalar's as ``12 00``); its bytes are decoded once per distinct shape.
    ok &= (pos + 1 < ends) & (data[np.minimum(pos, len(data) - 1)] == proto.T_SHAPE)
    shape_len = np.where(ok, data[np.minimum(pos + 1, len(data) - 1)], 0).astype(_I64)
    ok &= shape_len < 0x80
    shape_len = np.where(ok, shape_len, 0)
    shape_at = pos + 2
    pos = np.where(ok, pos + 2 + shape_len, pos)
    shard = varint_field(proto.T_SHARD)
    offset = varint_field(proto.T_OFFSET)
    size = varint_field(proto.T_SIZE)
    has_crc = (pos < ends) & (data[pos] == proto.T_CRC)
    crc_at = np.where(has_crc, pos + 1, len(data) - 5)
    crc = np.where(has_crc, data[crc_at[:, None] + np.arange(4)].astype(_I64) @ (1 << 8 * np.arange(4)), 0)
    pos = np.where(has_crc, pos + 5, pos)
    ok &= pos == ends

    width = int(shape_len.max(initial=0))
    cols = np.arange(width)
    raw_shapes = np.where(cols < shape_len[:, None], data[np.minimum(shape_at[:, None] + cols, len(data) - 1)], 0)
    keyed = np.concatenate([shape_len[:, None].astype(np.uint8), raw_shapes.astype(np.uint8)], axis=1)
    unique, shape_of = np.unique(np.ascontiguousarray(keyed).view(np.dtype((np.void, width + 1))).ravel(),
                                 return_inverse=True)
    shapes, elements = [], []
    for u in unique:
        raw = bytes(u)[1:1 + bytes(u)[0]]
        try:
            shape = proto.decode_shape(raw)
        except ValueError:
            shape = None
        shapes.append(shape)
        elements.append(-1 if shape is None else math.prod(shape))
    elements = np.array([e if 0 <= e < 1 << 62 else -1 for e in elements], _I64)[shape_of]
    itemsize = _ITEMSIZE[np.clip(dtype, 0, 255)]
    ok &= (dtype < 256) & (itemsize > 0) & (elements >= 0) & (shard < num_shards)
    ok &= elements <= (1 << 62) // np.maximum(itemsize, 1)  # so the product below cannot wrap
    ok &= size == elements * itemsize
    shape_of = shape_of.ravel().tolist()
    out = proto.Entry.many(dtype.tolist(), [shapes[s] for s in shape_of], shard.tolist(), offset.tolist(),
                           size.tolist(), crc.tolist())
    for i in np.flatnonzero(~ok).tolist():
        out[i] = None
    return out
