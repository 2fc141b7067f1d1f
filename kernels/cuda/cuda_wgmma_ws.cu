/* cuda_wgmma_ws: the warp-specialised form of moed's wgmma grouped GEMM
 * (sm_90a only, like cuda_wgmma.cu; the same problem, plan, tiles, work
 * items and epilogue).
 *
 * Three warpgroups per CTA, one CTA per multiprocessor, persistent over
 * the items b, b + gridDim.x, ...:
 * - the producer (warpgroup 0, its registers cut to 56 by setmaxnreg)
 *   fills STAGES buffers in order, across items: the weight tile by the
 *   tensor-memory-access unit (two boxes of BN/2 rows, issued by thread 0),
 *   and the A tile either the same way (a_index NULL: the rows in order, as
 *   the down GEMM reads act) or, for the gathered gate/up rows, by
 *   cp.async from all 128 producer threads, 8 chunks of 16 bytes each;
 * - the two MMA warpgroups (registers raised to 224: 56·128 + 224·256
 *   is what 384 threads of 168 hold, and neither side spills) each own
 *   64 rows of the 128-row tile, as in the classic form.
 * A "full" mbarrier per buffer completes when its bytes have landed (the
 *   tensor copies count their bytes on it; each producer thread's cp.async
 *   arrive on it once they complete), an "empty" one when each of the 8
 *   MMA warps has finished the wgmma that read it (one arrival per warp
 *   after wgmma.wait_group 1, or after wait_group 0 for an item's last
 *   block, or at once from a warpgroup that a partial tile leaves without
 *   rows). The producer waits for "empty" before it
 *   refills a buffer, so it runs up to STAGES - 1 blocks ahead of the MMAs
 *   (the classic form: STAGES - 2, since every thread copies and
 *   multiplies), and no CTA-wide barrier remains in the loop.
 * Covered by tests/cuda_layer.c (tile forms "ws64", "ws128", "ws256" and
 * "wsweight") under compute-sanitizer in scripts/gpu-test.sh. */
#include <cuda.h>
#include <cudaTypedefs.h>

#include <type_traits>

#include "cuda_wgmma_ops.cuh"

#define WS_THREADS 384 /* producer warpgroup + two MMA warpgroups */

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
/* One arrival on bar once this thread's cp.async so far have landed (the
 * barrier's count includes it: noinc). */
__device__ __forceinline__ void mbar_arrive_copies(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
/* Until the phase of the given parity has completed (parity 1 on a fresh
 * barrier: at once, "the phase before the first"). */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "WS_WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WS_WAIT_%=;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
/* One box of a tensor map at (k, row) into dst, its bytes counted on bar. */
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap *map, int k, int row, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(map), "r"(k), "r"(row), "r"(bar)
        : "memory");
}
template <int N>
__device__ __forceinline__ void regs_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void regs_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

/* w_map: the weights [S·n_rows_w, K] in boxes of 64 k by BN/2 rows; a_map:
 * A [rows, K] in boxes of 64 k by WG_BM rows (used when a_index is NULL).
 * SWIGLU: the first box holds gate rows col0.., the second the matching up
 * rows (n_out + col0..); else BN consecutive rows. Rows past a slot's own
 * (the next slot's, or zeros past the tensor) reach only columns and rows
 * the epilogue drops; k past K loads zeros. */
