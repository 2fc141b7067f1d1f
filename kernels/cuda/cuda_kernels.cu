/* cuda_kernels: every kernel of the CUDA backend and its launcher
 * (STYLE 7: one launcher per kernel, shapes checked, grid sized here, the
 * launch error returned). Layouts, for T tokens of this rank, R ranks,
 * k experts per token, H hidden, I intermediate, S slots per rank:
 *   x [T,H] bf16; logits [T,E] f32; ids/weights [T,k]; entry_slot [T,k]
 *   flags/scan [R,T] int32: token t goes to rank d / its position in the
 *     send buffer (an exclusive scan over the whole [R,T] array, so the
 *     buffer is grouped by destination rank in token order)
 *   send_rows [n_send,H] bf16, send_meta [n_send,k] {local slot|-1, weight}
 *   pairs: (row, entry) of the received rows with a local slot, grouped by
 *     slot (counts, scan, atomic scatter: the order within a slot varies,
 *     no result depends on it), gathered [n_valid,H] bf16,
 *     h13 [n_valid,2I] bf16, act [n_valid,I] bf16, y [n_valid,H] bf16
 *     (f32 accumulation inside the GEMMs)
 *   partial [n_recv,H] bf16 = Σ over a row's local entries of w·y
 *   out [T,H] f32 = Σ over ranks (ascending) of the returned partials
 *     + gate·shared expert.
 * Covered by tests/cuda_layer.c (against the CPU backend) under
 * compute-sanitizer in scripts/gpu-test.sh. */
#include "cuda_internal.h"

static int blocks_for(size_t n, int threads) {
    size_t blocks = (n + (size_t)threads - 1) / (size_t)threads;
    return (int)(blocks > 65535u * 16u ? 65535u * 16u : (blocks == 0 ? 1 : blocks));
}

/* 8 values per thread (two 16-byte loads, one 16-byte store) when both
 * buffers are 16-byte aligned, the last n % 8 one by one: one value per
 * thread took 25 µs for 4096 tokens of 2048 on an H200, 2 TB/s. */
__global__ void f32_to_bf16_kernel(const float *src, bf16 *dst, size_t n, bool wide) {
    const size_t stride = (size_t)gridDim.x * blockDim.x, first = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t done = 0;
    if (wide) {
        const size_t n8 = n / 8;
        for (size_t i = first; i < n8; i += stride) {
            const float4 a = reinterpret_cast<const float4 *>(src)[2 * i];
            const float4 b = reinterpret_cast<const float4 *>(src)[2 * i + 1];
            uint4 o;
            __nv_bfloat162 *pair = reinterpret_cast<__nv_bfloat162 *>(&o);
            pair[0] = __floats2bfloat162_rn(a.x, a.y);
            pair[1] = __floats2bfloat162_rn(a.z, a.w);
            pair[2] = __floats2bfloat162_rn(b.x, b.y);
            pair[3] = __floats2bfloat162_rn(b.z, b.w);
            reinterpret_cast<uint4 *>(dst)[i] = o;
        }
        done = n8 * 8;
    }
    for (size_t i = done + first; i < n; i += stride) dst[i] = __float2bfloat16(src[i]);
}

cudaError_t moe_cuda_f32_to_bf16_launch(const float *src, bf16 *dst, size_t n, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    const bool wide = ((uintptr_t)src | (uintptr_t)dst) % 16 == 0;
    f32_to_bf16_kernel<<<blocks_for(wide ? (n + 7) / 8 : n, 256), 256, 0, stream>>>(src, dst, n, wide);
    return cudaGetLastError();
}

/* Synthetic weights: the same moe_synth_value as the CPU backend (IEEE
 * sqrt and division on both sides), so values agree before rounding. */
__global__ void synth_kernel(bf16 *dst_bf16, float *dst_f32, size_t n, uint64_t seed, int layer, int kind,
                             int expert, int fan_in, size_t offset) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = moe_synth_value(seed, layer, kind, expert, offset + i, fan_in);
        if (dst_bf16 != nullptr) dst_bf16[i] = __float2bfloat16(v);
        else dst_f32[i] = v;
    }
}

cudaError_t moe_cuda_synth_launch(bf16 *dst_bf16, float *dst_f32, size_t n, uint64_t seed, int layer, int kind,
                                  int expert, int fan_in, size_t index_offset, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    if ((dst_bf16 == nullptr) == (dst_f32 == nullptr)) return cudaErrorInvalidValue;
    synth_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(dst_bf16, dst_f32, n, seed, layer, kind, expert, fan_in,
                                                         index_offset);
    return cudaGetLastError();
}

