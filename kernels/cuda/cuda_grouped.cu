/* cuda_grouped: moed's own grouped expert GEMM (`moe.gemm: grouped`) in
 * its mma.sync form (every GPU from sm_80; on sm_90 cuda_wgmma.cu's form
 * runs instead), and the grouping of entries by local slot both forms use.
 *
 * One launch covers every local slot. The per-slot row counts stay on the
 * device: the grouping turns them into row offsets and a tile table, and
 * each CTA finds its (slot, row tile) by a binary search of that table, so
 * the host never waits for the routing (no sync, CUDA-graph safe) — what
 * cuBLAS's grouped call cannot do, as it takes its group sizes on the host.
 *
 * The math is warp-level mma.sync m16n8k16 (bf16 in, f32 accumulate) with
 * operands copied 16 bytes per lane: within each 32-wide k chunk a lane
 * copies the 8 consecutive k of its row and feeds them to two MMAs as if
 * they were the k positions the MMA fragment layout names. The same
 * permutation is applied to A and to B, so the dot products are unchanged,
 * and every weight row is read in full 64-byte runs. The copies go through
 * a cp.async pipeline in shared memory, so several KiB per warp are in
 * flight. That keeps the
 * decode case (a few rows per expert) at streaming speed, which is where a
 * MoE layer is weight-bandwidth bound; for large row counts the tiles get
 * taller (MT) so each weight fragment serves more rows.
 *
 * Two forms:
 *   gate/up: act[r, c] = silu(A_r · Wg_c) · (A_r · Wu_c), with Wg = rows
 *     [0, I) and Wu = rows [I, 2I) of the slot's w13, A's rows read through
 *     an index (the received row of each sorted entry: the gather is fused);
 *   down:    y[r, c] = act_r · W2_c.
 * Requirements (moe_cuda_grouped_supported): compute capability >= 8.0,
 * K, N and I multiples of 8 (16-byte rows). */
#include "cuda_internal.h"

#define WARPS 4

/* 16 bytes global -> shared through the cp.async pipeline (cuda_internal.h) */
__device__ __forceinline__ void copy16(void *smem, const bf16 *src, bool ok) {
    moe_cuda_copy16((uint32_t)__cvta_generic_to_shared(smem), src, ok);
}

