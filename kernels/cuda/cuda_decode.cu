/* cuda_decode: moed's grouped expert GEMM in its decode form, for chunks
 * of few received rows (moe.gemm grouped; by default while a chunk's
 * entries stay under half of the slots, moe_cuda_use_decode;
 * MOE_CUDA_DECODE_ROWS overrides; every GPU from sm_80), and the router
 * GEMM for a few tokens.
 *
 * With a handful of tokens a MoE layer is a matter of reading each used
 * expert's weights once at the full speed of HBM: there are few rows to
 * multiply, so tensor-core tiles of 64 or 128 rows are mostly padding and
 * spread one expert's weights over few multiprocessors. Here the work goes
 * by row, not by slot, so no grouping of entries by slot is needed:
 *   gate/up: a warp per (row r, column c, entry j) streams the gate and up
 *     weight rows c of j's slot, 16 bytes per lane with several
 *     iterations' loads in flight, and writes
 *     act[r·k + j, c] = silu(x_r · Wg_c) · (x_r · Wu_c) (bf16);
 *   down and sum: a warp per (row r, column h) reads row h of each entry's
 *     W2 and computes y_j = act[r·k + j] · W2_h (rounded to bf16, as the
 *     grouped forms store y), then Σ_j w_j · y_j in k order — the same
 *     values and order as the per-row sum of the other forms, so the
 *     result does not depend on where a slot lives.
 * f32 accumulation throughout. Two kernels instead of grouping, two GEMMs
 * and the sum. A slot used by several rows is read once per row (L2 serves
 * the repeats): the form is for a few rows, where that is rare. The
 * kernels here, and the routing kernels before them, use programmatic
 * dependent launch on sm_90 (cuda_internal.h). */
#include "cuda_vec.cuh"

/* gate/up: warp (row r, column c, batch z) takes entries z·KB ..
 * z·KB+KB-1 of row r: batches of few entries give many short warps, and
 * each lane issues U iterations' loads (2·KB·U of 16 bytes) before it uses
 * them. */