/* One thread per token: the routing code shared with the CPU backend. */
__global__ void route_kernel(moe_route_token_params_t p, const float *logits, const float *bias,
                             const double *zipf_cdf, uint64_t step, int64_t first_token, int n_tokens,
                             int32_t *ids, float *weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_tokens) return;
    /* the top-k list is built in registers/local memory, not in place in
     * global memory (its insertions rewrite it: 10x slower there) */
    int32_t my_ids[MOE_ROUTE_MAX_K];
    float my_weights[MOE_ROUTE_MAX_K];
    moe_route_token(&p, logits != nullptr ? logits + (size_t)t * p.experts : nullptr, bias, zipf_cdf, step,
                    first_token + t, my_ids, my_weights);
    for (int i = 0; i < p.top_k; i++) {
        ids[(size_t)t * p.top_k + i] = my_ids[i];
        weights[(size_t)t * p.top_k + i] = my_weights[i];
    }
}

/* softmax_topk and renormalize with a warp per token: the same decisions
 * as moe_route_token (top-k by logit, ties to the lower expert id; a NaN
 * logit ranks last), the softmax sum taken across lanes. One thread per
 * token was latency-bound: 66 us for 16 tokens of 128 experts on an H200,
 * most of a decode step. */
#define ROUTE_WARP_MAX_PER_LANE 32 /* experts <= 1024 */
/* An order-preserving 32-bit key of a float that is not NaN: a larger
 * float has a larger key, -0 the key of +0 (they compare equal), and every
 * key is above 0, which marks "excluded" or "taken". */
__device__ __forceinline__ uint32_t order_key(float v) {
    uint32_t b = __float_as_uint(v);
    if (b == 0x80000000u) b = 0u;
    return b & 0x80000000u ? ~b : b | 0x80000000u;
}

__device__ __forceinline__ float key_value(uint32_t key) {
    return __uint_as_float(key & 0x80000000u ? key & 0x7fffffffu : ~key);
}

/* The warp's largest (MAX) or smallest 32-bit value: one redux.sync from
 * sm_80, shuffles before. */
template <bool MAX>
__device__ __forceinline__ uint32_t warp_extreme_u32(uint32_t v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    return MAX ? __reduce_max_sync(0xffffffffu, v) : __reduce_min_sync(0xffffffffu, v);
#else
    for (int off = 16; off > 0; off /= 2) {
        const uint32_t other = __shfl_xor_sync(0xffffffffu, v, off);
        v = MAX ? max(v, other) : min(v, other);
    }
    return v;
#endif
}

/* The warp's top_k of its experts' values (expert lane + 32·i in lane's
 * v[i], none NaN; experts past n_experts ignored), largest first, ties to
 * the lower id: lane r (< top_k) receives the r-th choice in *value and
 * *id (other lanes: -inf and 0). Each round every lane offers its best
 * untaken key; the warp's largest key is one reduction and the lowest
 * expert id offering it another (two redux.sync in place of ten shuffles
 * and their compares: routing 4096 tokens of 128 experts, k=8, took 19 µs
 * on an H200 with the shuffles); the winner's lane marks it taken. */
template <int PER_LANE>
__device__ __forceinline__ void warp_top_k(const float *v, int lane, int n_experts, int top_k, float *value,
                                           int *id) {
    uint32_t key[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) key[i] = lane + 32 * i < n_experts ? order_key(v[i]) : 0u;
    float my_value = -INFINITY;
    int my_id = 0;
    for (int r = 0; r < top_k; r++) {
        uint32_t best = 0u;
        int best_i = 0;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++)
            if (key[i] > best) best = key[i], best_i = i; /* strict: the lane's lowest id among equals */
        const uint32_t top = warp_extreme_u32<true>(best);
        const int winner = (int)warp_extreme_u32<false>(best == top ? (uint32_t)(lane + 32 * best_i) : 0xffffffffu);
        if (lane == r) my_value = key_value(top), my_id = winner;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++)
            if (lane + 32 * i == winner) key[i] = 0u;
    }
    *value = my_value;
    *id = my_id;
}

/* PER_LANE logits per lane (experts <= 32·PER_LANE), so a 128-expert
 * router loops over 4, not 32; the r-th choice stays in lane r's
 * registers (no per-thread arrays indexed at run time, which live in
 * local memory), and lanes 0..k-1 write the token's k results side by side. */
