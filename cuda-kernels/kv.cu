// KV-cache block movement: writing a step's keys and values at their slots, and copying whole
// blocks (to another block, or between the cache and a staging buffer for swap).
#include "dtype.cuh"

// k_cache[slots[r]] = k[r], v likewise; one block per row of `width` floats.
extern "C" __global__ void write_kv(const float* k, const float* v, float* k_cache, float* v_cache, const u32* slots, int width) {
    long long dst = (long long)slots[blockIdx.x] * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        k_cache[dst + c] = k[(long long)blockIdx.x * width + c];
        v_cache[dst + c] = v[(long long)blockIdx.x * width + c];
    }
}

// For each pair i: block dst[i] = block src[i] (block_floats floats each), one block per pair.
// `from` and `to` may be the same cache (copy-on-write) or a cache and a staging buffer.
extern "C" __global__ void copy_blocks(const float* from, float* to, const u32* src, const u32* dst, long long block_floats) {
    const float* s = from + (long long)src[blockIdx.x] * block_floats;
    float* d = to + (long long)dst[blockIdx.x] * block_floats;
    for (long long c = threadIdx.x; c < block_floats; c += blockDim.x) d[c] = s[c];
}

// Swap staging. The cache is `planes` planes (layer * 2 + {0: keys, 1: values}) of
// `num_blocks` blocks of `block_floats` floats; staging holds, for each listed block i, its
// blocks of every plane in order: staging[i][plane][block_floats] (the host swap layout, so
// one contiguous copy moves a run of host blocks). grid = (listed blocks, planes).
extern "C" __global__ void gather_kv_blocks(const float* cache, float* staging, const u32* blocks, long long num_blocks, long long block_floats, int planes) {
    int i = blockIdx.x, plane = blockIdx.y;
    const float* s = cache + ((long long)plane * num_blocks + blocks[i]) * block_floats;
    float* d = staging + ((long long)i * planes + plane) * block_floats;
    for (long long c = threadIdx.x; c < block_floats; c += blockDim.x) d[c] = s[c];
}

// The inverse of gather_kv_blocks: cache[plane][blocks[i]] = staging[i][plane].
extern "C" __global__ void scatter_kv_blocks(const float* staging, float* cache, const u32* blocks, long long num_blocks, long long block_floats, int planes) {
    int i = blockIdx.x, plane = blockIdx.y;
    const float* s = staging + ((long long)i * planes + plane) * block_floats;
    float* d = cache + ((long long)plane * num_blocks + blocks[i]) * block_floats;
    for (long long c = threadIdx.x; c < block_floats; c += blockDim.x) d[c] = s[c];
}