__device__ __forceinline__ void mma16816(float *c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

/* plan[0..S] = row offsets (exclusive scan of counts), plan[S+1..2S+1] =
 * first tile of each slot with tiles of `tile_rows` rows (plan NULL: not
 * written); cursor[s] = plan[s] (the scatter's running positions). By one
 * CTA of THREADS: each thread sums a run of slots, a shared-memory scan
 * over the threads, then each thread writes its run. */
template <int THREADS>
__device__ void plan_block(const int32_t *counts, int S, int tile_rows, int32_t *plan, int32_t *cursor) {
    __shared__ int32_t rows_scan[THREADS], tiles_scan[THREADS];
    const int per = (S + THREADS - 1) / THREADS, first = threadIdx.x * per;
    int32_t rows = 0, tiles = 0;
    for (int s = first; s < first + per && s < S; s++) {
        rows += counts[s];
        tiles += (counts[s] + tile_rows - 1) / tile_rows;
    }
    rows_scan[threadIdx.x] = rows;
    tiles_scan[threadIdx.x] = tiles;
    __syncthreads();
    for (int step = 1; step < THREADS; step *= 2) { /* inclusive Hillis-Steele scan */
        int32_t r = threadIdx.x >= step ? rows_scan[threadIdx.x - step] : 0;
        int32_t t = threadIdx.x >= step ? tiles_scan[threadIdx.x - step] : 0;
        __syncthreads();
        rows_scan[threadIdx.x] += r;
        tiles_scan[threadIdx.x] += t;
        __syncthreads();
    }
    rows = rows_scan[threadIdx.x] - rows;
    tiles = tiles_scan[threadIdx.x] - tiles;
    for (int s = first; s < first + per && s < S; s++) {
        cursor[s] = rows;
        if (plan != nullptr) plan[s] = rows, plan[S + 1 + s] = tiles;
        rows += counts[s];
        tiles += (counts[s] + tile_rows - 1) / tile_rows;
    }
    if (plan != nullptr && threadIdx.x == THREADS - 1) {
        plan[S] = rows_scan[THREADS - 1];
        plan[2 * S + 1] = tiles_scan[THREADS - 1];
    }
}

/* Entries [begin, end) with a local slot (< S) counted per slot into
 * shared memory (zeroed by the caller), and then placed: each takes the
 * next position of its slot's cursor, order[pos] = entry, inverse[entry]
 * = pos. By the whole CTA. */
__device__ __forceinline__ void count_block(const cuda_meta_t *meta, int begin, int end, int S, int32_t *counts) {
    for (int p = begin + threadIdx.x; p < end; p += blockDim.x) {
        const int slot = meta[p].local_slot;
        if (slot >= 0 && slot < S) atomicAdd(&counts[slot], 1);
    }
}

__device__ __forceinline__ void scatter_block(const cuda_meta_t *meta, int begin, int end, int S, int32_t *cursor,
                                              int32_t *order, int32_t *inverse) {
    for (int p = begin + threadIdx.x; p < end; p += blockDim.x) {
        const int slot = meta[p].local_slot;
        if (slot < 0 || slot >= S) continue;
        const int pos = atomicAdd(&cursor[slot], 1);
        order[pos] = p;
        inverse[p] = pos;
    }
}

/* The whole grouping in one CTA for few entries (decode): counts in
 * shared memory, the plan, the scatter — one launch instead of two. */
#define GROUP_SMALL_THREADS 1024
#define GROUP_SMALL_MAX_ENTRIES 16384
__global__ void __launch_bounds__(GROUP_SMALL_THREADS)
    group_small_kernel(const cuda_meta_t *meta, int n_entries, int S, int tile_rows, int32_t *slot_counts,
                       int32_t *plan, int32_t *order, int32_t *inverse) {
    extern __shared__ int32_t group_shared[];
    int32_t *counts = group_shared, *cursor = group_shared + S;
    for (int s = threadIdx.x; s < S; s += blockDim.x) counts[s] = 0;
    __syncthreads();
    count_block(meta, 0, n_entries, S, counts);
    __syncthreads();
    for (int s = threadIdx.x; s < S; s += blockDim.x) slot_counts[s] = counts[s];
    plan_block<GROUP_SMALL_THREADS>(counts, S, tile_rows, plan, cursor);
    __syncthreads();
    scatter_block(meta, 0, n_entries, S, cursor, order, inverse);
}

/* The grouping of many entries in two launches, without global atomics
 * (the counts, plan and scatter of 32768 entries into 128 slots took
 * 19 µs in three launches with an atomic per entry, serialised at L2 on
 * the 128 counters; an H200). CTA b takes entries [b·per, (b+1)·per):
 *   count:   its per-slot counts in shared memory, to hist[b][s];
 *   scatter: every CTA reads hist's column sums (the slot counts) and the
 *            sums over the CTAs before it, scans the counts to the plan
 *            (CTA 0 writes it and slot_counts), then places its entries
 *            from offset[s] + before[s] with shared-memory atomics.
 * The order within a slot follows the atomics and may differ between
 * runs; no result depends on it (each GEMM row is computed alone, and the
 * per-row sum reads the entries in k order through inverse), so outputs
 * stay bit-identical. Entries without a local slot get no position. */
#define GROUP_THREADS 512
#define GROUP_MAX_BLOCKS 64
static int group_per_block(int n_entries) {
    int per = 1024;
    while ((n_entries + per - 1) / per > GROUP_MAX_BLOCKS) per *= 2;
    return per;
}

__global__ void __launch_bounds__(GROUP_THREADS)
    group_count_kernel(const cuda_meta_t *meta, int n_entries, int S, int per, int32_t *hist) {
    extern __shared__ int32_t group_shared[];
    for (int s = threadIdx.x; s < S; s += blockDim.x) group_shared[s] = 0;
    __syncthreads();
    const int begin = blockIdx.x * per, end = min(begin + per, n_entries);
    count_block(meta, begin, end, S, group_shared);
    __syncthreads();
    for (int s = threadIdx.x; s < S; s += blockDim.x) hist[(size_t)blockIdx.x * S + s] = group_shared[s];
}

__global__ void __launch_bounds__(GROUP_THREADS)
    group_scatter_kernel(const cuda_meta_t *meta, int n_entries, int S, int per, int tile_rows, const int32_t *hist,
                         int32_t *slot_counts, int32_t *plan, int32_t *order, int32_t *inverse) {
    extern __shared__ int32_t group_shared[];
    int32_t *counts = group_shared, *cursor = group_shared + S;
    const int blocks = gridDim.x;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        int32_t total = 0;
        for (int b = 0; b < blocks; b++) total += hist[(size_t)b * S + s];
        counts[s] = total;
        if (blockIdx.x == 0) slot_counts[s] = total;
    }
    __syncthreads();
    plan_block<GROUP_THREADS>(counts, S, tile_rows, blockIdx.x == 0 ? plan : nullptr, cursor);
    __syncthreads();
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        int32_t before = 0;
        for (int b = 0; b < (int)blockIdx.x; b++) before += hist[(size_t)b * S + s];
        cursor[s] += before;
    }
    __syncthreads();
    const int begin = blockIdx.x * per, end = min(begin + per, n_entries);
    scatter_block(meta, begin, end, S, cursor, order, inverse);
}

