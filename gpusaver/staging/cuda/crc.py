"""Host-side CRC-32C arithmetic and numpy mirrors of the CUDA kernels.

The device computes one CRC-32C per fixed-size segment (``kernels/crc32c.cu``); this module
folds those into the CRC of the whole buffer (:func:`combine_segments`, built on
:func:`crc32c_combine`) and holds numpy references of the kernels' exact algorithms
(:func:`crc32c_segments_reference`, :func:`pack_reference`, :func:`unpack_reference`), so the
kernels' arithmetic is tested on machines without a GPU.

CRC values are those of the ``crc32c`` package and of TensorFlow's checkpoints: Castagnoli,
reflected polynomial 0x82F63B78, initial register and final xor 0xFFFFFFFF, unmasked.
Polynomials mod P are held in the reflected form of the CRC register: bit 31 is the
coefficient of x^0. Advancing a register over n zero bytes multiplies it by x^(8n) mod P;
that is all :func:`crc32c_combine` (from ``gpusaver.format.wire``) needs. numpy only: no CuPy,
no TensorFlow.
"""

from __future__ import annotations

import operator
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

# The GF(2) arithmetic lives in the format layer, which needs it to combine chunk CRCs.
from gpusaver.format.wire import POLY, crc32c_combine, gf_mul, x8n

__all__ = [
    "POLY",
    "THREADS",
    "crc32c_combine",
    "combine_segments",
    "crc32c_segments_reference",
    "pack_layout",
    "pack_reference",
    "unpack_reference",
]

#: Threads per block of ``crc32c_segments``; must equal CRC_THREADS in kernels/crc32c.cu.
THREADS = 256
#: Bytes per load of one kernel thread (one uint4).
_BLOCK = 16
_GAP = _BLOCK * (THREADS - 1)  # bytes of other threads between two blocks of one thread
_ONE = 0x80000000  # the polynomial 1
_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# GF(2)[x] / P arithmetic


def _gf_mul_np(values: np.ndarray, b: int) -> np.ndarray:
    """Elementwise ``values * b mod P`` for a uint32 array and one constant ``b``."""
    v = values.astype(np.uint32, copy=True)
    p = np.zeros_like(v)
    poly = np.uint32(POLY)
    for bit in range(32):
        if b & (_ONE >> bit):
            p ^= v
        v = (v >> np.uint32(1)) ^ np.where(v & np.uint32(1), poly, np.uint32(0))
    return p


@lru_cache(maxsize=256)
def _advance_tables(nbytes: int) -> np.ndarray:
    """(4, 256) uint32: the linear map "advance by ``nbytes`` zero bytes", one table per
    register byte, so applying it costs four lookups instead of a 32-step multiply."""
    shifts = 8 * np.arange(4, dtype=np.uint32)
    basis = np.arange(256, dtype=np.uint32)[None, :] << shifts[:, None]
    tables = _gf_mul_np(basis, x8n(nbytes))
    tables.setflags(write=False)
    return tables


@lru_cache(maxsize=256)
def _advance_lists(nbytes: int) -> tuple[list[int], list[int], list[int], list[int]]:
    t = _advance_tables(nbytes)
    return t[0].tolist(), t[1].tolist(), t[2].tolist(), t[3].tolist()


def _advance_np(values: np.ndarray, nbytes: int) -> np.ndarray:
    t = _advance_tables(nbytes)
    return (t[0][values & 0xFF] ^ t[1][(values >> 8) & 0xFF]
            ^ t[2][(values >> 16) & 0xFF] ^ t[3][values >> 24])


