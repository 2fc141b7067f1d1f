/* cuda_vec: what the kernels that stream bf16 rows with CUDA cores
 * share (cuda_decode.cu, cuda_shared.cu): 16-byte loads of 8 values, their
 * dot products in f32, and the warp's sum. */
#pragma once

#include "cuda_internal.h"

#define DECODE_WARPS 4 /* warps per block of the decode, router and shared-expert kernels */

/* 8 bf16 (16 bytes) -> f32: element 2i is the low half of word i */
__device__ __forceinline__ void bf16x8_to_f32(uint4 v, float f[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ float dot8(uint4 a, const float b[8], float acc) {
    float f[8];
    bf16x8_to_f32(a, f);
#pragma unroll
    for (int e = 0; e < 8; e++) acc = fmaf(f[e], b[e], acc);
    return acc;
}

/* Weights stream: read once, not kept in L1. */
__device__ __forceinline__ uint4 load_stream(const bf16 *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
