/* cuda_wgmma: moed's grouped expert GEMM for many rows per slot, on
 * Hopper's warpgroup MMA (wgmma, sm_90a only: this file alone is built for
 * compute_90a, so on any other GPU its kernels have no image and
 * moe_cuda_wgmma_supported says no).
 *
 * The same problem and plan as cuda_grouped.cu (gate/up with the gather
 * and SwiGLU fused, then down; one launch over every local slot, the
 * per-slot counts read on the device), with tiles sized for arithmetic
 * as well as streaming: 128 rows by BN (64, 128 or 256) columns per CTA, two
 * warpgroups each owning 64 rows, k in blocks of 64.
 *
 * Shared memory holds each operand tile K-major in the 128-byte swizzle
 * that wgmma's descriptors name: row r's 16-byte chunk c lands at
 * r·128 + ((c ^ (r mod 8))·16), from 1024-byte-aligned tile bases, and a
 * k16 step advances the descriptor's start by 32 bytes. Every thread
 * copies with cp.async (the A rows go through the entry index: the gather
 * is fused, which bulk tensor copies cannot do); STAGES buffers, filled
 * STAGES-2 blocks ahead, so a buffer is overwritten only after every
 * warpgroup's wgmma that read it has completed (wait_group 1 in the
 * previous iteration, then the CTA barrier).
 * Covered by tests/cuda_layer.c (every item width, against the CPU
 * backend's reference) under compute-sanitizer in scripts/gpu-test.sh. */
#include <type_traits>

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

/* barrier.sync, not the .aligned bar.sync of __syncthreads(): the two
 * warpgroups reach it from different copies of the loop (with and without
 * their MMAs). */
__device__ __forceinline__ void cta_sync() { asm volatile("barrier.sync 0;\n" ::: "memory"); }

/* Persistent: CTA b computes work items b, b + gridDim.x, ... (item =
 * tile · col_blocks + column block, so the CTAs at work at one time share
 * their A rows and slots), and its copies run STAGES-2 k-blocks ahead
 * across items, so the next item's first blocks load during this one's
 * last MMAs and its epilogue.
 * SWIGLU: B's tile rows [0, BN/2) are gate rows col0.., [BN/2, BN) the
 * matching up rows (n_out + col0..), and the CTA writes BN/2 act columns;
 * else BN output columns. a_index (or NULL: row r itself) maps a sorted
 * entry to its A row (a_index[r] / a_index_div). */
template <int BN, bool SWIGLU>
__global__ void __launch_bounds__(WG_THREADS, 1)
    wgmma_kernel(const bf16 *__restrict__ W, const bf16 *__restrict__ A, const int32_t *__restrict__ a_index,
                 int a_index_div, const int32_t *__restrict__ plan, int S, int n_rows_w, int K, int n_out,
                 int col_blocks, bf16 *__restrict__ out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int STAGES = wg_shape<BN>::stages, STAGE = wg_shape<BN>::stage_bytes;
    constexpr int COLS = SWIGLU ? BN / 2 : BN, B_ROWS = BN / 32, ACC = BN / 2;
    const int32_t *offsets = plan, *tiles = plan + S + 1;
    const int n_items = tiles[S] * col_blocks;
    if ((int)blockIdx.x >= n_items) return;
    struct item_t {
        int s, row0, row_end, col0;
    };
    auto locate = [&](int item) {
        const int tile = item / col_blocks, s = moe_cuda_tile_slot(plan, S, tile);
        return item_t{s, offsets[s] + (tile - tiles[s]) * WG_BM, offsets[s + 1], (item % col_blocks) * COLS};
    };

    extern __shared__ uint8_t wg_smem[];
    const uint32_t base = ((uint32_t)__cvta_generic_to_shared(wg_smem) + 1023u) & ~1023u;
    /* the epilogue's patches, past the stage buffers */
    constexpr int EPI_COLS = wg_shape<BN>::epi_cols, EPI_PITCH = wg_shape<BN>::epi_pitch;
    uint8_t *epi = wg_smem + (base - (uint32_t)__cvta_generic_to_shared(wg_smem)) + (size_t)STAGES * STAGE;
    const int n_k = (K + WG_BK - 1) / WG_BK;

    /* The copy side: block lk of item li next, into buffer q_load % STAGES.
     * This thread copies chunk c of rows r0 + 32·i of each tile. */
    const int tid = threadIdx.x, c = tid % 8, r0 = tid / 8;
    const uint32_t swz = (uint32_t)(r0 * 128 + ((c ^ (r0 & 7)) << 4));
    int li = blockIdx.x, lk = 0;
    uint32_t q_load = 0;
    const bf16 *a_src[4], *b_src[B_ROWS];
    bool a_ok[4], b_ok[B_ROWS];
    auto point = [&]() { /* the source rows of item li */
        const item_t it = locate(li);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = it.row0 + r0 + 32 * i;
            a_ok[i] = r < it.row_end;
            const int src = a_ok[i] ? (a_index != nullptr ? a_index[r] / a_index_div : r) : 0;
            a_src[i] = A + (size_t)src * K + 8 * c;
        }
        const bf16 *Ws = W + (size_t)it.s * n_rows_w * K;
#pragma unroll
        for (int i = 0; i < B_ROWS; i++) {
            const int rr = r0 + 32 * i;
            const int col = SWIGLU ? it.col0 + (rr < BN / 2 ? rr : rr - BN / 2) : it.col0 + rr;
            const int wrow = SWIGLU && rr >= BN / 2 ? n_out + col : col;
            b_ok[i] = col < n_out;
            b_src[i] = Ws + (size_t)(b_ok[i] ? wrow : 0) * K + 8 * c;
        }
    };
    point();
    bool repoint = false; /* the copies moved on to item li: point() before the next issue() */
    auto issue = [&]() {
        if (li < n_items) {
            const int kk = lk * WG_BK;
            const bool in = kk + 8 * c < K;
            const uint32_t sa = base + (q_load % STAGES) * STAGE, sb = sa + WG_BM * 128;
#pragma unroll
            for (int i = 0; i < 4; i++) moe_cuda_copy16(sa + swz + 32 * 128 * i, a_src[i] + (in ? kk : 0), in && a_ok[i]);
#pragma unroll
            for (int i = 0; i < B_ROWS; i++)
                moe_cuda_copy16(sb + swz + 32 * 128 * i, b_src[i] + (in ? kk : 0), in && b_ok[i]);
            q_load++;
            if (++lk == n_k) {
                lk = 0;
                li += gridDim.x;
                repoint = li < n_items;
            }
        }
        moe_cuda_copy_commit(); /* an empty group past the end keeps the count uniform */
    };

    /* The MMA side: warpgroup wg owns rows 64·wg.. of each tile. Group j
     * of this thread's copies holds the j-th block it multiplies, so
     * waiting until STAGES-3 groups are pending finds it landed; the block
     * issued at that step goes into the buffer read two blocks ago, whose
     * wgmma both warpgroups have finished (wait_group 1, then the barrier).
     * The copies go out before this block's MMAs, but where they move on
     * to the next item, its location (a binary search) and entry indices,
     * dependent loads, are fetched after them, and so is the MMA side's own
     * search for its next item: those loads then wait while the tensor
     * cores work instead of before their next block (README, "Qwen3 at
     * 4096 tokens"). */
    const int wg = tid / 128, warp = (tid % 128) / 32, g = (tid % 32) / 4, t = tid % 4;
    uint32_t q_use = 0;
    int next_item = 0;
    item_t next = locate(blockIdx.x); /* the MMA side's next item */
    float d[ACC];