template <int PER_LANE>
__global__ void route_warp_kernel(moe_route_token_params_t p, const float *logits, int n_tokens, int32_t *ids,
                                  float *weights, const moe_slot_table_t *local_slots, int64_t first_token,
                                  int32_t *entry_slot, cuda_meta_t *meta) {
    const int t = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    moe_cuda_grid_wait();
    moe_cuda_grid_release();
    if (t >= n_tokens) return;
    const float *l = logits + (size_t)t * p.experts;
    float v[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int e = lane + 32 * i;
        v[i] = e < p.experts ? l[e] : -INFINITY;
    }
    /* One rank: the slot of each of this lane's experts that has a single
     * replica (-1: several, picked after the choice), loaded while the
     * logits load, so that no slot-table load waits for the choice (with
     * 128 experts at 4096 tokens the kernel is a chain of loads: 13 µs on
     * an H200 with the table read after it). Up to 256 experts; with more,
     * the table's lines are prefetched into L1 instead. */
    constexpr bool PRELOAD = PER_LANE <= 8;
    int one_slot[PRELOAD ? PER_LANE : 1];
    if (local_slots != nullptr) {
        if constexpr (PRELOAD) {
#pragma unroll
            for (int i = 0; i < PER_LANE; i++) {
                const int e = lane + 32 * i;
                one_slot[i] = -1;
                if (e < p.experts) {
                    const int start = local_slots->replica_start[e], end = local_slots->replica_start[e + 1];
                    if (end - start == 1) one_slot[i] = local_slots->replica_slot[start];
                }
            }
        } else {
            for (int i = lane * 32; i <= p.experts; i += 32 * 32)
                asm volatile("prefetch.global.L1 [%0];\n"
                             "prefetch.global.L1 [%1];\n" ::"l"(local_slots->replica_start + i),
                             "l"(local_slots->replica_slot + i));
        }
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; i++)
        if (isnan(v[i])) v[i] = -INFINITY;
    float my_value;
    int my_id;
    warp_top_k<PER_LANE>(v, lane, p.experts, p.top_k, &my_value, &my_id);
    /* the first choice is the largest logit: the softmax's max */
    const float first = __shfl_sync(0xffffffffu, my_value, 0);
    float sum = 0.0f;
    if (p.method == MOE_ROUTE_TOKEN_SOFTMAX_TOPK) {
#pragma unroll
        for (int i = 0; i < PER_LANE; i++)
            if (lane + 32 * i < p.experts) sum += expf(v[i] - first);
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    }
    const bool mine = lane < p.top_k;
    const float w = !mine ? 0.0f
                          : p.method == MOE_ROUTE_TOKEN_SOFTMAX_TOPK ? expf(my_value - first) / sum
                                                                     : expf(my_value - first);
    float chosen = w;
    for (int off = 16; off > 0; off /= 2) chosen += __shfl_xor_sync(0xffffffffu, chosen, off);
    const bool normalize = p.method == MOE_ROUTE_TOKEN_RENORMALIZE || p.norm_topk_prob;
    int slot = -1; /* lane r: its choice's preloaded slot, from the lane that holds it */
    if (PRELOAD && local_slots != nullptr)
#pragma unroll
        for (int i = 0; i < (PRELOAD ? PER_LANE : 1); i++) {
            const int held = __shfl_sync(0xffffffffu, one_slot[i], my_id % 32);
            if (my_id / 32 == i) slot = held;
        }
    if (mine) {
        const size_t entry = (size_t)t * p.top_k + lane;
        const float weight = normalize ? w / chosen : w;
        ids[entry] = my_id;
        weights[entry] = weight;
        if (local_slots != nullptr) { /* one rank: mark_local_kernel's work */
            if (slot < 0) slot = moe_slots_pick(local_slots, my_id, 0, first_token + t);
            entry_slot[entry] = slot;
            meta[entry] = cuda_meta_t{slot, weight};
        }
    }
}

/* sigmoid_group_topk (DeepSeek-V3) with a warp per token: the same
 * decisions as moe_route_sigmoid_group_topk for finite logits, which takes
 * one thread 158 µs per token at 256 experts on an H200 (serial scans in
 * local memory). The biased scores go to shared memory; lane g ranks group
 * g's two best and lane 0 the groups with moe_route_insert itself (the
 * same tie rules, as serial as the host's: 32 and n_group steps); the
 * experts of the chosen groups are then ranked like route_warp_kernel
 * (largest first, ties to the lower id; a NaN score ranks last), and the
 * weights are the unbiased sigmoids, summed in rank order. */
