/* cpu_forward: one MoE layer forward on the CPU (DESIGN §4), collective over
 * the EP group.
 *   1. route every local token (router GEMM + the configured method);
 *   2. agree with the other ranks (max tokens, any rejected input) so that
 *      every rank runs the same number of chunks, or every rank fails;
 *   per chunk of at most moe.chunking.max_tokens_per_chunk tokens:
 *   3. map experts to slots; per destination rank the distinct tokens that
 *      need it (a token travels to a rank once) with a (local slot, weight)
 *      entry per chosen expert; counts, then rows, with MPI_Alltoallv;
 *   4. experts: (row, entry) pairs grouped by local slot, SwiGLU, weighted;
 *      a token's partial sum over this rank's experts is reduced here;
 *   5. combine: each (token, expert) result travels back on its own and
 *      the token's rank adds a token's k results in entry order (+ the
 *      shared expert): the same bits whatever rank computed each entry, so
 *      an EPLB placement change, the rank count or moe.comm never changes
 *      the output (DESIGN §6).
 * moe.comm allgather (small chunks, or all with `allgather`): instead of 3
 * and 5, every rank gathers every rank's rows and entries (MPI_Allgatherv),
 * computes its experts' results for all of them, and MPI_Reduce_scatter
 * returns every (token, expert) result to the token's rank (the other
 * ranks add exact zeros).
 * Every sum runs in a fixed order, so a result does not depend on the
 * thread count. */
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../../config/moe_log.h"
#include "../../protocol/moe_frame.h"
#include "cpu_internal.h"

#define ROWS_PER_TASK 16

typedef struct {
    int slot;
    int first; /* index into the slot-sorted pair order */
    int count;
} expert_task_t;

#define RESERVE(engine, buf, type, n)                                              \
    ((type *)moe_cpu_reserve(&(engine)->ws.buf, sizeof(type) * ((size_t)(n) + 1)))

static float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
    for (int j = 0; j < n; j++) sum += a[j] * b[j];
    return sum;
}

static moe_err_t mpi_fail(int code, const char *what, char *msg, size_t msg_size) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "%s failed: %s", what, text);
}

#define MOE_MPI_CHECK(call, what)                                         \
    do {                                                                  \
        int mpi_rc_ = (call);                                             \
        if (mpi_rc_ != MPI_SUCCESS) return mpi_fail(mpi_rc_, what, msg, msg_size); \
    } while (0)

/* Step 3: builds the send buffers of one chunk, grouped by destination rank. */
static moe_err_t pack_dispatch(moe_cpu_engine_t *engine, const float *x, const int32_t *slot,
                               const float *weights, int n_tokens, int *send_counts,
                               int *n_send_out, char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden, k = engine->cfg.model.top_k;
    const int spr = engine->slots.slots_per_rank, n_ranks = engine->ep.size;
    /* a token goes to at most min(ranks, k) ranks */
    const size_t max_send = (size_t)n_tokens * (size_t)(n_ranks < k ? n_ranks : k);
    int32_t *send_token = RESERVE(engine, send_token, int32_t, max_send);
    float *rows = RESERVE(engine, send_rows, float, max_send * H);
    moe_cpu_meta_t *meta = RESERVE(engine, send_meta, moe_cpu_meta_t, (max_send + 1) * k);
    if (send_token == NULL || rows == NULL || meta == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "dispatch: out of memory");
    int n_send = 0;
    for (int d = 0; d < n_ranks; d++) {
        send_counts[d] = 0;
        for (int t = 0; t < n_tokens; t++) {
            bool needed = false;
            moe_cpu_meta_t *entry = meta + (size_t)n_send * k;
            for (int i = 0; i < k; i++) {
                int s = slot[(size_t)t * k + i];
                bool here = s / spr == d;
                entry[i].local_slot = here ? s % spr : -1;
                entry[i].weight = here ? weights[(size_t)t * k + i] : 0.0f;
                needed |= here;
            }
            if (!needed) continue;
            memcpy(rows + (size_t)n_send * H, x + (size_t)t * H, sizeof(float) * H);
            send_token[n_send++] = t;
            send_counts[d]++;
        }
    }
    *n_send_out = n_send;
    return MOE_OK;
}

/* Step 4: pair_out[r·k + i] = w_ri · expert_{slot_ri}(row r) for this
 * rank's entries (local_slot >= 0) of each received row; the other pairs
 * are left as they are. *pair_out_ptr: the workspace buffer. */