def _segment_count(total_nbytes: int, segment_size: int) -> int:
    segment_size = operator.index(segment_size)
    total_nbytes = operator.index(total_nbytes)
    if segment_size <= 0:
        raise ValueError(f"segment size must be > 0 bytes, got {segment_size}")
    if total_nbytes < 0:
        raise ValueError(f"total size must be >= 0 bytes, got {total_nbytes}")
    return -(-total_nbytes // segment_size)


def combine_segments(crcs: Iterable[int], segment_size: int, total_nbytes: int) -> int:
    """Fold per-segment CRC-32Cs (in buffer order) into the CRC-32C of the whole buffer.

    Segment ``i`` covers bytes ``[i * segment_size, min((i + 1) * segment_size, total_nbytes))``;
    only the last may be short. An empty buffer has CRC 0. Costs four table lookups per
    segment after a one-off table build per segment size.

    Raises:
        ValueError: ``segment_size <= 0``, ``total_nbytes < 0``, or the number of CRCs is not
            ``ceil(total_nbytes / segment_size)``.
    """
    if isinstance(crcs, np.ndarray):
        values = crcs.astype(np.int64).reshape(-1).tolist()
    else:
        values = [operator.index(c) for c in crcs]
    nseg = _segment_count(total_nbytes, segment_size)
    if len(values) != nseg:
        raise ValueError(
            f"{len(values)} segment CRCs given, expected {nseg} for {total_nbytes} bytes "
            f"in segments of {segment_size} bytes")
    if nseg == 0:
        return 0
    if any(not 0 <= v <= _MASK32 for v in values):
        raise ValueError("segment CRCs must be 32-bit unsigned values")
    crc = values[0]
    if nseg > 2:
        t0, t1, t2, t3 = _advance_lists(segment_size)
        for v in values[1:-1]:
            crc = (t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF]
                   ^ t2[(crc >> 16) & 0xFF] ^ t3[crc >> 24] ^ v)
    if nseg > 1:
        crc = crc32c_combine(crc, values[-1], total_nbytes - (nseg - 1) * segment_size)
    return crc


# ---------------------------------------------------------------------------------------------
# Reference of kernels/crc32c.cu


@lru_cache(maxsize=None)
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """(T0, comp): the byte table and the 16 composite tables the kernel builds in shared
    memory. comp[k][v] is T0[v] advanced by k + _GAP zero bytes."""
    c = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        c = (c >> np.uint32(1)) ^ np.where(c & np.uint32(1), np.uint32(POLY), np.uint32(0))
    t0 = c
    comp = np.empty((16, 256), dtype=np.uint32)
    comp[0] = _advance_np(t0, _GAP)
    for k in range(1, 16):
        comp[k] = (comp[k - 1] >> np.uint32(8)) ^ t0[comp[k - 1] & 0xFF]
    t0.setflags(write=False)
    comp.setflags(write=False)
    return t0, comp


