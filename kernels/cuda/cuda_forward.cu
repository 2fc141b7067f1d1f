/* cuda_forward: one MoE layer forward on the GPU (DESIGN §4), collective
 * over the EP group. A step is cut into chunks; each chunk goes through
 *   front   (aux stream) route: cuBLAS router GEMM (bf16 in, f32 logits) and
 *           the shared per-token routing -> slots, destination flags, an
 *           exclusive scan (CUB) -> dispatch (moe.comm): alltoall packs the
 *           rows each rank needs (a token goes to a rank once), exchanges
 *           counts then rows and entries (NCCL grouped send/recv);
 *           allgather gathers every rank's rows and entries;
 *   experts (main stream, cuda_experts.cu) -> partial sums per row;
 *   combine (aux) the partials back (send/recv, or reduce-scatter);
 *   finish  (main) shared expert, finalize, routing trace.
 * moe.combine exact (more than one rank, cuda_exact.cu): the front also
 * flags and scans every entry's destination and the counts exchange carries
 * entries too; the experts return one unweighted row per entry instead of a
 * partial sum per row, and finish sums a token's rows in entry order.
 * With moe.chunking.overlap the host issues chunk i+1's front before chunk
 * i's combine, so chunk i+1's routing and dispatch run beside chunk i's
 * experts; each chunk in flight has its own buffer set (two), and events
 * order the streams. Every NCCL call of a step is on the aux stream, in the
 * same order on every rank (fronts and combines interleave identically), so
 * one communicator never sees two streams. Without overlap (or one chunk,
 * or MOE_CUDA_PROFILE) both phases use the main stream.
 * The host learns counts per chunk (rows to send and receive with more
 * than one rank; entries per local slot with cuBLAS), so a chunk has zero
 * (1 rank, moe.gemm grouped) to two small device-to-host synchronisations. */
#include <cub/cub.cuh>

#include "cuda_internal.h"

#define RESERVE(engine, name, type, n) \
    ((type *)moe_cuda_reserve(&(engine)->ws.name, sizeof(type) * (size_t)(n), msg, msg_size))

/* One chunk in flight: what its phases hand to each other. */
typedef struct {
    int set; /* buffer set, 0 or 1 */
    int T, chunk_max, n_rows, n_send;
    int64_t first_token;
    const bf16 *x;
    float *out;
    bool allgather, comm_only;
    bool rows_are_tokens; /* back holds one summed row per token, in order (allgather, or one rank) */
    bool out_written;     /* the experts stage wrote out itself (one rank, no shared expert) */
    int *send_count, *recv_count, *send_off, *recv_off;
    /* the exact combine (cuda_exact.cu): entries per rank, both ways */
    int *e_send_count, *e_recv_count, *e_send_off, *e_recv_off;
    int n_entries_sent, n_entries_recv;
    int32_t *ids, *entry_slot, *flags, *scan, *eflags, *escan;
    float *weights;
    bf16 *recv_rows, *partial, *back;
    cuda_meta_t *recv_meta;
} cuda_chunk_t;

/* The streams a step's phases run on. */
typedef struct {
    cudaStream_t front;
    cublasHandle_t front_blas;
} chunk_streams_t;

static moe_err_t exclusive_scan(cudaStream_t stream, cuda_buffer_t *temp_buffer, const int32_t *in, int32_t *out,
                                int n, char *msg, size_t msg_size) {
    if (n == 0) return MOE_OK;
    size_t bytes = 0;
    MOE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(nullptr, bytes, in, out, n, stream));
    void *temp = moe_cuda_reserve(temp_buffer, bytes, msg, msg_size);
    if (temp == nullptr) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(temp, bytes, in, out, n, stream));
    return MOE_OK;
}

/* Grouped send/recv of `width` elements of `type` per row, rows per peer
 * from the counts and their prefix offsets. */
static moe_err_t exchange(moe_cuda_engine_t *engine, cudaStream_t stream, const void *send, const int *send_count,
                          const int *send_off, void *recv, const int *recv_count, const int *recv_off, size_t width,
                          ncclDataType_t type, size_t elem_bytes, char *msg, size_t msg_size) {
    MOE_NCCL_TRY(ncclGroupStart());
    for (int d = 0; d < engine->ep.size; d++) {
        MOE_NCCL_GROUP_TRY(ncclSend((const char *)send + (size_t)send_off[d] * width * elem_bytes,
                              (size_t)send_count[d] * width, type, d, engine->comm, stream));
        MOE_NCCL_GROUP_TRY(ncclRecv((char *)recv + (size_t)recv_off[d] * width * elem_bytes, (size_t)recv_count[d] * width,
                              type, d, engine->comm, stream));
    }
    MOE_NCCL_TRY(ncclGroupEnd());
    return MOE_OK;
}

/* Route: ids and weights of the chunk's tokens; with `meta` (one rank)
 * also every entry's slot and meta. */
