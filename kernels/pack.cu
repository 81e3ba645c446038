// Gather many small device tensors into one contiguous device buffer, and back.
//
// Why: thousands of small variables cost one copy-engine call each; packing them
// on the device first turns those into a single large device-to-host copy (and
// the reverse on restore). Large tensors are better copied directly.
//
// Layout: tensor i occupies bytes [offsets[i], offsets[i] + sizes[i]) of the
// packed buffer (the host picks the offsets: gpusaver/staging/crc.py pack_layout,
// mirrored by pack_reference / unpack_reference). Pointers are raw device byte
// addresses passed as unsigned long long.
//
// Work split: one block per tensor (blocks loop over tensors when n > gridDim.x),
// the block's threads copy consecutive 16-byte words so each warp moves 512
// contiguous bytes. The 16-byte path needs source and destination to share their
// address mod 16; a short byte-wise head brings both to alignment. Otherwise
// (different misalignment) the copy is byte-wise, still coalesced.

#define PACK_VEC 16ull

__device__ __forceinline__ void copy_bytes(unsigned char* __restrict__ dst,
                                           const unsigned char* __restrict__ src,
                                           unsigned long long size) {
    const unsigned long long s_addr = reinterpret_cast<unsigned long long>(src);
    const unsigned long long d_addr = reinterpret_cast<unsigned long long>(dst);
    unsigned long long head = size;  // bytes copied one by one before the wide part
    if (((s_addr ^ d_addr) & (PACK_VEC - 1)) == 0) {
        head = (PACK_VEC - (s_addr & (PACK_VEC - 1))) & (PACK_VEC - 1);
        if (head > size) head = size;
    }
    for (unsigned long long k = threadIdx.x; k < head; k += blockDim.x) dst[k] = src[k];

    const unsigned long long nvec = (size - head) / PACK_VEC;
    const uint4* __restrict__ vsrc = reinterpret_cast<const uint4*>(src + head);
    uint4* __restrict__ vdst = reinterpret_cast<uint4*>(dst + head);
    for (unsigned long long k = threadIdx.x; k < nvec; k += blockDim.x) vdst[k] = __ldg(vsrc + k);

    for (unsigned long long k = head + nvec * PACK_VEC + threadIdx.x; k < size; k += blockDim.x) {
        dst[k] = src[k];
    }
}

extern "C" __global__ void pack_gather(const unsigned long long* __restrict__ src_ptrs,
                                       const unsigned long long* __restrict__ sizes,
                                       const unsigned long long* __restrict__ dst_offsets,
                                       int n, unsigned char* __restrict__ dst) {
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        copy_bytes(dst + dst_offsets[i],
                   reinterpret_cast<const unsigned char*>(src_ptrs[i]), sizes[i]);
    }
}

extern "C" __global__ void unpack_scatter(const unsigned char* __restrict__ src,
                                          const unsigned long long* __restrict__ src_offsets,
                                          const unsigned long long* __restrict__ sizes,
                                          const unsigned long long* __restrict__ dst_ptrs,
                                          int n) {
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        copy_bytes(reinterpret_cast<unsigned char*>(dst_ptrs[i]), src + src_offsets[i], sizes[i]);
    }
}