template <int KB, int U>
__global__ void __launch_bounds__(DECODE_WARPS * 32)
    decode_up_kernel(const bf16 *__restrict__ W13, const bf16 *__restrict__ rows, const cuda_meta_t *__restrict__ meta,
                     int top_k, int S, int H, int I, bf16 *__restrict__ act) {
    const int r = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int col = blockIdx.x * DECODE_WARPS + warp, j0 = blockIdx.z * KB;
    moe_cuda_grid_wait();
    moe_cuda_grid_release();
    if (col >= I) return;
    const bf16 *x = rows + (size_t)r * H;
    const bf16 *wg[KB];
    bool used[KB];
#pragma unroll
    for (int j = 0; j < KB; j++) {
        const int slot = j0 + j < top_k ? meta[(size_t)r * top_k + j0 + j].local_slot : -1;
        used[j] = slot >= 0 && slot < S;
        wg[j] = W13 + ((size_t)(used[j] ? slot : 0) * 2 * I + col) * H;
    }
    float acc_g[KB], acc_u[KB];
#pragma unroll
    for (int j = 0; j < KB; j++) acc_g[j] = acc_u[j] = 0.0f;
    for (int base = lane * 8; base < H; base += 256 * U) {
        uint4 g[U][KB], u[U][KB], xv[U];
#pragma unroll
        for (int it = 0; it < U; it++) {
            const int k0 = base + it * 256;
            if (k0 >= H) break;
#pragma unroll
            for (int j = 0; j < KB; j++)
                if (used[j])
                    g[it][j] = load_stream(wg[j] + k0),
                    u[it][j] = load_stream(wg[j] + (size_t)I * H + k0);
            xv[it] = __ldg((const uint4 *)(x + k0));
        }
#pragma unroll
        for (int it = 0; it < U; it++) {
            if (base + it * 256 >= H) break;
            float xf[8];
            bf16x8_to_f32(xv[it], xf);
#pragma unroll
            for (int j = 0; j < KB; j++)
                if (used[j]) acc_g[j] = dot8(g[it][j], xf, acc_g[j]), acc_u[j] = dot8(u[it][j], xf, acc_u[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < KB; j++) {
        if (!used[j]) continue;
        const float gate = warp_sum(acc_g[j]), up = warp_sum(acc_u[j]);
        if (lane == 0)
            act[((size_t)r * top_k + j0 + j) * I + col] = __float2bfloat16(moe_cuda_swiglu(gate, up));
    }
}

/* down and the weighted sum: dst[r, h] (bf16 partial, or f32 out holding
 * the same rounded value). A warp per (row, column) with all of the row's
 * entries (the sum needs them in k order), KB at a time; at most 128
 * registers, so four blocks (16 warps) share a multiprocessor. */
template <int KB, bool F32_OUT>
__global__ void __launch_bounds__(DECODE_WARPS * 32, 4)
    decode_down_kernel(const bf16 *__restrict__ W2, const bf16 *__restrict__ act, const cuda_meta_t *__restrict__ meta,
                       int top_k, int S, int H, int I, bool prefetch, void *__restrict__ dst) {
    const int r = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    constexpr int U = KB >= 4 ? 1 : 4 / KB;
    const int h = blockIdx.x * DECODE_WARPS + warp;
    const cuda_meta_t *row_meta = meta + (size_t)r * top_k;
    /* With `prefetch` (the chunk's W2 rows fit half of L2), before waiting
     * for the gate/up kernel: this warp's W2 rows into L2 (up to 16 lines
     * per lane), while that kernel's last blocks run. Its meta is already
     * final: this grid starts only once every gate/up block has passed its
     * own wait, so routing has completed. */
    if (prefetch && h < H)
        for (int j = 0; j < top_k; j++) {
            const int slot = row_meta[j].local_slot;
            if (slot < 0 || slot >= S) continue;
            const char *row = (const char *)(W2 + ((size_t)slot * H + h) * I);
            const int lines = (I * (int)sizeof(bf16) + 127) / 128;
            for (int line = lane; line < lines && line < 16 * 32; line += 32)
                asm volatile("prefetch.global.L2 [%0];\n" ::"l"(row + (size_t)line * 128));
        }
    moe_cuda_grid_wait();
    moe_cuda_grid_release();
    if (h >= H) return;
    float sum = 0.0f;
    for (int j0 = 0; j0 < top_k; j0 += KB) {
        const bf16 *a = act + ((size_t)r * top_k + j0) * I; /* entry j0 + j: a + j·I */
        int slot[KB];
#pragma unroll
        for (int j = 0; j < KB; j++) {
            slot[j] = j0 + j < top_k ? row_meta[j0 + j].local_slot : -1;
            if (slot[j] >= S) slot[j] = -1;
        }
        float acc[KB];
#pragma unroll
        for (int j = 0; j < KB; j++) acc[j] = 0.0f;
        for (int base = lane * 8; base < I; base += 256 * U) { /* 2·KB·U loads per lane, then their math */
            uint4 wv[U][KB], av[U][KB];
#pragma unroll
            for (int it = 0; it < U; it++) {
                const int k0 = base + it * 256;
                if (k0 >= I) break;
#pragma unroll
                for (int j = 0; j < KB; j++)
                    if (slot[j] >= 0)
                        wv[it][j] = load_stream(W2 + ((size_t)slot[j] * H + h) * I + k0),
                        av[it][j] = __ldg((const uint4 *)(a + (size_t)j * I + k0));
            }
#pragma unroll
            for (int it = 0; it < U; it++) {
                if (base + it * 256 >= I) break;
#pragma unroll
                for (int j = 0; j < KB; j++) {
                    if (slot[j] < 0) continue;
                    float af[8];
                    bf16x8_to_f32(av[it][j], af);
                    acc[j] = dot8(wv[it][j], af, acc[j]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < KB; j++) /* k order, as the per-row sum of the other forms */
            if (slot[j] >= 0) sum += row_meta[j0 + j].weight * __bfloat162float(__float2bfloat16(warp_sum(acc[j])));
    }
    if (lane != 0) return;
    const bf16 rounded = __float2bfloat16(sum);
    if constexpr (F32_OUT) static_cast<float *>(dst)[(size_t)r * H + h] = __bfloat162float(rounded);
    else static_cast<bf16 *>(dst)[(size_t)r * H + h] = rounded;
}

/* one entry per gate/up warp (four iterations' loads at once), DOWN_KB
 * per down batch */
#define UP_KB 1
#define UP_U 4
template <int DOWN_KB>
static cudaError_t decode_launch(const bf16 *W13, const bf16 *W2, const bf16 *rows, const cuda_meta_t *meta,
                                 int n_rows, int top_k, int S, int H, int I, bf16 *act, bf16 *partial, float *out,
                                 bool prefetch, bool pdl, cudaStream_t stream) {
    const dim3 up_grid((unsigned)((I + DECODE_WARPS - 1) / DECODE_WARPS), (unsigned)n_rows,
                       (unsigned)((top_k + UP_KB - 1) / UP_KB));
    cudaError_t e = moe_cuda_launch(pdl, decode_up_kernel<UP_KB, UP_U>, up_grid, dim3(DECODE_WARPS * 32), 0, stream, W13,
                                    rows, meta, top_k, S, H, I, act);
    if (e != cudaSuccess) return e;
    const dim3 down_grid((unsigned)((H + DECODE_WARPS - 1) / DECODE_WARPS), (unsigned)n_rows);
    if (out != nullptr)
        return moe_cuda_launch(pdl, decode_down_kernel<DOWN_KB, true>, down_grid, dim3(DECODE_WARPS * 32), 0, stream,
                               W2, act, meta, top_k, S, H, I, prefetch, (void *)out);
    return moe_cuda_launch(pdl, decode_down_kernel<DOWN_KB, false>, down_grid, dim3(DECODE_WARPS * 32), 0, stream, W2,
                           act, meta, top_k, S, H, I, prefetch, (void *)partial);
}

cudaError_t moe_cuda_decode_launch(const bf16 *W13, const bf16 *W2, const bf16 *rows, const cuda_meta_t *meta,
                                   int n_rows, int top_k, int S, int H, int I, size_t l2_bytes, bf16 *act,
                                   bf16 *partial, float *out, bool pdl, cudaStream_t stream) {
    if (n_rows <= 0) return cudaSuccess;
    if (H % 8 != 0 || I % 8 != 0 || top_k <= 0 || top_k > MOE_ROUTE_MAX_K || n_rows > MOE_CUDA_DECODE_MAX_ROWS ||
        (partial == nullptr) == (out == nullptr))
        return cudaErrorInvalidValue;
    /* the down kernel prefetches its weights during the gate/up kernel's
     * tail when they fit half of L2 (Qwen3 at one token: 8 × 3 MiB; more
     * than that measured slower on an H200: Mixtral, Qwen3 at 8 tokens) */
    const bool prefetch = pdl && (double)n_rows * top_k * H * I * sizeof(bf16) <= (double)l2_bytes / 2;
#define MOE_DECODE_ARGS W13, W2, rows, meta, n_rows, top_k, S, H, I, act, partial, out, prefetch, pdl, stream
    if (top_k <= 1) return decode_launch<1>(MOE_DECODE_ARGS);
    if (top_k <= 2) return decode_launch<2>(MOE_DECODE_ARGS);
    if (top_k <= 4) return decode_launch<4>(MOE_DECODE_ARGS);
    return decode_launch<8>(MOE_DECODE_ARGS);
#undef MOE_DECODE_ARGS
}

/* The router GEMM for a few tokens, in the same spirit: logits[t, e] =
 * x_t · router_e (f32), a block per (expert, TB tokens) whose four warps
 * split the row (H/1024 loads per thread, up to four in flight), summed
 * through shared memory — one small kernel where cuBLAS's took 6 µs at one
 * token on an H200. */
template <int TB>
__global__ void __launch_bounds__(DECODE_WARPS * 32)
    router_kernel(const bf16 *__restrict__ router, const bf16 *__restrict__ x, int T, int E, int H,
                  float *__restrict__ logits) {
    __shared__ float part[DECODE_WARPS][TB];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int e = blockIdx.x, t0 = blockIdx.y * TB;
    moe_cuda_grid_wait();
    moe_cuda_grid_release();
    const bf16 *w = router + (size_t)e * H;
    float acc[TB];
#pragma unroll
    for (int t = 0; t < TB; t++) acc[t] = 0.0f;
#pragma unroll 4
    for (int k0 = threadIdx.x * 8; k0 < H; k0 += DECODE_WARPS * 256) {
        float wf[8];
        bf16x8_to_f32(load_stream(w + k0), wf);
#pragma unroll
        for (int t = 0; t < TB; t++)
            if (t0 + t < T) acc[t] = dot8(__ldg((const uint4 *)(x + (size_t)(t0 + t) * H + k0)), wf, acc[t]);
    }
#pragma unroll
    for (int t = 0; t < TB; t++) {
        const float v = warp_sum(acc[t]);
        if (lane == 0) part[warp][t] = v;
    }
    __syncthreads();
    if (threadIdx.x < TB && t0 + (int)threadIdx.x < T) {
        float v = 0.0f;
#pragma unroll
        for (int w_ = 0; w_ < DECODE_WARPS; w_++) v += part[w_][threadIdx.x];
        logits[(size_t)(t0 + threadIdx.x) * E + e] = v;
    }
}

bool moe_cuda_decode_pdl_built(void) {
    return moe_cuda_built_for_sm90(router_kernel<1>, decode_up_kernel<UP_KB, UP_U>, decode_down_kernel<8, true>);
}

cudaError_t moe_cuda_router_launch(const bf16 *router, const bf16 *x, int T, int E, int H, float *logits, bool pdl,
                                   cudaStream_t stream) {
    if (T <= 0) return cudaSuccess;
    if (H % 8 != 0 || T > MOE_CUDA_ROUTER_MAX_TOKENS || E <= 0) return cudaErrorInvalidValue;
    const dim3 block(DECODE_WARPS * 32);
    if (T <= 1) return moe_cuda_launch(pdl, router_kernel<1>, dim3(E, 1), block, 0, stream, router, x, T, E, H, logits);
    if (T <= 2) return moe_cuda_launch(pdl, router_kernel<2>, dim3(E, 1), block, 0, stream, router, x, T, E, H, logits);
    if (T <= 4) return moe_cuda_launch(pdl, router_kernel<4>, dim3(E, 1), block, 0, stream, router, x, T, E, H, logits);
    return moe_cuda_launch(pdl, router_kernel<8>, dim3(E, (T + 7) / 8), block, 0, stream, router, x, T, E, H, logits);
}