static moe_err_t route(moe_cuda_engine_t *engine, cuda_layer_t *L, cuda_chunk_t *c, chunk_streams_t st,
                       const int32_t *routed_ids, const float *routed_weights, cuda_meta_t *meta, char *msg,
                       size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const int k = m->top_k, H = m->hidden, E = m->experts, T = c->T;
    cuda_chunk_ws_t *ws = &engine->ws.chunk[c->set];
    c->ids = (int32_t *)moe_cuda_reserve(&ws->ids, sizeof(int32_t) * (size_t)T * k, msg, msg_size);
    c->weights = (float *)moe_cuda_reserve(&ws->weights, sizeof(float) * (size_t)T * k, msg, msg_size);
    if (c->ids == nullptr || c->weights == nullptr) return MOE_ERR_NOMEM;
    if (m->routing.method == MOE_ROUTE_CLIENT) {
        /* the staging buffers are free (to reuse or to grow) once this
         * set's previous front is done */
        MOE_CUDA_TRY(cudaEventSynchronize(engine->ev[c->set][EV_FRONT]));
        int32_t *h_ids = (int32_t *)moe_cuda_reserve(&ws->host_ids, sizeof(int32_t) * (size_t)T * k, msg, msg_size);
        float *h_w = (float *)moe_cuda_reserve(&ws->host_weights, sizeof(float) * (size_t)T * k, msg, msg_size);
        if (h_ids == nullptr || h_w == nullptr) return MOE_ERR_NOMEM;
        memcpy(h_ids, routed_ids, sizeof(int32_t) * (size_t)T * k);
        memcpy(h_w, routed_weights, sizeof(float) * (size_t)T * k);
        MOE_CUDA_TRY(cudaMemcpyAsync(c->ids, h_ids, sizeof(int32_t) * (size_t)T * k, cudaMemcpyHostToDevice, st.front));
        MOE_CUDA_TRY(cudaMemcpyAsync(c->weights, h_w, sizeof(float) * (size_t)T * k, cudaMemcpyHostToDevice, st.front));
        if (meta != nullptr)
            MOE_CUDA_TRY(moe_cuda_mark_local_launch(L->d_slots, c->ids, c->weights, T, k, c->first_token, c->entry_slot,
                                                    meta, st.front));
        return MOE_OK;
    }
    float *logits = nullptr;
    if (moe_route_needs_logits(m->routing.method)) {
        logits = (float *)moe_cuda_reserve(&ws->logits, sizeof(float) * (size_t)T * E, msg, msg_size);
        if (logits == nullptr) return MOE_ERR_NOMEM;
        if (T <= MOE_CUDA_ROUTER_MAX_TOKENS && H % 8 == 0) /* one small kernel (cuda_decode.cu) */
            MOE_CUDA_TRY(moe_cuda_router_launch(L->router, c->x, T, E, H, logits, engine->pdl, st.front));
        else
            MOE_TRY(moe_cuda_gemm(st.front_blas, E, T, H, L->router, c->x, logits, CUDA_R_32F, msg, msg_size));
    }
    moe_route_params_t params;
    moe_route_params_init(&params, m, nullptr, L->layer, engine->ep.rank, engine->ep.size);
    moe_route_token_params_t tp = moe_route_token_params(&params);
    MOE_CUDA_TRY(moe_cuda_route_launch(&tp, logits, L->bias, engine->d_zipf_cdf, L->step, c->first_token, T, c->ids,
                                       c->weights, meta != nullptr ? L->d_slots : nullptr, c->entry_slot, meta,
                                       engine->pdl, st.front));
    return MOE_OK;
}

/* alltoall dispatch: the rows each rank needs with their entries, counts first. */
static moe_err_t dispatch_alltoall(moe_cuda_engine_t *engine, cuda_chunk_t *c, cudaStream_t stream, int32_t *counts,
                                   char *msg, size_t msg_size) {
    const int R = engine->ep.size, k = engine->cfg.model.top_k, H = engine->cfg.model.hidden;
    const int S = engine->slots.slots_per_rank, T = c->T;
    cuda_chunk_ws_t *ws = &engine->ws.chunk[c->set];
    size_t max_send = (size_t)T * (size_t)(R < k ? R : k);
    bf16 *send_rows = (bf16 *)moe_cuda_reserve(&ws->send_rows, sizeof(bf16) * max_send * H, msg, msg_size);
    cuda_meta_t *send_meta =
        (cuda_meta_t *)moe_cuda_reserve(&ws->send_meta, sizeof(cuda_meta_t) * max_send * k, msg, msg_size);
    if (!send_rows || !send_meta) return MOE_ERR_NOMEM;
    MOE_CUDA_TRY(moe_cuda_pack_launch(c->x, c->entry_slot, c->weights, c->flags, c->scan, T, H, k, R, S, send_rows,
                                      send_meta, stream));
    /* counts: [rows to d | rows from d], and with the exact combine
     * [entries to d | entries from d] after them */
    const int n_counts = engine->exact ? 4 * R : 2 * R;
    int host_counts[4 * R];
    if (R > 1) {
        MOE_NCCL_TRY(ncclGroupStart());
        for (int d = 0; d < R; d++) {
            MOE_NCCL_GROUP_TRY(ncclSend(counts + d, 1, ncclInt32, d, engine->comm, stream));
            MOE_NCCL_GROUP_TRY(ncclRecv(counts + R + d, 1, ncclInt32, d, engine->comm, stream));
            if (engine->exact) {
                MOE_NCCL_GROUP_TRY(ncclSend(counts + 2 * R + d, 1, ncclInt32, d, engine->comm, stream));
                MOE_NCCL_GROUP_TRY(ncclRecv(counts + 3 * R + d, 1, ncclInt32, d, engine->comm, stream));
            }
        }
        MOE_NCCL_TRY(ncclGroupEnd());
        MOE_TRY(moe_cuda_fetch(engine, stream, host_counts, counts, sizeof(int32_t) * n_counts, msg, msg_size));
    } else {
        /* one rank holds every expert: every token is sent to itself, and
         * the host knows that without asking the device */
        host_counts[0] = host_counts[1] = T;
    }
    int n_send = 0, n_recv = 0;
    for (int d = 0; d < R; d++) {
        c->send_count[d] = host_counts[d];
        c->recv_count[d] = host_counts[R + d];
        c->send_off[d] = n_send;
        c->recv_off[d] = n_recv;
        n_send += c->send_count[d];
        n_recv += c->recv_count[d];
    }
    c->n_send = n_send;
    c->n_rows = n_recv;
    c->n_entries_sent = c->n_entries_recv = 0;
    for (int d = 0; engine->exact && d < R; d++) {
        c->e_send_count[d] = host_counts[2 * R + d];
        c->e_recv_count[d] = host_counts[3 * R + d];
        c->e_send_off[d] = c->n_entries_sent;
        c->e_recv_off[d] = c->n_entries_recv;
        c->n_entries_sent += c->e_send_count[d];
        c->n_entries_recv += c->e_recv_count[d];
    }
    engine->comm_bytes += (int64_t)(n_send - c->send_count[engine->ep.rank]) *
                          (int64_t)(sizeof(bf16) * H + sizeof(cuda_meta_t) * k);
    c->recv_rows = send_rows;
    c->recv_meta = send_meta;
    if (R > 1) {
        c->recv_rows = (bf16 *)moe_cuda_reserve(&ws->recv_rows, sizeof(bf16) * (size_t)n_recv * H, msg, msg_size);
        c->recv_meta =
            (cuda_meta_t *)moe_cuda_reserve(&ws->recv_meta, sizeof(cuda_meta_t) * (size_t)n_recv * k, msg, msg_size);
        if (!c->recv_rows || !c->recv_meta) return MOE_ERR_NOMEM;
        MOE_TRY(exchange(engine, stream, send_rows, c->send_count, c->send_off, c->recv_rows, c->recv_count,
                         c->recv_off, (size_t)H, ncclBfloat16, sizeof(bf16), msg, msg_size));
        MOE_TRY(exchange(engine, stream, send_meta, c->send_count, c->send_off, c->recv_meta, c->recv_count,
                         c->recv_off, (size_t)k * sizeof(cuda_meta_t), ncclChar, 1, msg, msg_size));
    }
    return MOE_OK;
}