size_t moe_cuda_group_hist_ints(int n_entries, int S) {
    if (n_entries <= GROUP_SMALL_MAX_ENTRIES) return 0;
    const int per = group_per_block(n_entries);
    return (size_t)((n_entries + per - 1) / per) * (size_t)S;
}

/* MT m16 tiles (16·MT rows) by NB n8 tiles per warp; WARPS warps side by
 * side in n. SWIGLU: the first NB/2 n8 tiles are gate rows, the others the
 * matching up rows, and the epilogue writes act. */
#define STAGES 3
#define KSUB 2
/* A goes through the shared-memory pipeline with the weights. (Reading a
 * single m16 tile through L1 instead, for a 4th CTA per SM, measured the
 * same on Qwen3 at 16 tokens and 28% slower on Mixtral at 1: 0.462 against
 * 0.360 ms on an H200; kept as a switch.) */
#define A_SMEM(mt) true

template <int MT, int NB, bool SWIGLU>
__global__ void __launch_bounds__(WARPS * 32)
    grouped_kernel(const bf16 *__restrict__ W, const bf16 *__restrict__ A, const int32_t *__restrict__ a_index,
                   int a_index_div, const int32_t *__restrict__ plan, int S, int n_rows_w, int K, int n_out,
                   bf16 *__restrict__ out) {
    const int32_t *offsets = plan, *tiles = plan + S + 1;
    const int tile = blockIdx.x;
    if (tile >= tiles[S]) return;
    const int s = moe_cuda_tile_slot(plan, S, tile);
    const int row0 = offsets[s] + (tile - tiles[s]) * 16 * MT, row_end = offsets[s + 1];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    constexpr int COLS = SWIGLU ? 8 * NB / 2 : 8 * NB; /* output columns per warp */
    const int col0 = (blockIdx.y * WARPS + warp) * COLS;
    if (col0 >= n_out) return;
    const bf16 *Ws = W + (size_t)s * n_rows_w * K;

    /* this lane's weight row of each n8 tile, and its A rows */
    const bf16 *b_row[NB];
    bool b_ok[NB];
#pragma unroll
    for (int j = 0; j < NB; j++) {
        int n = SWIGLU ? (j < NB / 2 ? col0 + 8 * j + g : n_out + col0 + 8 * (j - NB / 2) + g) : col0 + 8 * j + g;
        int c = SWIGLU ? col0 + 8 * (j % (NB / 2)) : col0 + 8 * j;
        b_ok[j] = c < n_out;
        b_row[j] = Ws + (size_t)(b_ok[j] ? n : 0) * K;
    }
    const bf16 *a_row[MT][2];
    bool a_ok[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int r = row0 + 16 * m + 8 * h + g;
            a_ok[m][h] = r < row_end;
            int src = a_ok[m][h] ? (a_index != nullptr ? a_index[r] / a_index_div : r) : 0;
            a_row[m][h] = A + (size_t)src * K;
        }

    float acc[MT][NB][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < NB; j++) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;

    /* A STAGES-deep cp.async pipeline per warp (no CTA barrier: a lane
     * reads back only what it copied): each stage holds KSUB 32-wide k
     * chunks of the warp's NB weight tiles and of its MT·2 A rows, so
     * (STAGES-1)·KSUB·(NB+2·MT)·512 bytes per warp are in flight — what
     * keeps HBM busy when a few rows per expert leave little math to hide
     * the latency behind. */
    extern __shared__ uint4 smem[];
    constexpr int PER_STAGE = KSUB * (NB + (A_SMEM(MT) ? 2 * MT : 0)) * 32; /* uint4 per warp and stage */
    uint4 *mine = smem + (size_t)warp * STAGES * PER_STAGE;
    const int n_iter = (K + 32 * KSUB - 1) / (32 * KSUB);
    auto issue = [&](int it) {
        if (it < n_iter) {
            uint4 *st = mine + (it % STAGES) * PER_STAGE;
#pragma unroll
            for (int q = 0; q < KSUB; q++) {
                const int kk = it * 32 * KSUB + 32 * q + 8 * t;
                const bool in = kk < K;
#pragma unroll
                for (int j = 0; j < NB; j++) copy16(st + (q * NB + j) * 32 + lane, b_row[j] + (in ? kk : 0), in && b_ok[j]);
#pragma unroll
                for (int m = 0; m < MT && A_SMEM(MT); m++)
#pragma unroll
                    for (int h = 0; h < 2; h++)
                        copy16(st + (KSUB * NB + (q * MT + m) * 2 + h) * 32 + lane, a_row[m][h] + (in ? kk : 0),
                               in && a_ok[m][h]);
            }
        }
        moe_cuda_copy_commit(); /* an empty group past the end keeps the count uniform */
    };
#pragma unroll
    for (int it = 0; it < STAGES - 1; it++) issue(it);
    for (int it = 0; it < n_iter; it++) {
        moe_cuda_copy_wait<STAGES - 2>(); /* stage it has landed */
        const uint4 *st = mine + (it % STAGES) * PER_STAGE;
#pragma unroll
        for (int q = 0; q < KSUB; q++) {
            uint4 a[MT][2];
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    if (A_SMEM(MT)) {
                        a[m][h] = st[(KSUB * NB + (q * MT + m) * 2 + h) * 32 + lane];
                    } else { /* one tile of rows: read through L1 (every warp of the CTA reads them) */
                        const int kk = it * 32 * KSUB + 32 * q + 8 * t;
                        a[m][h] = a_ok[m][h] && kk < K ? __ldg(reinterpret_cast<const uint4 *>(a_row[m][h] + kk))
                                                       : make_uint4(0u, 0u, 0u, 0u);
                    }
                }
#pragma unroll
            for (int j = 0; j < NB; j++) {
                const uint4 bq = st[(q * NB + j) * 32 + lane];
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    const uint4 lo4 = a[m][0], hi4 = a[m][1];
                    mma16816(acc[m][j], lo4.x, hi4.x, lo4.y, hi4.y, bq.x, bq.y);
                    mma16816(acc[m][j], lo4.z, hi4.z, lo4.w, hi4.w, bq.z, bq.w);
                }
            }
        }
        issue(it + STAGES - 1); /* into the stage read one iteration ago */
    }
    moe_cuda_copy_wait<0>();

    /* epilogue: c0,c1 at (row g, cols 2t, 2t+1); c2,c3 at row g+8 */
    constexpr int TILES_OUT = SWIGLU ? NB / 2 : NB;
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = row0 + 16 * m + 8 * h + g;
            if (r >= row_end) continue;