template <int BN, bool SWIGLU>
__global__ void __launch_bounds__(WS_THREADS, 1)
    wgmma_ws_kernel(const __grid_constant__ CUtensorMap w_map, const __grid_constant__ CUtensorMap a_map,
                    const bf16 *__restrict__ A, const int32_t *__restrict__ a_index, int a_index_div,
                    const int32_t *__restrict__ plan, int S, int n_rows_w, int K, int n_out, int col_blocks,
                    int by_weight, bf16 *__restrict__ out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int STAGES = wg_shape<BN>::stages, STAGE = wg_shape<BN>::stage_bytes;
    constexpr int COLS = SWIGLU ? BN / 2 : BN, ACC = BN / 2;
    const int n_items = plan[2 * S + 1] * col_blocks;
    if ((int)blockIdx.x >= n_items) return;
    auto locate = [&](int item) {
        return by_weight ? wg_locate_by_weight(plan, S, col_blocks, COLS, item)
                         : wg_locate(plan, S, col_blocks, COLS, item);
    };

    extern __shared__ uint8_t wg_smem[];
    const uint32_t base = ((uint32_t)__cvta_generic_to_shared(wg_smem) + 1023u) & ~1023u;
    uint8_t *epi = wg_smem + (base - (uint32_t)__cvta_generic_to_shared(wg_smem)) + (size_t)STAGES * STAGE;
    __shared__ __align__(8) uint64_t bars[2 * STAGES];
    const uint32_t full0 = (uint32_t)__cvta_generic_to_shared(bars), empty0 = full0 + 8 * STAGES;
    const int n_k = (K + WG_BK - 1) / WG_BK;
    const int tid = threadIdx.x;
    const bool a_tma = a_index == nullptr;
    if (tid == 0) {
        for (int q = 0; q < STAGES; q++) {
            mbar_init(full0 + 8 * q, a_tma ? 1 : 128 + 1); /* expect_tx (+ every producer thread's copies) */
            mbar_init(empty0 + 8 * q, 2 * 4);              /* each MMA warp */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (tid < 128) { /* the producer */
        regs_dec<56>();
        if (a_tma && tid != 0) return; /* thread 0's tensor copies load it all */
        const int c = tid % 8, r0 = tid / 8; /* chunk c of rows r0 + 16·i */
        const uint32_t swz = (uint32_t)(r0 * 128 + ((c ^ (r0 & 7)) << 4));
        uint32_t q = 0;
        for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
            const wg_item_t it = locate(item);
            int src[8]; /* A rows, -1: none (zeros) */
            if (!a_tma) {
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const int r = it.row0 + r0 + 16 * i;
                    src[i] = r < it.row_end ? a_index[r] / a_index_div : -1;
                }
            }
            const int w_row = it.s * n_rows_w + it.col0;
            const int w_row2 = it.s * n_rows_w + (SWIGLU ? n_out + it.col0 : it.col0 + BN / 2);
            for (int kb = 0; kb < n_k; kb++, q++) {
                const uint32_t buf = q % STAGES, full = full0 + 8 * buf;
                const uint32_t sa = base + buf * STAGE, sb = sa + WG_BM * 128;
                mbar_wait(empty0 + 8 * buf, ((q / STAGES) & 1) ^ 1);
                if (tid == 0) {
                    mbar_expect_tx(full, (a_tma ? WG_BM * 128 : 0) + BN * 128);
                    tma_load(sb, &w_map, kb * WG_BK, w_row, full);
                    tma_load(sb + (BN / 2) * 128, &w_map, kb * WG_BK, w_row2, full);
                    if (a_tma) tma_load(sa, &a_map, kb * WG_BK, it.row0, full);
                }
                if (!a_tma) {
                    const int kk = kb * WG_BK + 8 * c;
                    const bool in = kk < K;
#pragma unroll
                    for (int i = 0; i < 8; i++)
                        moe_cuda_copy16(sa + swz + 16 * 128 * i,
                                        A + (size_t)(src[i] >= 0 ? src[i] : 0) * K + (in ? kk : 0), in && src[i] >= 0);
                    mbar_arrive_copies(full);
                }
            }
        }
        /* every buffer given back (so every copy and arrival has landed)
         * before these threads leave */
        for (int j = 0; j < STAGES; j++, q++) mbar_wait(empty0 + 8 * (q % STAGES), ((q / STAGES) & 1) ^ 1);
        return;
    }

    regs_inc<224>();
    /* The MMA side: warpgroup wg owns rows 64·wg.. of each tile. The next
     * item's location (a binary search, dependent loads) is fetched after
     * the first block's MMAs are issued, while the tensor cores work. */
    const int ct = tid - 128, wg = ct / 128, warp = (ct % 128) / 32, lane = ct % 32;
    uint32_t q = 0;
    int next_item = 0;
    wg_item_t next = locate(blockIdx.x);
    float d[ACC];
    auto release = [&](uint32_t block) { /* this warp is done with block's buffer */
        __syncwarp();
        if (lane == 0) mbar_arrive(empty0 + 8 * (block % STAGES));
    };
    /* the loop twice: with this warpgroup's MMAs, and without them when a
     * partial tile leaves it no rows */
    auto loop = [&](auto with_mma) {
        for (int kb = 0; kb < n_k; kb++, q++) {
            mbar_wait(full0 + 8 * (q % STAGES), (q / STAGES) & 1);
            if constexpr (decltype(with_mma)::value) {
                /* the producer's cp.async wrote A through the generic proxy */
                if (!a_tma) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
                wg_mma_block<BN>(d, base + (q % STAGES) * STAGE, wg);
            }
            if (kb == 0 && next_item < n_items) next = locate(next_item);
            if constexpr (decltype(with_mma)::value) {
                wg_wait<1>();
                if (kb > 0) release(q - 1);
            } else {
                release(q);
            }
        }
    };
    for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
        const wg_item_t it = next;
        next_item = item + gridDim.x;
#pragma unroll
        for (int i = 0; i < ACC; i++) d[i] = 0.0f;
        const bool with_mma = it.row0 + wg * 64 < it.row_end;
        if (with_mma) loop(std::true_type{});
        else loop(std::false_type{});
        wg_wait<0>();
        wg_fence_regs<ACC>(d);
        if (with_mma) release(q - 1);
        wg_epilogue<BN, SWIGLU>(d, it.row0 + wg * 64 + warp * 16, it.row_end, it.col0, n_out,
                                epi + (size_t)(ct / 32) * 16 * wg_shape<BN>::epi_pitch, lane, out);
    }