/* allgather dispatch: every rank's rows (padded to chunk_max, the same
 * everywhere, as NCCL's all-gather wants equal parts) and entries (global
 * slots) to every rank, then the entries made local. On one rank (only
 * with moe.comm: allgather) the same kernels run without the NCCL call. */
static moe_err_t dispatch_allgather(moe_cuda_engine_t *engine, cuda_chunk_t *c, cudaStream_t stream, char *msg,
                                    size_t msg_size) {
    const int R = engine->ep.size, k = engine->cfg.model.top_k, H = engine->cfg.model.hidden;
    const int S = engine->slots.slots_per_rank, T = c->T;
    cuda_chunk_ws_t *ws = &engine->ws.chunk[c->set];
    const int Ta = c->chunk_max > T ? c->chunk_max : T, n_all = R * Ta;
    bf16 *own_rows = (bf16 *)moe_cuda_reserve(&ws->send_rows, sizeof(bf16) * (size_t)Ta * H, msg, msg_size);
    cuda_meta_t *own_meta =
        (cuda_meta_t *)moe_cuda_reserve(&ws->send_meta, sizeof(cuda_meta_t) * (size_t)Ta * k, msg, msg_size);
    if (!own_rows || !own_meta) return MOE_ERR_NOMEM;
    if (T > 0)
        MOE_CUDA_TRY(cudaMemcpyAsync(own_rows, c->x, sizeof(bf16) * (size_t)T * H, cudaMemcpyDeviceToDevice, stream));
    if (Ta > T) /* padding rows: defined values, and no entries */
        MOE_CUDA_TRY(cudaMemsetAsync(own_rows + (size_t)T * H, 0, sizeof(bf16) * (size_t)(Ta - T) * H, stream));
    MOE_CUDA_TRY(moe_cuda_allgather_meta_launch(c->entry_slot, c->weights, T, Ta, k, own_meta, stream));
    c->recv_rows = own_rows;
    c->recv_meta = own_meta;
    if (R > 1) {
        c->recv_rows = (bf16 *)moe_cuda_reserve(&ws->recv_rows, sizeof(bf16) * (size_t)n_all * H, msg, msg_size);
        c->recv_meta =
            (cuda_meta_t *)moe_cuda_reserve(&ws->recv_meta, sizeof(cuda_meta_t) * (size_t)n_all * k, msg, msg_size);
        if (!c->recv_rows || !c->recv_meta) return MOE_ERR_NOMEM;
        MOE_NCCL_TRY(ncclGroupStart());
        MOE_NCCL_GROUP_TRY(ncclAllGather(own_rows, c->recv_rows, (size_t)Ta * H, ncclBfloat16, engine->comm, stream));
        MOE_NCCL_GROUP_TRY(ncclAllGather(own_meta, c->recv_meta, (size_t)Ta * k * sizeof(cuda_meta_t), ncclChar,
                                         engine->comm, stream));
        MOE_NCCL_TRY(ncclGroupEnd());
        /* what each rank sends in a ring all-gather: the other ranks' parts */
        engine->comm_bytes += (int64_t)(R - 1) * Ta * (int64_t)(sizeof(bf16) * H + sizeof(cuda_meta_t) * k);
    }
    MOE_CUDA_TRY(moe_cuda_localize_meta_launch(c->recv_meta, (size_t)n_all * k, engine->ep.rank, S, stream));
    c->n_rows = n_all;
    return MOE_OK;
}