#define ROUTE_GROUP_WARPS 4
template <int PER_LANE>
__global__ void __launch_bounds__(ROUTE_GROUP_WARPS * 32)
    route_group_warp_kernel(moe_route_token_params_t p, const float *logits, const float *bias, int n_tokens,
                            int32_t *ids, float *weights, const moe_slot_table_t *local_slots, int64_t first_token,
                            int32_t *entry_slot, cuda_meta_t *meta) {
    extern __shared__ float group_scores[]; /* [warps][experts] biased scores */
    __shared__ float group_score[ROUTE_GROUP_WARPS][32];
    __shared__ uint32_t allowed_groups[ROUTE_GROUP_WARPS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int t = blockIdx.x * ROUTE_GROUP_WARPS + warp;
    moe_cuda_grid_wait();
    moe_cuda_grid_release();
    if (t >= n_tokens) return; /* a whole warp: the syncs below are per warp */
    const float *l = logits + (size_t)t * p.experts;
    float *biased = group_scores + (size_t)warp * p.experts;
    float v[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int e = lane + 32 * i;
        v[i] = -INFINITY;
        if (e < p.experts) {
            biased[e] = moe_route_sigmoid(l[e]) + (bias != nullptr ? bias[e] : 0.0f);
            v[i] = biased[e];
        }
    }
    __syncwarp();
    const int group_size = p.experts / p.n_group;
    if (lane < p.n_group) { /* lane g: group g's two best, summed as the host does */
        const int take = group_size < 2 ? group_size : 2;
        float best[2], score = 0.0f;
        int32_t best_index[2];
        int count = 0;
        for (int j = 0; j < group_size; j++)
            moe_route_insert(best, best_index, &count, take, biased[lane * group_size + j], j);
        for (int i = 0; i < take; i++) score += best[i];
        group_score[warp][lane] = score;
    }
    __syncwarp();
    if (lane == 0) { /* the topk_group best groups, in the host's order of insertion */
        float group_top[MOE_ROUTE_MAX_K];
        int32_t groups[MOE_ROUTE_MAX_K];
        int n_groups = 0;
        uint32_t mask = 0;
        for (int g = 0; g < p.n_group; g++)
            moe_route_insert(group_top, groups, &n_groups, p.topk_group, group_score[warp][g], g);
        for (int i = 0; i < n_groups; i++) mask |= 1u << groups[i];
        allowed_groups[warp] = mask;
    }
    __syncwarp();
    const uint32_t allowed = allowed_groups[warp];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int e = lane + 32 * i;
        if (e >= p.experts || !(allowed >> (e / group_size) & 1u) || isnan(v[i])) v[i] = -INFINITY;
    }
    float my_value;
    int my_id;
    warp_top_k<PER_LANE>(v, lane, p.experts, p.top_k, &my_value, &my_id);
    (void)my_value;
    const bool mine = lane < p.top_k;
    float w = mine ? moe_route_sigmoid(l[my_id]) : 0.0f;
    float sum = 0.0f; /* in rank order, as the host sums */
    for (int i = 0; i < p.top_k; i++) sum += __shfl_sync(0xffffffffu, w, i);
    if (p.norm_topk_prob) w /= sum + 1e-20f;
    w *= p.routed_scaling_factor;
    if (mine) {
        const size_t entry = (size_t)t * p.top_k + lane;
        ids[entry] = my_id;
        weights[entry] = w;
        if (local_slots != nullptr) {
            const int slot = moe_slots_pick(local_slots, my_id, 0, first_token + t);
            entry_slot[entry] = slot;
            meta[entry] = cuda_meta_t{slot, w};
        }
    }
}

bool moe_cuda_route_pdl_built(void) {
    return moe_cuda_built_for_sm90(route_warp_kernel<4>, route_group_warp_kernel<8>);
}

cudaError_t moe_cuda_route_launch(const moe_route_token_params_t *params, const float *logits, const float *bias,
                                  const double *zipf_cdf, uint64_t step, int64_t first_token, int n_tokens,
                                  int32_t *ids, float *weights, const moe_slot_table_t *local_slots,
                                  int32_t *entry_slot, cuda_meta_t *meta, bool pdl, cudaStream_t stream) {
    if (n_tokens <= 0) return cudaSuccess;
    if (params->top_k > MOE_ROUTE_MAX_K) return cudaErrorInvalidValue;
    if (logits != nullptr && params->experts <= 32 * ROUTE_WARP_MAX_PER_LANE &&
        (params->method == MOE_ROUTE_TOKEN_SOFTMAX_TOPK || params->method == MOE_ROUTE_TOKEN_RENORMALIZE)) {
        const unsigned blocks = blocks_for((size_t)n_tokens * 32, 128);
        const int per_lane = (params->experts + 31) / 32;
#define MOE_ROUTE_CASE(n)                                                                              \
    if (per_lane <= (n)) {                                                                             \
        return moe_cuda_launch(pdl, route_warp_kernel<n>, dim3(blocks), dim3(128), 0, stream, *params, logits, \
                               n_tokens, ids, weights, local_slots, first_token, entry_slot, meta);    \
    }
        MOE_ROUTE_CASE(1)
        MOE_ROUTE_CASE(2)
        MOE_ROUTE_CASE(4)
        MOE_ROUTE_CASE(8)
        MOE_ROUTE_CASE(16)
        MOE_ROUTE_CASE(32)
#undef MOE_ROUTE_CASE
    }
    if (logits != nullptr && params->method == MOE_ROUTE_TOKEN_SIGMOID_GROUP_TOPK && params->experts <= 32 * 8 * 4 &&
        params->n_group >= 1 && params->n_group <= 32 && params->experts % params->n_group == 0 &&
        params->topk_group <= params->n_group) {
        const unsigned blocks = (unsigned)((n_tokens + ROUTE_GROUP_WARPS - 1) / ROUTE_GROUP_WARPS);
        const size_t smem = sizeof(float) * ROUTE_GROUP_WARPS * (size_t)params->experts;
        const int per_lane = (params->experts + 31) / 32;
#define MOE_ROUTE_GROUP_CASE(n)                                                                                  \
    if (per_lane <= (n))                                                                                          \
        return moe_cuda_launch(pdl, route_group_warp_kernel<n>, dim3(blocks), dim3(ROUTE_GROUP_WARPS * 32), smem, \
                               stream, *params, logits, bias, n_tokens, ids, weights, local_slots, first_token,   \
                               entry_slot, meta);
        MOE_ROUTE_GROUP_CASE(1)
        MOE_ROUTE_GROUP_CASE(2)
        MOE_ROUTE_GROUP_CASE(4)
        MOE_ROUTE_GROUP_CASE(8)
        MOE_ROUTE_GROUP_CASE(16)
        MOE_ROUTE_GROUP_CASE(32)
#undef MOE_ROUTE_GROUP_CASE
    }
    route_kernel<<<blocks_for((size_t)n_tokens, 128), 128, 0, stream>>>(*params, logits, bias, zipf_cdf, step,
                                                                         first_token, n_tokens, ids, weights);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || local_slots == nullptr) return e;
    return moe_cuda_mark_local_launch(local_slots, ids, weights, n_tokens, params->top_k, first_token, entry_slot, meta,
                                      stream);
}