#elif defined(__CUDA_ARCH__)
#error "cuda_wgmma_ws.cu needs an sm_90a target (WGMMA_ARCH = -gencode=arch=compute_90a,code=sm_90a)"
#endif
}

/* cuTensorMapEncodeTiled from the driver, through the runtime (no link to
 * libcuda); NULL where the driver lacks it. */
static PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder(void) {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    static bool looked = false;
    if (!looked) {
        looked = true;
        void *p = nullptr;
        cudaDriverEntryPointQueryResult found;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) ==
                cudaSuccess &&
            found == cudaDriverEntryPointSuccess)
            fn = (PFN_cuTensorMapEncodeTiled_v12000)p;
        else
            (void)cudaGetLastError();
    }
    return fn;
}

/* A bf16 matrix [rows, K] (row pitch K) as a 2-D tensor of boxes 64 k by
 * box_rows rows in the 128-byte swizzle (the layout wg_desc names); zeros
 * past its ends. A failure is logged with the map's shape (`what`: which
 * operand); the launch returns it as a CUDA error. Rows stay below
 * 2^31 - 256: the kernel adds up to BN/2 to a row index. */
static cudaError_t tile_map(CUtensorMap *map, const char *what, const bf16 *ptr, long rows, int K, int box_rows) {
    PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (encode == nullptr) return cudaErrorNotSupported;
    if (rows <= 0 || rows > 0x7fffffffL - 256) {
        moe_log(MOE_LOG_ERROR, "cuda", "wgmma: %s tensor map of %ld rows (at most 2^31 - 256)", what, rows);
        return cudaErrorInvalidValue;
    }
    const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows}, strides[1] = {(cuuint64_t)K * sizeof(bf16)};
    const cuuint32_t box[2] = {WG_BK, (cuuint32_t)box_rows}, unit[2] = {1, 1};
    const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)ptr, dims, strides, box, unit,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r == CUDA_SUCCESS) return cudaSuccess;
    moe_log(MOE_LOG_ERROR, "cuda",
            "wgmma: cuTensorMapEncodeTiled for %s (%ld rows, K %d, boxes of %d rows): CUresult %d", what, rows, K,
            box_rows, (int)r);
    return cudaErrorInvalidValue;
}