/* front: route, slots and destinations, dispatch. */
static moe_err_t front(moe_cuda_engine_t *engine, cuda_layer_t *L, cuda_chunk_t *c, chunk_streams_t st,
                       const int32_t *routed_ids, const float *routed_weights, char *msg, size_t msg_size) {
    const int R = engine->ep.size, k = engine->cfg.model.top_k, T = c->T;
    cuda_chunk_ws_t *ws = &engine->ws.chunk[c->set];
    /* the set's buffers are free once the chunk that used them last is
     * finished and counted (a captured step: waited for before its graph's
     * launch, cuda_graph.cu) */
    if (!moe_cuda_is_capturing()) {
        MOE_CUDA_TRY(cudaStreamWaitEvent(st.front, engine->ev[c->set][EV_FINISH], 0));
        MOE_CUDA_TRY(cudaStreamWaitEvent(st.front, engine->ev[c->set][EV_COUNTED], 0));
    }
    c->entry_slot = (int32_t *)moe_cuda_reserve(&ws->entry_slot, sizeof(int32_t) * (size_t)T * k, msg, msg_size);
    c->flags = (int32_t *)moe_cuda_reserve(&ws->flags, sizeof(int32_t) * (size_t)R * T, msg, msg_size);
    c->scan = (int32_t *)moe_cuda_reserve(&ws->scan, sizeof(int32_t) * (size_t)R * T, msg, msg_size);
    int32_t *counts = (int32_t *)moe_cuda_reserve(&ws->counts, sizeof(int32_t) * 4 * (size_t)R, msg, msg_size);
    if (!c->entry_slot || !c->flags || !c->scan || !counts) return MOE_ERR_NOMEM;
    c->allgather = c->chunk_max <= engine->allgather_max_tokens;
    /* one rank: every token is a row of its own, in order, with all its
     * entries here (global slot = local slot), so no flags, scan, packed
     * copy of the rows or exchange; routing writes slots and entries too */
    const bool local = R == 1 && !c->allgather;
    cuda_meta_t *meta = nullptr;
    if (local) {
        meta = (cuda_meta_t *)moe_cuda_reserve(&ws->send_meta, sizeof(cuda_meta_t) * (size_t)T * k, msg, msg_size);
        if (meta == nullptr) return MOE_ERR_NOMEM;
    }
    moe_cuda_mark(engine, 0);
    MOE_TRY(route(engine, L, c, st, routed_ids, routed_weights, meta, msg, msg_size));
    moe_cuda_mark(engine, 1);
    if (local) {
        c->recv_rows = const_cast<bf16 *>(c->x), c->recv_meta = meta, c->n_rows = c->n_send = T;
        c->rows_are_tokens = true;
    } else {
        MOE_CUDA_TRY(moe_cuda_mark_launch(L->d_slots, c->ids, T, k, engine->ep.rank, R, c->first_token,
                                          c->entry_slot, c->flags, st.front));
        if (c->allgather) { /* every row goes everywhere: no destinations to scan */
            MOE_TRY(dispatch_allgather(engine, c, st.front, msg, msg_size));
        } else {
            MOE_TRY(exclusive_scan(st.front, &ws->cub_temp, c->flags, c->scan, R * T, msg, msg_size));
            MOE_CUDA_TRY(moe_cuda_counts_launch(c->flags, c->scan, T, R, counts, st.front));
            if (engine->exact) { /* where each entry's row comes back: cuda_exact.cu */
                const size_t cells = (size_t)R * T * k;
                if (cells > 0x7fffffffu) /* RANGE, not INVAL: the ranks agreed on this step already */
                    return moe_err_fmt(msg, msg_size, MOE_ERR_RANGE,
                                       "moe.combine exact: %zu entry flags in one chunk exceed 2^31 (ranks x tokens x "
                                       "top_k); lower moe.chunking.max_tokens_per_chunk",
                                       cells);
                c->eflags = (int32_t *)moe_cuda_reserve(&ws->eflags, sizeof(int32_t) * cells, msg, msg_size);
                c->escan = (int32_t *)moe_cuda_reserve(&ws->escan, sizeof(int32_t) * cells, msg, msg_size);
                if (!c->eflags || !c->escan) return MOE_ERR_NOMEM;
                MOE_CUDA_TRY(moe_cuda_entry_flags_launch(c->entry_slot, T * k, engine->slots.slots_per_rank, R,
                                                         c->eflags, st.front));
                MOE_TRY(exclusive_scan(st.front, &ws->cub_temp, c->eflags, c->escan, (int)cells, msg, msg_size));
                MOE_CUDA_TRY(moe_cuda_counts_launch(c->eflags, c->escan, T * k, R, counts + 2 * R, st.front));
            }
            MOE_TRY(dispatch_alltoall(engine, c, st.front, counts, msg, msg_size));
        }
        c->rows_are_tokens = c->allgather;
    }
    MOE_CUDA_TRY(cudaEventRecord(engine->ev[c->set][EV_FRONT], st.front));
    if (engine->counting && T > 0) {
        /* EPLB statistics on aux_balancer: the forward never waits for them */
        MOE_CUDA_TRY(cudaStreamWaitEvent(engine->balancer, engine->ev[c->set][EV_FRONT], 0));
        MOE_CUDA_TRY(moe_cuda_slot_stats_launch(c->entry_slot, T * k, engine->slots.n_slots,
                                                     engine->d_step_counts, engine->balancer));
        MOE_CUDA_TRY(cudaEventRecord(engine->ev[c->set][EV_COUNTED], engine->balancer));
    }
    return MOE_OK;
}

/* experts on the main stream, once the front is done */
static moe_err_t experts(moe_cuda_engine_t *engine, cuda_layer_t *L, cuda_chunk_t *c, char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden;
    MOE_CUDA_TRY(cudaStreamWaitEvent(engine->stream, engine->ev[c->set][EV_FRONT], 0));
    moe_cuda_mark(engine, 2);
    const bool exact = engine->exact && !c->allgather;
    const size_t out_rows = exact ? (size_t)c->n_entries_recv : (size_t)c->n_rows;
    c->partial =
        (bf16 *)moe_cuda_reserve(&engine->ws.chunk[c->set].partial, sizeof(bf16) * out_rows * H, msg, msg_size);
    if (c->partial == nullptr) return MOE_ERR_NOMEM;
    int32_t *entry_pos = nullptr;
    if (exact) { /* each received entry's row in what goes back (cuda_exact.cu) */
        if ((int64_t)c->n_rows * engine->cfg.model.top_k > 0x7fffffff)
            return moe_err_fmt(msg, msg_size, MOE_ERR_RANGE, "moe.combine exact: %d received rows of %d entries "
                               "exceed 2^31 entries; lower moe.chunking.max_tokens_per_chunk",
                               c->n_rows, engine->cfg.model.top_k);
        const int n_entries = c->n_rows * engine->cfg.model.top_k;
        int32_t *valid = RESERVE(engine, entry_valid, int32_t, n_entries);
        entry_pos = RESERVE(engine, entry_pos, int32_t, n_entries);
        if (valid == nullptr || entry_pos == nullptr) return MOE_ERR_NOMEM;
        MOE_CUDA_TRY(moe_cuda_entry_valid_launch(c->recv_meta, n_entries, valid, engine->stream));
        MOE_TRY(exclusive_scan(engine->stream, &engine->ws.cub_temp, valid, entry_pos, n_entries, msg, msg_size));
    }
    /* one rank without a shared expert: the per-row sums are the output */
    c->out_written = engine->ep.size == 1 && c->rows_are_tokens && c->n_rows == c->T &&
                     engine->cfg.model.shared_intermediate == 0 && !c->comm_only;
    if (c->comm_only) /* moe.comm auto's timing: the exchanges alone */
        MOE_CUDA_TRY(cudaMemsetAsync(c->partial, 0, sizeof(bf16) * (size_t)c->n_rows * H, engine->stream));
    else
        MOE_TRY(moe_cuda_experts(engine, L, engine->gemm_table[moe_cuda_bucket(c->n_rows)], c->recv_rows, c->recv_meta,
                                 c->n_rows, c->out_written ? nullptr : c->partial, c->out_written ? c->out : nullptr,
                                 entry_pos, msg, msg_size));
    moe_cuda_mark(engine, 6);
    MOE_CUDA_TRY(cudaEventRecord(engine->ev[c->set][EV_EXPERTS], engine->stream));
    return MOE_OK;
}