/* Slot of every entry, and flags[d,t] = 1 when token t has an expert on d. */
__global__ void mark_kernel(const moe_slot_table_t *slots, const int32_t *ids, int n_tokens, int top_k, int rank,
                            int64_t first_token, int32_t *entry_slot, int32_t *flags) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_tokens) return;
    for (int i = 0; i < top_k; i++) {
        int slot = moe_slots_pick(slots, ids[(size_t)t * top_k + i], rank, first_token + t);
        entry_slot[(size_t)t * top_k + i] = slot;
        flags[(size_t)(slot / slots->slots_per_rank) * n_tokens + t] = 1;
    }
}

cudaError_t moe_cuda_mark_launch(const moe_slot_table_t *slots, const int32_t *ids, int n_tokens, int top_k,
                                 int rank, int n_ranks, int64_t first_token, int32_t *entry_slot, int32_t *flags,
                                 cudaStream_t stream) {
    if (n_tokens <= 0) return cudaSuccess;
    cudaError_t e = cudaMemsetAsync(flags, 0, sizeof(int32_t) * (size_t)n_ranks * n_tokens, stream);
    if (e != cudaSuccess) return e;
    mark_kernel<<<blocks_for((size_t)n_tokens, 128), 128, 0, stream>>>(slots, ids, n_tokens, top_k, rank,
                                                                        first_token, entry_slot, flags);
    return cudaGetLastError();
}

/* One rank: the slot of every entry, and its meta (global slot = local
 * slot, weight) — mark and allgather_meta in one launch, no flags. */
__global__ void mark_local_kernel(const moe_slot_table_t *slots, const int32_t *ids, const float *weights,
                                  int n_entries, int top_k, int64_t first_token, int32_t *entry_slot,
                                  cuda_meta_t *meta) {
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < n_entries; p += gridDim.x * blockDim.x) {
        const int slot = moe_slots_pick(slots, ids[p], 0, first_token + p / top_k);
        entry_slot[p] = slot;
        meta[p] = cuda_meta_t{slot, weights[p]};
    }
}

cudaError_t moe_cuda_mark_local_launch(const moe_slot_table_t *slots, const int32_t *ids, const float *weights,
                                       int n_tokens, int top_k, int64_t first_token, int32_t *entry_slot,
                                       cuda_meta_t *meta, cudaStream_t stream) {
    const size_t n = (size_t)n_tokens * top_k;
    if (n == 0) return cudaSuccess;
    if (n > 0x7fffffff) return cudaErrorInvalidValue;
    mark_local_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(slots, ids, weights, (int)n, top_k, first_token,
                                                              entry_slot, meta);
    return cudaGetLastError();
}

__global__ void counts_kernel(const int32_t *flags, const int32_t *scan, int n_tokens, int n_ranks, int32_t *counts) {
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= n_ranks) return;
    if (n_tokens == 0) {
        counts[d] = 0;
        return;
    }
    size_t first = (size_t)d * n_tokens, last = first + n_tokens - 1;
    counts[d] = scan[last] + flags[last] - scan[first];
}

cudaError_t moe_cuda_counts_launch(const int32_t *flags, const int32_t *scan, int n_tokens, int n_ranks,
                                   int32_t *counts, cudaStream_t stream) {
    if (n_ranks <= 0) return cudaSuccess;
    counts_kernel<<<blocks_for((size_t)n_ranks, 256), 256, 0, stream>>>(flags, scan, n_tokens, n_ranks, counts);
    return cudaGetLastError();
}