#pragma unroll
            for (int j = 0; j < TILES_OUT; j++) {
                const int c = col0 + 8 * j + 2 * t;
                if (c >= n_out) continue;
                float v0 = acc[m][j][2 * h], v1 = acc[m][j][2 * h + 1];
                if (SWIGLU) {
                    const float u0 = acc[m][j + NB / 2][2 * h], u1 = acc[m][j + NB / 2][2 * h + 1];
                    v0 = moe_cuda_swiglu(v0, u0);
                    v1 = moe_cuda_swiglu(v1, u1);
                }
                *reinterpret_cast<__nv_bfloat162 *>(out + (size_t)r * n_out + c) = __floats2bfloat162_rn(v0, v1);
            }
        }
}

/* Dynamic shared memory of a CTA with tiles of 16·mt rows. */
static size_t smem_bytes(int mt) {
    const int nb = 4;
    return sizeof(uint4) * WARPS * STAGES * KSUB * (nb + (A_SMEM(mt) ? 2 * mt : 0)) * 32;
}

bool moe_cuda_grouped_supported(int hidden, int inter, int cc_major, size_t max_smem, char *why, size_t why_size) {
    if (cc_major < 8) {
        snprintf(why, why_size, "needs bf16 mma.sync (compute capability >= 8.0)");
        return false;
    }
    if (max_smem < smem_bytes(1)) {
        snprintf(why, why_size, "needs %zu bytes of shared memory per block; this GPU allows %zu", smem_bytes(1),
                 max_smem);
        return false;
    }
    if (hidden % 8 != 0 || inter % 8 != 0) {
        snprintf(why, why_size, "needs model.hidden and model.intermediate to be multiples of 8 (have %d and %d)",
                 hidden, inter);
        return false;
    }
    return true;
}