static moe_err_t run_experts(moe_cpu_engine_t *engine, moe_cpu_layer_t *layer, const float *rows,
                             const moe_cpu_meta_t *meta, int n_rows, float **pair_out_ptr, char *msg,
                             size_t msg_size) {
    const int H = engine->cfg.model.hidden, I = engine->cfg.model.moe_intermediate;
    const int k = engine->cfg.model.top_k, spr = engine->slots.slots_per_rank;
    const size_t n_entries = (size_t)n_rows * k;
    int *slot_start = RESERVE(engine, slot_start, int, spr + 1);
    int *order = RESERVE(engine, pair_order, int, n_entries);
    float *pair_out = RESERVE(engine, pair_out, float, n_entries * H);
    expert_task_t *tasks = RESERVE(engine, tasks, expert_task_t, n_entries / ROWS_PER_TASK + spr + 1);
    int n_threads = omp_get_max_threads();
    size_t per_thread = (size_t)2 * I + 2 * (size_t)ROWS_PER_TASK * H;
    float *scratch = RESERVE(engine, scratch, float, per_thread * n_threads);
    if (slot_start == NULL || order == NULL || pair_out == NULL || tasks == NULL || scratch == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "experts: out of memory");
    *pair_out_ptr = pair_out;
    /* counting sort of the (row, entry) pairs by local slot */
    memset(slot_start, 0, sizeof(int) * (size_t)(spr + 1));
    for (size_t p = 0; p < n_entries; p++)
        if (meta[p].local_slot >= 0) slot_start[meta[p].local_slot + 1]++;
    for (int s = 0; s < spr; s++) slot_start[s + 1] += slot_start[s];
    int n_tasks = 0;
    for (int s = 0; s < spr; s++)
        for (int first = slot_start[s]; first < slot_start[s + 1]; first += ROWS_PER_TASK) {
            int count = slot_start[s + 1] - first;
            tasks[n_tasks++] = (expert_task_t){s, first, count < ROWS_PER_TASK ? count : ROWS_PER_TASK};
        }
    {
        int *fill = RESERVE(engine, slot_fill, int, spr);
        if (fill == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "experts: out of memory");
        memcpy(fill, slot_start, sizeof(int) * (size_t)spr);
        for (size_t p = 0; p < n_entries; p++)
            if (meta[p].local_slot >= 0) order[fill[meta[p].local_slot]++] = (int)p;
    }
    const size_t IH = (size_t)I * H;
#pragma omp parallel for schedule(dynamic)
    for (int task_index = 0; task_index < n_tasks; task_index++) {
        expert_task_t task = tasks[task_index];
        float *hidden = scratch + per_thread * (size_t)omp_get_thread_num();
        float *gathered = hidden + 2 * (size_t)I;
        float *y = gathered + (size_t)ROWS_PER_TASK * H;
        for (int j = 0; j < task.count; j++)
            memcpy(gathered + (size_t)j * H, rows + (size_t)(order[task.first + j] / k) * H,
                   sizeof(float) * H);
        moe_cpu_swiglu_rows(gathered, task.count, H, I, layer->slot_w1 + task.slot * IH,
                            layer->slot_w3 + task.slot * IH, layer->slot_w2 + task.slot * IH,
                            hidden, y);
        for (int j = 0; j < task.count; j++) {
            int pair = order[task.first + j];
            float w = meta[pair].weight;
            float *dst = pair_out + (size_t)pair * H;
            for (int h = 0; h < H; h++) dst[h] = w * y[(size_t)j * H + h];
        }
    }
    return MOE_OK;
}

/* out[t] = Σ_i per_entry[t·k + i] in entry order: the same sum whatever
 * rank computed each entry, so a placement change (or the rank count, or
 * moe.comm) does not change a bit of the result. */
static void sum_entries(const float *per_entry, int n_tokens, int k, int H, float *out) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < n_tokens; t++) {
        float *dst = out + (size_t)t * H;
        memset(dst, 0, sizeof(float) * H);
        for (int i = 0; i < k; i++) {
            const float *src = per_entry + ((size_t)t * k + i) * H;
            for (int h = 0; h < H; h++) dst[h] += src[h];
        }
    }
}