/* One block per (destination, token): copy the row and its entries. */
__global__ void pack_kernel(const bf16 *x, const int32_t *entry_slot, const float *weights, const int32_t *flags,
                            const int32_t *scan, int n_tokens, int hidden, int top_k, int slots_per_rank,
                            bf16 *send_rows, cuda_meta_t *send_meta) {
    size_t cell = blockIdx.x;
    if (!flags[cell]) return;
    int d = (int)(cell / n_tokens), t = (int)(cell % n_tokens);
    size_t pos = (size_t)scan[cell];
    const bf16 *src = x + (size_t)t * hidden;
    bf16 *dst = send_rows + pos * hidden;
    for (int h = threadIdx.x; h < hidden; h += blockDim.x) dst[h] = src[h];
    if (threadIdx.x < top_k) {
        int i = threadIdx.x, slot = entry_slot[(size_t)t * top_k + i];
        bool here = slot / slots_per_rank == d;
        send_meta[pos * top_k + i].local_slot = here ? slot % slots_per_rank : -1;
        send_meta[pos * top_k + i].weight = here ? weights[(size_t)t * top_k + i] : 0.0f;
    }
}

cudaError_t moe_cuda_pack_launch(const bf16 *x, const int32_t *entry_slot, const float *weights,
                                 const int32_t *flags, const int32_t *scan, int n_tokens, int hidden, int top_k,
                                 int n_ranks, int slots_per_rank, bf16 *send_rows, cuda_meta_t *send_meta,
                                 cudaStream_t stream) {
    size_t cells = (size_t)n_ranks * n_tokens;
    if (cells == 0) return cudaSuccess;
    if (cells > 0x7fffffffu || top_k > 128) return cudaErrorInvalidValue;
    pack_kernel<<<(unsigned)cells, 128, 0, stream>>>(x, entry_slot, weights, flags, scan, n_tokens, hidden, top_k,
                                                     slots_per_rank, send_rows, send_meta);
    return cudaGetLastError();
}

/* gathered[j] = the row of pair vals_sorted[j]. */
__global__ void gather_kernel(const bf16 *rows, const int32_t *vals_sorted, int hidden, int top_k, bf16 *gathered) {
    int j = blockIdx.x, pair = vals_sorted[j];
    const bf16 *src = rows + (size_t)(pair / top_k) * hidden;
    bf16 *dst = gathered + (size_t)j * hidden;
    for (int h = threadIdx.x; h < hidden; h += blockDim.x) dst[h] = src[h];
}

cudaError_t moe_cuda_gather_launch(const bf16 *rows, const int32_t *vals_sorted, int n_valid, int hidden,
                                   int top_k, bf16 *gathered, cudaStream_t stream) {
    if (n_valid <= 0) return cudaSuccess;
    gather_kernel<<<n_valid, 128, 0, stream>>>(rows, vals_sorted, hidden, top_k, gathered);
    return cudaGetLastError();
}

/* act = silu(gate) · up, from the fused [gate | up] product. */
__global__ void swiglu_kernel(const float *h13, size_t n, int inter, bf16 *act) {
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        size_t row = idx / inter, i = idx % inter;
        float gate = h13[row * 2 * inter + i], up = h13[row * 2 * inter + inter + i];
        act[idx] = __float2bfloat16(moe_cuda_swiglu(gate, up));
    }
}

/* The same from a bf16 [gate | up] (the grouped expert GEMMs write bf16). */
__global__ void swiglu_bf16_kernel(const bf16 *h13, size_t n, int inter, bf16 *act) {
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        size_t row = idx / inter, i = idx % inter;
        float gate = __bfloat162float(h13[row * 2 * inter + i]), up = __bfloat162float(h13[row * 2 * inter + inter + i]);
        act[idx] = __float2bfloat16(moe_cuda_swiglu(gate, up));
    }
}

cudaError_t moe_cuda_swiglu_bf16_launch(const bf16 *h13, int n_rows, int inter, bf16 *act, cudaStream_t stream) {
    size_t n = (size_t)n_rows * inter;
    if (n == 0) return cudaSuccess;
    swiglu_bf16_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(h13, n, inter, act);
    return cudaGetLastError();
}

cudaError_t moe_cuda_swiglu_launch(const float *h13, int n_rows, int inter, bf16 *act, cudaStream_t stream) {
    size_t n = (size_t)n_rows * inter;
    if (n == 0) return cudaSuccess;
    swiglu_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(h13, n, inter, act);
    return cudaGetLastError();
}

/* partial[r] = Σ_i w_i · y[inverse[r·k + i]] over row r's local entries, in
 * entry order, rounded to bf16: a CTA per (row, 2048 columns), 8 columns
 * (16 bytes) per thread when the hidden size allows, the row's entries read
 * once into shared memory. F32_OUT: written as float32 instead (the same
 * rounded values: a one-rank step without a shared expert ends here, with
 * what finalize would have written). */
