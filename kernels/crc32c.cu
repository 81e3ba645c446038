// CRC-32C (Castagnoli) of fixed-size segments of a device buffer.
//
// Values are those of the `crc32c` Python package and of TensorFlow's checkpoint
// format: reflected polynomial 0x82F63B78, initial register 0xFFFFFFFF, final
// xor 0xFFFFFFFF. out[s] is the CRC of bytes [s*segment, min((s+1)*segment, nbytes)),
// so the last segment may be short. The host folds the per-segment CRCs into the
// CRC of the whole buffer (gpusaver/staging/crc.py: combine_segments).
//
// Work split, and why. One block of CRC_THREADS threads per segment (blocks loop
// over segments, grid-stride, so the tables below are built once per block, not
// once per segment). The segment is cut into 16-byte blocks dealt round-robin to
// the threads: in every row of CRC_THREADS blocks, thread t reads block t. A warp
// therefore reads 512 contiguous bytes with one aligned 16-byte load per thread,
// fully coalesced; giving each thread a contiguous sub-segment instead would make
// every warp load touch 32 separate cache lines.
//
// CRC is linear over GF(2): with a zero initial register ("raw" CRC), the CRC of
// the segment is the xor, over threads, of the raw CRC of the segment with every
// byte not owned by that thread set to zero. Between two of its blocks a thread
// sees exactly GAP = 16*(CRC_THREADS-1) such zero bytes, so absorbing a block and
// then skipping the gap is a single linear map of (register, 16 data bytes):
// 16 lookups in the "composite" slicing-by-16 tables comp[k][v] = T0[v] advanced
// by k + GAP zero bytes. That costs one shared-memory lookup per data byte, the
// same as plain slicing-by-8/16, with no extra work for the interleaving.
//
// Boundaries. Leading zero bytes do not change a raw CRC, so:
//  * the segment is viewed from the 16-aligned address at or before its start
//    (pad = start & 15 virtual zero bytes), which keeps every load aligned;
//  * blocks are numbered so that the segment's last full block falls to the last
//    thread (`shift` virtual all-zero blocks come first); every thread's final
//    block then lies in the last row, and thread t's result needs advancing by
//    exactly 16*(CRC_THREADS-1-t) bytes, which a log2(CRC_THREADS)-level tree
//    does with one constant per level;
//  * in the last row there is no gap after the block, so it is absorbed with the
//    plain byte table; the final < 16 bytes (the tail) are absorbed by thread 0.
// Finally the initial register is put back: crc = raw ^ (0xFFFFFFFF advanced by
// len bytes) ^ 0xFFFFFFFF.
//
// Polynomial arithmetic uses the reflected representation of the CRC register:
// bit 31 is the coefficient of x^0, bit 0 that of x^31. Advancing a register by
// n zero bytes multiplies it by x^(8n) mod P.
//
// The numpy mirror of this exact algorithm is crc32c_segments_reference() in
// gpusaver/staging/crc.py; keep the two in step (CRC_THREADS included).

#define CRC_THREADS 256
#define CRC_POLY 0x82F63B78u
#define CRC_ONE 0x80000000u  // the polynomial 1 in reflected form
#define CRC_X8 0x00800000u   // x^8
#define CRC_GAP (16ull * (CRC_THREADS - 1))

static_assert(CRC_THREADS == 256, "table build assumes one table entry per thread");
static_assert((CRC_THREADS & (CRC_THREADS - 1)) == 0, "tree reduction needs a power of two");

// a * b mod P, both reflected. Branch-free so that a warp stays converged.
__device__ __forceinline__ unsigned int gf_mul(unsigned int a, unsigned int b) {
    unsigned int p = 0;
#pragma unroll 4
    for (int i = 0; i < 32; ++i) {
        p ^= b & (0u - (a >> 31));
        a <<= 1;
        b = (b >> 1) ^ (CRC_POLY & (0u - (b & 1u)));
    }
    return p;
}

// v advanced by n zero bytes; xpow[k] holds x^(8 * 2^k) mod P.
__device__ unsigned int gf_advance(unsigned int v, unsigned long long n,
                                   const unsigned int* xpow) {
    for (int k = 0; n != 0; ++k, n >>= 1) {
        if (n & 1ull) v = gf_mul(v, xpow[k]);
    }
    return v;
}

__device__ __forceinline__ unsigned int byte_step(unsigned int reg, unsigned int b,
                                                  const unsigned int* t0) {
    return (reg >> 8) ^ t0[(reg ^ b) & 0xffu];
}

// Absorb one 16-byte block and then GAP zero bytes.
__device__ __forceinline__ unsigned int absorb_composite(unsigned int reg, uint4 w,
                                                         const unsigned int (*comp)[256]) {
    const unsigned int x = reg ^ w.x;
    return comp[15][x & 0xffu] ^ comp[14][(x >> 8) & 0xffu] ^
           comp[13][(x >> 16) & 0xffu] ^ comp[12][x >> 24] ^
           comp[11][w.y & 0xffu] ^ comp[10][(w.y >> 8) & 0xffu] ^
           comp[9][(w.y >> 16) & 0xffu] ^ comp[8][w.y >> 24] ^
           comp[7][w.z & 0xffu] ^ comp[6][(w.z >> 8) & 0xffu] ^
           comp[5][(w.z >> 16) & 0xffu] ^ comp[4][w.z >> 24] ^
           comp[3][w.w & 0xffu] ^ comp[2][(w.w >> 8) & 0xffu] ^
           comp[1][(w.w >> 16) & 0xffu] ^ comp[0][w.w >> 24];
}