/* out[t] += sigmoid(g·x) · shared_expert(x) (gate only for qwen_moe). */
static moe_err_t run_shared(moe_cpu_engine_t *engine, const moe_cpu_layer_t *layer, const float *x,
                            int n_tokens, float *out, char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden, Is = engine->cfg.model.shared_intermediate;
    int n_threads = omp_get_max_threads();
    size_t per_thread = (size_t)Is + H;
    float *scratch = RESERVE(engine, scratch, float, per_thread * n_threads);
    if (scratch == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "shared expert: out of memory");
#pragma omp parallel for schedule(static)
    for (int t = 0; t < n_tokens; t++) {
        float *hidden = scratch + per_thread * (size_t)omp_get_thread_num();
        float *y = hidden + Is;
        const float *row = x + (size_t)t * H;
        moe_cpu_swiglu_rows(row, 1, H, Is, layer->shared_w1, layer->shared_w3, layer->shared_w2,
                            hidden, y);
        float gate = 1.0f;
        if (layer->shared_gate != NULL) gate = 1.0f / (1.0f + expf(-dot(layer->shared_gate, row, H)));
        for (int h = 0; h < H; h++) out[(size_t)t * H + h] += gate * y[h];
    }
    return MOE_OK;
}

/* Steps 3-5 with allgather + reduce-scatter (moe.comm allgather). With
 * comm_only the experts are skipped (zeros): the startup timing of moe.comm
 * auto. */
static moe_err_t forward_chunk_allgather(moe_cpu_engine_t *engine, moe_cpu_layer_t *layer,
                                         const float *x, const int32_t *slot,
                                         const float *weights, int n_tokens, float *out,
                                         bool comm_only, char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden, k = engine->cfg.model.top_k;
    const int n_ranks = engine->ep.size, spr = engine->slots.slots_per_rank;
    int counts[n_ranks], row_counts[n_ranks], row_displs[n_ranks], meta_counts[n_ranks],
        meta_displs[n_ranks];
    MOE_MPI_CHECK(MPI_Allgather(&n_tokens, 1, MPI_INT, counts, 1, MPI_INT, engine->ep.comm),
                  "allgather counts (MPI_Allgather)");
    const int meta_bytes = (int)sizeof(moe_cpu_meta_t) * k;
    int n_all = 0;
    for (int d = 0; d < n_ranks; d++) {
        row_counts[d] = counts[d] * H, row_displs[d] = n_all * H;
        meta_counts[d] = counts[d] * meta_bytes, meta_displs[d] = n_all * meta_bytes;
        n_all += counts[d];
    }
    moe_cpu_meta_t *own = RESERVE(engine, send_meta, moe_cpu_meta_t, (size_t)n_tokens * k);
    float *rows = RESERVE(engine, recv_rows, float, (size_t)n_all * H);
    moe_cpu_meta_t *meta = RESERVE(engine, recv_meta, moe_cpu_meta_t, (size_t)n_all * k);
    if (own == NULL || rows == NULL || meta == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "allgather: out of memory");
    for (size_t p = 0; p < (size_t)n_tokens * k; p++) /* global slots travel */
        own[p] = (moe_cpu_meta_t){slot[p], weights[p]};
    MOE_MPI_CHECK(MPI_Allgatherv(x, n_tokens * H, MPI_FLOAT, rows, row_counts, row_displs,
                                 MPI_FLOAT, engine->ep.comm),
                  "allgather rows (MPI_Allgatherv)");
    MOE_MPI_CHECK(MPI_Allgatherv(own, n_tokens * meta_bytes, MPI_BYTE, meta, meta_counts,
                                 meta_displs, MPI_BYTE, engine->ep.comm),
                  "allgather entries (MPI_Allgatherv)");
    for (size_t p = 0; p < (size_t)n_all * k; p++) {
        int s = meta[p].local_slot;
        meta[p].local_slot = s / spr == engine->ep.rank ? s % spr : -1;
    }
    /* every (token, entry) result, zeros where another rank computes it:
     * the reduce-scatter adds exact zeros, so each arrives unrounded */
    const size_t pairs = (size_t)n_all * k;
    float *pair_out = NULL, *entries = RESERVE(engine, partial, float, pairs * H);
    if (entries == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "experts: out of memory");
    if (!comm_only) MOE_CHECK(run_experts(engine, layer, rows, meta, n_all, &pair_out, msg, msg_size));
    for (size_t p = 0; p < pairs; p++) {
        float *dst = entries + p * H;
        if (comm_only || meta[p].local_slot < 0) memset(dst, 0, sizeof(float) * H);
        else memcpy(dst, pair_out + p * H, sizeof(float) * H);
    }
    float *mine = RESERVE(engine, back, float, (size_t)n_tokens * k * H);
    if (mine == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "combine: out of memory");
    int entry_counts[n_ranks];
    for (int d = 0; d < n_ranks; d++) entry_counts[d] = counts[d] * k * H;
    MOE_MPI_CHECK(MPI_Reduce_scatter(entries, mine, entry_counts, MPI_FLOAT, MPI_SUM, engine->ep.comm),
                  "combine (MPI_Reduce_scatter)");
    if (n_tokens == 0) return MOE_OK;
    sum_entries(mine, n_tokens, k, H, out);
    if (engine->cfg.model.shared_intermediate > 0 && !comm_only)
        MOE_CHECK(run_shared(engine, layer, x, n_tokens, out, msg, msg_size));
    return MOE_OK;
}