int moe_cuda_grouped_tile_rows(int n_entries, int S, size_t max_smem) {
    /* rows per slot on average decide the tile height, as far as the GPU's
     * shared memory allows (64-row tiles need 144 KiB: sm_80/sm_90 yes,
     * sm_86/89/120 with 99 KiB stop at 32) */
    int per_slot = S > 0 ? (n_entries + S - 1) / S : n_entries;
    int rows = per_slot <= 16 ? 16 : per_slot <= 32 ? 32 : 64;
    while (rows > 16 && smem_bytes(rows / 16) > max_smem) rows /= 2;
    return rows;
}

cudaError_t moe_cuda_group_entries_launch(const cuda_meta_t *meta, int n_entries, int S, int tile_rows, int32_t *hist,
                                          int32_t *slot_counts, int32_t *plan, int32_t *order, int32_t *inverse,
                                          cudaStream_t stream) {
    if (S <= 0 || S > MOE_MAX_SLOTS || tile_rows <= 0 || n_entries < 0) return cudaErrorInvalidValue;
    /* dynamic shared memory: counts and cursors; static: plan_block's two scan arrays */
    const size_t shared = sizeof(int32_t) * 2 * (size_t)S;
    static_assert(sizeof(int32_t) * 2 * (MOE_MAX_SLOTS + GROUP_SMALL_THREADS) <= 48 * 1024,
                  "the grouping fits the default shared memory at every slot count");
    if (n_entries <= GROUP_SMALL_MAX_ENTRIES) {
        group_small_kernel<<<1, GROUP_SMALL_THREADS, shared, stream>>>(meta, n_entries, S, tile_rows, slot_counts,
                                                                      plan, order, inverse);
        return cudaGetLastError();
    }
    const int per = group_per_block(n_entries), blocks = (n_entries + per - 1) / per;
    group_count_kernel<<<blocks, GROUP_THREADS, sizeof(int32_t) * (size_t)S, stream>>>(meta, n_entries, S, per, hist);
    group_scatter_kernel<<<blocks, GROUP_THREADS, shared, stream>>>(meta, n_entries, S, per, tile_rows, hist,
                                                                   slot_counts, plan, order, inverse);
    return cudaGetLastError();
}

template <int MT, bool SWIGLU>
static cudaError_t launch(const bf16 *W, const bf16 *A, const int32_t *a_index, int a_index_div,
                          const int32_t *plan, int S, int n_rows_w, int K, int n_out, int n_entries, bf16 *out,
                          cudaStream_t stream) {
    constexpr int NB = 4;
    constexpr int COLS = SWIGLU ? 8 * NB / 2 : 8 * NB;
    const long tiles = moe_cuda_tile_bound(n_entries, S, 16 * MT);
    long col_blocks = ((long)n_out + WARPS * COLS - 1) / (WARPS * COLS);
    if (tiles <= 0) return cudaSuccess;
    if (tiles > 0x7fffffffL || col_blocks > 65535) return cudaErrorInvalidValue;
    const size_t smem = smem_bytes(MT);
    static bool attribute_set = false; /* per instantiation; launches come from one thread */
    if (!attribute_set) {
        cudaError_t e = cudaFuncSetAttribute(grouped_kernel<MT, NB, SWIGLU>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return e;
        attribute_set = true;
    }
    dim3 grid((unsigned)tiles, (unsigned)col_blocks);
    grouped_kernel<MT, NB, SWIGLU><<<grid, WARPS * 32, smem, stream>>>(W, A, a_index, a_index_div, plan, S, n_rows_w,
                                                                     K, n_out, out);
    return cudaGetLastError();
}

cudaError_t moe_cuda_grouped_gemm_launch(const bf16 *W, const bf16 *A, const int32_t *a_index, int a_index_div,
                                         const int32_t *plan, int S, int tile_rows, bool swiglu, int n_out, int K,
                                         int n_entries, bf16 *out, cudaStream_t stream) {
    if (n_entries <= 0) return cudaSuccess;
    if (K % 8 != 0 || n_out % 8 != 0 || a_index_div <= 0) return cudaErrorInvalidValue;
    const int n_rows_w = swiglu ? 2 * n_out : n_out;
#define MOE_GROUPED_CASE(mt)                                                                                   \
    if (tile_rows == 16 * (mt))                                                                                \
        return swiglu ? launch<mt, true>(W, A, a_index, a_index_div, plan, S, n_rows_w, K, n_out, n_entries, out, \
                                         stream)                                                               \
                      : launch<mt, false>(W, A, a_index, a_index_div, plan, S, n_rows_w, K, n_out, n_entries, out, \
                                          stream);
    MOE_GROUPED_CASE(1)
    MOE_GROUPED_CASE(2)
    MOE_GROUPED_CASE(4)
#undef MOE_GROUPED_CASE
    return cudaErrorInvalidValue;
}