// Absorb one 16-byte block with nothing after it (last row only, once per thread).
__device__ __forceinline__ unsigned int absorb_plain(unsigned int reg, uint4 w,
                                                     const unsigned int* t0) {
    const unsigned int words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int b = 0; b < 32; b += 8) reg = byte_step(reg, (words[i] >> b) & 0xffu, t0);
    }
    return reg;
}

// Block j of the segment's 16-aligned view; bytes before the segment read as zero.
__device__ __forceinline__ uint4 load_block(const unsigned char* seg, unsigned int pad,
                                            long long j) {
    if (j > 0 || (j == 0 && pad == 0)) {
        return __ldg(reinterpret_cast<const uint4*>(seg + (16ll * j - (long long)pad)));
    }
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    if (j == 0) {  // the first block straddles the segment start
        unsigned int words[4] = {0u, 0u, 0u, 0u};
        for (unsigned int i = pad; i < 16u; ++i) {
            words[i >> 2] |= (unsigned int)seg[i - pad] << (8u * (i & 3u));
        }
        w = make_uint4(words[0], words[1], words[2], words[3]);
    }
    return w;
}

extern "C" __global__ void __launch_bounds__(CRC_THREADS)
crc32c_segments(const unsigned char* __restrict__ data, unsigned long long nbytes,
                unsigned long long segment, unsigned int* __restrict__ out) {
    __shared__ unsigned int t0[256];
    __shared__ unsigned int comp[16][256];
    __shared__ unsigned int xpow[64];
    __shared__ unsigned int lanes[CRC_THREADS];

    // The tables and the reduction assume this block size; a wrong launch must
    // fail loudly rather than return wrong checksums.
    if (blockDim.x != CRC_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    const unsigned int tid = threadIdx.x;

    {
        unsigned int c = tid;
        for (int i = 0; i < 8; ++i) c = (c >> 1) ^ (CRC_POLY & (0u - (c & 1u)));
        t0[tid] = c;
    }
    if (tid == 0) {
        // Squarings are one serial chain; compute only the powers any advance below can
        // use (lengths up to `segment`, the gap, the tree's 16*128 bytes: bit 11).
        const int used = segment ? 64 - __clzll((long long)segment) : 0;
        const int nxp = used > 12 ? used : 12;
        unsigned int p = CRC_X8;
        for (int k = 0; k < nxp; ++k) {
            xpow[k] = p;
            p = gf_mul(p, p);
        }
    }
    __syncthreads();
    {
        unsigned int c = gf_advance(t0[tid], CRC_GAP, xpow);
        comp[0][tid] = c;
        for (int k = 1; k < 16; ++k) {
            c = (c >> 8) ^ t0[c & 0xffu];
            comp[k][tid] = c;
        }
    }
    __syncthreads();

    if (segment == 0) return;  // the host rejects it; never divide by zero here
    const unsigned long long nseg = (nbytes + segment - 1) / segment;
    for (unsigned long long s = blockIdx.x; s < nseg; s += gridDim.x) {
        const unsigned long long start = s * segment;
        const unsigned long long rest = nbytes - start;
        const unsigned long long len = rest < segment ? rest : segment;
        const unsigned char* seg = data + start;
        const unsigned int pad = (unsigned int)(reinterpret_cast<unsigned long long>(seg) & 15ull);
        const unsigned long long vlen = pad + len;
        const unsigned long long nfull = vlen >> 4;
        const unsigned long long rows = (nfull + CRC_THREADS - 1) / CRC_THREADS;
        const long long shift = (long long)(rows * CRC_THREADS - nfull);

        unsigned int reg = 0;
        if (rows > 0) {
            long long j = (long long)tid - shift;
            for (unsigned long long r = 0; r + 1 < rows; ++r, j += CRC_THREADS) {
                reg = absorb_composite(reg, load_block(seg, pad, j), comp);
            }
            reg = absorb_plain(reg, load_block(seg, pad, j), t0);
        }
        lanes[tid] = reg;
        __syncthreads();
        // Pairwise: left half advanced past the right half (16*stride bytes).
        int level = 4;  // xpow[4 + log2(stride)] == x^(8 * 16 * stride)
        for (unsigned int stride = 1; stride < CRC_THREADS; stride <<= 1, ++level) {
            if ((tid & (2u * stride - 1u)) == 0) {
                lanes[tid] = gf_mul(lanes[tid], xpow[level]) ^ lanes[tid + stride];
            }
            __syncthreads();
        }
        if (tid == 0) {
            unsigned int raw = lanes[0];
            // Tail: the bytes after the last full 16-byte block (all of a segment
            // shorter than one block, padding excluded).
            const unsigned long long full_end = 16ull * nfull;
            const unsigned long long t_begin = full_end > pad ? full_end - pad : 0ull;
            for (unsigned long long i = t_begin; i < len; ++i) raw = byte_step(raw, seg[i], t0);
            out[s] = raw ^ gf_advance(0xFFFFFFFFu, len, xpow) ^ 0xFFFFFFFFu;
        }
        __syncthreads();  // lanes[] is rewritten by the next segment
    }
}