/* chunk_max: the largest token count of this chunk on any rank (the same
 * on every rank), which picks the exchange. */
static moe_err_t forward_chunk(moe_cpu_engine_t *engine, moe_cpu_layer_t *layer, const float *x,
                               const int32_t *ids, const float *weights, int n_tokens,
                               int64_t first_token, int chunk_max, float *out, bool comm_only,
                               char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden, k = engine->cfg.model.top_k;
    const int n_ranks = engine->ep.size;
    int send_counts[n_ranks], recv_counts[n_ranks], send_displs[n_ranks], recv_displs[n_ranks];
    int row_send[n_ranks], row_recv[n_ranks], row_sdispl[n_ranks], row_rdispl[n_ranks];
    int32_t *slot = RESERVE(engine, slot, int32_t, (size_t)n_tokens * k);
    if (slot == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "slots: out of memory");
    for (int t = 0; t < n_tokens; t++)
        for (int i = 0; i < k; i++)
            slot[(size_t)t * k + i] = moe_slots_pick(layer->slots, ids[(size_t)t * k + i],
                                                     engine->ep.rank, first_token + t);
    if (n_ranks > 1 && chunk_max <= engine->allgather_max_tokens)
        return forward_chunk_allgather(engine, layer, x, slot, weights, n_tokens, out, comm_only,
                                       msg, msg_size);
    int n_send = 0;
    MOE_CHECK(pack_dispatch(engine, x, slot, weights, n_tokens, send_counts, &n_send, msg, msg_size));
    float *recv_rows = engine->ws.send_rows.ptr;
    moe_cpu_meta_t *recv_meta = engine->ws.send_meta.ptr;
    int n_recv = n_send;
    if (n_ranks > 1) {
        MOE_MPI_CHECK(MPI_Alltoall(send_counts, 1, MPI_INT, recv_counts, 1, MPI_INT, engine->ep.comm),
                      "dispatch counts (MPI_Alltoall)");
        n_recv = 0;
        for (int d = 0; d < n_ranks; d++) {
            send_displs[d] = d == 0 ? 0 : send_displs[d - 1] + send_counts[d - 1];
            recv_displs[d] = n_recv;
            n_recv += recv_counts[d];
        }
        if ((int64_t)n_recv * H > INT_MAX || (int64_t)n_send * H > INT_MAX)
            return moe_err_fmt(msg, msg_size, MOE_ERR_RANGE,
                               "dispatch: %d rows of %d exceed MPI's int counts; lower "
                               "moe.chunking.max_tokens_per_chunk", n_recv, H);
        recv_rows = RESERVE(engine, recv_rows, float, (size_t)n_recv * H);
        recv_meta = RESERVE(engine, recv_meta, moe_cpu_meta_t, (size_t)n_recv * k);
        if (recv_rows == NULL || recv_meta == NULL)
            return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "dispatch: out of memory");
        const int meta_bytes = (int)sizeof(moe_cpu_meta_t) * k;
        for (int d = 0; d < n_ranks; d++) {
            row_send[d] = send_counts[d] * H, row_sdispl[d] = send_displs[d] * H;
            row_recv[d] = recv_counts[d] * H, row_rdispl[d] = recv_displs[d] * H;
        }
        MOE_MPI_CHECK(MPI_Alltoallv(engine->ws.send_rows.ptr, row_send, row_sdispl, MPI_FLOAT,
                                    recv_rows, row_recv, row_rdispl, MPI_FLOAT, engine->ep.comm),
                      "dispatch rows (MPI_Alltoallv)");
        int meta_send[n_ranks], meta_sdispl[n_ranks], meta_recv[n_ranks], meta_rdispl[n_ranks];
        for (int d = 0; d < n_ranks; d++) {
            meta_send[d] = send_counts[d] * meta_bytes, meta_sdispl[d] = send_displs[d] * meta_bytes;
            meta_recv[d] = recv_counts[d] * meta_bytes, meta_rdispl[d] = recv_displs[d] * meta_bytes;
        }
        MOE_MPI_CHECK(MPI_Alltoallv(engine->ws.send_meta.ptr, meta_send, meta_sdispl, MPI_BYTE,
                                    recv_meta, meta_recv, meta_rdispl, MPI_BYTE, engine->ep.comm),
                      "dispatch entries (MPI_Alltoallv)");
    }
    /* Step 5: each (token, entry) result travels back on its own (not a
     * per-rank partial sum), in (row, entry) order, and the token's rank
     * adds a token's k results in entry order: the same bits whatever the
     * placement. */
    const size_t pairs = (size_t)n_recv * k;
    float *pair_out = NULL;
    if (!comm_only) MOE_CHECK(run_experts(engine, layer, recv_rows, recv_meta, n_recv, &pair_out, msg, msg_size));
    if (n_ranks == 1 && !comm_only) {
        /* one rank: row j is token j and all its entries are here; the same
         * sums, without the packing */
        if (n_tokens > 0) sum_entries(pair_out, n_tokens, k, H, out);
        if (engine->cfg.model.shared_intermediate > 0 && n_tokens > 0)
            MOE_CHECK(run_shared(engine, layer, x, n_tokens, out, msg, msg_size));
        return MOE_OK;
    }
    int local_recv = 0, local_send = 0;
    for (size_t p = 0; p < pairs; p++) local_recv += recv_meta[p].local_slot >= 0;
    const moe_cpu_meta_t *sent_meta = engine->ws.send_meta.ptr;
    for (size_t p = 0; p < (size_t)n_send * k; p++) local_send += sent_meta[p].local_slot >= 0;
    float *packed = RESERVE(engine, partial, float, (size_t)local_recv * H);
    if (packed == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "combine: out of memory");
    for (size_t p = 0, j = 0; p < pairs; p++) {
        if (recv_meta[p].local_slot < 0) continue;
        if (comm_only) memset(packed + j * H, 0, sizeof(float) * H);
        else memcpy(packed + j * H, pair_out + p * H, sizeof(float) * H);
        j++;
    }
    float *back = packed;
    if (n_ranks > 1) {
        /* entries per peer: what it sent us / what we sent it, counted from the entries */
        int back_send[n_ranks], back_sdispl[n_ranks], back_recv[n_ranks], back_rdispl[n_ranks];
        for (int d = 0, row = 0, sent_row = 0, at = 0, got = 0; d < n_ranks; d++) {
            int mine = 0, theirs = 0;
            for (int r = 0; r < recv_counts[d]; r++, row++)
                for (int i = 0; i < k; i++) mine += recv_meta[(size_t)row * k + i].local_slot >= 0;
            for (int r = 0; r < send_counts[d]; r++, sent_row++)
                for (int i = 0; i < k; i++) theirs += sent_meta[(size_t)sent_row * k + i].local_slot >= 0;
            if ((int64_t)(at + mine) * H > INT_MAX || (int64_t)(got + theirs) * H > INT_MAX)
                return moe_err_fmt(msg, msg_size, MOE_ERR_RANGE,
                                   "combine: %d entries of %d exceed MPI's int counts; lower "
                                   "moe.chunking.max_tokens_per_chunk", local_recv, H);
            back_send[d] = mine * H, back_sdispl[d] = at * H;
            back_recv[d] = theirs * H, back_rdispl[d] = got * H;
            at += mine, got += theirs;
        }
        back = RESERVE(engine, back, float, (size_t)local_send * H);
        if (back == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "combine: out of memory");
        MOE_MPI_CHECK(MPI_Alltoallv(packed, back_send, back_sdispl, MPI_FLOAT, back, back_recv,
                                    back_rdispl, MPI_FLOAT, engine->ep.comm),
                      "combine entries (MPI_Alltoallv)");
    }
    const int32_t *send_token = engine->ws.send_token.ptr;
    if (n_tokens == 0) return MOE_OK; /* this rank only served others' tokens */
    float *per_entry = RESERVE(engine, per_entry, float, (size_t)n_tokens * k * H);
    if (per_entry == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "combine: out of memory");
    memset(per_entry, 0, sizeof(float) * (size_t)n_tokens * k * H);
    for (int j = 0, next = 0; j < n_send; j++)
        for (int i = 0; i < k; i++)
            if (sent_meta[(size_t)j * k + i].local_slot >= 0)
                memcpy(per_entry + ((size_t)send_token[j] * k + i) * H, back + (size_t)next++ * H,
                       sizeof(float) * H);
    sum_entries(per_entry, n_tokens, k, H, out);
    if (engine->cfg.model.shared_intermediate > 0 && !comm_only)
        MOE_CHECK(run_shared(engine, layer, x, n_tokens, out, msg, msg_size));
    return MOE_OK;
}

