// Sampling helpers on the device, so only a token id (not a vocabulary of logits) crosses to
// the host in the common greedy case. One block per row of logits.
#include "dtype.cuh"

// out[r] = argmax of logits[r] (lowest index among equals; NaN never wins).
extern "C" __global__ void argmax(const float* logits, int vocab, u32* out) {
    __shared__ float best_v[32];
    __shared__ u32 best_i[32];
    const float* row = logits + (long long)blockIdx.x * vocab;
    float v = -ACCEL_INF;
    u32 idx = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float x = row[i];
        if (x == x && (x > v || (x == v && (u32)i < idx))) { v = x; idx = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) { best_v[warp] = v; best_i[warp] = idx; }
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < warps ? best_v[threadIdx.x] : -ACCEL_INF;
        idx = threadIdx.x < warps ? best_i[threadIdx.x] : 0xffffffffu;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, o);
            u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
        }
        if (threadIdx.x == 0) out[blockIdx.x] = idx == 0xffffffffu ? 0 : idx;
    }
}

// probs[r] = softmax(logits[r] / temperature), in place allowed.
extern "C" __global__ void softmax_temperature(const float* logits, float* probs, int vocab, float temperature) {
    __shared__ float reduce[32];
    const float* row = logits + (long long)blockIdx.x * vocab;
    float* dst = probs + (long long)blockIdx.x * vocab;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float m = -ACCEL_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, row[i] / temperature);
    m = warp_max(m);
    if (lane == 0) reduce[warp] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < warps ? reduce[threadIdx.x] : -ACCEL_INF;
        v = warp_max(v);
        if (threadIdx.x == 0) reduce[0] = v;
    }
    __syncthreads();
    m = reduce[0];
    __syncthreads();
    float s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float e = expf(row[i] / temperature - m);
        dst[i] = e;
        s += e;
    }
    s = warp_sum(s);
    if (lane == 0) reduce[warp] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < warps ? reduce[threadIdx.x] : 0.0f;
        v = warp_sum(v);
        if (threadIdx.x == 0) reduce[0] = v;
    }
    __syncthreads();
    float inv = 1.0f / reduce[0];
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) dst[i] *= inv;
}

// Orders (value, index) pairs: higher value first, lower index among equals; NaN never wins.
__device__ __forceinline__ bool ranks_before(float v, u32 i, float w, u32 j) {
    return v > w || (v == w && i < j);
}

// The k best logits of each row in order (see ranks_before), with their indices: the
// candidates of top-k / top-p sampling, so only k values per row cross to the host. One block
// per row; k rounds, each the best entry ranked after the previous round's winner. Rows with
// fewer than k entries that are not NaN end with index 0xffffffff and value -inf.
extern "C" __global__ void top_k(const float* logits, int vocab, int k, float* out_values, u32* out_indices) {
    __shared__ float best_v[32];
    __shared__ u32 best_i[32];
    __shared__ float last_v;
    __shared__ u32 last_i;
    const float* row = logits + (long long)blockIdx.x * vocab;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = 0; r < k; r++) {
        float v = -ACCEL_INF;
        u32 idx = 0xffffffffu;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float x = row[i];
            bool eligible = x == x && (r == 0 || ranks_before(last_v, last_i, x, (u32)i));
            if (eligible && ranks_before(x, (u32)i, v, idx)) { v = x; idx = i; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, o);
            u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ranks_before(ov, oi, v, idx)) { v = ov; idx = oi; }
        }
        if (lane == 0) { best_v[warp] = v; best_i[warp] = idx; }
        __syncthreads();
        if (threadIdx.x < 32) {
            v = threadIdx.x < warps ? best_v[threadIdx.x] : -ACCEL_INF;
            idx = threadIdx.x < warps ? best_i[threadIdx.x] : 0xffffffffu;
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, v, o);
                u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
                if (ranks_before(ov, oi, v, idx)) { v = ov; idx = oi; }
            }
            if (threadIdx.x == 0) {
                out_values[(long long)blockIdx.x * k + r] = v;
                out_indices[(long long)blockIdx.x * k + r] = idx;
                last_v = v;
                last_i = idx;
            }
        }
        __syncthreads();
    }
}
