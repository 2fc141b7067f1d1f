/* cuda_forward: one MoE layer forward on the GPU (DESIGN §4), collective
 * over the EP group; the step of cuda_kernels.cu's layout comment:
 *   route (cuBLAS router GEMM, bf16 in, f32 logits; the shared per-token
 *   routing) -> slots, destination flags, an exclusive scan (CUB) -> pack
 *   the rows each rank needs -> NCCL: counts, then rows and entries
 *   (grouped send/recv) -> entries sorted by local slot (CUB radix sort,
 *   stable) -> per-slot cuBLAS GEMMs [gate|up], SwiGLU, down -> weighted
 *   per-row reduction -> NCCL back -> finalize (+ shared expert).
 * The host learns the counts per chunk (rows to send and received, with
 * more than one rank; entries per local slot: cuBLAS takes its group sizes
 * on the host), so a chunk has one (1 rank) or two small device-to-host
 * synchronisations. */
#include <cub/cub.cuh>

#include "cuda_internal.h"

#define RESERVE(engine, name, type, n) \
    ((type *)moe_cuda_reserve(&(engine)->ws.name, sizeof(type) * (size_t)(n), msg, msg_size))

/* y[n, N] = x[n, K] · W[N, K]ᵀ, bf16 operands, f32 accumulation; y is f32
 * (y_type CUDA_R_32F) or bf16 (CUDA_R_16BF). */
static moe_err_t gemm_to(moe_cuda_engine_t *engine, int N, int n, int K, const bf16 *W, const bf16 *x, void *y,
                         cudaDataType_t y_type, char *msg, size_t msg_size) {
    if (n == 0) return MOE_OK;
    const float alpha = 1.0f, beta = 0.0f;
    MOE_CUBLAS_TRY(cublasGemmEx(engine->cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, n, K, &alpha, W, CUDA_R_16BF, K, x,
                                CUDA_R_16BF, K, &beta, y, y_type, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return MOE_OK;
}

static moe_err_t gemm(moe_cuda_engine_t *engine, int N, int n, int K, const bf16 *W, const bf16 *x, float *y,
                      char *msg, size_t msg_size) {
    return gemm_to(engine, N, n, K, W, x, y, CUDA_R_32F, msg, msg_size);
}

/* For every local slot s with rows[s] > 0: y_s[rows, N] = x_s[rows, K] ·
 * W_s[N, K]ᵀ (bf16 out, f32 accumulation), where slot s's rows start at row
 * offset Σ rows[<s] of x and y and W_s = W + s·N·K. One
 * cublasGemmGroupedBatchedEx call (each slot a group of one problem, as n
 * differs per slot; cuBLAS 13 offers it for bf16 in and out, not f32 out)
 * where the library supports it, else one cublasGemmEx per slot. */
static moe_err_t grouped_gemm(moe_cuda_engine_t *engine, int N, int K, const bf16 *W, const bf16 *x,
                              bf16 *y, const int *rows, int S, int table, char *msg, size_t msg_size) {
    /* Measured on an H200 (README): one grouped call wins with many small
     * experts per rank (Qwen3: 128 slots, 1.75 against 2.47 ms at 4096
     * tokens); cuBLAS's plain GEMMs win with few large ones (Mixtral: 8
     * slots, 5.05 against 11.4 ms). Until the autotuner times both per
     * token-count bucket, the slot count decides. */
    if (!engine->grouped_gemm || S <= engine->grouped_min_slots) {
        for (int s = 0, off = 0; s < S; off += rows[s], s++)
            MOE_TRY(gemm_to(engine, N, rows[s], K, W + (size_t)s * N * K, x + (size_t)off * K, y + (size_t)off * N,
                            CUDA_R_16BF, msg, msg_size));
        return MOE_OK;
    }
    int groups = 0;
    for (int s = 0; s < S; s++) groups += rows[s] > 0;
    if (groups == 0) return MOE_OK;
    /* Two pointer tables, one per GEMM of a chunk (`table` 0: gate/up, 1:
     * down), each 3·MOE_MAX_SLOTS pointers. No host sync is needed before
     * rewriting one: the chunk's slot-count fetch synchronised the stream
     * after the previous chunk's copies out of both. */
    const size_t per_table = sizeof(void *) * 3 * MOE_MAX_SLOTS;
    char *host_base = (char *)moe_cuda_reserve(&engine->ws.host_gemm_ptrs, 2 * per_table, msg, msg_size);
    char *dev_base = (char *)moe_cuda_reserve(&engine->ws.gemm_ptrs, 2 * per_table, msg, msg_size);
    if (host_base == nullptr || dev_base == nullptr) return MOE_ERR_NOMEM;
    const void **host = (const void **)(host_base + (size_t)table * per_table);
    const void **dev = (const void **)(dev_base + (size_t)table * per_table);
    cublasOperation_t ta[MOE_MAX_SLOTS], tb[MOE_MAX_SLOTS];
    int m[MOE_MAX_SLOTS], n[MOE_MAX_SLOTS], k[MOE_MAX_SLOTS], size[MOE_MAX_SLOTS];
    float alpha[MOE_MAX_SLOTS], beta[MOE_MAX_SLOTS];
    for (int s = 0, off = 0, g = 0; s < S; off += rows[s], s++) {
        if (rows[s] == 0) continue;
        host[g] = W + (size_t)s * N * K;
        host[groups + g] = x + (size_t)off * K;
        host[2 * groups + g] = y + (size_t)off * N;
        ta[g] = CUBLAS_OP_T, tb[g] = CUBLAS_OP_N;
        m[g] = N, n[g] = rows[s], k[g] = K, size[g] = 1, alpha[g] = 1.0f, beta[g] = 0.0f;
        g++;
    }
    MOE_CUDA_TRY(cudaMemcpyAsync(dev, host, sizeof(void *) * 3 * groups, cudaMemcpyHostToDevice, engine->stream));
    cublasStatus_t st = cublasGemmGroupedBatchedEx(
        engine->cublas, ta, tb, m, n, k, alpha, dev, CUDA_R_16BF, k, dev + groups, CUDA_R_16BF, k, beta,
        (void *const *)(dev + 2 * groups), CUDA_R_16BF, m, groups, size, CUBLAS_COMPUTE_32F);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
        moe_log(MOE_LOG_WARN, "cuda", "cublasGemmGroupedBatchedEx: %s for bf16 x bf16 -> bf16; one GEMM per slot instead",
                cublasGetStatusString(st));
        engine->grouped_gemm = false;
        return grouped_gemm(engine, N, K, W, x, y, rows, S, table, msg, msg_size);
    }
    MOE_CUBLAS_TRY(st);
    return MOE_OK;
}

/* Marks the end of phase `phase` of the chunk (MOE_CUDA_PROFILE). */
static void mark(moe_cuda_engine_t *engine, int phase) {
    if (engine->profile.on) cudaEventRecord(engine->profile.marks[phase], engine->stream);
}

static moe_err_t exclusive_scan(moe_cuda_engine_t *engine, const int32_t *in, int32_t *out, int n, char *msg,
                                size_t msg_size) {
    if (n == 0) return MOE_OK;
    size_t bytes = 0;
    MOE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, n, engine->stream));
    void *temp = moe_cuda_reserve(&engine->ws.cub_temp, bytes, msg, msg_size);
    if (temp == nullptr) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(temp, bytes, in, out, n, engine->stream));
    return MOE_OK;
}

