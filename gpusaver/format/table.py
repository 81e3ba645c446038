"""The LevelDB-style sorted table that holds a bundle's ``.index``: builder and reader.

Layout (tsl/lib/io/table_builder.cc, block_builder.cc, format.cc):
``[data blocks][metaindex block][index block][footer: 48 bytes]``; each block is followed by a
1-byte compression type and the masked CRC32C of contents + type.
"""
import struct

from gpusaver.format.wire import crc32c, decode_varint, encode_varint, fixed32, mask, read_fixed32, unmask

BLOCK_SIZE = 262144
FOOTER_SIZE = 48
_MAGIC = 0xDB4775248B80FB57
_TRAILER = 5  # type byte + fixed32 crc
_NONE, _SNAPPY = 0, 1


class TableFormatError(ValueError):
    """The bytes are not a valid table; the bundle layer adds the file name."""


def shortest_separator(a: bytes, b: bytes) -> bytes:
    """A short key k with a <= k < b (LevelDB's BytewiseComparator::FindShortestSeparator)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    if i < n and a[i] < 0xFF and a[i] + 1 < b[i]:
        return a[:i] + bytes([a[i] + 1])
    return a


def short_successor(a: bytes) -> bytes:
    """A short key >= a (LevelDB's BytewiseComparator::FindShortSuccessor)."""
    for i, c in enumerate(a):
        if c != 0xFF:
            return a[:i] + bytes([c + 1])
    return a


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, without a loop per byte: the
    position of the highest differing bit of the two prefixes read as big-endian integers."""
    n = min(len(a), len(b))
    diff = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    return n - (diff.bit_length() + 7) // 8


class _BlockBuilder:
    def __init__(self, restart_interval: int):
        self._interval = restart_interval
        self.reset()

    def reset(self):
        self.buf = bytearray()
        self._restarts = [0]
        self._counter = 0
        self._last = b""

    def add(self, key: bytes, value: bytes):
        shared = 0
        if self._counter < self._interval:
            shared = _common_prefix(key, self._last)
        else:
            self._restarts.append(len(self.buf))
            self._counter = 0
        non_shared, value_len = len(key) - shared, len(value)
        if non_shared < 0x80 and value_len < 0x80:  # shared <= len(key): the usual one byte each
            self.buf += bytes((shared, non_shared, value_len)) if shared < 0x80 else (
                encode_varint(shared) + bytes((non_shared, value_len)))
        else:
            self.buf += encode_varint(shared) + encode_varint(non_shared) + encode_varint(value_len)
        self.buf += key[shared:]
        self.buf += value
        self._last = key
        self._counter += 1

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self._restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buf) + b"".join(fixed32(r) for r in self._restarts) + fixed32(len(self._restarts))


def _handle(offset: int, size: int) -> bytes:
    return encode_varint(offset) + encode_varint(size)


class TableBuilder:
    """Builds a table in memory from keys added in strictly increasing order; :meth:`finish` returns it.

    Follows TF's builder rules exactly, so the bytes equal what TF writes for the same entries.
    """

    def __init__(self, block_size: int = BLOCK_SIZE):
        self._block_size = block_size
        self._out = bytearray()
        self._data = _BlockBuilder(16)
        self._index: list[tuple[bytes, bytes]] = []  # (separator key, handle) per data block
        self._last_key = None
        self._pending = None  # handle of the last flushed data block, not yet in the index

    def add(self, key: bytes, value: bytes):
        """Append an entry. Raises ValueError if ``key`` is not greater than the previous key."""
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"table keys must be strictly increasing: {key!r} after {self._last_key!r}")
        if self._data.buf and len(key) + len(value) >= 2 * self._block_size:
            self._flush()
        if self._pending is not None:
            self._index.append((shortest_separator(self._last_key, key), self._pending))
            self._pending = None
        self._last_key = key
        data = self._data
        data.add(key, value)
        if len(data.buf) + 4 * len(data._restarts) + 4 >= self._block_size:  # data.size_estimate()
            self._flush()

    def _flush(self):
        if self._data.buf:
            self._pending = write_block(self._out, self._data.finish())
            self._data.reset()

    def finish(self) -> bytes:
        """Write the last data block, the metaindex, the index and the footer; return the table bytes."""
        self._flush()
        if self._pending is not None:
            self._index.append((short_successor(self._last_key), self._pending))
        return finish_table(self._out, self._index)


def write_block(out: bytearray, contents: bytes) -> bytes:
    """Append one block (its contents, the compression type, the masked CRC32C of both) to
    ``out``; return the block's handle."""
    handle = _handle(len(out), len(contents))
    trailer = bytes([_NONE])
    out += contents + trailer + fixed32(mask(crc32c(trailer, crc32c(contents))))
    return handle


def finish_table(out: bytearray, index: list[tuple[bytes, bytes]]) -> bytes:
    """Append the (empty) metaindex, the index block over ``index`` — a (separator key, handle)
    per data block, in order — and the footer to ``out``, the data blocks; return the table."""
    metaindex = write_block(out, _BlockBuilder(16).finish())
    block = _BlockBuilder(1)
    for key, handle in index:
        block.add(key, handle)
    index_handle = write_block(out, block.finish())
    out += (metaindex + index_handle).ljust(FOOTER_SIZE - 8, b"\0") + struct.pack("<Q", _MAGIC)
    return bytes(out)


def _read_handle(buf, pos: int, limit: int):
    offset, pos = decode_varint(buf, pos, limit)
    size, pos = decode_varint(buf, pos, limit)
    return offset, size, pos


def _block(data: memoryview, offset: int, size: int, limit: int) -> memoryview:
    """Contents of the block at ``offset`` after checking bounds, CRC and compression type."""
    if offset + size + _TRAILER > limit:
        raise TableFormatError(f"block [{offset}, +{size}) runs past the table's end ({limit} bytes)")
    contents = data[offset:offset + size]
    btype = data[offset + size]
    stored = read_fixed32(data, offset + size + 1)
    if crc32c(data[offset + size:offset + size + 1], crc32c(contents)) != unmask(stored):
        raise TableFormatError(f"block at offset {offset} fails its CRC32C check")
    if btype == _SNAPPY:
        from gpusaver.format.snappy import decompress
        return memoryview(decompress(contents))
    if btype != _NONE:
        raise TableFormatError(f"block at offset {offset} has unknown compression type {btype}")
    return contents


def _block_entries(block):
    """Yield (key, value bytes) from one block's contents; every length is bounds-checked."""
    block = bytes(block)  # indexing and slicing bytes is several times cheaper than a memoryview
    n = len(block)
    if n < 4:
        raise TableFormatError("block too short for its restart count")
    num_restarts = read_fixed32(block, n - 4)
    if 4 * (num_restarts + 1) > n:
        raise TableFormatError(f"block claims {num_restarts} restarts, more than fit in {n} bytes")
    end = n - 4 * (num_restarts + 1)
    pos, key = 0, b""
    while pos < end:
        if pos + 3 <= end and block[pos] < 0x80 and block[pos + 1] < 0x80 and block[pos + 2] < 0x80:
            shared, non_shared, value_len = block[pos], block[pos + 1], block[pos + 2]  # the usual entry
            pos += 3
        else:
            shared, pos = decode_varint(block, pos, end, 5)
            non_shared, pos = decode_varint(block, pos, end, 5)
            value_len, pos = decode_varint(block, pos, end, 5)
        if shared > len(key) or non_shared + value_len > end - pos:
            raise TableFormatError(f"block entry at {pos} has lengths that run past the block")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len


def read_table(data) -> dict[bytes, bytes]:
    """Parse a whole table; return {key: value}. Raises TableFormatError for any malformed input.

    The table is parsed from a buffer already in memory (index files are small), so a corrupted
    length can never cause a read or an allocation larger than the file itself.
    """
    data = memoryview(data)
    n = len(data)
    if n < FOOTER_SIZE:
        raise TableFormatError(f"{n} bytes is too short for a table footer ({FOOTER_SIZE})")
    if struct.unpack_from("<Q", data, n - 8)[0] != _MAGIC:
        raise TableFormatError("bad table magic number (not a TensorFlow checkpoint index)")
    limit = n - FOOTER_SIZE
    try:
        _, _, pos = _read_handle(data, limit, n - 8)
        index_off, index_size, _ = _read_handle(data, pos, n - 8)
        entries = {}
        last = None
        for _, handle in _block_entries(_block(data, index_off, index_size, limit)):
            off, size, _ = _read_handle(handle, 0, len(handle))
            for key, value in _block_entries(_block(data, off, size, limit)):
                if last is not None and key <= last:
                    raise TableFormatError(f"keys out of order: {key!r} after {last!r}")
                entries[key] = value
                last = key
    except TableFormatError:
        raise
    except ValueError as e:  # malformed varints
        raise TableFormatError(str(e)) from None
    return entries