template <int BN, bool SWIGLU>
static cudaError_t ws_launch(const bf16 *W, const bf16 *A, const int32_t *a_index, int a_index_div,
                             const int32_t *plan, int S, int K, int n_out, int n_entries, int sms, int order,
                             bf16 *out, cudaStream_t stream) {
    constexpr int COLS = SWIGLU ? BN / 2 : BN;
    const long tiles = moe_cuda_tile_bound(n_entries, S, WG_BM);
    const long col_blocks = ((long)n_out + COLS - 1) / COLS;
    /* Items of a slot with several row tiles: row tile first (its column
     * blocks share the A rows), or by weight tile (its row tiles share the
     * weights) where a slot has very many column blocks: row-tile order
     * then spreads the readers of one weight tile over two waves of items
     * and reads many twice from DRAM. Measured per kernel on an H200 (`ncu`,
     * ms by row tile / by weight tile): Mixtral gate/up (56 column blocks)
     * 3.81 / 2.84 at T=4096, 14.63 / 11.73 at 16384; its down (16) 1.40 /
     * 1.46 and 5.83 / 5.70; DeepSeek-V3 T=16384 gate/up (16) 15.84 / 18.71,
     * down (28) 8.66 / 9.13; Qwen3 (6 and 8) 0.426 / 0.443 gate/up at 4096. */
    const bool by_weight = order == MOE_WGMMA_ORDER_WEIGHT || (order == MOE_WGMMA_ORDER_AUTO && col_blocks >= 32);
    if (tiles * col_blocks > 0x7fffffffL - 1024) return cudaErrorInvalidValue; /* item += grid stays an int */
    const int n_rows_w = SWIGLU ? 2 * n_out : n_out;
    CUtensorMap w_map, a_map;
    memset(&a_map, 0, sizeof a_map);
    cudaError_t e = tile_map(&w_map, "weights", W, (long)S * n_rows_w, K, BN / 2);
    if (e == cudaSuccess && a_index == nullptr) e = tile_map(&a_map, "A rows", A, n_entries, K, WG_BM);
    if (e != cudaSuccess) return e;
    static bool attribute_set = false; /* per instantiation; launches come from one thread */
    if (!attribute_set) {
        e = cudaFuncSetAttribute(wgmma_ws_kernel<BN, SWIGLU>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)wg_shape<BN>::smem);
        if (e != cudaSuccess) return e;
        attribute_set = true;
    }
    const long grid = tiles * col_blocks < sms ? tiles * col_blocks : sms;
    wgmma_ws_kernel<BN, SWIGLU><<<(unsigned)grid, WS_THREADS, wg_shape<BN>::smem, stream>>>(
        w_map, a_map, A, a_index, a_index_div, plan, S, n_rows_w, K, n_out, (int)col_blocks, by_weight ? 1 : 0, out);
    return cudaGetLastError();
}

bool moe_cuda_wgmma_ws_supported(void) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, wgmma_ws_kernel<256, true>) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return tensor_map_encoder() != nullptr;
}

cudaError_t moe_cuda_wgmma_ws_launch(const bf16 *W, const bf16 *A, const int32_t *a_index, int a_index_div,
                                     const int32_t *plan, int S, bool swiglu, int n_out, int K, int n_entries, int bn,
                                     int sms, int order, bf16 *out, cudaStream_t stream) {
#define MOE_WS_CASE(b)                                                                                             \
    if (bn == (b))                                                                                                 \
        return swiglu ? ws_launch<b, true>(W, A, a_index, a_index_div, plan, S, K, n_out, n_entries, sms, order, out, \
                                           stream)                                                                 \
                      : ws_launch<b, false>(W, A, a_index, a_index_div, plan, S, K, n_out, n_entries, sms, order, out, \
                                            stream);
    MOE_WS_CASE(64)
    MOE_WS_CASE(128)
    MOE_WS_CASE(256)
#undef MOE_WS_CASE
    return cudaErrorInvalidValue;
}