/* combine on the front stream: partial sums back to the tokens' ranks */
static moe_err_t combine(moe_cuda_engine_t *engine, cuda_chunk_t *c, chunk_streams_t st, char *msg, size_t msg_size) {
    const int R = engine->ep.size, H = engine->cfg.model.hidden;
    MOE_CUDA_TRY(cudaStreamWaitEvent(st.front, engine->ev[c->set][EV_EXPERTS], 0));
    c->back = c->partial;
    if (R > 1) {
        const bool exact = engine->exact && !c->allgather;
        size_t rows = c->allgather ? (size_t)(c->n_rows / R) : exact ? (size_t)c->n_entries_sent : (size_t)c->n_send;
        c->back = (bf16 *)moe_cuda_reserve(&engine->ws.chunk[c->set].back, sizeof(bf16) * rows * H, msg, msg_size);
        if (c->back == nullptr) return MOE_ERR_NOMEM;
        if (exact) { /* a row per entry, back to the tokens' ranks */
            engine->comm_bytes += (int64_t)sizeof(bf16) * H * (c->n_entries_recv - c->e_recv_count[engine->ep.rank]);
            MOE_TRY(exchange(engine, st.front, c->partial, c->e_recv_count, c->e_recv_off, c->back, c->e_send_count,
                             c->e_send_off, (size_t)H, ncclBfloat16, sizeof(bf16), msg, msg_size));
            MOE_CUDA_TRY(cudaEventRecord(engine->ev[c->set][EV_COMBINE], st.front));
            return MOE_OK;
        }
        /* bytes sent: a ring reduce-scatter sends R - 1 of the R parts */
        engine->comm_bytes += (int64_t)sizeof(bf16) * H *
                              (c->allgather ? (int64_t)(R - 1) * (int64_t)rows
                                            : (int64_t)(c->n_rows - c->recv_count[engine->ep.rank]));
        if (c->allgather)
            MOE_NCCL_TRY(ncclReduceScatter(c->partial, c->back, rows * H, ncclBfloat16, ncclSum, engine->comm, st.front));
        else
            MOE_TRY(exchange(engine, st.front, c->partial, c->recv_count, c->recv_off, c->back, c->send_count,
                             c->send_off, (size_t)H, ncclBfloat16, sizeof(bf16), msg, msg_size));
    }
    MOE_CUDA_TRY(cudaEventRecord(engine->ev[c->set][EV_COMBINE], st.front));
    return MOE_OK;
}

/* finish on the main stream: shared expert, finalize, the routing trace */
static moe_err_t finish(moe_cuda_engine_t *engine, cuda_layer_t *L, cuda_chunk_t *c, moe_route_trace_t *trace,
                        char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const int R = engine->ep.size, k = m->top_k, H = m->hidden, Is = m->shared_intermediate, T = c->T;
    cudaStream_t stream = engine->stream;
    float *shared_y = nullptr, *gate = nullptr;
    if (Is > 0 && T > 0 && !c->comm_only) {
        bf16 *shared_act = RESERVE(engine, shared_act, bf16, (size_t)T * Is);
        shared_y = RESERVE(engine, shared_y, float, (size_t)T * H);
        if (!shared_act || !shared_y) return MOE_ERR_NOMEM;
        if (engine->shared_small && moe_cuda_shared_small_ok(T, H, Is)) { /* cuda_shared.cu */
            MOE_CUDA_TRY(moe_cuda_shared_small_launch(L->shared_w13, L->shared_w2, c->x, T, H, Is, shared_act,
                                                      shared_y, engine->pdl, stream));
            engine->shared_runs[1]++;
        } else {
            float *shared_h13 = RESERVE(engine, shared_h13, float, (size_t)T * 2 * Is);
            if (shared_h13 == nullptr) return MOE_ERR_NOMEM;
            MOE_TRY(moe_cuda_gemm(engine->cublas, 2 * Is, T, H, L->shared_w13, c->x, shared_h13, CUDA_R_32F, msg,
                                  msg_size));
            MOE_CUDA_TRY(moe_cuda_swiglu_launch(shared_h13, T, Is, shared_act, stream));
            MOE_TRY(moe_cuda_gemm(engine->cublas, H, T, Is, L->shared_w2, shared_act, shared_y, CUDA_R_32F, msg,
                                  msg_size));
            engine->shared_runs[0]++;
        }
        if (L->shared_gate != nullptr) {
            gate = RESERVE(engine, gate, float, T);
            if (gate == nullptr) return MOE_ERR_NOMEM;
            MOE_CUDA_TRY(moe_cuda_gate_launch(c->x, L->shared_gate, T, H, gate, stream));
        }
    }
    MOE_CUDA_TRY(cudaStreamWaitEvent(stream, engine->ev[c->set][EV_COMBINE], 0));
    moe_cuda_mark(engine, 7);
    if (engine->exact && !c->allgather && !c->rows_are_tokens)
        MOE_CUDA_TRY(moe_cuda_finalize_entries_launch(c->back, c->entry_slot, c->escan, c->weights, T, k,
                                                      engine->slots.slots_per_rank, H, shared_y, gate, c->out, stream));
    else if (!c->out_written)
        MOE_CUDA_TRY(moe_cuda_finalize_launch(c->back, c->rows_are_tokens ? nullptr : c->flags, c->scan, T, H, R,
                                              shared_y, gate, c->out, stream));
    moe_cuda_mark(engine, 8);
    if (engine->profile.on) {
        cudaEventSynchronize(engine->profile.marks[8]);
        for (int p = 0; p < MOE_CUDA_PHASES; p++) {
            float ms = 0.0f;
            cudaEventElapsedTime(&ms, engine->profile.marks[p], engine->profile.marks[p + 1]);
            engine->profile.ms[p] += ms;
        }
        engine->profile.chunks++;
    }
    /* what routing chose, for tests and EPLB statistics */
    if (trace != nullptr && T > 0) {
        const int64_t first = c->first_token;
        if (trace->ids != nullptr)
            MOE_TRY(moe_cuda_fetch(engine, stream, trace->ids + first * k, c->ids, sizeof(int32_t) * (size_t)T * k, msg,
                                   msg_size));
        if (trace->weights != nullptr)
            MOE_TRY(moe_cuda_fetch(engine, stream, trace->weights + first * k, c->weights,
                                   sizeof(float) * (size_t)T * k, msg, msg_size));
        if (trace->logits != nullptr && moe_route_needs_logits(m->routing.method))
            MOE_TRY(moe_cuda_fetch(engine, stream, trace->logits + first * m->experts,
                                   engine->ws.chunk[c->set].logits.ptr, sizeof(float) * (size_t)T * m->experts, msg,
                                   msg_size));
    }
    MOE_CUDA_TRY(cudaEventRecord(engine->ev[c->set][EV_FINISH], stream));
    return MOE_OK;
}

