// Element conversions shared by every kernel. Weights arrive as raw 16-bit or block-quantized
// bytes; activations are f32. No CUDA headers are needed, so NVRTC compiles these anywhere.
#pragma once

typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned int u32;

// +infinity without math headers.
#define ACCEL_INF __int_as_float(0x7f800000)

// bf16 is the top half of an f32.
__device__ __forceinline__ float bf16_to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }

// f16 -> f32 with the hardware conversion.
__device__ __forceinline__ float f16_to_f32(u16 v) {
    float f;
    asm("{ .reg .b16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(v));
    return f;
}

// Round-to-nearest-even f32 -> bf16 (for bf16 KV caches and outputs).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);  // quiet NaN
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float load_f16_scale(const u8* p) { return f16_to_f32((u16)(p[0] | (p[1] << 8))); }

// GGML block layouts (32 elements each).
#define QK 32
#define Q8_0_BYTES 34  // f16 d, 32 x i8
#define Q4_0_BYTES 18  // f16 d, 16 bytes: low nibbles = elements 0..15, high = 16..31, value (q-8)*d
#define Q4_1_BYTES 20  // f16 d, f16 m, 16 bytes as Q4_0, value q*d + m

// Element i (0..31) of a quantized block.
__device__ __forceinline__ float q8_0_at(const u8* block, int i) {
    return load_f16_scale(block) * (float)(signed char)block[2 + i];
}
__device__ __forceinline__ float q4_0_at(const u8* block, int i) {
    u8 b = block[2 + (i & 15)];
    int q = i < 16 ? (b & 15) : (b >> 4);
    return load_f16_scale(block) * (float)(q - 8);
}
__device__ __forceinline__ float q4_1_at(const u8* block, int i) {
    u8 b = block[4 + (i & 15)];
    int q = i < 16 ? (b & 15) : (b >> 4);
    return load_f16_scale(block) * (float)q + load_f16_scale(block + 2);
}

// Weight dtypes, as the engine numbers them.
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_Q8_0 3
#define DT_Q4_0 4
#define DT_Q4_1 5

// Element `col` of a weight row in dtype `dt`.
__device__ __forceinline__ float weight_at(const u8* row, int dt, int col) {
    switch (dt) {
        case DT_F32: return ((const float*)row)[col];
        case DT_F16: return f16_to_f32(((const u16*)row)[col]);
        case DT_BF16: return bf16_to_f32(((const u16*)row)[col]);
        case DT_Q8_0: return q8_0_at(row + (col / QK) * Q8_0_BYTES, col % QK);
        case DT_Q4_0: return q4_0_at(row + (col / QK) * Q4_0_BYTES, col % QK);
        default: return q4_1_at(row + (col / QK) * Q4_1_BYTES, col % QK);
    }
}

// Sum over a warp.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