template <bool F32_OUT>
__global__ void reduce_kernel(const bf16 *y, const cuda_meta_t *meta, const int32_t *inverse, int hidden,
                              int top_k, void *dst) {
    __shared__ float w[128];
    __shared__ int32_t src[128];
    const int r = blockIdx.x;
    if (threadIdx.x < top_k) {
        cuda_meta_t m = meta[(size_t)r * top_k + threadIdx.x];
        w[threadIdx.x] = m.local_slot < 0 ? 0.0f : m.weight;
        src[threadIdx.x] = m.local_slot < 0 ? -1 : inverse[(size_t)r * top_k + threadIdx.x];
    }
    __syncthreads();
    const int h0 = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (hidden % 8 == 0) {
        if (h0 >= hidden) return;
        float acc[8] = {};
        for (int i = 0; i < top_k; i++) {
            if (src[i] < 0) continue;
            const uint4 v = *reinterpret_cast<const uint4 *>(y + (size_t)src[i] * hidden + h0);
            const __nv_bfloat162 *pair = reinterpret_cast<const __nv_bfloat162 *>(&v);
            for (int j = 0; j < 4; j++) {
                float2 f = __bfloat1622float2(pair[j]);
                acc[2 * j] += w[i] * f.x;
                acc[2 * j + 1] += w[i] * f.y;
            }
        }
        uint4 out;
        __nv_bfloat162 *o = reinterpret_cast<__nv_bfloat162 *>(&out);
        for (int j = 0; j < 4; j++) o[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
        if constexpr (F32_OUT) {
            float4 *f = reinterpret_cast<float4 *>(static_cast<float *>(dst) + (size_t)r * hidden + h0);
            const float2 a = __bfloat1622float2(o[0]), b = __bfloat1622float2(o[1]);
            const float2 c = __bfloat1622float2(o[2]), d = __bfloat1622float2(o[3]);
            f[0] = make_float4(a.x, a.y, b.x, b.y);
            f[1] = make_float4(c.x, c.y, d.x, d.y);
        } else {
            *reinterpret_cast<uint4 *>(static_cast<bf16 *>(dst) + (size_t)r * hidden + h0) = out;
        }
        return;
    }
    for (int h = h0; h < h0 + 8 && h < hidden; h++) {
        float acc = 0.0f;
        for (int i = 0; i < top_k; i++)
            if (src[i] >= 0) acc += w[i] * __bfloat162float(y[(size_t)src[i] * hidden + h]);
        if constexpr (F32_OUT) static_cast<float *>(dst)[(size_t)r * hidden + h] = __bfloat162float(__float2bfloat16(acc));
        else static_cast<bf16 *>(dst)[(size_t)r * hidden + h] = __float2bfloat16(acc);
    }
}

cudaError_t moe_cuda_reduce_launch(const bf16 *y, const cuda_meta_t *meta, const int32_t *inverse, int n_rows,
                                   int hidden, int top_k, bf16 *partial, float *out, cudaStream_t stream) {
    if (n_rows <= 0) return cudaSuccess;
    if (top_k > 128 || (partial == nullptr) == (out == nullptr)) return cudaErrorInvalidValue;
    const int threads = 256, per_block = threads * 8;
    dim3 grid((unsigned)n_rows, (unsigned)((hidden + per_block - 1) / per_block));
    if (out != nullptr) reduce_kernel<true><<<grid, threads, 0, stream>>>(y, meta, inverse, hidden, top_k, out);
    else reduce_kernel<false><<<grid, threads, 0, stream>>>(y, meta, inverse, hidden, top_k, partial);
    return cudaGetLastError();
}

/* gate_out[t] = sigmoid(x[t]·g): one warp per token. */
__global__ void gate_kernel(const bf16 *x, const float *gate, int n_tokens, int hidden, float *gate_out) {
    int t = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (t >= n_tokens) return;
    float sum = 0.0f;
    for (int h = lane; h < hidden; h += 32) sum += __bfloat162float(x[(size_t)t * hidden + h]) * gate[h];
    for (int off = 16; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
    if (lane == 0) gate_out[t] = 1.0f / (1.0f + expf(-sum));
}

cudaError_t moe_cuda_gate_launch(const bf16 *x, const float *gate, int n_tokens, int hidden, float *gate_out,
                                 cudaStream_t stream) {
    if (n_tokens <= 0) return cudaSuccess;
    gate_kernel<<<blocks_for((size_t)n_tokens * 32, 256), 256, 0, stream>>>(x, gate, n_tokens, hidden, gate_out);
    return cudaGetLastError();
}

/* out[t] = Σ_d (ascending) of the partial rank d returned for t (flags
 * NULL: back[t], the reduce-scatter's sum),
 * + gate[t] · shared_y[t]. Every element written (also without experts). */
__global__ void finalize_kernel(const bf16 *back, const int32_t *flags, const int32_t *scan, int n_tokens,
                                int hidden, int n_ranks, const float *shared_y, const float *gate, float *out) {
    const int t = blockIdx.x, h = blockIdx.y * blockDim.x + threadIdx.x;
    if (h < hidden) {
        float acc = 0.0f;
        if (flags == nullptr) /* allgather: back is summed already, row t */
            acc = __bfloat162float(back[(size_t)t * hidden + h]);
        for (int d = 0; flags != nullptr && d < n_ranks; d++) {
            size_t cell = (size_t)d * n_tokens + t;
            if (flags[cell]) acc += __bfloat162float(back[(size_t)scan[cell] * hidden + h]);
        }
        if (shared_y != nullptr) acc += (gate != nullptr ? gate[t] : 1.0f) * shared_y[(size_t)t * hidden + h];
        out[(size_t)t * hidden + h] = acc;
    }
}

cudaError_t moe_cuda_finalize_launch(const bf16 *back, const int32_t *flags, const int32_t *scan, int n_tokens,
                                     int hidden, int n_ranks, const float *shared_y, const float *gate,
                                     float *out, cudaStream_t stream) {
    if (n_tokens <= 0) return cudaSuccess;
    /* a thread per element: one token's row is not a serial loop (18 µs at
     * H = 7168 with one block per token) */
    const dim3 grid((unsigned)n_tokens, (unsigned)((hidden + 255) / 256));
    finalize_kernel<<<grid, 256, 0, stream>>>(back, flags, scan, n_tokens, hidden, n_ranks, shared_y, gate, out);
    return cudaGetLastError();
}

__global__ void allgather_meta_kernel(const int32_t *entry_slot, const float *weights, int T, int Ta, int top_k,
                                     cuda_meta_t *own_meta) {
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < (size_t)Ta * top_k;
         p += (size_t)gridDim.x * blockDim.x)
        own_meta[p] = p < (size_t)T * top_k ? cuda_meta_t{entry_slot[p], weights[p]} : cuda_meta_t{-1, 0.0f};
}

cudaError_t moe_cuda_allgather_meta_launch(const int32_t *entry_slot, const float *weights, int T, int Ta, int top_k,
                                           cuda_meta_t *own_meta, cudaStream_t stream) {
    size_t n = (size_t)Ta * top_k;
    if (n == 0) return cudaSuccess;
    if (T > Ta) return cudaErrorInvalidValue;
    allgather_meta_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(entry_slot, weights, T, Ta, top_k, own_meta);
    return cudaGetLastError();
}

__global__ void localize_meta_kernel(cuda_meta_t *meta, size_t n, int rank, int slots_per_rank) {
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < n; p += (size_t)gridDim.x * blockDim.x) {
        int s = meta[p].local_slot;
        bool here = s >= 0 && s / slots_per_rank == rank;
        meta[p] = here ? cuda_meta_t{s % slots_per_rank, meta[p].weight} : cuda_meta_t{-1, 0.0f};
    }
}