static void chunk_init(moe_cuda_engine_t *engine, cuda_chunk_t *c, int set, const bf16 *x, int T, int chunk_max,
                       int64_t first_token, float *out, bool comm_only) {
    const int R = engine->ep.size;
    memset(c, 0, sizeof *c);
    c->set = set, c->x = x, c->T = T, c->chunk_max = chunk_max, c->first_token = first_token, c->out = out;
    c->comm_only = comm_only;
    int *counts = engine->rank_counts + (size_t)set * 8 * R;
    c->send_count = counts, c->recv_count = counts + R, c->send_off = counts + 2 * R, c->recv_off = counts + 3 * R;
    c->e_send_count = counts + 4 * R, c->e_recv_count = counts + 5 * R;
    c->e_send_off = counts + 6 * R, c->e_recv_off = counts + 7 * R;
}

moe_err_t moe_cuda_forward_chunk(moe_cuda_engine_t *engine, cuda_layer_t *L, const bf16 *x, int T, int chunk_max,
                                 const int32_t *routed_ids, const float *routed_weights, float *out, bool comm_only,
                                 char *msg, size_t msg_size) {
    chunk_streams_t st = {engine->stream, engine->cublas};
    cuda_chunk_t c;
    chunk_init(engine, &c, 0, x, T, chunk_max, 0, out, comm_only);
    MOE_TRY(front(engine, L, &c, st, routed_ids, routed_weights, msg, msg_size));
    MOE_TRY(experts(engine, L, &c, msg, msg_size));
    MOE_TRY(combine(engine, &c, st, msg, msg_size));
    return finish(engine, L, &c, nullptr, msg, msg_size);
}

static cuda_layer_t *find_layer(moe_cuda_engine_t *engine, int layer) {
    for (int i = 0; i < engine->n_layers; i++)
        if (engine->layers[i].layer == layer) return &engine->layers[i];
    return nullptr;
}

/* Every rank runs the same number of chunks, or every rank fails, with
 * MOE_ERR_INVAL (refused before the agreement: the step loop goes on,
 * moe_backend.h); msg keeps this rank's own reason. */
static moe_err_t agree(moe_cuda_engine_t *engine, moe_err_t local, int n_tokens, int layer, int *max_tokens,
                       char *msg, size_t msg_size) {
    int values[2] = {local == MOE_OK ? n_tokens : 0, local != MOE_OK};
    if (engine->ep.size > 1 &&
        MPI_Allreduce(MPI_IN_PLACE, values, 2, MPI_INT, MPI_MAX, engine->ep.comm) != MPI_SUCCESS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "step agreement (MPI_Allreduce) failed");
    if (local != MOE_OK) return MOE_ERR_INVAL;
    if (values[1])
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "another rank could not start the step of layer %d (its input, or memory for it); step "
                           "skipped",
                           layer);
    *max_tokens = values[0];
    return MOE_OK;
}

/* The chunks of a step: fronts on the aux stream one chunk ahead of the
 * experts when overlapping (see the top of the file). */
static moe_err_t run_chunks(moe_cuda_engine_t *engine, cuda_layer_t *L, const bf16 *x, int n_tokens, int max_tokens,
                            const int32_t *routed_ids, const float *routed_weights, float *out,
                            moe_route_trace_t *trace, char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden, k = engine->cfg.model.top_k;
    const int chunk = engine->cfg.moe.chunking.max_tokens_per_chunk > 0 ? engine->cfg.moe.chunking.max_tokens_per_chunk
                                                                          : max_tokens + 1;
    const int n_chunks = max_tokens > 0 ? (max_tokens + chunk - 1) / chunk : 0;
    const bool overlap = engine->cfg.moe.chunking.overlap && n_chunks > 1 && !engine->profile.on;
    chunk_streams_t st = {overlap ? engine->aux : engine->stream, overlap ? engine->cublas_aux : engine->cublas};
    if (overlap) { /* the fronts start after what the main stream holds (the input copy) */
        MOE_CUDA_TRY(cudaEventRecord(engine->ev_begin, engine->stream));
        MOE_CUDA_TRY(cudaStreamWaitEvent(engine->aux, engine->ev_begin, 0));
    }
    cuda_chunk_t chunks[2];
    auto start = [&](int i) -> moe_err_t {
        const int begin = i * chunk;
        int count = n_tokens - begin;
        count = count < 0 ? 0 : count > chunk ? chunk : count;
        size_t row = (size_t)(count > 0 ? begin : 0);
        int chunk_max = max_tokens - begin < chunk ? max_tokens - begin : chunk;
        cuda_chunk_t *c = &chunks[i % 2];
        chunk_init(engine, c, i % 2, x + row * H, count, chunk_max, begin, out + row * H, false);
        return front(engine, L, c, st, routed_ids != nullptr ? routed_ids + row * k : nullptr,
                     routed_weights != nullptr ? routed_weights + row * k : nullptr, msg, msg_size);
    };
    if (overlap && n_chunks > 0) MOE_TRY(start(0));
    for (int i = 0; i < n_chunks; i++) {
        cuda_chunk_t *c = &chunks[i % 2];
        if (!overlap) MOE_TRY(start(i)); /* one phase after another (also what profiling needs) */
        MOE_TRY(experts(engine, L, c, msg, msg_size));
        if (overlap && i + 1 < n_chunks) MOE_TRY(start(i + 1)); /* beside chunk i's experts */
        MOE_TRY(combine(engine, c, st, msg, msg_size));
        MOE_TRY(finish(engine, L, c, trace, msg, msg_size));
    }
    if (!moe_cuda_is_capturing()) L->step++; /* a graph's launch counts its step (cuda_graph.cu) */
    return MOE_OK;
}

