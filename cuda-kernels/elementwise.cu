// The forward pass's elementwise and row-wise operations, f32 activations, one block per row
// unless noted. Mirrors the CPU backend's ops of the same names (runtime/src/backend/cpu).
#include "dtype.cuh"

// out[r] = table[tokens[r]] (any weight dtype), one block per token.
extern "C" __global__ void embed(const u8* table, int dt, long long row_bytes, const u32* tokens, float* out, int cols) {
    const u8* row = table + (long long)tokens[blockIdx.x] * row_bytes;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(long long)blockIdx.x * cols + c] = weight_at(row, dt, c);
}

// out[r] = x[r] / rms(x[r]) * weight; blockDim.x a multiple of 32, at most 1024.
extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, int cols, float eps) {
    __shared__ float partial[32];
    const float* row = x + (long long)blockIdx.x * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += row[c] * row[c];
    sum = warp_sum(sum);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        float s = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0f;
        s = warp_sum(s);
        if (threadIdx.x == 0) partial[0] = s;
    }
    __syncthreads();
    float scale = rsqrtf(partial[0] / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(long long)blockIdx.x * cols + c] = row[c] * scale * weight[c];
}

// RoPE in place: one block per row, one thread per pair. style 0 = halves (HF rotate_half),
// 1 = interleaved (GGUF llama). Angles in f32: position * inv_freq, as the reference.
extern "C" __global__ void rope(float* x, const u32* positions, const float* inv_freq, int heads, int head_dim, int style) {
    int half = head_dim / 2;
    float pos = (float)positions[blockIdx.x];
    for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
        int h = p / half, i = p % half;
        float angle = pos * inv_freq[i];
        float c = cosf(angle), s = sinf(angle);
        float* head = x + ((long long)blockIdx.x * heads + h) * head_dim;
        int a = style == 0 ? i : 2 * i;
        int b = style == 0 ? i + half : 2 * i + 1;
        float x0 = head[a], x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x1 * c + x0 * s;
    }
}

// gate = silu(gate) * up, over n elements.
extern "C" __global__ void silu_mul(float* gate, const float* up, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x += y, over n elements.
extern "C" __global__ void add(float* x, const float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) x[i] += y[i];
}

// x[r] += bias, one block per row.
extern "C" __global__ void add_bias(float* x, const float* bias, int cols) {
    for (int c = threadIdx.x; c < cols; c += blockDim.x) x[(long long)blockIdx.x * cols + c] += bias[c];
}

// out[i] = x[rows[i]], one block per gathered row.
extern "C" __global__ void gather_rows(const float* x, const u32* rows, float* out, int cols) {
    const float* src = x + (long long)rows[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(long long)blockIdx.x * cols + c] = src[c];
}
