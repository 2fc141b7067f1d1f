/* cuda_shared: the shared expert of one or two tokens (T <=
 * MOE_CUDA_SHARED_SMALL_TOKENS; cuBLAS for more), in the manner of the
 * decode kernels (cuda_decode.cu): a few tokens' shared expert is a matter
 * of reading its weights once at the speed of HBM.
 *   gate/up: a warp per intermediate column c streams the gate and up
 *     weight rows c (16 bytes per lane, four iterations' loads in flight)
 *     against each token's x: act[t, c] = silu(x_t · Wg_c) · (x_t · Wu_c)
 *     (bf16, as cuBLAS's path rounds it);
 *   down: a warp per hidden column h streams W2 row h against each token's
 *     act: y[t, h] = act_t · W2_h (f32, as cuBLAS's path leaves it).
 * f32 accumulation. Programmatic dependent launch on sm_90, like the decode
 * chain; unlike cuBLAS's calls they go into a step's CUDA graph, which is
 * most of what they gain. Measured on an H200 (`ncu`, DeepSeek-V3's 88 MB
 * shared expert): at one token 20 + 10 µs against cuBLAS's 19 + 2.8 +
 * 2.1 + 11 µs (two GEMMs, a split-K reduction, the SwiGLU); at 8 tokens 82
 * + 27 µs against cuBLAS's 35: the tokens' rows, read once per column from
 * L1/L2, bound them beyond two tokens. */
#include "cuda_vec.cuh"

template <int TB>
__global__ void __launch_bounds__(DECODE_WARPS * 32)
    shared_up_kernel(const bf16 *__restrict__ W13, const bf16 *__restrict__ x, int T, int H, int Is,
                     bf16 *__restrict__ act) {
    constexpr int U = 4; /* iterations' weight loads in flight */
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int col = blockIdx.x * DECODE_WARPS + warp;
    moe_cuda_grid_wait();
    moe_cuda_grid_release();
    if (col >= Is) return;
    const bf16 *wg = W13 + (size_t)col * H, *wu = W13 + ((size_t)Is + col) * H;
    float acc_g[TB], acc_u[TB];
#pragma unroll
    for (int t = 0; t < TB; t++) acc_g[t] = acc_u[t] = 0.0f;
    for (int base = lane * 8; base < H; base += 256 * U) {
        uint4 g[U], u[U];
#pragma unroll
        for (int it = 0; it < U; it++) {
            const int k0 = base + it * 256;
            if (k0 >= H) break;
            g[it] = load_stream(wg + k0), u[it] = load_stream(wu + k0);
        }
#pragma unroll
        for (int it = 0; it < U; it++) {
            const int k0 = base + it * 256;
            if (k0 >= H) break;
#pragma unroll
            for (int t = 0; t < TB; t++) {
                if (t >= T) break;
                float xf[8];
                bf16x8_to_f32(__ldg((const uint4 *)(x + (size_t)t * H + k0)), xf);
                acc_g[t] = dot8(g[it], xf, acc_g[t]);
                acc_u[t] = dot8(u[it], xf, acc_u[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TB; t++) {
        if (t >= T) break;
        const float gate = warp_sum(acc_g[t]), up = warp_sum(acc_u[t]);
        if (lane == 0) act[(size_t)t * Is + col] = __float2bfloat16(moe_cuda_swiglu(gate, up));
    }
}

template <int TB>
__global__ void __launch_bounds__(DECODE_WARPS * 32)
    shared_down_kernel(const bf16 *__restrict__ W2, const bf16 *__restrict__ act, int T, int H, int Is,
                       float *__restrict__ y) {
    constexpr int U = 4;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.x * DECODE_WARPS + warp;
    moe_cuda_grid_wait();
    moe_cuda_grid_release();
    if (h >= H) return;
    const bf16 *w = W2 + (size_t)h * Is;
    float acc[TB];
#pragma unroll
    for (int t = 0; t < TB; t++) acc[t] = 0.0f;
    for (int base = lane * 8; base < Is; base += 256 * U) {
        uint4 wv[U];
#pragma unroll
        for (int it = 0; it < U; it++) {
            const int k0 = base + it * 256;
            if (k0 >= Is) break;
            wv[it] = load_stream(w + k0);
        }
#pragma unroll
        for (int it = 0; it < U; it++) {
            const int k0 = base + it * 256;
            if (k0 >= Is) break;
#pragma unroll
            for (int t = 0; t < TB; t++) {
                if (t >= T) break;
                float af[8];
                bf16x8_to_f32(__ldg((const uint4 *)(act + (size_t)t * Is + k0)), af);
                acc[t] = dot8(wv[it], af, acc[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TB; t++) {
        if (t >= T) break;
        const float v = warp_sum(acc[t]);
        if (lane == 0) y[(size_t)t * H + h] = v;
    }
}

bool moe_cuda_shared_small_ok(int T, int H, int Is) {
    return T > 0 && T <= MOE_CUDA_SHARED_SMALL_TOKENS && H > 0 && Is > 0 && H % 8 == 0 && Is % 8 == 0;
}

bool moe_cuda_shared_pdl_built(void) {
    return moe_cuda_built_for_sm90(shared_up_kernel<1>, shared_down_kernel<1>);
}

template <int TB>
static cudaError_t shared_launch(const bf16 *W13, const bf16 *W2, const bf16 *x, int T, int H, int Is, bf16 *act,
                                 float *y, bool pdl, cudaStream_t stream) {
    const dim3 block(DECODE_WARPS * 32);
    cudaError_t e = moe_cuda_launch(pdl, shared_up_kernel<TB>, dim3((unsigned)((Is + DECODE_WARPS - 1) / DECODE_WARPS)),
                                    block, 0, stream, W13, x, T, H, Is, act);
    if (e != cudaSuccess) return e;
    return moe_cuda_launch(pdl, shared_down_kernel<TB>, dim3((unsigned)((H + DECODE_WARPS - 1) / DECODE_WARPS)), block,
                           0, stream, W2, (const bf16 *)act, T, H, Is, y);
}

cudaError_t moe_cuda_shared_small_launch(const bf16 *W13, const bf16 *W2, const bf16 *x, int T, int H, int Is,
                                         bf16 *act, float *y, bool pdl, cudaStream_t stream) {
    if (!moe_cuda_shared_small_ok(T, H, Is)) return cudaErrorInvalidValue;
    static_assert(MOE_CUDA_SHARED_SMALL_TOKENS == 2, "one instantiation per token count");
    return T <= 1 ? shared_launch<1>(W13, W2, x, T, H, Is, act, y, pdl, stream)
                  : shared_launch<2>(W13, W2, x, T, H, Is, act, y, pdl, stream);
}