/* Step 1: logits and routing for all local tokens (before any collective, so
 * that a rejected input is known before the ranks agree). */
static moe_err_t route_all(moe_cpu_engine_t *engine, moe_cpu_layer_t *layer, const float *x,
                           int n_tokens, const int32_t *routed_ids, const float *routed_weights,
                           int32_t *ids, float *weights, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &engine->cfg.model;
    const int H = m->hidden, E = m->experts;
    float *logits = NULL;
    if (moe_route_needs_logits(m->routing.method)) {
        logits = RESERVE(engine, logits, float, (size_t)n_tokens * E);
        if (logits == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "router: out of memory");
#pragma omp parallel for schedule(static)
        for (int t = 0; t < n_tokens; t++)
            for (int e = 0; e < E; e++)
                logits[(size_t)t * E + e] = dot(x + (size_t)t * H, layer->router + (size_t)e * H, H);
    }
    moe_route_params_t params;
    moe_route_params_init(&params, m, layer->bias, layer->layer, engine->ep.rank, engine->ep.size);
    return moe_route_tokens(&params, logits, routed_ids, routed_weights, n_tokens, layer->step, 0,
                            ids, weights, msg, msg_size);
}

/* The forward; `failed` (msg set): this rank's input could not be
 * prepared, which it reports into the step agreement like any other
 * local error, so that no rank enters the exchanges alone. */
