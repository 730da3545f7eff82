// Causal attention over the paged KV cache, read through each sequence's block table, f32.
// Cache layout per layer: [num_blocks * block_size][num_kv_heads][head_dim], as on the CPU.
// One block of threads per (query row, head); scores live in shared memory in chunks.
#include "dtype.cuh"

#define CHUNK 1024

// q: [rows][num_heads * head_dim]; out likewise. seq_of_row[t] gives the row's sequence,
// positions[t] its position (it sees 0..=position). block_tables: [seqs][max_blocks].
extern "C" __global__ void paged_attention(
    const float* q, const float* k_cache, const float* v_cache, float* out,
    const u32* positions, const u32* seq_of_row, const u32* block_tables, int max_blocks,
    int block_size, int num_heads, int num_kv_heads, int head_dim, float scale) {
    __shared__ float scores[CHUNK];
    __shared__ float reduce[32];
    int t = blockIdx.x, h = blockIdx.y;
    int kv_head = h / (num_heads / num_kv_heads);
    int width = num_kv_heads * head_dim;
    int visible = (int)positions[t] + 1;
    const u32* table = block_tables + (long long)seq_of_row[t] * max_blocks;
    const float* query = q + ((long long)t * num_heads + h) * head_dim;
    float* o = out + ((long long)t * num_heads + h) * head_dim;
    int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    // Online softmax across chunks of positions: running max m, running sum l, and the
    // unnormalised output accumulated per dimension (each thread owns dimensions d ≡ tid).
    float m = -ACCEL_INF, l = 0.0f;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // head_dim <= 4 * blockDim.x
    for (int start = 0; start < visible; start += CHUNK) {
        int n = min(CHUNK, visible - start);
        // Scores: one warp per position.
        for (int p = warp; p < n; p += warps) {
            int pos = start + p;
            long long slot = (long long)table[pos / block_size] * block_size + pos % block_size;
            const float* key = k_cache + slot * width + kv_head * head_dim;
            float s = 0.0f;
            for (int d = lane; d < head_dim; d += 32) s += query[d] * key[d];
            s = warp_sum(s);
            if (lane == 0) scores[p] = s * scale;
        }
        __syncthreads();
        // Chunk max.
        float cm = -ACCEL_INF;
        for (int p = threadIdx.x; p < n; p += blockDim.x) cm = fmaxf(cm, scores[p]);
        cm = warp_max(cm);
        if (lane == 0) reduce[warp] = cm;
        __syncthreads();
        if (threadIdx.x < 32) {
            float v = threadIdx.x < warps ? reduce[threadIdx.x] : -ACCEL_INF;
            v = warp_max(v);
            if (threadIdx.x == 0) reduce[0] = v;
        }
        __syncthreads();
        float new_m = fmaxf(m, reduce[0]);
        __syncthreads();
        // Exponentiate and sum.
        float cs = 0.0f;
        for (int p = threadIdx.x; p < n; p += blockDim.x) {
            float e = expf(scores[p] - new_m);
            scores[p] = e;
            cs += e;
        }
        cs = warp_sum(cs);
        if (lane == 0) reduce[warp] = cs;
        __syncthreads();
        if (threadIdx.x < 32) {
            float v = threadIdx.x < warps ? reduce[threadIdx.x] : 0.0f;
            v = warp_sum(v);
            if (threadIdx.x == 0) reduce[0] = v;
        }
        __syncthreads();
        float correction = expf(m - new_m);
        l = l * correction + reduce[0];
        m = new_m;
        // Weighted values.
        for (int i = 0; i < 4; i++) {
            int d = threadIdx.x + i * blockDim.x;
            if (d >= head_dim) break;
            float a = acc[i] * correction;
            for (int p = 0; p < n; p++) {
                int pos = start + p;
                long long slot = (long long)table[pos / block_size] * block_size + pos % block_size;
                a += scores[p] * v_cache[slot * width + kv_head * head_dim + d];
            }
            acc[i] = a;
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++) {
        int d = threadIdx.x + i * blockDim.x;
        if (d < head_dim) o[d] = acc[i] / l;
    }
}