def _as_bytes(buf) -> np.ndarray:
    """A 1-D uint8 view of a C-contiguous array or any buffer-protocol object (no copy)."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("buffer must be C-contiguous")
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def _absorb_composite(reg: np.ndarray, blocks: np.ndarray, comp: np.ndarray) -> np.ndarray:
    x = reg ^ blocks.view("<u4")[..., 0]
    out = (comp[15][x & 0xFF] ^ comp[14][(x >> 8) & 0xFF]
           ^ comp[13][(x >> 16) & 0xFF] ^ comp[12][x >> 24])
    for i in range(4, 16):
        out ^= comp[15 - i][blocks[..., i]]
    return out


def _absorb_plain(reg: np.ndarray, blocks: np.ndarray, t0: np.ndarray) -> np.ndarray:
    for i in range(16):
        reg = (reg >> np.uint32(8)) ^ t0[(reg ^ blocks[..., i]) & 0xFF]
    return reg


def crc32c_segments_reference(buf, segment: int, *, address: int | None = None) -> np.ndarray:
    """CRC-32C of each ``segment``-byte piece of ``buf``, by the kernel's own algorithm.

    Mirrors ``crc32c_segments`` in kernels/crc32c.cu step for step (16-aligned view of each
    segment, 16-byte blocks dealt round-robin to ``THREADS`` lanes, composite tables, the
    advance-and-xor tree, the byte-wise tail, the initial-register term), vectorised over
    segments and lanes. ``address`` (default: where ``buf``'s bytes actually are) sets each
    segment's alignment, which decides how the kernel splits it; the CRCs do not depend on it.

    It works one row of blocks (up to 4 KiB per segment) at a time, with some 30 bytes of
    temporaries per byte of the row across all segments: right for test-sized buffers, slow
    and memory-hungry for gigabytes.

    Returns:
        uint32 array of ``ceil(len(buf) / segment)`` CRCs (empty for an empty buffer).

    Raises:
        ValueError: ``segment <= 0`` or ``buf`` is a non-contiguous array.
    """
    a = _as_bytes(buf)
    n = a.size
    nseg = _segment_count(n, segment)
    if nseg == 0:
        return np.zeros(0, dtype=np.uint32)
    if address is None:
        address = a.ctypes.data
    t0, comp = _tables()

    starts = np.arange(nseg, dtype=np.int64) * segment
    lens = np.minimum(segment, n - starts)
    pads = (starts + (address % _BLOCK)) % _BLOCK
    nfull = (pads + lens) // _BLOCK
    rows = int(-(-nfull.max() // THREADS))
    # The kernel's shift is rows_s * THREADS - nfull_s; measuring it from the longest segment's
    # row count only prepends all-zero rows, which leave a zero register at zero.
    shift = rows * THREADS - nfull
    # Lanes below THREADS - width never receive a block; their register stays 0.
    width = int(min(THREADS, nfull.max()))
    lane = np.arange(THREADS - width, THREADS, dtype=np.int64)
    byte = np.arange(_BLOCK, dtype=np.int64)

    reg = np.zeros((nseg, width), dtype=np.uint32)
    for r in range(rows):
        j = r * THREADS + lane[None, :] - shift[:, None]
        off = _BLOCK * j[..., None] + byte - pads[:, None, None]  # byte offset in the segment
        valid = off >= 0  # negative: before the segment (alignment pad or zero block)
        gathered = a[np.where(valid, starts[:, None, None] + off, 0)]
        blocks = np.ascontiguousarray(np.where(valid, gathered, 0), dtype=np.uint8)
        if r + 1 < rows:
            reg = _absorb_composite(reg, blocks, comp)
        else:
            reg = _absorb_plain(reg, blocks, t0)

    lanes = np.zeros((nseg, THREADS), dtype=np.uint32)
    lanes[:, THREADS - width:] = reg
    stride = 1
    while lanes.shape[1] > 1:
        lanes = _advance_np(lanes[:, 0::2], _BLOCK * stride) ^ lanes[:, 1::2]
        stride *= 2
    raw = lanes[:, 0]

    full_end = _BLOCK * nfull
    t_begin = np.where(full_end > pads, full_end - pads, 0)
    count = lens - t_begin
    for i in range(_BLOCK - 1):
        active = i < count
        b = a[np.where(active, starts + t_begin + i, 0)]
        raw = np.where(active, (raw >> np.uint32(8)) ^ t0[(raw ^ b) & 0xFF], raw)

    out = raw ^ np.uint32(_MASK32)
    for length in np.unique(lens).tolist():
        out[lens == length] ^= np.uint32(gf_mul(x8n(length), _MASK32))
    return out


# ---------------------------------------------------------------------------------------------
# Reference of kernels/pack.cu


def pack_layout(sizes: Sequence[int], align: int = 16) -> tuple[np.ndarray, int]:
    """Offsets of tensors of ``sizes`` bytes packed in order, each start rounded up to a
    multiple of ``align`` bytes (16 lets the kernel use 16-byte loads when the sources are
    16-aligned, as device allocations are); gaps are zero in buffers this package allocates.

    Returns:
        (int64 offsets, total bytes) where total is the end of the last tensor.

    Raises:
        ValueError: a size is negative or ``align`` is not a positive power of two.
    """
    align = operator.index(align)
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a positive power of two, got {align}")
    offsets = np.zeros(len(sizes), dtype=np.int64)
    end = 0
    for i, size in enumerate(sizes):
        size = operator.index(size)
        if size < 0:
            raise ValueError(f"size of tensor {i} is negative: {size}")
        start = (end + align - 1) & -align
        offsets[i] = start
        end = start + size
    return offsets, end


def pack_reference(arrays: Sequence, align: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Host mirror of ``pack_gather``: the bytes of each C-contiguous array (or buffer) laid
    out by :func:`pack_layout`; padding bytes are zero. Inputs are not modified.

    Returns:
        (uint8 buffer, int64 offsets in bytes).

    Raises:
        ValueError: an array is not C-contiguous, or ``align`` is invalid.
    """
    views = [_as_bytes(x) for x in arrays]
    offsets, total = pack_layout([v.size for v in views], align)
    buf = np.zeros(total, dtype=np.uint8)
    for off, v in zip(offsets.tolist(), views):
        buf[off:off + v.size] = v
    return buf, offsets


def unpack_reference(buf, offsets: Sequence[int], sizes: Sequence[int]) -> list[np.ndarray]:
    """Host mirror of ``unpack_scatter``: copies of ``buf[offsets[i]:offsets[i] + sizes[i]]``
    as new uint8 arrays (bytes).

    Raises:
        ValueError: lengths differ, or a range is negative or runs past the buffer's end.
    """
    b = _as_bytes(buf)
    if len(offsets) != len(sizes):
        raise ValueError(f"{len(offsets)} offsets but {len(sizes)} sizes")
    out = []
    for i, (off, size) in enumerate(zip(offsets, sizes)):
        off, size = operator.index(off), operator.index(size)
        if off < 0 or size < 0 or off + size > b.size:
            raise ValueError(
                f"tensor {i}: bytes [{off}, {off + size}) lie outside a packed buffer "
                f"of {b.size} bytes")
        out.append(b[off:off + size].copy())
    return out