static moe_err_t forward(moe_cpu_engine_t *engine, int layer_id, const float *x, int n_tokens,
                         const int32_t *routed_ids, const float *routed_weights, float *out,
                         moe_route_trace_t *trace, moe_err_t failed, char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden, k = engine->cfg.model.top_k;
    moe_cpu_layer_t *layer = NULL;
    for (int i = 0; i < engine->n_layers; i++)
        if (engine->layers[i].layer == layer_id) layer = &engine->layers[i];
    moe_err_t local = failed;
    int32_t *ids = NULL;
    float *weights = NULL;
    if (local != MOE_OK) {
        /* msg holds the reason */
    } else if (layer == NULL || n_tokens < 0) {
        local = moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                            "layer %d is not served, or bad token count %d", layer_id, n_tokens);
    } else {
        ids = RESERVE(engine, step_ids, int32_t, (size_t)n_tokens * k);
        weights = RESERVE(engine, step_weights, float, (size_t)n_tokens * k);
        if (ids == NULL || weights == NULL)
            local = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "routing: out of memory");
        else
            local = route_all(engine, layer, x, n_tokens, routed_ids, routed_weights, ids, weights,
                              msg, msg_size);
    }
    /* Step 2: every rank runs the same number of chunks, or every rank fails. */
    int agree[2] = {local == MOE_OK ? n_tokens : 0, local != MOE_OK};
    if (engine->ep.size > 1)
        MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, agree, 2, MPI_INT, MPI_MAX, engine->ep.comm),
                      "step agreement (MPI_Allreduce)");
    /* refused before the agreement, on every rank alike: MOE_ERR_INVAL
     * (moe_backend.h), msg keeping this rank's own reason */
    if (local != MOE_OK) return MOE_ERR_INVAL;
    if (agree[1])
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "another rank could not start the step of layer %d (its input, or memory for it); "
                           "step skipped", layer_id);
    layer->step++;
    if (trace != NULL && trace->ids != NULL)
        memcpy(trace->ids, ids, sizeof(int32_t) * (size_t)n_tokens * k);
    if (trace != NULL && trace->weights != NULL)
        memcpy(trace->weights, weights, sizeof(float) * (size_t)n_tokens * k);
    if (trace != NULL && trace->slot_counts != NULL) {
        memset(trace->slot_counts, 0, sizeof(int64_t) * (size_t)layer->slots->n_slots);
        for (int t = 0; t < n_tokens; t++)
            for (int i = 0; i < k; i++)
                trace->slot_counts[moe_slots_pick(layer->slots, ids[(size_t)t * k + i],
                                                  engine->ep.rank, t)]++;
    }
    int chunk = engine->cfg.moe.chunking.max_tokens_per_chunk > 0
                    ? engine->cfg.moe.chunking.max_tokens_per_chunk
                    : agree[0] + 1;
    /* MPI counts are ints: a chunk's rows (or entry bytes) from every rank
     * must fit, whatever the config says; the same bound on every rank */
    const int64_t row_width = (int64_t)k * (H > 8 ? H : 8); /* a token's k entry results */
    const int64_t safe = INT_MAX / ((int64_t)engine->ep.size * row_width);
    if (chunk > safe) chunk = (int)(safe > 0 ? safe : 1);
    for (int begin = 0; begin < agree[0]; begin += chunk) {
        int count = n_tokens - begin;
        count = count < 0 ? 0 : count > chunk ? chunk : count;
        size_t row = (size_t)(count > 0 ? begin : 0);
        int chunk_max = agree[0] - begin < chunk ? agree[0] - begin : chunk;
        MOE_CHECK(forward_chunk(engine, layer, x + row * H, ids + row * k, weights + row * k,
                                count, begin, chunk_max, out + row * H, false, msg, msg_size));
    }
    return MOE_OK;
}