static moe_err_t sort_pairs(moe_cuda_engine_t *engine, const int32_t *keys, int32_t *keys_sorted,
                            const int32_t *vals, int32_t *vals_sorted, int n, int max_key, char *msg,
                            size_t msg_size) {
    if (n == 0) return MOE_OK;
    int end_bit = 1;
    while ((1 << end_bit) <= max_key) end_bit++;
    size_t bytes = 0;
    MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, keys_sorted, vals, vals_sorted, n, 0, end_bit,
                                                 engine->stream));
    void *temp = moe_cuda_reserve(&engine->ws.cub_temp, bytes, msg, msg_size);
    if (temp == nullptr) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(cub::DeviceRadixSort::SortPairs(temp, bytes, keys, keys_sorted, vals, vals_sorted, n, 0, end_bit,
                                                 engine->stream));
    return MOE_OK;
}

/* Device -> pinned host -> caller, synchronously (small counts). */
static moe_err_t fetch(moe_cuda_engine_t *engine, void *dst, const void *src, size_t bytes, char *msg,
                       size_t msg_size) {
    void *staging = moe_cuda_reserve(&engine->ws.host_counts, bytes, msg, msg_size);
    if (staging == nullptr) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(cudaMemcpyAsync(staging, src, bytes, cudaMemcpyDeviceToHost, engine->stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(engine->stream));
    memcpy(dst, staging, bytes);
    return MOE_OK;
}

/* Grouped send/recv of `width` elements of `type` per row, rows per peer
 * from the counts and their prefix offsets. */
static moe_err_t exchange(moe_cuda_engine_t *engine, const void *send, const int *send_count, const int *send_off,
                          void *recv, const int *recv_count, const int *recv_off, size_t width, ncclDataType_t type,
                          size_t elem_bytes, char *msg, size_t msg_size) {
    MOE_NCCL_TRY(ncclGroupStart());
    for (int d = 0; d < engine->ep.size; d++) {
        MOE_NCCL_TRY(ncclSend((const char *)send + (size_t)send_off[d] * width * elem_bytes,
                              (size_t)send_count[d] * width, type, d, engine->comm, engine->stream));
        MOE_NCCL_TRY(ncclRecv((char *)recv + (size_t)recv_off[d] * width * elem_bytes, (size_t)recv_count[d] * width,
                              type, d, engine->comm, engine->stream));
    }
    MOE_NCCL_TRY(ncclGroupEnd());
    return MOE_OK;
}

int moe_cuda_bucket(int rows) {
    int b = 0;
    while (b < MOE_GEMM_BUCKETS - 1 && (1 << b) < rows) b++;
    return b;
}

/* Entries grouped by local slot (a stable radix sort: deterministic), then
 * [gate|up], SwiGLU and down per slot, then the weighted per-row sum.
 * cuBLAS needs the per-slot counts on the host (one sync); moed's grouped
 * kernel reads them on the device, reads each entry's row in place (the
 * gather is fused) and applies SwiGLU in its epilogue. */
moe_err_t moe_cuda_experts(moe_cuda_engine_t *engine, cuda_layer_t *L, moe_gemm_impl_t impl,
                           const bf16 *recv_rows, const cuda_meta_t *recv_meta, int n_recv, bf16 **partial_out,
                           char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const int k = m->top_k, H = m->hidden, I = m->moe_intermediate, S = engine->slots.slots_per_rank;
    cudaStream_t stream = engine->stream;
    const int n_entries = n_recv * k;
    int32_t *keys = RESERVE(engine, keys, int32_t, n_entries), *vals = RESERVE(engine, vals, int32_t, n_entries);
    int32_t *keys_sorted = RESERVE(engine, keys_sorted, int32_t, n_entries);
    int32_t *vals_sorted = RESERVE(engine, vals_sorted, int32_t, n_entries);
    int32_t *slot_counts = RESERVE(engine, slot_counts, int32_t, S);
    int32_t *inverse = RESERVE(engine, inverse, int32_t, n_entries);
    bf16 *partial = RESERVE(engine, partial, bf16, (size_t)n_recv * H);
    if (!keys || !vals || !keys_sorted || !vals_sorted || !slot_counts || !inverse || !partial) return MOE_ERR_NOMEM;
    *partial_out = partial;
    MOE_CUDA_TRY(moe_cuda_pair_keys_launch(recv_meta, n_entries, S, keys, vals, slot_counts, stream));
    MOE_TRY(sort_pairs(engine, keys, keys_sorted, vals, vals_sorted, n_entries, S, msg, msg_size));
    bf16 *y = nullptr;
    if (impl == MOE_IMPL_GROUPED && engine->own_grouped_ok) {
        /* buffers sized for every entry: the host does not learn how many are local */
        int32_t *plan = RESERVE(engine, plan, int32_t, 2 * (size_t)S + 2);
        bf16 *act = RESERVE(engine, act, bf16, (size_t)n_entries * I);
        y = RESERVE(engine, y, bf16, (size_t)n_entries * H);
        if (!plan || !act || !y) return MOE_ERR_NOMEM;
        const int tile_rows = moe_cuda_grouped_tile_rows(n_entries, S);
        MOE_CUDA_TRY(moe_cuda_grouped_plan_launch(slot_counts, S, tile_rows, plan, vals_sorted, n_entries, inverse,
                                                  stream));
        mark(engine, 3);
        MOE_CUDA_TRY(moe_cuda_grouped_gemm_launch(L->w13, recv_rows, vals_sorted, k, plan, S, tile_rows, true, I, H,
                                                  n_entries, act, stream));
        mark(engine, 4);
        MOE_CUDA_TRY(moe_cuda_grouped_gemm_launch(L->w2, act, nullptr, 1, plan, S, tile_rows, false, H, I, n_entries,
                                                  y, stream));
    } else {
        int host_slot_counts[MOE_MAX_SLOTS];
        MOE_TRY(fetch(engine, host_slot_counts, slot_counts, sizeof(int32_t) * S, msg, msg_size));
        int n_valid = 0;
        for (int s = 0; s < S; s++) n_valid += host_slot_counts[s];
        bf16 *gathered = RESERVE(engine, gathered, bf16, (size_t)n_valid * H);
        bf16 *h13 = RESERVE(engine, h13, bf16, (size_t)n_valid * 2 * I);
        bf16 *act = RESERVE(engine, act, bf16, (size_t)n_valid * I);
        y = RESERVE(engine, y, bf16, (size_t)n_valid * H);
        if (!gathered || !h13 || !act || !y) return MOE_ERR_NOMEM;
        MOE_CUDA_TRY(moe_cuda_gather_launch(recv_rows, vals_sorted, n_valid, H, k, gathered, inverse, stream));
        mark(engine, 3);
        MOE_TRY(grouped_gemm(engine, 2 * I, H, L->w13, gathered, h13, host_slot_counts, S, 0, msg, msg_size));
        mark(engine, 4);
        MOE_CUDA_TRY(moe_cuda_swiglu_bf16_launch(h13, n_valid, I, act, stream));
        MOE_TRY(grouped_gemm(engine, H, I, L->w2, act, y, host_slot_counts, S, 1, msg, msg_size));
    }
    mark(engine, 5);
    MOE_CUDA_TRY(moe_cuda_reduce_launch(y, recv_meta, inverse, n_recv, H, k, partial, stream));
    return MOE_OK;
}

/* Steps 3-6 with all-to-all (moe.comm alltoall): the rows each rank needs
 * (a token goes to a rank once) with their entries, counts first; partial
 * sums come back the same way (*back_out: one row per (rank, token) sent,
 * grouped by rank as flags/scan say). */
static moe_err_t exchange_alltoall(moe_cuda_engine_t *engine, cuda_layer_t *L, const bf16 *x, int T,
                                   const int32_t *entry_slot, const float *weights, const int32_t *flags,
                                   const int32_t *scan, int32_t *counts, bool comm_only, bf16 **back_out, char *msg,
                                   size_t msg_size) {
    const int R = engine->ep.size, k = engine->cfg.model.top_k, H = engine->cfg.model.hidden;
    const int S = engine->slots.slots_per_rank;
    cudaStream_t stream = engine->stream;
    /* 3. pack what each rank needs (a token goes to a rank once) */
    size_t max_send = (size_t)T * (size_t)(R < k ? R : k);
    int32_t *send_token = RESERVE(engine, send_token, int32_t, max_send);
    bf16 *send_rows = RESERVE(engine, send_rows, bf16, max_send * H);
    cuda_meta_t *send_meta = RESERVE(engine, send_meta, cuda_meta_t, max_send * k);
    if (!send_token || !send_rows || !send_meta) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(moe_cuda_pack_launch(x, entry_slot, weights, flags, scan, T, H, k, R, S, send_token, send_rows,
                                      send_meta, stream));

    /* 4. counts, then rows and entries */
    int send_count[R], recv_count[R], send_off[R], recv_off[R], host_counts[2 * R];
    if (R > 1) {
        MOE_NCCL_TRY(ncclGroupStart());
        for (int d = 0; d < R; d++) {
            MOE_NCCL_TRY(ncclSend(counts + d, 1, ncclInt32, d, engine->comm, stream));
            MOE_NCCL_TRY(ncclRecv(counts + R + d, 1, ncclInt32, d, engine->comm, stream));
        }
        MOE_NCCL_TRY(ncclGroupEnd());
        MOE_TRY(fetch(engine, host_counts, counts, sizeof(int32_t) * 2 * R, msg, msg_size));
    } else {
        /* one rank holds every expert: every token is sent to itself, and
         * the host knows that without asking the device */
        host_counts[0] = host_counts[1] = T;
    }
    int n_send = 0, n_recv = 0;
    for (int d = 0; d < R; d++) {
        send_count[d] = host_counts[d];
        recv_count[d] = host_counts[R + d];
        send_off[d] = n_send;
        recv_off[d] = n_recv;
        n_send += send_count[d];
        n_recv += recv_count[d];
    }
    bf16 *recv_rows = send_rows;
    cuda_meta_t *recv_meta = send_meta;
    if (R > 1) {
        recv_rows = RESERVE(engine, recv_rows, bf16, (size_t)n_recv * H);
        recv_meta = RESERVE(engine, recv_meta, cuda_meta_t, (size_t)n_recv * k);
        if (!recv_rows || !recv_meta) return MOE_ERR_NOMEM;
        MOE_TRY(exchange(engine, send_rows, send_count, send_off, recv_rows, recv_count, recv_off, (size_t)H,
                         ncclBfloat16, sizeof(bf16), msg, msg_size));
        MOE_TRY(exchange(engine, send_meta, send_count, send_off, recv_meta, recv_count, recv_off,
                         (size_t)k * sizeof(cuda_meta_t), ncclChar, 1, msg, msg_size));
    }

    mark(engine, 2);
    /* 5. experts */
    bf16 *partial = nullptr;
    if (comm_only) { /* moe.comm auto's timing: the exchanges alone */
        partial = RESERVE(engine, partial, bf16, (size_t)n_recv * H);
        if (partial == nullptr) return MOE_ERR_NOMEM;
        MOE_CUDA_TRY(cudaMemsetAsync(partial, 0, sizeof(bf16) * (size_t)n_recv * H, stream));
    } else {
        MOE_TRY(moe_cuda_experts(engine, L, engine->gemm_table[moe_cuda_bucket(n_recv)], recv_rows, recv_meta,
                                 n_recv, &partial, msg, msg_size));
    }

    mark(engine, 6);
    /* 6. combine */
    bf16 *back = partial;
    if (R > 1) {
        back = RESERVE(engine, back, bf16, (size_t)n_send * H);
        if (back == nullptr) return MOE_ERR_NOMEM;
        MOE_TRY(exchange(engine, partial, recv_count, recv_off, back, send_count, send_off, (size_t)H, ncclBfloat16,
                         sizeof(bf16), msg, msg_size));
    }

    *back_out = back;
    return MOE_OK;
}

/* Steps 3-6 with allgather + reduce-scatter (moe.comm allgather): every
 * rank's rows (padded to chunk_max, the same everywhere, as NCCL's
 * all-gather wants equal parts) and entries (global slots) go to every
 * rank; each computes its experts' partial sums for all rows; a
 * reduce-scatter sums them back to the tokens' ranks. On one rank (only
 * with moe.comm: allgather) the same kernels run without the NCCL calls. */
static moe_err_t exchange_allgather(moe_cuda_engine_t *engine, cuda_layer_t *L, const bf16 *x, int T, int chunk_max,
                                    const int32_t *entry_slot, const float *weights, bool comm_only, bf16 **back_out,
                                    char *msg, size_t msg_size) {
    const int R = engine->ep.size, k = engine->cfg.model.top_k, H = engine->cfg.model.hidden;
    const int S = engine->slots.slots_per_rank;
    cudaStream_t stream = engine->stream;
    const int Ta = chunk_max > T ? chunk_max : T, n_all = R * Ta;
    bf16 *own_rows = RESERVE(engine, send_rows, bf16, (size_t)Ta * H);
    cuda_meta_t *own_meta = RESERVE(engine, send_meta, cuda_meta_t, (size_t)Ta * k);
    if (!own_rows || !own_meta) return MOE_ERR_NOMEM;
    if (T > 0) MOE_CUDA_TRY(cudaMemcpyAsync(own_rows, x, sizeof(bf16) * (size_t)T * H, cudaMemcpyDeviceToDevice, stream));
    if (Ta > T) /* padding rows: defined values, and no entries */
        MOE_CUDA_TRY(cudaMemsetAsync(own_rows + (size_t)T * H, 0, sizeof(bf16) * (size_t)(Ta - T) * H, stream));
    MOE_CUDA_TRY(moe_cuda_allgather_meta_launch(entry_slot, weights, T, Ta, k, own_meta, stream));
    bf16 *all_rows = own_rows;
    cuda_meta_t *all_meta = own_meta;
    if (R > 1) {
        all_rows = RESERVE(engine, recv_rows, bf16, (size_t)n_all * H);
        all_meta = RESERVE(engine, recv_meta, cuda_meta_t, (size_t)n_all * k);
        if (!all_rows || !all_meta) return MOE_ERR_NOMEM;
        MOE_NCCL_TRY(ncclGroupStart());
        MOE_NCCL_TRY(ncclAllGather(own_rows, all_rows, (size_t)Ta * H, ncclBfloat16, engine->comm, stream));
        MOE_NCCL_TRY(ncclAllGather(own_meta, all_meta, (size_t)Ta * k * sizeof(cuda_meta_t), ncclChar, engine->comm,
                                   stream));
        MOE_NCCL_TRY(ncclGroupEnd());
    }
    MOE_CUDA_TRY(moe_cuda_localize_meta_launch(all_meta, (size_t)n_all * k, engine->ep.rank, S, stream));
    mark(engine, 2);
    bf16 *partial = nullptr;
    if (comm_only) {
        partial = RESERVE(engine, partial, bf16, (size_t)n_all * H);
        if (partial == nullptr) return MOE_ERR_NOMEM;
        MOE_CUDA_TRY(cudaMemsetAsync(partial, 0, sizeof(bf16) * (size_t)n_all * H, stream));
    } else {
        MOE_TRY(moe_cuda_experts(engine, L, engine->gemm_table[moe_cuda_bucket(n_all)], all_rows, all_meta, n_all,
                                 &partial, msg, msg_size));
    }
    mark(engine, 6);
    bf16 *back = partial;
    if (R > 1) {
        back = RESERVE(engine, back, bf16, (size_t)Ta * H);
        if (back == nullptr) return MOE_ERR_NOMEM;
        MOE_NCCL_TRY(ncclReduceScatter(partial, back, (size_t)Ta * H, ncclBfloat16, ncclSum, engine->comm, stream));
    }
    *back_out = back;
    return MOE_OK;
}

moe_err_t moe_cuda_forward_device(moe_cuda_engine_t *engine, cuda_layer_t *L, const bf16 *x, int T, int chunk_max,
                                  int64_t first_token, const int32_t *routed_ids, const float *routed_weights,
                                  float *out, bool comm_only, moe_route_trace_t *trace, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const int R = engine->ep.size, k = m->top_k, H = m->hidden, E = m->experts;
    const int Is = m->shared_intermediate;
    cudaStream_t stream = engine->stream;

    mark(engine, 0);
    /* 1. route */
    int32_t *ids = RESERVE(engine, ids, int32_t, (size_t)T * k);
    float *weights = RESERVE(engine, weights, float, (size_t)T * k);
    if (ids == nullptr || weights == nullptr) return MOE_ERR_NOMEM;
    if (m->routing.method == MOE_ROUTE_CLIENT) {
        int32_t *h_ids = RESERVE(engine, host_ids, int32_t, (size_t)T * k);
        float *h_w = RESERVE(engine, host_weights, float, (size_t)T * k);
        if (h_ids == nullptr || h_w == nullptr) return MOE_ERR_NOMEM;
        MOE_CUDA_TRY(cudaStreamSynchronize(stream)); /* the staging buffers are free */
        memcpy(h_ids, routed_ids, sizeof(int32_t) * (size_t)T * k);
        memcpy(h_w, routed_weights, sizeof(float) * (size_t)T * k);
        MOE_CUDA_TRY(cudaMemcpyAsync(ids, h_ids, sizeof(int32_t) * (size_t)T * k, cudaMemcpyHostToDevice, stream));
        MOE_CUDA_TRY(cudaMemcpyAsync(weights, h_w, sizeof(float) * (size_t)T * k, cudaMemcpyHostToDevice, stream));
    } else {
        float *logits = nullptr;
        if (moe_route_needs_logits(m->routing.method)) {
            logits = RESERVE(engine, logits, float, (size_t)T * E);
            if (logits == nullptr) return MOE_ERR_NOMEM;
            MOE_TRY(gemm(engine, E, T, H, L->router, x, logits, msg, msg_size));
            if (trace != nullptr && trace->logits != nullptr && T > 0)
                MOE_TRY(fetch(engine, trace->logits + first_token * E, logits, sizeof(float) * (size_t)T * E, msg,
                              msg_size));
        }
        moe_route_params_t params;
        moe_route_params_init(&params, m, nullptr, L->layer, engine->ep.rank, R);
        moe_route_token_params_t tp = moe_route_token_params(&params);
        MOE_CUDA_TRY(moe_cuda_route_launch(&tp, logits, L->bias, engine->d_zipf_cdf, L->step, first_token, T, ids,
                                           weights, stream));
    }

    mark(engine, 1);
    /* 2. slots and destinations */
    int32_t *entry_slot = RESERVE(engine, entry_slot, int32_t, (size_t)T * k);
    int32_t *flags = RESERVE(engine, flags, int32_t, (size_t)R * T);
    int32_t *scan = RESERVE(engine, scan, int32_t, (size_t)R * T);
    int32_t *counts = RESERVE(engine, counts, int32_t, 2 * (size_t)R);
    if (!entry_slot || !flags || !scan || !counts) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(moe_cuda_mark_launch(engine->d_slots, ids, T, k, engine->ep.rank, R, first_token, entry_slot, flags,
                                      stream));
    MOE_TRY(exclusive_scan(engine, flags, scan, R * T, msg, msg_size));
    MOE_CUDA_TRY(moe_cuda_counts_launch(flags, scan, T, R, counts, stream));

    const bool allgather = chunk_max <= engine->allgather_max_tokens;
    bf16 *back = nullptr;
    if (allgather) {
        MOE_TRY(exchange_allgather(engine, L, x, T, chunk_max, entry_slot, weights, comm_only, &back, msg, msg_size));
    } else {
        MOE_TRY(exchange_alltoall(engine, L, x, T, entry_slot, weights, flags, scan, counts, comm_only, &back, msg,
                                  msg_size));
    }

    /* 7. shared expert and finalize */
    float *shared_y = nullptr, *gate = nullptr;
    if (Is > 0 && T > 0 && !comm_only) {
        float *shared_h13 = RESERVE(engine, shared_h13, float, (size_t)T * 2 * Is);
        bf16 *shared_act = RESERVE(engine, shared_act, bf16, (size_t)T * Is);
        shared_y = RESERVE(engine, shared_y, float, (size_t)T * H);
        if (!shared_h13 || !shared_act || !shared_y) return MOE_ERR_NOMEM;
        MOE_TRY(gemm(engine, 2 * Is, T, H, L->shared_w13, x, shared_h13, msg, msg_size));
        MOE_CUDA_TRY(moe_cuda_swiglu_launch(shared_h13, T, Is, shared_act, stream));
        MOE_TRY(gemm(engine, H, T, Is, L->shared_w2, shared_act, shared_y, msg, msg_size));
        if (L->shared_gate != nullptr) {
            gate = RESERVE(engine, gate, float, T);
            if (gate == nullptr) return MOE_ERR_NOMEM;
            MOE_CUDA_TRY(moe_cuda_gate_launch(x, L->shared_gate, T, H, gate, stream));
        }
    }
    mark(engine, 7);
    MOE_CUDA_TRY(moe_cuda_finalize_launch(back, allgather ? nullptr : flags, scan, T, H, R, shared_y, gate, out, stream));
    mark(engine, 8);
    if (engine->profile.on) {
        cudaEventSynchronize(engine->profile.marks[8]);
        for (int p = 0; p < MOE_CUDA_PHASES; p++) {
            float ms = 0.0f;
            cudaEventElapsedTime(&ms, engine->profile.marks[p], engine->profile.marks[p + 1]);
            engine->profile.ms[p] += ms;
        }
        engine->profile.chunks++;
    }

    /* 8. what routing chose, for tests and EPLB statistics */
    if (trace != nullptr && T > 0) {
        if (trace->ids != nullptr)
            MOE_TRY(fetch(engine, trace->ids + first_token * k, ids, sizeof(int32_t) * (size_t)T * k, msg, msg_size));
        if (trace->weights != nullptr)
            MOE_TRY(fetch(engine, trace->weights + first_token * k, weights, sizeof(float) * (size_t)T * k, msg,
                          msg_size));
        if (trace->slot_counts != nullptr) {
            const int n_slots = engine->slots.n_slots;
            unsigned long long *d_stats = RESERVE(engine, stat_counts, unsigned long long, n_slots);
            unsigned long long host_stats[MOE_MAX_SLOTS];
            if (d_stats == nullptr) return MOE_ERR_NOMEM;
            MOE_CUDA_TRY(cudaMemsetAsync(d_stats, 0, sizeof(unsigned long long) * n_slots, stream));
            MOE_CUDA_TRY(moe_cuda_slot_stats_launch(entry_slot, T * k, d_stats, stream));
            MOE_TRY(fetch(engine, host_stats, d_stats, sizeof(unsigned long long) * n_slots, msg, msg_size));
            for (int s = 0; s < n_slots; s++) trace->slot_counts[s] += (int64_t)host_stats[s];
        }
    }
    return MOE_OK;
}

static cuda_layer_t *find_layer(moe_cuda_engine_t *engine, int layer) {
    for (int i = 0; i < engine->n_layers; i++)
        if (engine->layers[i].layer == layer) return &engine->layers[i];
    return nullptr;
}

/* Every rank runs the same number of chunks, or every rank fails. */
static moe_err_t agree(moe_cuda_engine_t *engine, moe_err_t local, int n_tokens, int layer, int *max_tokens,
                       char *msg, size_t msg_size) {
    int values[2] = {local == MOE_OK ? n_tokens : 0, local != MOE_OK};
    if (engine->ep.size > 1 &&
        MPI_Allreduce(MPI_IN_PLACE, values, 2, MPI_INT, MPI_MAX, engine->ep.comm) != MPI_SUCCESS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "step agreement (MPI_Allreduce) failed");
    if (local != MOE_OK) return local;
    if (values[1])
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "another rank rejected its input for layer %d; step skipped",
                           layer);
    *max_tokens = values[0];
    return MOE_OK;
}