#pragma unroll
    for (int p = 0; p < STAGES - 2; p++) {
        issue();
        if (repoint) repoint = false, point();
    }
    /* the loop twice: with this warpgroup's MMAs, and without them when a
     * partial tile leaves it no rows (a branch around the wgmma inside the
     * loop would make the compiler serialise them) */
    auto loop = [&](auto with_mma) {
        for (int kb = 0; kb < n_k; kb++, q_use++) {
            moe_cuda_copy_wait<STAGES - 3>();
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); /* visible to the tensor cores */
            cta_sync();
            issue();
            if constexpr (decltype(with_mma)::value) {
                const uint32_t sa = base + (q_use % STAGES) * STAGE, sb = sa + WG_BM * 128;
                wg_fence();
#pragma unroll
                for (int ks = 0; ks < WG_BK / 16; ks++)
                    wg_mma<BN>(d, wg_desc(sa + wg * 64 * 128 + ks * 32), wg_desc(sb + ks * 32));
                wg_commit();
            }
            if (repoint) repoint = false, point();
            if (kb == 0 && next_item < n_items) next = locate(next_item);
            if constexpr (decltype(with_mma)::value) wg_wait<1>();
        }
    };
    for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
        const item_t it = next;
        next_item = item + gridDim.x;
#pragma unroll
        for (int i = 0; i < ACC; i++) d[i] = 0.0f;
        if (it.row0 + wg * 64 < it.row_end) loop(std::true_type{});
        else loop(std::false_type{});
        wg_wait<0>();
        wg_fence_regs<ACC>(d);
        /* The epilogue. A warp with all 16 of its rows goes through its own
         * patch of shared memory, EPI_COLS columns at a time: the fragments
         * in (4-byte stores, no bank conflicts with the padded pitch), then
         * whole 16-byte pieces of rows out to global memory, 8 lanes per
         * 128-byte run (the fragments' own layout stores 4 bytes to 8 rows
         * per instruction: Qwen3 T=16384 2.871 -> 2.689 ms, the perfect
         * router's T=4096 0.739 -> 0.680). A warp with fewer rows (small T,
         * a slot's last tile) stores its fragments directly, skipping the
         * rows it does not have (staging them all cost 10-17% at T <= 1024). */
        const int row_base = it.row0 + wg * 64 + warp * 16, have = it.row_end - row_base;
        if (have >= 16) {
            uint8_t *patch = epi + (size_t)(tid / 32) * 16 * EPI_PITCH;
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
                for (int idx = tid % 32; idx < 16 * PIECES; idx += 32) {
                    const int rr = idx / PIECES, piece = idx % PIECES;
                    const int col = it.col0 + pass * EPI_COLS + 8 * piece;
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
                if (r >= it.row_end) continue;
#pragma unroll
                for (int j = 0; j < COLS / 8; j++) {
                    const int col = it.col0 + 8 * j + 2 * t;
                    if (col >= n_out) continue;
                    *reinterpret_cast<__nv_bfloat162 *>(out + (size_t)r * n_out + col) = epi_pair<BN, SWIGLU>(d, j, h);
                }
            }
        }
    }
    moe_cuda_copy_wait<0>();