/* A step as a CUDA graph (cuda_graph.cu) when it can be one: one rank, one
 * chunk of at most MOE_CUDA_GRAPH_TOKENS tokens, routing on the device by
 * a method that does not draw anew at every step, the router's small-T
 * kernel and moed's grouped kernels (cuBLAS's calls want counts on the
 * host), no shared expert or one of at most MOE_CUDA_SHARED_SMALL_TOKENS
 * tokens by cuda_shared.cu (cuBLAS's GEMMs are not captured), no routing
 * trace but the slot counts, no per-phase profile. */
static bool graphable(const moe_cuda_engine_t *engine, int n_tokens, const int32_t *routed_ids,
                      const moe_route_trace_t *trace) {
    const moe_model_config_t *m = &engine->cfg.model;
    const int chunk = engine->cfg.moe.chunking.max_tokens_per_chunk;
    const moe_route_method_t method = m->routing.method;
    const bool device_routing = method == MOE_ROUTE_SOFTMAX_TOPK || method == MOE_ROUTE_RENORMALIZE ||
                                method == MOE_ROUTE_SIGMOID_GROUP_TOPK || method == MOE_ROUTE_PERFECT;
    return n_tokens > 0 && n_tokens <= engine->graphs.max_tokens && n_tokens <= MOE_CUDA_ROUTER_MAX_TOKENS &&
           engine->ep.size == 1 && (chunk <= 0 || n_tokens <= chunk) && device_routing && routed_ids == nullptr &&
           m->hidden % 8 == 0 &&
           (m->shared_intermediate == 0 ||
            (engine->shared_small && moe_cuda_shared_small_ok(n_tokens, m->hidden, m->shared_intermediate))) &&
           !engine->profile.on &&
           engine->gemm_table[moe_cuda_bucket(n_tokens)] == MOE_IMPL_GROUPED &&
           (trace == nullptr || (trace->ids == nullptr && trace->weights == nullptr && trace->logits == nullptr));
}

typedef struct {
    moe_cuda_engine_t *engine;
    cuda_layer_t *L;
    const bf16 *x;
    int n_tokens;
    float *out;
} graph_step_t;

static moe_err_t graph_step(void *ctx, char *msg, size_t msg_size) {
    graph_step_t *a = (graph_step_t *)ctx;
    return run_chunks(a->engine, a->L, a->x, a->n_tokens, a->n_tokens, nullptr, nullptr, a->out, nullptr, msg,
                      msg_size);
}

/* The step of a layer: its chunks, as a graph where it can be one. */
static moe_err_t run_step(moe_cuda_engine_t *engine, cuda_layer_t *L, const bf16 *x, int n_tokens, int max_tokens,
                          const int32_t *routed_ids, const float *routed_weights, float *out,
                          moe_route_trace_t *trace, char *msg, size_t msg_size) {
    if (!graphable(engine, n_tokens, routed_ids, trace))
        return run_chunks(engine, L, x, n_tokens, max_tokens, routed_ids, routed_weights, out, trace, msg, msg_size);
    graph_step_t a = {engine, L, x, n_tokens, out};
    return moe_cuda_graph_run(engine, L, n_tokens, x, out, graph_step, &a, msg, msg_size);
}

/* The step's slot counts (EPLB statistics), counted on aux_balancer:
 * all-reduced on the balancer communicator with more than one rank (so
 * trace->slot_counts_global), then read back; the counters start from zero
 * again. Collective when the forward is. */
static moe_err_t step_counts(moe_cuda_engine_t *engine, moe_route_trace_t *trace, char *msg, size_t msg_size) {
    const int n_slots = engine->slots.n_slots;
    const size_t bytes = sizeof(unsigned long long) * (size_t)n_slots;
    unsigned long long *host = (unsigned long long *)moe_cuda_reserve(&engine->ws.host_stats, bytes, msg, msg_size);
    if (host == nullptr) return MOE_ERR_NOMEM;
    /* after the step's last combine: two communicators never run at once */
    MOE_CUDA_TRY(cudaEventRecord(engine->ev_begin, engine->stream));
    MOE_CUDA_TRY(cudaStreamWaitEvent(engine->balancer, engine->ev_begin, 0));
    if (engine->ep.size > 1)
        MOE_NCCL_TRY(ncclAllReduce(engine->d_step_counts, engine->d_step_counts, (size_t)n_slots, ncclUint64, ncclSum,
                                   engine->comm_balancer, engine->balancer));
    MOE_CUDA_TRY(cudaMemcpyAsync(host, engine->d_step_counts, bytes, cudaMemcpyDeviceToHost, engine->balancer));
    MOE_CUDA_TRY(cudaMemsetAsync(engine->d_step_counts, 0, bytes, engine->balancer));
    MOE_CUDA_TRY(cudaStreamSynchronize(engine->balancer));
    for (int s = 0; s < n_slots; s++) trace->slot_counts[s] = (int64_t)host[s];
    trace->slot_counts_global = engine->ep.size > 1;
    return MOE_OK;
}

/* Page-locked host memory that the GPU reaches by DMA (cudaHostAlloc or
 * registered); plain malloc'd memory is not. */
