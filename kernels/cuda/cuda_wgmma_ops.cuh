/* cuda_wgmma_ops: what both forms of moed's wgmma grouped GEMM share
 * (cuda_wgmma.cu, cuda_wgmma_ws.cu; sm_90a only): the tile shape, the
 * shared-memory operand descriptors, the wgmma instructions, the work
 * items of a grouping plan and the epilogue.
 *
 * Shared memory holds each operand tile K-major in the 128-byte swizzle
 * that wgmma's descriptors name: row r's 16-byte chunk c lands at
 * r·128 + ((c ^ (r mod 8))·16), from 1024-byte-aligned tile bases, and a
 * k16 step advances the descriptor's start by 32 bytes (the layout the
 * tensor-memory-access unit writes with CU_TENSOR_MAP_SWIZZLE_128B). */
#pragma once

#include "cuda_internal.h"

#define WG_BM 128
static_assert(WG_BM == MOE_WGMMA_TILE_ROWS, "the plan's tiles are the kernel's tiles");
#define WG_BK 64
#define WG_THREADS 256

template <int BN>
struct wg_shape {
    static constexpr int stages = BN == 64 ? 8 : BN == 128 ? 6 : 4;
    static constexpr int stage_bytes = (WG_BM + BN) * WG_BK * 2;
    /* the epilogue: per warp 16 rows of epi_cols output columns, each row
     * padded by 16 bytes (rows' first banks 36 or 20 words apart: the 8
     * rows × 4 lanes of one fragment store hit 32 different banks) */
    static constexpr int epi_cols = BN / 2 < 64 ? BN / 2 : 64; /* COLS is BN/2 or BN: a multiple */
    static constexpr int epi_pitch = epi_cols * 2 + 16;
    static constexpr size_t smem =
        (size_t)stages * stage_bytes + 1024 /* alignment slack */ + (size_t)(WG_THREADS / 32) * 16 * epi_pitch;
};

/* A K-major operand tile in the 128-byte swizzle: start address, leading
 * byte offset (unused with this swizzle), 1024 bytes between 8-row
 * groups, swizzle mode 1 (128 B). */
