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
 * Operand tiles in shared memory as cuda_wgmma_ops.cuh says. Every thread
 * copies with cp.async (the A rows go through the entry index: the gather
 * is fused, which bulk tensor copies cannot do); STAGES buffers, filled
 * STAGES-2 blocks ahead, so a buffer is overwritten only after every
 * warpgroup's wgmma that read it has completed (wait_group 1 in the
 * previous iteration, then the CTA barrier).
 * Covered by tests/cuda_layer.c (every item width, against the CPU
 * backend's reference) under compute-sanitizer in scripts/gpu-test.sh. */
#include <type_traits>

#include "cuda_wgmma_ops.cuh"

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
    const int n_items = plan[2 * S + 1] * col_blocks;
    if ((int)blockIdx.x >= n_items) return;
    auto locate = [&](int item) { return wg_locate(plan, S, col_blocks, COLS, item); };

    extern __shared__ uint8_t wg_smem[];
    const uint32_t base = ((uint32_t)__cvta_generic_to_shared(wg_smem) + 1023u) & ~1023u;
    /* the epilogue's patches, past the stage buffers */
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
        const wg_item_t it = locate(li);
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
    const int wg = tid / 128, warp = (tid % 128) / 32;
    uint32_t q_use = 0;
    int next_item = 0;
    wg_item_t next = locate(blockIdx.x); /* the MMA side's next item */
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
                wg_mma_block<BN>(d, base + (q_use % STAGES) * STAGE, wg);
            }
            if (repoint) repoint = false, point();
            if (kb == 0 && next_item < n_items) next = locate(next_item);
            if constexpr (decltype(with_mma)::value) wg_wait<1>();
        }
    };
    for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
        const wg_item_t it = next;
        next_item = item + gridDim.x;
#pragma unroll
        for (int i = 0; i < ACC; i++) d[i] = 0.0f;
        if (it.row0 + wg * 64 < it.row_end) loop(std::true_type{});
        else loop(std::false_type{});
        wg_wait<0>();
        wg_fence_regs<ACC>(d);
        wg_epilogue<BN, SWIGLU>(d, it.row0 + wg * 64 + warp * 16, it.row_end, it.col0, n_out,
                                epi + (size_t)(tid / 32) * 16 * wg_shape<BN>::epi_pitch, tid % 32, out);
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
    if (tiles * col_blocks > 0x7fffffffL - 1024) return cudaErrorInvalidValue; /* item += grid stays an int */
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
                                       int bn, bool ws, int order, bf16 *out, cudaStream_t stream) {
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
    if (ws)
        return moe_cuda_wgmma_ws_launch(W, A, a_index, a_index_div, plan, S, swiglu, n_out, K, n_entries, bn, sms,
                                        order, out, stream);
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
