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
// shares the KV head (GQA), so each key and value is read from memory once per row and
// segment, and long contexts spread over many blocks. Each block writes, per query head, its
// segment's softmax-normalised output with the segment's max score and exp-sum;
// paged_attention_combine merges the segments. group <= MAX_GROUP, head_dim <= MAX_DIM.
#define SEG 256
#define MAX_GROUP 8
#define MAX_DIM 256

// partial: [rows][num_heads][max_segments][head_dim + 2] (output, then max, then sum).
extern "C" __global__ void paged_attention_partial(
    const float* q, const float* k_cache, const float* v_cache, float* partial,
    const u32* positions, const u32* seq_of_row, const u32* block_tables, int max_blocks,
    int block_size, int num_heads, int num_kv_heads, int head_dim, float scale, int max_segments) {
    __shared__ float qs[MAX_GROUP * MAX_DIM];
    __shared__ float scores[MAX_GROUP][SEG];
    __shared__ long long offsets[SEG];
    __shared__ float seg_max[MAX_GROUP], seg_sum[MAX_GROUP];
    int t = blockIdx.x, g = blockIdx.y, seg = blockIdx.z;
    int group = num_heads / num_kv_heads;
    int visible = (int)positions[t] + 1;
    int start = seg * SEG;
    if (start >= visible) return;  // past this row's context: the combine step skips it
    int n = min(SEG, visible - start);
    int width = num_kv_heads * head_dim;
    const u32* table = block_tables + (long long)seq_of_row[t] * max_blocks;
    int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    // This group's queries, pre-scaled, and the cache offset of each position in the segment.
    for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) {
        qs[i] = q[((long long)t * num_heads + g * group) * head_dim + i] * scale;
    }
    for (int p = threadIdx.x; p < n; p += blockDim.x) {
        int pos = start + p;
        long long slot = (long long)table[pos / block_size] * block_size + pos % block_size;
        offsets[p] = slot * width + (long long)g * head_dim;
    }
    __syncthreads();

    // Scores: one warp per position; the key is read once for every head of the group.
    for (int p = warp; p < n; p += warps) {
        const float* key = k_cache + offsets[p];
        float s[MAX_GROUP];
#pragma unroll
        for (int h = 0; h < MAX_GROUP; h++) s[h] = 0.0f;
        for (int d = lane; d < head_dim; d += 32) {
            float k = key[d];
#pragma unroll
            for (int h = 0; h < MAX_GROUP; h++) {
                if (h < group) s[h] += qs[h * head_dim + d] * k;
            }
        }
#pragma unroll
        for (int h = 0; h < MAX_GROUP; h++) {
            if (h < group) {
                float v = warp_sum(s[h]);
                if (lane == 0) scores[h][p] = v;
            }
        }
    }
    __syncthreads();

    // Softmax within the segment, one warp per head.
    for (int h = warp; h < group; h += warps) {
        float m = -ACCEL_INF;
        for (int p = lane; p < n; p += 32) m = fmaxf(m, scores[h][p]);
        m = warp_max(m);
        float l = 0.0f;
        for (int p = lane; p < n; p += 32) {
            float e = expf(scores[h][p] - m);
            scores[h][p] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) {
            seg_max[h] = m;
            seg_sum[h] = l;
        }
    }
    __syncthreads();

    // Weighted values: each thread owns (head, dimension) pairs; a warp reads consecutive
    // dimensions of one value row.
    for (int j = threadIdx.x; j < group * head_dim; j += blockDim.x) {
        int h = j / head_dim, d = j % head_dim;
        float a = 0.0f;
        for (int p = 0; p < n; p++) a += scores[h][p] * v_cache[offsets[p] + d];
        long long base = (((long long)t * num_heads + g * group + h) * max_segments + seg) * (head_dim + 2);
        partial[base + d] = a / seg_sum[h];
        if (d == 0) {
            partial[base + head_dim] = seg_max[h];
            partial[base + head_dim + 1] = seg_sum[h];
        }
    }
}

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