__device__ __forceinline__ uint64_t wg_desc(uint32_t smem_addr) {
    return (uint64_t)((smem_addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Ties the accumulators to this point, so no read of them moves above a wait. */
template <int N>
__device__ __forceinline__ void wg_fence_regs(float *d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

/* d[64·n/128 ...] += A(64×16, smem) · B(n×16, smem)ᵀ, f32 accumulators in
 * the m64nNk16 fragment layout (warp w of the warpgroup: rows 16w + g and
 * 16w + g + 8 with g = lane/4; d[4j..4j+3] at columns 8j + 2·(lane%4) + {0,1}). */
__device__ __forceinline__ void wgmma_m64n64k16(float *d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{" 
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

__device__ __forceinline__ void wgmma_m64n128k16(float *d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{" 
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

__device__ __forceinline__ void wgmma_m64n256k16(float *d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{" 
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

template <int BN>
__device__ __forceinline__ void wg_mma(float *d, uint64_t desc_a, uint64_t desc_b) {
    if constexpr (BN == 64) wgmma_m64n64k16(d, desc_a, desc_b, 1);
    else if constexpr (BN == 128) wgmma_m64n128k16(d, desc_a, desc_b, 1);
    else wgmma_m64n256k16(d, desc_a, desc_b, 1);
}

/* The epilogue's two output values at the thread's fragment column pair j
 * (columns 8j + 2t, +1) of row half h: SwiGLU of the gate and up
 * accumulators (SWIGLU: up at column j + BN/16), or the accumulators. */
template <int BN, bool SWIGLU>
__device__ __forceinline__ __nv_bfloat162 epi_pair(const float *d, int j, int h) {
    float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
    if (SWIGLU) {
        const float u0 = d[4 * (j + BN / 16) + 2 * h], u1 = d[4 * (j + BN / 16) + 2 * h + 1];
        v0 = moe_cuda_swiglu(v0, u0);
        v1 = moe_cuda_swiglu(v1, u1);
    }
    return __floats2bfloat162_rn(v0, v1);
}

/* One k-block of warpgroup wg's MMAs (its 64 rows of the A tile at stage,
 * the B tile after the A tile's WG_BM rows), committed as one group. */
template <int BN>
__device__ __forceinline__ void wg_mma_block(float *d, uint32_t stage, int wg) {
    const uint32_t sa = stage + wg * 64 * 128, sb = stage + WG_BM * 128;
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < WG_BK / 16; ks++) wg_mma<BN>(d, wg_desc(sa + ks * 32), wg_desc(sb + ks * 32));
    wg_commit();
}

/* A work item of a grouping plan (plan[0..S]: row offsets, plan[S+1..2S+1]:
 * first tile of each slot): item = tile · col_blocks + column block, so the
 * CTAs at work at one time share their A rows and slots. */
struct wg_item_t {
    int s, row0, row_end, col0;
};
__device__ __forceinline__ wg_item_t wg_locate(const int32_t *plan, int S, int col_blocks, int cols, int item) {
    const int tile = item / col_blocks, s = moe_cuda_tile_slot(plan, S, tile);
    return wg_item_t{s, plan[s] + (tile - plan[S + 1 + s]) * WG_BM, plan[s + 1], (item % col_blocks) * cols};
}
/* The same items of a slot ordered by column block first (the row tiles
 * that read one weight tile next to each other). */
__device__ __forceinline__ wg_item_t wg_locate_by_weight(const int32_t *plan, int S, int col_blocks, int cols,
                                                         int item) {
    const int s = moe_cuda_tile_slot(plan, S, item / col_blocks);
    const int first = plan[S + 1 + s], n_tiles = plan[S + 2 + s] - first, j = item - first * col_blocks;
    return wg_item_t{s, plan[s] + (j % n_tiles) * WG_BM, plan[s + 1], (j / n_tiles) * cols};
}

/* The epilogue of one warp: its 16 rows from row_base (rows at or past
 * row_end are not the item's), the accumulators' COLS columns from col0
 * (columns at or past n_out dropped), SwiGLU'd or not, as bf16 into out.
 * A warp with all 16 of its rows goes through its own patch of shared
 * memory, EPI_COLS columns at a time: the fragments in (4-byte stores, no
 * bank conflicts with the padded pitch), then whole 16-byte pieces of rows
 * out to global memory, 8 lanes per 128-byte run (the fragments' own
 * layout stores 4 bytes to 8 rows per instruction: Qwen3 T=16384 2.871 ->
 * 2.689 ms, the perfect router's T=4096 0.739 -> 0.680). A warp with fewer
 * rows (small T, a slot's last tile) stores its fragments directly,
 * skipping the rows it does not have (staging them all cost 10-17% at
 * T <= 1024). */
template <int BN, bool SWIGLU>
__device__ __forceinline__ void wg_epilogue(const float *d, int row_base, int row_end, int col0, int n_out,
                                            uint8_t *patch, int lane, bf16 *__restrict__ out) {
    constexpr int COLS = SWIGLU ? BN / 2 : BN;
    constexpr int EPI_COLS = wg_shape<BN>::epi_cols, EPI_PITCH = wg_shape<BN>::epi_pitch;
    const int g = lane / 4, t = lane % 4, have = row_end - row_base;
    if (have >= 16) {
#pragma unroll
        for (int pass = 0; pass < COLS / EPI_COLS; pass++) {
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int jj = 0; jj < EPI_COLS / 8; jj++) {
                    *reinterpret_cast<__nv_bfloat162 *>(patch + (8 * h + g) * EPI_PITCH + (8 * jj + 2 * t) * 2) =
                        epi_pair<BN, SWIGLU>(d, pass * (EPI_COLS / 8) + jj, h);
                }
            __syncwarp();
            constexpr int PIECES = EPI_COLS / 8; /* 16-byte pieces per row */
#pragma unroll
            for (int idx = lane; idx < 16 * PIECES; idx += 32) {
                const int rr = idx / PIECES, piece = idx % PIECES;
                const int col = col0 + pass * EPI_COLS + 8 * piece;
                if (col < n_out) /* n_out % 8 == 0: a piece is all in or all out */
                    *reinterpret_cast<uint4 *>(out + (size_t)(row_base + rr) * n_out + col) =
                        *reinterpret_cast<const uint4 *>(patch + rr * EPI_PITCH + 16 * piece);
            }
            __syncwarp();
        }
    } else if (have > 0) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = row_base + 8 * h + g;
            if (r >= row_end) continue;
#pragma unroll
            for (int j = 0; j < COLS / 8; j++) {
                const int col = col0 + 8 * j + 2 * t;
                if (col >= n_out) continue;
                *reinterpret_cast<__nv_bfloat162 *>(out + (size_t)r * n_out + col) = epi_pair<BN, SWIGLU>(d, j, h);
            }
        }
    }
}
