// Weights that cuBLAS cannot read directly: dequantization to f32 for GEMMs (prefill), and a
// matrix-vector product that dequantizes inside the dot product (decode), f32 activations.
#include "dtype.cuh"

// out[r][c] = weight[r][c] as f32; one block per row.
extern "C" __global__ void dequantize_rows(const u8* weight, int dt, long long row_bytes, float* out, int cols) {
    const u8* row = weight + (long long)blockIdx.x * row_bytes;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(long long)blockIdx.x * cols + c] = weight_at(row, dt, c);
}

// out[b][r] = dot(weight[r], x[b]) for a few activation rows: one warp per weight row, the row
// read once for every batch row. blockDim.x = 32 * warps; grid covers the weight rows.
#define MAX_BATCH 8
extern "C" __global__ void matvec(const u8* weight, int dt, long long row_bytes, int rows, int cols, const float* x, int batch, float* out) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= rows) return;
    const u8* row = weight + (long long)warp * row_bytes;
    float acc[MAX_BATCH];
    for (int b = 0; b < MAX_BATCH; b++) acc[b] = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        float w = weight_at(row, dt, c);
        for (int b = 0; b < MAX_BATCH && b < batch; b++) acc[b] += w * x[(long long)b * cols + c];
    }
    for (int b = 0; b < MAX_BATCH && b < batch; b++) {
        float s = warp_sum(acc[b]);
        if (lane == 0) out[(long long)b * rows + warp] = s;
    }
}