static moe_err_t run_chunks(moe_cuda_engine_t *engine, cuda_layer_t *L, const bf16 *x, int n_tokens, int max_tokens,
                            const int32_t *routed_ids, const float *routed_weights, float *out,
                            moe_route_trace_t *trace, char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden, k = engine->cfg.model.top_k;
    const int chunk = engine->cfg.moe.chunking.max_tokens_per_chunk > 0 ? engine->cfg.moe.chunking.max_tokens_per_chunk
                                                                          : max_tokens + 1;
    for (int begin = 0; begin < max_tokens; begin += chunk) {
        int count = n_tokens - begin;
        count = count < 0 ? 0 : count > chunk ? chunk : count;
        size_t row = (size_t)(count > 0 ? begin : 0);
        int chunk_max = max_tokens - begin < chunk ? max_tokens - begin : chunk;
        MOE_TRY(moe_cuda_forward_device(engine, L, x + row * H, count, chunk_max, begin,
                                        routed_ids != nullptr ? routed_ids + row * k : nullptr,
                                        routed_weights != nullptr ? routed_weights + row * k : nullptr,
                                        out + row * H, false, trace, msg, msg_size));
    }
    L->step++;
    return MOE_OK;
}

extern "C" moe_err_t moe_cuda_forward(moe_cuda_engine_t *engine, int layer, const float *x, int n_tokens,
                                      const int32_t *routed_ids, const float *routed_weights, float *out,
                                      moe_route_trace_t *trace, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = (size_t)m->hidden, k = (size_t)m->top_k;
    cuda_layer_t *L = find_layer(engine, layer);
    moe_err_t local = MOE_OK;
    if (L == nullptr || n_tokens < 0)
        local = moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "layer %d is not served, or bad token count %d", layer,
                            n_tokens);
    if (local == MOE_OK && m->routing.method == MOE_ROUTE_CLIENT && n_tokens > 0) {
        /* the same checks as the CPU backend, on the host, before any collective */
        int32_t *ids = (int32_t *)malloc(sizeof(int32_t) * n_tokens * k);
        float *w = (float *)malloc(sizeof(float) * n_tokens * k);
        moe_route_params_t params;
        moe_route_params_init(&params, m, nullptr, layer, engine->ep.rank, engine->ep.size);
        local = ids == nullptr || w == nullptr
                    ? moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "routing: out of memory")
                    : moe_route_tokens(&params, nullptr, routed_ids, routed_weights, n_tokens, 0, 0, ids, w, msg,
                                       msg_size);
        free(ids);
        free(w);
    }
    int max_tokens = 0;
    MOE_TRY(agree(engine, local, n_tokens, layer, &max_tokens, msg, msg_size));
    cudaStream_t stream = engine->stream;
    size_t values = (size_t)n_tokens * H;
    float *staging = RESERVE(engine, host_x, float, values);
    float *x_f32 = RESERVE(engine, x_f32, float, values);
    bf16 *x_bf16 = RESERVE(engine, x, bf16, values);
    float *d_out = RESERVE(engine, out, float, values);
    float *h_out = RESERVE(engine, host_out, float, values);
    if (!staging || !x_f32 || !x_bf16 || !d_out || !h_out) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    if (values > 0) memcpy(staging, x, sizeof(float) * values);
    MOE_CUDA_TRY(cudaMemcpyAsync(x_f32, staging, sizeof(float) * values, cudaMemcpyHostToDevice, stream));
    MOE_CUDA_TRY(moe_cuda_f32_to_bf16_launch(x_f32, x_bf16, values, stream));
    if (trace != nullptr && trace->slot_counts != nullptr)
        memset(trace->slot_counts, 0, sizeof(int64_t) * (size_t)engine->slots.n_slots);
    MOE_TRY(run_chunks(engine, L, x_bf16, n_tokens, max_tokens, routed_ids, routed_weights, d_out, trace, msg,
                       msg_size));
    MOE_CUDA_TRY(cudaMemcpyAsync(h_out, d_out, sizeof(float) * values, cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    if (values > 0) memcpy(out, h_out, sizeof(float) * values);
    return MOE_OK;
}

extern "C" moe_err_t moe_cuda_bench(moe_cuda_engine_t *engine, int layer, int n_tokens, int warmup, int iters,
                                    double *ms_per_iter, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const size_t H = (size_t)m->hidden, k = (size_t)m->top_k;
    cuda_layer_t *L = find_layer(engine, layer);
    if (L == nullptr) return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "layer %d is not served", layer);
    bf16 *x = RESERVE(engine, x, bf16, (size_t)n_tokens * H);
    float *out = RESERVE(engine, out, float, (size_t)n_tokens * H);
    if (x == nullptr || out == nullptr) return MOE_ERR_NOMEM;
    /* random inputs in [-1, 1), never zeros; different on every rank */
    MOE_CUDA_TRY(moe_cuda_synth_launch(x, nullptr, (size_t)n_tokens * H, 0xbe9c4ull + engine->ep.rank, layer, 99, 0, 1,
                                       0, engine->stream));
    int32_t *ids = nullptr;
    float *weights = nullptr;
    if (m->routing.method == MOE_ROUTE_CLIENT) {
        ids = (int32_t *)malloc(sizeof(int32_t) * n_tokens * k);
        weights = (float *)malloc(sizeof(float) * n_tokens * k);
        if (ids == nullptr || weights == nullptr) {
            free(ids);
            free(weights);
            return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "bench: out of memory");
        }
        for (size_t t = 0; t < (size_t)n_tokens; t++)
            for (size_t i = 0; i < k; i++) {
                ids[t * k + i] = (int32_t)((t * 7 + i) % (size_t)m->experts);
                weights[t * k + i] = 1.0f / (float)k;
            }
    }
    cudaEvent_t start, stop;
    MOE_CUDA_TRY(cudaEventCreate(&start));
    MOE_CUDA_TRY(cudaEventCreate(&stop));
    moe_err_t ret = MOE_OK;
    for (int it = 0; ret == MOE_OK && it < warmup + iters; it++) {
        if (engine->ep.size > 1) MPI_Barrier(engine->ep.comm);
        cudaEventRecord(start, engine->stream);
        ret = run_chunks(engine, L, x, n_tokens, n_tokens, ids, weights, out, nullptr, msg, msg_size);
        cudaEventRecord(stop, engine->stream);
        cudaError_t e = cudaEventSynchronize(stop);
        if (ret == MOE_OK && e != cudaSuccess)
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "bench: %s", cudaGetErrorString(e));
        float ms = 0.0f;
        cudaEventElapsedTime(&ms, start, stop);
        double slowest = ms;
        if (engine->ep.size > 1) MPI_Allreduce(MPI_IN_PLACE, &slowest, 1, MPI_DOUBLE, MPI_MAX, engine->ep.comm);
        if (it >= warmup) ms_per_iter[it - warmup] = slowest;
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    free(ids);
    free(weights);
    if (engine->profile.on && engine->profile.chunks > 0) {
        static const char *names[MOE_CUDA_PHASES] = {"route", "dispatch", "sort+gather", "gemm gate/up", "swiglu+gemm down",
                                                     "reduce", "combine+shared", "finalize"};
        char line[512];
        int n = snprintf(line, sizeof line, "profile T=%d, ms per chunk over %ld:", n_tokens, engine->profile.chunks);
        for (int p = 0; p < MOE_CUDA_PHASES && n < (int)sizeof line; p++)
            n += snprintf(line + n, sizeof line - n, " %s %.3f", names[p], engine->profile.ms[p] / engine->profile.chunks);
        moe_log(MOE_LOG_INFO, "cuda", "%s", line);
        memset(engine->profile.ms, 0, sizeof engine->profile.ms);
        engine->profile.chunks = 0;
    }
    return ret;
}