static bool is_pinned(const void *ptr) {
    cudaPointerAttributes attr;
    if (ptr == nullptr || cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return attr.type == cudaMemoryTypeHost;
}

/* The forward with host activations in float32 (bf16_io false) or bf16
 * (true; uint16_t bit patterns), in and out. bf16 in goes to the device as
 * it is; float32 in is converted there (the same rounding). The output is
 * made in float32 on the device, and for bf16 rounded there (to nearest
 * even, as the wire's own conversion), so both forms give the same values
 * up to that rounding, and bf16 moves half the bytes over PCIe. */
static moe_err_t forward_io(moe_cuda_engine_t *engine, int layer, const void *x, bool bf16_io, int n_tokens,
                            const int32_t *routed_ids, const float *routed_weights, void *out,
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
    cudaStream_t stream = engine->stream;
    const size_t values = (size_t)n_tokens * H, io_bytes = (bf16_io ? sizeof(bf16) : sizeof(float)) * values;
    /* The step's own buffers before the agreement, so that a rank short of
     * memory fails the step on every rank instead of leaving the others
     * waiting in a collective (pinned x and out, the daemon's step buffers:
     * DMA straight from and to them; else through pinned staging buffers). */
    const bool x_pinned = is_pinned(x), out_pinned = is_pinned(out);
    void *staging = nullptr, *h_out = nullptr;
    float *x_f32 = nullptr, *d_out = nullptr;
    bf16 *x_bf16 = nullptr, *d_out_bf16 = nullptr;
    if (local == MOE_OK) {
        staging = x_pinned ? nullptr : RESERVE(engine, host_x, uint8_t, io_bytes);
        x_f32 = bf16_io ? nullptr : RESERVE(engine, x_f32, float, values);
        x_bf16 = RESERVE(engine, x, bf16, values);
        d_out = RESERVE(engine, out, float, values);
        d_out_bf16 = bf16_io ? RESERVE(engine, out_bf16, bf16, values) : nullptr;
        h_out = out_pinned ? out : RESERVE(engine, host_out, uint8_t, io_bytes);
        if ((!x_pinned && !staging) || (!bf16_io && !x_f32) || !x_bf16 || !d_out || (bf16_io && !d_out_bf16) ||
            !h_out)
            local = MOE_ERR_NOMEM; /* msg says how many bytes of which memory */
    }
    int max_tokens = 0;
    MOE_TRY(agree(engine, local, n_tokens, layer, &max_tokens, msg, msg_size));
    if (engine->poison_out && values > 0) /* tests: an element nothing writes shows as NaN */
        MOE_CUDA_TRY(cudaMemsetAsync(d_out, 0xff, sizeof(float) * values, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    if (!x_pinned && values > 0) memcpy(staging, x, io_bytes);
    MOE_CUDA_TRY(cudaMemcpyAsync(bf16_io ? (void *)x_bf16 : (void *)x_f32, x_pinned ? x : staging, io_bytes,
                                 cudaMemcpyHostToDevice, stream));
    MOE_CUDA_TRY(cudaEventRecord(engine->ev_input, stream));
    moe_err_t ret = MOE_OK;
    cudaError_t e = bf16_io ? cudaSuccess : moe_cuda_f32_to_bf16_launch(x_f32, x_bf16, values, stream);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "cuda: the input's conversion to bf16: %s",
                          cudaGetErrorString(e));
    }
    engine->counting = ret == MOE_OK && trace != nullptr && trace->slot_counts != nullptr;
    if (ret == MOE_OK)
        ret = run_step(engine, L, x_bf16, n_tokens, max_tokens, routed_ids, routed_weights, d_out, trace, msg,
                       msg_size);
    if (ret == MOE_OK && engine->counting) ret = step_counts(engine, trace, msg, msg_size);
    if (ret != MOE_OK && engine->counting) /* a failed step's partial counts must not reach the next one */
        cudaMemsetAsync(engine->d_step_counts, 0, sizeof(unsigned long long) * engine->slots.n_slots, engine->balancer);
    engine->counting = false;
    if (ret == MOE_OK && bf16_io) {
        e = moe_cuda_f32_to_bf16_launch(d_out, d_out_bf16, values, stream);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "cuda: the output's conversion to bf16: %s",
                              cudaGetErrorString(e));
        }
    }
    if (ret != MOE_OK) {
        /* x may be the caller's pinned buffer, still being read by the
         * copy: the caller may refill or free it once this returns (the
         * event, not the stream: a failed step's collectives may never end) */
        (void)cudaEventSynchronize(engine->ev_input);
        (void)cudaGetLastError();
        return ret;
    }
    MOE_CUDA_TRY(cudaMemcpyAsync(h_out, bf16_io ? (const void *)d_out_bf16 : (const void *)d_out, io_bytes,
                                 cudaMemcpyDeviceToHost, stream));
    MOE_CUDA_TRY(cudaStreamSynchronize(stream));
    if (!out_pinned && values > 0) memcpy(out, h_out, io_bytes);
    return MOE_OK;
}

extern "C" moe_err_t moe_cuda_forward(moe_cuda_engine_t *engine, int layer, const float *x, int n_tokens,
                                      const int32_t *routed_ids, const float *routed_weights, float *out,
                                      moe_route_trace_t *trace, char *msg, size_t msg_size) {
    return forward_io(engine, layer, x, false, n_tokens, routed_ids, routed_weights, out, trace, msg, msg_size);
}

extern "C" moe_err_t moe_cuda_forward_bf16(moe_cuda_engine_t *engine, int layer, const uint16_t *x, int n_tokens,
                                           const int32_t *routed_ids, const float *routed_weights, uint16_t *out,
                                           moe_route_trace_t *trace, char *msg, size_t msg_size) {
    return forward_io(engine, layer, x, true, n_tokens, routed_ids, routed_weights, out, trace, msg, msg_size);
}

extern "C" moe_err_t moe_cuda_bench(moe_cuda_engine_t *engine, int layer, int n_tokens, int warmup, int iters,
                                    double *ms_per_iter, double *comm_bytes, char *msg, size_t msg_size) {
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
    engine->comm_bytes = 0;
    cudaEvent_t start, stop;
    MOE_CUDA_TRY(cudaEventCreate(&start));
    MOE_CUDA_TRY(cudaEventCreate(&stop));
    moe_err_t ret = MOE_OK;
    for (int it = 0; ret == MOE_OK && it < warmup + iters; it++) {
        if (engine->ep.size > 1) MPI_Barrier(engine->ep.comm);
        cudaEventRecord(start, engine->stream);
        ret = run_step(engine, L, x, n_tokens, n_tokens, ids, weights, out, nullptr, msg, msg_size);
        cudaEventRecord(stop, engine->stream);
        cudaError_t e = cudaEventSynchronize(stop);
        if (ret == MOE_OK && e != cudaSuccess)
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "bench: %s", cudaGetErrorString(e));
        float ms = 0.0f;
        cudaEventElapsedTime(&ms, start, stop);
        /* the slowest rank's time, and whether any rank failed: then every
         * rank stops here (none waits in the next barrier alone) */
        double slowest[2] = {ms, ret != MOE_OK ? 1.0 : 0.0};
        if (engine->ep.size > 1) MPI_Allreduce(MPI_IN_PLACE, slowest, 2, MPI_DOUBLE, MPI_MAX, engine->ep.comm);
        if (ret == MOE_OK && slowest[1] > 0)
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "bench: another rank failed (see its log)");
        if (it >= warmup) ms_per_iter[it - warmup] = slowest[0];
        if (it + 1 == warmup) engine->comm_bytes = 0;
    }
    if (comm_bytes != nullptr) *comm_bytes = iters > 0 ? (double)engine->comm_bytes / iters : 0.0;
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