#elif defined(__CUDA_ARCH__)
#error "cuda_wgmma.cu needs an sm_90a target (WGMMA_ARCH = -gencode=arch=compute_90a,code=sm_90a)"
#endif
}

template <int BN, bool SWIGLU>
static cudaError_t wg_launch(const bf16 *W, const bf16 *A, const int32_t *a_index, int a_index_div,
                             const int32_t *plan, int S, int K, int n_out, int n_entries, int sms, bf16 *out,
                             cudaStream_t stream) {
    constexpr int COLS = SWIGLU ? BN / 2 : BN;
    const long tiles = moe_cuda_tile_bound(n_entries, S, WG_BM);
    const long col_blocks = ((long)n_out + COLS - 1) / COLS;
    if (tiles * col_blocks > 0x7fffffffL) return cudaErrorInvalidValue;
    static bool attribute_set = false; /* per instantiation; launches come from one thread */
    if (!attribute_set) {
        cudaError_t e = cudaFuncSetAttribute(wgmma_kernel<BN, SWIGLU>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)wg_shape<BN>::smem);
        if (e != cudaSuccess) return e;
        attribute_set = true;
    }
    const long grid = tiles * col_blocks < sms ? tiles * col_blocks : sms;
    wgmma_kernel<BN, SWIGLU><<<(unsigned)grid, WG_THREADS, wg_shape<BN>::smem, stream>>>(
        W, A, a_index, a_index_div, plan, S, SWIGLU ? 2 * n_out : n_out, K, n_out, (int)col_blocks, out);
    return cudaGetLastError();
}

bool moe_cuda_wgmma_supported(size_t max_smem, char *why, size_t why_size) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, wgmma_kernel<256, true>) != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(why, why_size, "needs an sm_90 GPU (H100/H200: wgmma)");
        return false;
    }
    size_t need = wg_shape<64>::smem;
    need = need > wg_shape<128>::smem ? need : wg_shape<128>::smem;
    need = need > wg_shape<256>::smem ? need : wg_shape<256>::smem;
    if (max_smem < need) {
        snprintf(why, why_size, "needs %zu bytes of shared memory per block; this GPU allows %zu", need, max_smem);
        return false;
    }
    return true;
}

cudaError_t moe_cuda_wgmma_gemm_launch(const bf16 *W, const bf16 *A, const int32_t *a_index, int a_index_div,
                                       const int32_t *plan, int S, bool swiglu, int n_out, int K, int n_entries,
                                       int bn, bf16 *out, cudaStream_t stream) {
    if (n_entries <= 0) return cudaSuccess;
    /* K > 0: each item's k loop is what moves the MMA side on to its next item */
    if (K <= 0 || K % 8 != 0 || n_out % 8 != 0 || a_index_div <= 0 || (bn != 0 && bn != 64 && bn != 128 && bn != 256))
        return cudaErrorInvalidValue;
    /* 16-byte copies of A and W rows, 16-byte stores of out rows */
    if (((uintptr_t)W | (uintptr_t)A | (uintptr_t)out) % 16 != 0) return cudaErrorInvalidValue;
    static int sms = 0; /* one CTA per multiprocessor (its shared memory allows no second) */
    if (sms == 0) {
        int device = 0;
        cudaError_t e = cudaGetDevice(&device);
        if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
        if (e != cudaSuccess) return e;
    }
    /* bn 0: the widest tiles that still give every multiprocessor a work
     * item (wide tiles re-read fewer A rows; narrow ones spread a few
     * experts' weights over the whole GPU when there are few rows) */
    for (int cand = 256; bn == 0; cand /= 2) {
        const long cols = swiglu ? cand / 2 : cand;
        if (cand == 64 || moe_cuda_tile_bound(n_entries, S, WG_BM) * ((n_out + cols - 1) / cols) >= sms) bn = cand;
    }
#define MOE_WG_CASE(b)                                                                                             \
    if (bn == (b))                                                                                                 \
        return swiglu ? wg_launch<b, true>(W, A, a_index, a_index_div, plan, S, K, n_out, n_entries, sms, out, stream) \
                      : wg_launch<b, false>(W, A, a_index, a_index_div, plan, S, K, n_out, n_entries, sms, out, stream);
    MOE_WG_CASE(64)
    MOE_WG_CASE(128)
    MOE_WG_CASE(256)
#undef MOE_WG_CASE
    return cudaErrorInvalidValue;
}