cudaError_t moe_cuda_localize_meta_launch(cuda_meta_t *meta, size_t n, int rank, int slots_per_rank,
                                          cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    localize_meta_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(meta, n, rank, slots_per_rank);
    return cudaGetLastError();
}

/* counts[slot] += entries of slot, n_slots of them: a CTA counts its run
 * of entries in shared memory and adds each nonzero count once (a global
 * atomic per entry on a few hundred counters took 10 µs for 32768 entries
 * on an H200: they serialise at L2). */
#define SLOT_STATS_THREADS 512
#define SLOT_STATS_PER_BLOCK 2048
__global__ void __launch_bounds__(SLOT_STATS_THREADS)
    slot_stats_kernel(const int32_t *entry_slot, int n_entries, int n_slots, unsigned long long *counts) {
    extern __shared__ uint32_t block_counts[];
    for (int s = threadIdx.x; s < n_slots; s += blockDim.x) block_counts[s] = 0;
    __syncthreads();
    const int begin = blockIdx.x * SLOT_STATS_PER_BLOCK, end = min(begin + SLOT_STATS_PER_BLOCK, n_entries);
    for (int p = begin + threadIdx.x; p < end; p += blockDim.x) {
        const int slot = entry_slot[p];
        if (slot >= 0 && slot < n_slots) atomicAdd(&block_counts[slot], 1u);
    }
    __syncthreads();
    for (int s = threadIdx.x; s < n_slots; s += blockDim.x)
        if (block_counts[s] != 0) atomicAdd(&counts[s], (unsigned long long)block_counts[s]);
}

cudaError_t moe_cuda_slot_stats_launch(const int32_t *entry_slot, int n_entries, int n_slots,
                                       unsigned long long *counts, cudaStream_t stream) {
    if (n_entries <= 0) return cudaSuccess;
    if (n_slots <= 0 || n_slots > MOE_MAX_SLOTS) return cudaErrorInvalidValue;
    const unsigned blocks = (unsigned)((n_entries + SLOT_STATS_PER_BLOCK - 1) / SLOT_STATS_PER_BLOCK);
    slot_stats_kernel<<<blocks, SLOT_STATS_THREADS, sizeof(uint32_t) * (size_t)n_slots, stream>>>(
        entry_slot, n_entries, n_slots, counts);
    return cudaGetLastError();
}