moe_err_t moe_cpu_forward(moe_cpu_engine_t *engine, int layer_id, const float *x, int n_tokens,
                          const int32_t *routed_ids, const float *routed_weights, float *out,
                          moe_route_trace_t *trace, char *msg, size_t msg_size) {
    return forward(engine, layer_id, x, n_tokens, routed_ids, routed_weights, out, trace, MOE_OK, msg, msg_size);
}

moe_err_t moe_cpu_forward_bf16(moe_cpu_engine_t *engine, int layer_id, const uint16_t *x, int n_tokens,
                               const int32_t *routed_ids, const float *routed_weights, uint16_t *out,
                               moe_route_trace_t *trace, char *msg, size_t msg_size) {
    const size_t values = n_tokens > 0 ? (size_t)n_tokens * (size_t)engine->cfg.model.hidden : 0;
    float *x_f32 = RESERVE(engine, bf16_x, float, values), *out_f32 = RESERVE(engine, bf16_out, float, values);
    moe_err_t failed = MOE_OK;
    if (x_f32 == NULL || out_f32 == NULL)
        failed = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "bf16 rows: out of memory for %zu values", values);
    else
        moe_dtype_to_f32(MOE_DTYPE_BF16, x, x_f32, values); /* exact */
    moe_err_t err = forward(engine, layer_id, x_f32, n_tokens, routed_ids, routed_weights, out_f32, trace, failed,
                            msg, msg_size);
    if (err == MOE_OK) moe_dtype_from_f32(MOE_DTYPE_BF16, out_f32, out, values); /* to nearest even */
    return err;
}

/* Median seconds of `reps` comm-only chunks of n tokens per rank with the
 * exchange forced by threshold; the slowest rank's. */
