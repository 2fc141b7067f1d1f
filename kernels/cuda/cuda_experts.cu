/* cuda_experts: the expert stage of a chunk on the main stream (DESIGN §4
 * step 5) — entries grouped by local slot, the expert GEMMs with the
 * implementation moe.gemm chose for the chunk's size (cuBLAS, or moed's
 * grouped kernels: cuda_decode.cu for few rows, cuda_wgmma.cu on sm_90,
 * cuda_grouped.cu's mma.sync elsewhere), SwiGLU, the weighted per-row sum —
 * and the small helpers the forward shares (a cuBLAS GEMM, a synchronous
 * fetch of counts, profile marks). */
#include "cuda_internal.h"

#define RESERVE(engine, name, type, n) \
    ((type *)moe_cuda_reserve(&(engine)->ws.name, sizeof(type) * (size_t)(n), msg, msg_size))

void moe_cuda_mark(moe_cuda_engine_t *engine, int phase) {
    if (engine->profile.on) cudaEventRecord(engine->profile.marks[phase], engine->stream);
}

moe_err_t moe_cuda_fetch(moe_cuda_engine_t *engine, cudaStream_t stream, void *dst, const void *src, size_t bytes,
                         char *msg, size_t msg_size) {
    void *staging = moe_cuda_reserve(&engine->ws.host_counts, bytes, msg, msg_size);
    if (staging == nullptr) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(cudaMemcpyAsync(staging, src, bytes, cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    memcpy(dst, staging, bytes);
    return MOE_OK;
}

/* y[n, N] = x[n, K] · W[N, K]ᵀ, bf16 operands, f32 accumulation; y is f32
 * (y_type CUDA_R_32F) or bf16 (CUDA_R_16BF). */
moe_err_t moe_cuda_gemm(cublasHandle_t handle, int N, int n, int K, const bf16 *W, const bf16 *x, void *y,
                        cudaDataType_t y_type, char *msg, size_t msg_size) {
    if (n == 0) return MOE_OK;
    const float alpha = 1.0f, beta = 0.0f;
    MOE_CUBLAS_TRY(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, n, K, &alpha, W, CUDA_R_16BF, K, x,
                                CUDA_R_16BF, K, &beta, y, y_type, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return MOE_OK;
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
     * slots, 5.05 against 11.4 ms). Within moe.gemm cublas the slot count
     * decides; the autotuner chooses between cublas and grouped. */
    if (!engine->grouped_gemm || S <= engine->grouped_min_slots) {
        for (int s = 0, off = 0; s < S; off += rows[s], s++)
            MOE_TRY(moe_cuda_gemm(engine->cublas, N, rows[s], K, W + (size_t)s * N * K, x + (size_t)off * K, y + (size_t)off * N,
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

bool moe_cuda_use_decode(const moe_cuda_engine_t *engine, int n_rows) {
    if (n_rows <= 0 || n_rows > MOE_CUDA_DECODE_MAX_ROWS) return false;
    if (engine->decode_rows >= 0) return n_rows <= engine->decode_rows;
    /* by default while a row's entries, spread over all R·S slots, leave
     * at most half of this rank's slots used: the decode form reads a
     * slot's weights once per row using it, so beyond that the re-reads
     * cost more than its tiles save (measured on an H200, README: Mixtral,
     * 8 slots of k = 2, gains at 1-2 tokens and loses from 4; Qwen3, 128
     * slots of k = 8, gains up to 8) */
    return (long)n_rows * engine->cfg.model.top_k * 2 <= (long)engine->slots.slots_per_rank * engine->ep.size;
}

int moe_cuda_bucket(int rows) {
    int b = 0;
    while (b < MOE_GEMM_BUCKETS - 1 && (1 << b) < rows) b++;
    return b;
}

/* Entries grouped by local slot (counts, a scan, a scatter: cuda_grouped.cu),
 * then [gate|up], SwiGLU and down per slot, then the weighted per-row sum.
 * cuBLAS needs the per-slot counts on the host (one sync); moed's grouped
 * kernel reads them on the device, reads each entry's row in place (the
 * gather is fused) and applies SwiGLU in its epilogue. */
moe_err_t moe_cuda_experts(moe_cuda_engine_t *engine, cuda_layer_t *L, moe_gemm_impl_t impl,
                           const bf16 *recv_rows, const cuda_meta_t *recv_meta, int n_recv, bf16 *partial,
                           float *out, const int32_t *entry_pos, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const int k = m->top_k, H = m->hidden, I = m->moe_intermediate, S = engine->slots.slots_per_rank;
    cudaStream_t stream = engine->stream;
    const int n_entries = n_recv * k;
    const bool grouped = impl == MOE_IMPL_GROUPED && engine->own_grouped_ok;
    if (grouped && entry_pos == nullptr && moe_cuda_use_decode(engine, n_recv)) {
        /* few rows (decode): by row, a warp per weight row, no grouping and
         * no separate sum (cuda_decode.cu) */
        bf16 *act = RESERVE(engine, act, bf16, (size_t)n_entries * I);
        if (act == nullptr) return MOE_ERR_NOMEM;
        if (n_entries > 0) engine->grouped_runs[2]++;
        moe_cuda_mark(engine, 3);
        MOE_CUDA_TRY(moe_cuda_decode_launch(L->w13, L->w2, recv_rows, recv_meta, n_recv, k, S, H, I, engine->l2_bytes,
                                            act, partial, out, engine->pdl, stream));
        moe_cuda_mark(engine, 4); /* profile: both GEMMs and the sum count as gate/up */
        moe_cuda_mark(engine, 5);
        return MOE_OK;
    }
    const size_t hist_ints = moe_cuda_group_hist_ints(n_entries, S);
    int32_t *hist = RESERVE(engine, hist, int32_t, hist_ints); /* 0: a few bytes all the same */
    int32_t *vals_sorted = RESERVE(engine, vals_sorted, int32_t, n_entries);
    int32_t *slot_counts = RESERVE(engine, slot_counts, int32_t, S);
    int32_t *inverse = RESERVE(engine, inverse, int32_t, n_entries);
    int32_t *plan = RESERVE(engine, plan, int32_t, 2 * (size_t)S + 2);
    if (!hist || !vals_sorted || !slot_counts || !inverse || !plan) return MOE_ERR_NOMEM;
    /* wgmma's 128-row tiles where the GPU has them (sm_90; measured faster
     * than the mma.sync tiles at every size on an H200, README), from
     * MOE_CUDA_WGMMA_MIN_ROWS entries per slot on average (default 1) */
    const bool wgmma = grouped && engine->wgmma_ok && (long)n_entries >= (long)engine->wgmma_min_rows * S;
    const int tile_rows = wgmma ? MOE_WGMMA_TILE_ROWS : moe_cuda_grouped_tile_rows(n_entries, S, engine->max_smem);
    MOE_CUDA_TRY(moe_cuda_group_entries_launch(recv_meta, n_entries, S, tile_rows, hist, slot_counts, plan,
                                               vals_sorted, inverse, stream));
    bf16 *y = nullptr;
    if (grouped) {
        /* buffers sized for every entry: the host does not learn how many are local */
        bf16 *act = RESERVE(engine, act, bf16, (size_t)n_entries * I);
        y = RESERVE(engine, y, bf16, (size_t)n_entries * H);
        if (!act || !y) return MOE_ERR_NOMEM;
        moe_cuda_mark(engine, 3);
        if (n_entries > 0) engine->grouped_runs[wgmma ? 1 : 0]++;
        if (n_entries > 0 && wgmma && engine->wgmma_ws) engine->grouped_runs[3]++;
        if (wgmma) {
            const int bn = engine->wgmma_bn, order = engine->wgmma_order;
            const bool ws = engine->wgmma_ws;
            MOE_CUDA_TRY(moe_cuda_wgmma_gemm_launch(L->w13, recv_rows, vals_sorted, k, plan, S, true, I, H, n_entries,
                                                    bn, ws, order, act, stream));
            moe_cuda_mark(engine, 4);
            MOE_CUDA_TRY(moe_cuda_wgmma_gemm_launch(L->w2, act, nullptr, 1, plan, S, false, H, I, n_entries, bn, ws,
                                                    order, y, stream));
        } else {
            MOE_CUDA_TRY(moe_cuda_grouped_gemm_launch(L->w13, recv_rows, vals_sorted, k, plan, S, tile_rows, true, I,
                                                      H, n_entries, act, stream));
            moe_cuda_mark(engine, 4);
            MOE_CUDA_TRY(moe_cuda_grouped_gemm_launch(L->w2, act, nullptr, 1, plan, S, tile_rows, false, H, I,
                                                      n_entries, y, stream));
        }
    } else {
        int host_slot_counts[MOE_MAX_SLOTS];
        MOE_TRY(moe_cuda_fetch(engine, stream, host_slot_counts, slot_counts, sizeof(int32_t) * S, msg, msg_size));
        int n_valid = 0;
        for (int s = 0; s < S; s++) n_valid += host_slot_counts[s];
        bf16 *gathered = RESERVE(engine, gathered, bf16, (size_t)n_valid * H);
        bf16 *h13 = RESERVE(engine, h13, bf16, (size_t)n_valid * 2 * I);
        bf16 *act = RESERVE(engine, act, bf16, (size_t)n_valid * I);
        y = RESERVE(engine, y, bf16, (size_t)n_valid * H);
        if (!gathered || !h13 || !act || !y) return MOE_ERR_NOMEM;
        MOE_CUDA_TRY(moe_cuda_gather_launch(recv_rows, vals_sorted, n_valid, H, k, gathered, stream));
        moe_cuda_mark(engine, 3);
        MOE_TRY(grouped_gemm(engine, 2 * I, H, L->w13, gathered, h13, host_slot_counts, S, 0, msg, msg_size));
        moe_cuda_mark(engine, 4);
        MOE_CUDA_TRY(moe_cuda_swiglu_bf16_launch(h13, n_valid, I, act, stream));
        MOE_TRY(grouped_gemm(engine, H, I, L->w2, act, y, host_slot_counts, S, 1, msg, msg_size));
    }
    moe_cuda_mark(engine, 5);
    if (entry_pos != nullptr) /* the exact combine: each entry's row as it is */
        MOE_CUDA_TRY(moe_cuda_entry_rows_launch(y, recv_meta, inverse, entry_pos, n_entries, H, partial, stream));
    else
        MOE_CUDA_TRY(moe_cuda_reduce_launch(y, recv_meta, inverse, n_recv, H, k, partial, out, stream));
    return MOE_OK;
}

