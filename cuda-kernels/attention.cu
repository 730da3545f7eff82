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

// Split-context ("flash-decoding") attention for the common shapes: one block per
// (query row, KV head, segment of SEG positions). The block serves every query head that
// shares the KV head (GQA), so each key and value row is read from memory once per query row
// and segment, and long contexts spread over many blocks. Each warp runs an online softmax
// over its share of the segment's positions (keys and values loaded together, one coalesced
// row each); the warps' states are then merged, and the block writes, per query head, the
// segment's softmax-normalised output with its max score and exp-sum for
// paged_attention_combine. Instantiated for G query heads per KV head (at most) and
// C * 32 head dimensions (at most), so per-thread state stays in registers.
#define SEG 256
#define WARPS 4

template <int G, int C>
__device__ __forceinline__ void attention_segment(
    const float* q, const float* k_cache, const float* v_cache, float* partial,
    const u32* positions, const u32* seq_of_row, const u32* block_tables, int max_blocks,
    int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int max_segments) {
    __shared__ float qs[G * C * 32];
    __shared__ float states[WARPS][G][C * 32 + 2];  // acc[head_dim], then max, then sum
    int t = blockIdx.x, g = blockIdx.y, seg = blockIdx.z;
    int group = num_heads / num_kv_heads;
    int visible = (int)positions[t] + 1;
    int start = seg * SEG;
    if (start >= visible) return;  // past this row's context (block-uniform): combine skips it
    int n = min(SEG, visible - start);
    int width = num_kv_heads * head_dim;
    const u32* table = block_tables + (long long)seq_of_row[t] * max_blocks;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    // The group's queries, zero-padded to C * 32 dimensions per head.
    for (int i = threadIdx.x; i < G * C * 32; i += blockDim.x) {
        int h = i / (C * 32), d = i % (C * 32);
        qs[i] = h < group && d < head_dim ? q[((long long)t * num_heads + g * group + h) * head_dim + d] : 0.0f;
    }
    __syncthreads();

    float m[G], l[G], acc[G][C];
#pragma unroll
    for (int h = 0; h < G; h++) {
        m[h] = -ACCEL_INF;
        l[h] = 0.0f;
#pragma unroll
        for (int c = 0; c < C; c++) acc[h][c] = 0.0f;
    }
    for (int p = warp; p < n; p += WARPS) {
        int pos = start + p;
        long long offset = ((long long)table[pos / block_size] * block_size + pos % block_size) * width
                           + (long long)g * head_dim;
        float k[C], v[C];
#pragma unroll
        for (int c = 0; c < C; c++) {
            int d = lane + 32 * c;
            k[c] = d < head_dim ? k_cache[offset + d] : 0.0f;
            v[c] = d < head_dim ? v_cache[offset + d] : 0.0f;
        }
#pragma unroll
        for (int h = 0; h < G; h++) {
            if (h < group) {
                float s = 0.0f;
#pragma unroll
                for (int c = 0; c < C; c++) s += qs[h * C * 32 + lane + 32 * c] * k[c];
                s = warp_sum(s) * scale;
                float new_m = fmaxf(m[h], s);
                float correction = expf(m[h] - new_m);
                float e = expf(s - new_m);
                l[h] = l[h] * correction + e;
#pragma unroll
                for (int c = 0; c < C; c++) acc[h][c] = acc[h][c] * correction + e * v[c];
                m[h] = new_m;
            }
        }
    }
    // Dimensions >= head_dim hold zeros (their q and v were zero), so writing all C * 32 is safe.
#pragma unroll
    for (int h = 0; h < G; h++) {
#pragma unroll
        for (int c = 0; c < C; c++) states[warp][h][lane + 32 * c] = acc[h][c];
        if (lane == 0) {
            states[warp][h][C * 32] = m[h];
            states[warp][h][C * 32 + 1] = l[h];
        }
    }
    __syncthreads();

    // Merge the warps (a warp that saw no position has max -inf and weighs nothing).
    for (int j = threadIdx.x; j < group * head_dim; j += blockDim.x) {
        int h = j / head_dim, d = j % head_dim;
        float big = -ACCEL_INF;
        for (int w = 0; w < WARPS; w++) big = fmaxf(big, states[w][h][C * 32]);
        float num = 0.0f, den = 0.0f;
        for (int w = 0; w < WARPS; w++) {
            float weight = expf(states[w][h][C * 32] - big);
            num += weight * states[w][h][d];
            den += weight * states[w][h][C * 32 + 1];
        }
        long long base = (((long long)t * num_heads + g * group + h) * max_segments + seg) * (head_dim + 2);
        partial[base + d] = num / den;
        if (d == 0) {
            partial[base + head_dim] = big;
            partial[base + head_dim + 1] = den;
        }
    }
}

// partial: [rows][num_heads][max_segments][head_dim + 2] (output, then max, then sum).
// blockDim.x = 32 * WARPS. Named for G and C: group <= G, head_dim <= 32 * C.
#define ATTENTION_SEGMENT(G, C)                                                                          \
    extern "C" __global__ void paged_attention_partial_g##G##_c##C(                                     \
        const float* q, const float* k_cache, const float* v_cache, float* partial,                     \
        const u32* positions, const u32* seq_of_row, const u32* block_tables, int max_blocks,           \
        int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int max_segments) { \
        attention_segment<G, C>(q, k_cache, v_cache, partial, positions, seq_of_row, block_tables,      \
                                max_blocks, block_size, num_heads, num_kv_heads, head_dim, scale,       \
                                max_segments);                                                          \
    }
ATTENTION_SEGMENT(4, 2)
ATTENTION_SEGMENT(4, 4)
ATTENTION_SEGMENT(4, 8)
ATTENTION_SEGMENT(8, 2)
ATTENTION_SEGMENT(8, 4)
ATTENTION_SEGMENT(8, 8)

// Merges a row's segments: out = sum_s w_s * o_s / sum_s w_s with w_s = exp(max_s - M) * sum_s.
// One block per (query row, head).
extern "C" __global__ void paged_attention_combine(
    const float* partial, float* out, const u32* positions, int num_heads, int head_dim, int max_segments) {
    int t = blockIdx.x, h = blockIdx.y;
    int segments = ((int)positions[t] + SEG) / SEG;  // ceil((position + 1) / SEG)
    const float* base = partial + ((long long)t * num_heads + h) * max_segments * (head_dim + 2);
    float m = -ACCEL_INF;
    for (int s = 0; s < segments; s++) m = fmaxf(m, base[s * (head_dim + 2) + head_dim]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < segments; s++) {
            const float* p = base + s * (head_dim + 2);
            float w = expf(p[head_dim] - m) * p[head_dim + 1];
            num += w * p[d];
            den += w;
        }
        out[((long long)t * num_heads + h) * head_dim + d] = num / den;
    }
}
