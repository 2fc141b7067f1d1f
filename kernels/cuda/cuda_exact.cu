/* The exact combine (moe.combine: exact, more than one rank). The experts'
 * rank returns one row per (token, expert) entry, the expert's output y
 * unweighted (bf16, as every grouped form stores it), and the token's rank
 * sums them in entry order with the one-rank formula: bf16(Σ w_i · y_i),
 * plus the shared expert. Which rank computed an entry, and which entries
 * share a rank, no longer changes a bit of the output, so EPLB swaps do not.
 *
 * Entry order on the wire: to rank d go the token's rows (one per token,
 * as with the partial combine) and, back from d, the entries of those rows
 * that live on d, in (token, entry) order. Both ends number them the same
 * way: the token's rank by a scan over eflags[d, t·k + i], the expert's rank
 * by a scan over the valid entries of the rows it received (rows arrive
 * from each rank in that rank's token order, entries in k order).
 *
 * Covered by tests/cuda_layer.c under mpirun -np 2 (its exact-combine
 * cases against the CPU reference, and the migration that must leave every
 * bit in place), also under compute-sanitizer, in scripts/gpu-test.sh. */
#include "cuda_internal.h"

/* A thread per item, no grid-stride loop (unlike cuda_kernels.cu's clamped
 * blocks_for): n_entries < 2^31 gives at most 2^23 blocks of 256. */
static unsigned blocks_of(size_t n, unsigned threads) { return (unsigned)((n + threads - 1) / threads); }

/* eflags[d·n + p] = 1 when entry p's slot lives on rank d (n = T·k). */
__global__ void entry_flags_kernel(const int32_t *entry_slot, int n, int slots_per_rank, int32_t *eflags) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < n) eflags[(size_t)(entry_slot[p] / slots_per_rank) * n + p] = 1;
}

cudaError_t moe_cuda_entry_flags_launch(const int32_t *entry_slot, int n_entries, int slots_per_rank, int n_ranks,
                                        int32_t *eflags, cudaStream_t stream) {
    if (n_entries <= 0) return cudaSuccess;
    cudaError_t e = cudaMemsetAsync(eflags, 0, sizeof(int32_t) * (size_t)n_ranks * n_entries, stream);
    if (e != cudaSuccess) return e;
    entry_flags_kernel<<<blocks_of((size_t)n_entries, 256), 256, 0, stream>>>(entry_slot, n_entries, slots_per_rank,
                                                                             eflags);
    return cudaGetLastError();
}

/* valid[p] = 1 for a received entry this rank computes (local slot >= 0). */
__global__ void entry_valid_kernel(const cuda_meta_t *meta, int n, int32_t *valid) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < n) valid[p] = meta[p].local_slot >= 0;
}

cudaError_t moe_cuda_entry_valid_launch(const cuda_meta_t *meta, int n_entries, int32_t *valid, cudaStream_t stream) {
    if (n_entries <= 0) return cudaSuccess;
    entry_valid_kernel<<<blocks_of((size_t)n_entries, 256), 256, 0, stream>>>(meta, n_entries, valid);
    return cudaGetLastError();
}

/* dst[pos[p]] = y[inverse[p]] for every valid received entry p: a block per
 * entry, 16-byte pieces when the row allows them. */
__global__ void entry_rows_kernel(const bf16 *y, const cuda_meta_t *meta, const int32_t *inverse, const int32_t *pos,
                                  int hidden, bf16 *dst) {
    const size_t p = blockIdx.x;
    if (meta[p].local_slot < 0) return;
    const bf16 *src = y + (size_t)inverse[p] * hidden;
    bf16 *to = dst + (size_t)pos[p] * hidden;
    if (hidden % 8 == 0) {
        for (int h = threadIdx.x * 8; h < hidden; h += blockDim.x * 8)
            *reinterpret_cast<uint4 *>(to + h) = *reinterpret_cast<const uint4 *>(src + h);
        return;
    }
    for (int h = threadIdx.x; h < hidden; h += blockDim.x) to[h] = src[h];
}

cudaError_t moe_cuda_entry_rows_launch(const bf16 *y, const cuda_meta_t *meta, const int32_t *inverse,
                                       const int32_t *pos, int n_entries, int hidden, bf16 *dst, cudaStream_t stream) {
    if (n_entries <= 0) return cudaSuccess;
    entry_rows_kernel<<<(unsigned)n_entries, 128, 0, stream>>>(y, meta, inverse, pos, hidden, dst);
    return cudaGetLastError();
}

/* out[t] = bf16(Σ_i w[t,i] · back[row of (t, i)]), i in entry order — the
 * arithmetic of the one-rank per-row sum — then + gate[t] · shared_y[t]
 * as finalize adds it. A thread per element. */
__global__ void finalize_entries_kernel(const bf16 *back, const int32_t *entry_slot, const int32_t *escan,
                                        const float *weights, int n_tokens, int top_k, int slots_per_rank,
                                        int hidden, const float *shared_y, const float *gate, float *out) {
    const int t = blockIdx.x, h = blockIdx.y * blockDim.x + threadIdx.x;
    if (h >= hidden) return;
    const size_t n = (size_t)n_tokens * top_k;
    float acc = 0.0f;
    for (int i = 0; i < top_k; i++) {
        const size_t p = (size_t)t * top_k + i;
        const int d = entry_slot[p] / slots_per_rank;
        acc += weights[p] * __bfloat162float(back[(size_t)escan[(size_t)d * n + p] * hidden + h]);
    }
    float v = __bfloat162float(__float2bfloat16_rn(acc));
    if (shared_y != nullptr) v += (gate != nullptr ? gate[t] : 1.0f) * shared_y[(size_t)t * hidden + h];
    out[(size_t)t * hidden + h] = v;
}

cudaError_t moe_cuda_finalize_entries_launch(const bf16 *back, const int32_t *entry_slot, const int32_t *escan,
                                             const float *weights, int n_tokens, int top_k, int slots_per_rank,
                                             int hidden, const float *shared_y, const float *gate, float *out,
                                             cudaStream_t stream) {
    if (n_tokens <= 0) return cudaSuccess;
    const dim3 grid((unsigned)n_tokens, (unsigned)((hidden + 255) / 256));
    finalize_entries_kernel<<<grid, 256, 0, stream>>>(back, entry_slot, escan, weights, n_tokens, top_k,
                                                      slots_per_rank, hidden, shared_y, gate, out);
    return cudaGetLastError();
}