static moe_err_t time_exchange(moe_cpu_engine_t *engine, int n, int threshold, double *seconds,
                               char *msg, size_t msg_size) {
    const int H = engine->cfg.model.hidden, k = engine->cfg.model.top_k, E = engine->cfg.model.experts;
    float *x = calloc((size_t)n * H + 1, sizeof(float)), *out = calloc((size_t)n * H + 1, sizeof(float));
    float *w = calloc((size_t)n * k + 1, sizeof(float));
    int32_t *ids = calloc((size_t)n * k + 1, sizeof(int32_t));
    moe_err_t ret = MOE_OK;
    if (x == NULL || out == NULL || w == NULL || ids == NULL)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "moe.comm auto: out of memory");
    for (int p = 0; ret == MOE_OK && p < n * k; p++) /* experts spread evenly, distinct per token */
        ids[p] = (int32_t)((p / k * 7 + p % k + engine->ep.rank * 3) % E), w[p] = 1.0f / k;
    /* the timing is collective: every rank's buffers must be there */
    int ready = ret == MOE_OK;
    if (MPI_Allreduce(MPI_IN_PLACE, &ready, 1, MPI_INT, MPI_MIN, engine->ep.comm) != MPI_SUCCESS) ready = 0;
    if (ret == MOE_OK && !ready)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "moe.comm auto: another rank could not set up the timing");
    const int saved = engine->allgather_max_tokens;
    engine->allgather_max_tokens = threshold;
    double samples[5] = {0};
    bool failed_anywhere = false;
    for (int rep = 0; rep < 5; rep++) {
        /* a barrier that also agrees every rank is still fine, so that a
         * rank's failure stops all of them at the same point */
        int ok = ret == MOE_OK;
        if (MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, engine->ep.comm) != MPI_SUCCESS) ok = 0;
        if (!ok) {
            failed_anywhere = true;
            break;
        }
        double start = MPI_Wtime();
        ret = forward_chunk(engine, &engine->layers[0], x, ids, w, n, 0, n, out, true, msg, msg_size);
        samples[rep] = MPI_Wtime() - start;
    }
    engine->allgather_max_tokens = saved;
    for (int i = 1; i < 5; i++) /* insertion sort of 5 */
        for (int j = i; j > 0 && samples[j] < samples[j - 1]; j--) {
            double tmp = samples[j];
            samples[j] = samples[j - 1], samples[j - 1] = tmp;
        }
    /* the slowest rank's median, and whether any rank failed after the last vote */
    double result[2] = {samples[2], ret != MOE_OK || failed_anywhere ? 1.0 : 0.0};
    if (MPI_Allreduce(MPI_IN_PLACE, result, 2, MPI_DOUBLE, MPI_MAX, engine->ep.comm) != MPI_SUCCESS && ret == MOE_OK)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "moe.comm auto: MPI_Allreduce failed");
    if (ret == MOE_OK && result[1] > 0)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "moe.comm auto: another rank's timing failed");
    *seconds = result[0];
    free(x), free(out), free(w), free(ids);
    return ret;
}

moe_err_t moe_cpu_tune_comm(moe_cpu_engine_t *engine, char *msg, size_t msg_size) {
    const moe_comm_kind_t comm = engine->cfg.moe.comm;
    engine->allgather_max_tokens = comm == MOE_COMM_ALLGATHER ? INT_MAX : -1;
    if (comm != MOE_COMM_AUTO || engine->ep.size == 1 || engine->n_layers == 0) return MOE_OK;
    const char *forced = getenv("MOE_COMM_ALLGATHER_MAX_TOKENS"); /* tests: a fixed threshold, no timing */
    if (forced != NULL) {
        engine->allgather_max_tokens = atoi(forced);
        return MOE_OK;
    }
    /* allgather while it is at least as fast, from 1 token per rank up */
    int n = 1;
    for (; n <= MOE_COMM_TUNE_MAX; n *= 2) {
        double a2a = 0, ag = 0;
        MOE_CHECK(time_exchange(engine, n, -1, &a2a, msg, msg_size));
        MOE_CHECK(time_exchange(engine, n, INT_MAX, &ag, msg, msg_size));
        if (engine->ep.rank == 0)
            moe_log(MOE_LOG_DEBUG, "comm", "%d tokens/rank: alltoall %.3f ms, allgather %.3f ms", n,
                    a2a * 1e3, ag * 1e3);
        if (ag > a2a) break;
    }
    engine->allgather_max_tokens = n / 2 >= 1 ? n / 2 : -1; /* n/2: the last size allgather won */
    if (engine->ep.rank == 0 && engine->allgather_max_tokens > 0)
        moe_log(MOE_LOG_INFO, "comm", "moe.comm auto: allgather up to %d tokens per rank per chunk, "
                "alltoall above (measured)", engine->allgather_max_tokens);
    else if (engine->ep.rank == 0)
        moe_log(MOE_LOG_INFO, "comm", "moe.comm auto: alltoall for every chunk (allgather measured "
                "slower already at 1 token per rank)");
    return MOE_OK;
}
