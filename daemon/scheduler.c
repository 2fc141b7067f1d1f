/* scheduler: the step loop of DESIGN §3 on the compute thread.
 *   1. take new requests into per-layer FIFOs (timed-out ones are answered);
 *   2. agree with every rank (MPI_Iallgather of pending tokens per layer,
 *      starvation flags, the config epoch rank 0 wants, drain and shutdown);
 *   3. at the boundary: a new config (broadcast from rank 0), drain, exit;
 *   4. choose the layer identically everywhere: a starving layer (oldest
 *      request older than scheduler.max_wait_ms) first, then the most
 *      pending tokens, ties to the lower layer;
 *   5. take whole requests FIFO up to moe.max_tokens_per_step and run the
 *      layer (a collective: a rank without tokens joins with none);
 *   6. hand results to the I/O thread; reduce slot loads to rank 0.
 * Collectives are waited on with MPI_Test and short sleeps, so an idle rank
 * does not spin a core, and the watchdog can see how long one has lasted. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../config/moe_log.h"
#include "../kernels/moe_eplb.h"
#include "../protocol/moe_frame.h"
#include "moe_daemon.h"
#include "moe_step_rows.h"

typedef struct {
    moe_request_t *head, *tail;
    long long tokens;
} fifo_t;

typedef struct {
    moe_daemon_t *daemon;
    bool closed;           /* this rank's inbound queue is closed (shutdown) */
    long long last_rebalance_check; /* the step EPLB last looked at */
    fifo_t *fifos;
    int n_layers;
    long long *record;     /* this rank's agreement record */
    long long *records;    /* every rank's */
    size_t step_capacity;  /* tokens the step buffers hold */
    bool bf16_capable;     /* the backend has forward_bf16: steps of bf16 requests use bf16 rows */
    void *step_x, *step_out;
    bool x_pinned, out_pinned; /* from the backend's host_alloc (else malloc) */
    bool pin_warned;           /* a refused host_alloc was logged */
    int32_t *step_ids;
    float *step_weights;
    int64_t *slot_loads, *slot_loads_sum;
    struct { /* an EPLB migration loading in the background (DESIGN §6) */
        bool active;
        int layer;
        double before, after, start;
        int placement[MOE_MAX_SLOTS];
        int resume;       /* layer position to look at next once it is in (-1: none) */
        bool forced;      /* ... for a `rebalance` command */
        long long forced_layer;
    } migration;
} scheduler_t;

/* REC_MIGRATION: this rank's migration, 0 none or loading, 1 loaded, 2 failed */
enum { REC_EPOCH = 0, REC_DRAIN, REC_SHUTDOWN, REC_CLOSED, REC_REBALANCE, REC_MIGRATION, REC_COUNTERS,
       REC_FIXED = REC_COUNTERS + MOE_COUNTERS };

static void sleep_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

/* Waits for a nonblocking collective without spinning a core. */
static int wait_request(moe_daemon_t *daemon, MPI_Request *request) {
    int done = 0, spins = 0;
    daemon->collective_since = moe_now();
    for (;;) {
        int rc = MPI_Test(request, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS || done) {
            daemon->collective_since = 0;
            return rc;
        }
        sleep_us(spins++ < 100 ? 5 : 100);
    }
}

/* Starts a nonblocking collective (its MPI_I* call's return code in
 * `started`) and waits for it; a failure is logged with MPI's message and
 * returned as MOE_ERR_MPI. */
static moe_err_t collective(moe_daemon_t *daemon, int started, MPI_Request *request, const char *what) {
    int rc = started == MPI_SUCCESS ? wait_request(daemon, request) : started;
    if (rc == MPI_SUCCESS) return MOE_OK;
    char text[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, text, &len);
    moe_log(MOE_LOG_ERROR, "step", "%s failed: %s", what, text);
    return MOE_ERR_MPI;
}

/* Hands a request back to the I/O thread; the caller must not touch it after. */
static void answer(moe_daemon_t *daemon, moe_request_t *request, uint32_t status, const char *text) {
    request->status = status;
    if (text != NULL) snprintf(request->error, sizeof request->error, "%s", text);
    atomic_fetch_sub(&daemon->queued_tokens, request->n_tokens);
    atomic_fetch_sub(&daemon->queued_requests, 1);
    request->done.kind = MOE_EVENT_RESULT;
    request->done.request = request;
    moe_daemon_post(daemon, &request->done);
}

static int layer_position(const moe_config_t *cfg, int layer) {
    for (int i = 0; i < cfg->model.n_layers; i++)
        if (cfg->model.layer_ids[i] == layer) return i;
    return -1;
}

static void take_new(scheduler_t *s, long wait_us) {
    moe_daemon_t *daemon = s->daemon;
    moe_request_t *list = moe_queue_take_all(&daemon->inbound, wait_us);
    while (list != NULL) {
        moe_request_t *request = list;
        list = list->next;
        request->next = NULL;
        int pos = layer_position(&daemon->cfg, request->layer);
        if (pos < 0) { /* the I/O thread checked; a reload cannot change layers */
            answer(daemon, request, MOE_STATUS_BAD_LAYER, "layer not served");
            continue;
        }
        fifo_t *fifo = &s->fifos[pos];
        if (fifo->tail != NULL) fifo->tail->next = request;
        else fifo->head = request;
        fifo->tail = request;
        fifo->tokens += request->n_tokens;
    }
}

/* Drops queued requests whose client is gone (its answer would be thrown
 * away: computing it would only delay everyone else), answers `timeout` for
 * those that waited past serve.request_timeout_ms, and publishes the oldest
 * arrival for health. */
static void expire_and_age(scheduler_t *s, double now) {
    moe_daemon_t *daemon = s->daemon;
    double limit = daemon->cfg.serve.request_timeout_ms / 1e3, oldest = 0;
    for (int l = 0; l < s->n_layers; l++) {
        fifo_t *fifo = &s->fifos[l];
        moe_request_t **link = &fifo->head, *last = NULL;
        while (*link != NULL) {
            moe_request_t *request = *link;
            bool gone = request->cancelled != NULL && atomic_load(request->cancelled);
            if (!gone && now - request->arrival <= limit) {
                last = request;
                link = &request->next;
                continue;
            }
            *link = request->next;
            fifo->tokens -= request->n_tokens;
            answer(daemon, request, gone ? MOE_STATUS_INTERNAL : MOE_STATUS_TIMEOUT,
                   gone ? "client disconnected" : "request waited longer than serve.request_timeout_ms");
        }
        fifo->tail = last;
        if (fifo->head != NULL && (oldest == 0 || fifo->head->arrival < oldest)) oldest = fifo->head->arrival;
    }
    daemon->oldest_queued = oldest;
}

static moe_err_t agree(scheduler_t *s, double now) {
    moe_daemon_t *daemon = s->daemon;
    long long *rec = s->record;
    double max_wait = daemon->cfg.scheduler.max_wait_ms / 1e3;
    pthread_mutex_lock(&daemon->reload_lock);
    rec[REC_EPOCH] = daemon->pending_config != NULL ? daemon->pending_epoch : daemon->epoch;
    pthread_mutex_unlock(&daemon->reload_lock);
    rec[REC_DRAIN] = atomic_load(&daemon->draining);
    rec[REC_SHUTDOWN] = atomic_load(&daemon->shutdown);
    rec[REC_CLOSED] = s->closed;
    rec[REC_REBALANCE] = daemon->ep.rank == 0 ? atomic_exchange(&daemon->rebalance_requested, 0) : 0;
    rec[REC_MIGRATION] = 0;
    if (s->migration.active) {
        int state = daemon->backend.ops->migrate_poll(daemon->backend.state);
        rec[REC_MIGRATION] = state == MOE_TASK_DONE ? 1 : state == MOE_TASK_FAILED ? 2 : 0;
    }
    moe_stats_local_counters(&daemon->stats, moe_now(), atomic_load(&daemon->queued_requests), rec + REC_COUNTERS);
    for (int l = 0; l < s->n_layers; l++) {
        rec[REC_FIXED + l] = s->fifos[l].tokens;
        rec[REC_FIXED + s->n_layers + l] = s->fifos[l].head != NULL && now - s->fifos[l].head->arrival > max_wait;
    }
    int count = REC_FIXED + 2 * s->n_layers;
    if (daemon->ep.size == 1) {
        memcpy(s->records, rec, sizeof(long long) * (size_t)count);
        moe_stats_set_cluster(&daemon->stats, rec + REC_COUNTERS);
        return MOE_OK;
    }
    MPI_Request request;
    MOE_CHECK(collective(daemon, MPI_Iallgather(rec, count, MPI_LONG_LONG, s->records, count, MPI_LONG_LONG,
                                                daemon->ep.comm, &request),
                         &request, "agreement (MPI_Iallgather)"));
    if (daemon->ep.rank == 0) {
        long long sums[MOE_COUNTERS] = {0};
        for (int r = 0; r < daemon->ep.size; r++)
            for (int c = 0; c < MOE_COUNTERS; c++) sums[c] += s->records[(size_t)r * count + REC_COUNTERS + c];
        moe_stats_set_cluster(&daemon->stats, sums);
    }
    return MOE_OK;
}

/* Rank 0's wanted epoch is ahead: every rank takes its config now. */
static moe_err_t apply_reload(scheduler_t *s, int epoch) {
    moe_daemon_t *daemon = s->daemon;
    moe_config_t *next = malloc(sizeof *next);
    if (next == NULL) return MOE_ERR_NOMEM;
    if (daemon->ep.rank == 0) {
        pthread_mutex_lock(&daemon->reload_lock);
        *next = *daemon->pending_config;
        free(daemon->pending_config);
        daemon->pending_config = NULL;
        pthread_mutex_unlock(&daemon->reload_lock);
    }
    if (daemon->ep.size > 1) {
        MPI_Request request;
        if (collective(daemon, MPI_Ibcast(next, (int)sizeof *next, MPI_BYTE, 0, daemon->ep.comm, &request), &request,
                       "config broadcast (MPI_Ibcast)") != MOE_OK) {
            free(next);
            return MOE_ERR_MPI;
        }
    }
    daemon->cfg = *next;
    daemon->epoch = epoch;
    atomic_store(&daemon->stall_timeout_ms, next->scheduler.stall_timeout_ms);
    moe_log_set_level((moe_log_level_t)next->log.level);
    daemon->backend.ops->reconfigure(daemon->backend.state, next);
    moe_stats_reconfigure(&daemon->stats, next);
    if (daemon->backend.ops->gemm != NULL)
        moe_stats_set_gemm(&daemon->stats, daemon->backend.ops->gemm(daemon->backend.state));
    long long step = atomic_load(&daemon->step);
    if (daemon->ep.rank == 0)
        moe_log(MOE_LOG_INFO, "reload", "config epoch %d (%s) applied at step %lld on every rank", epoch,
                next->source_path, step);
    moe_event_t *event = calloc(1, sizeof *event);
    if (event == NULL) {
        free(next);
        return MOE_ERR_NOMEM;
    }
    event->kind = MOE_EVENT_CONFIG;
    event->config = next;
    event->epoch = epoch;
    event->step = step;
    event->ok = true;
    moe_daemon_post(daemon, event);
    return MOE_OK;
}

/* EPLB online (DESIGN §6): a placement from the window's expert loads,
 * computed identically on every rank, adopted when it cuts the predicted
 * imbalance by eplb.min_improvement (or when `rebalance` forced it and it
 * is better at all). Adopting starts the weight loads in the background on
 * every rank (*started); serving goes on with the current placement until
 * every rank reports its loads done (finish_migration). */
static moe_err_t rebalance_layer(scheduler_t *s, int layer, bool forced, bool *started) {
    moe_daemon_t *daemon = s->daemon;
    const moe_config_t *cfg = &daemon->cfg;
    const int E = cfg->model.experts, R = daemon->ep.size;
    const int n_slots = daemon->backend.ops->slot_count(daemon->backend.state);
    double loads[MOE_MAX_EXPERTS], total = 0;
    *started = false;
    moe_stats_window_expert_loads(&daemon->stats, layer, atomic_load(&daemon->step), loads);
    for (int e = 0; e < E; e++) total += loads[e];
    if (total <= 0) return MOE_OK;
    const int *current = daemon->backend.ops->placement(daemon->backend.state, layer);
    int *next = s->migration.placement;
    char msg[512] = "";
    if (moe_eplb_place(loads, E, n_slots, R, cfg->eplb.ranks_per_node, next, NULL, msg, sizeof msg) != MOE_OK) {
        moe_log(MOE_LOG_WARN, "eplb", "layer %d: no placement: %s", layer, msg);
        return MOE_OK;
    }
    double before = moe_eplb_imbalance(loads, E, current, n_slots, R, NULL);
    double after = moe_eplb_imbalance(loads, E, next, n_slots, R, NULL);
    bool adopt = forced ? after < before : moe_eplb_should_adopt(before, after, cfg->eplb.min_improvement);
    if (!adopt || memcmp(current, next, sizeof(int) * (size_t)n_slots) == 0) return MOE_OK;
    moe_err_t err = daemon->backend.ops->migrate_begin(daemon->backend.state, layer, next, msg, sizeof msg);
    if (err != MOE_OK) /* reported as failed at the next agreement: every rank drops it there */
        moe_log(MOE_LOG_ERROR, "eplb", "layer %d: rank %d cannot start the migration: %s", layer, daemon->ep.rank, msg);
    s->migration.active = true;
    s->migration.layer = layer;
    s->migration.before = before, s->migration.after = after;
    s->migration.start = moe_now();
    moe_stats_loading(&daemon->stats, layer, true);
    *started = true;
    if (daemon->ep.rank == 0)
        moe_log(MOE_LOG_INFO, "eplb", "layer %d: new placement (predicted imbalance %.3f -> %.3f); loading weights "
                "while serving", layer, before, after);
    return MOE_OK;
}

/* The layers of a rebalance from position `from`: stops at the first one
 * that starts a migration (one at a time) and remembers where to go on. */
static moe_err_t rebalance_from(scheduler_t *s, int from, long long forced) {
    moe_daemon_t *daemon = s->daemon;
    s->migration.resume = -1;
    for (int l = from; l < s->n_layers; l++) {
        int layer = daemon->cfg.model.layer_ids[l];
        if (forced > 0 && forced - 1 != layer) continue;
        bool started = false;
        MOE_CHECK(rebalance_layer(s, layer, forced != 0, &started));
        if (started) {
            s->migration.resume = l + 1 < s->n_layers ? l + 1 : -1;
            s->migration.forced_layer = forced;
            return MOE_OK;
        }
    }
    return MOE_OK;
}

/* Every rank reported its loads (all done, or one failed): all swap in at
 * this boundary, or all drop the new placement and serve on with the old
 * one. A swap that fails on any rank ends the job: ranks serving with
 * different placements would compute wrong results. */
static moe_err_t finish_migration(scheduler_t *s, bool commit) {
    moe_daemon_t *daemon = s->daemon;
    const int layer = s->migration.layer;
    char msg[512] = "";
    int64_t bytes = 0;
    moe_err_t err = daemon->backend.ops->migrate_end(daemon->backend.state, commit, &bytes, msg, sizeof msg);
    s->migration.active = false;
    moe_stats_loading(&daemon->stats, layer, false);
    long long result[2] = {commit && err != MOE_OK, bytes};
    if (daemon->ep.size > 1) {
        MPI_Request request;
        MOE_CHECK(collective(daemon, MPI_Iallreduce(MPI_IN_PLACE, result, 2, MPI_LONG_LONG, MPI_SUM, daemon->ep.comm,
                                                    &request),
                             &request, "migration outcome (MPI_Iallreduce)"));
    }
    if (!commit) {
        moe_log(MOE_LOG_ERROR, "eplb", "layer %d: loading the new placement failed%s%s; every rank keeps the "
                "current one", layer, err != MOE_OK ? " here: " : " on another rank", err != MOE_OK ? msg : "");
        return MOE_OK;
    }
    if (result[0] != 0) {
        moe_log(MOE_LOG_ERROR, "eplb", "layer %d: the swap failed on %lld rank(s)%s%s; ending the job", layer, result[0],
                err != MOE_OK ? ": " : "", err != MOE_OK ? msg : "");
        return MOE_ERR_INTERNAL;
    }
    double ms = (moe_now() - s->migration.start) * 1e3;
    moe_stats_rebalanced(&daemon->stats, layer, s->migration.placement, s->migration.before, s->migration.after,
                         result[1], ms);
    if (daemon->ep.rank == 0)
        moe_log(MOE_LOG_INFO, "eplb", "layer %d: new placement in at step %lld, predicted imbalance %.3f -> %.3f; "
                "%lld bytes of weights loaded, %.1f ms from decision to swap", layer,
                (long long)atomic_load(&daemon->step), s->migration.before, s->migration.after, result[1], ms);
    return MOE_OK;
}

/* The activations of a step, in and out, in the backend's host memory
 * (cuda: pinned, so they go to and from the GPU by DMA with no staging
 * pass; measured in the README), else malloc's — also when the backend's
 * is refused (logged once: forward still works, through its staging). */
static void *step_alloc(scheduler_t *s, size_t bytes, bool *pinned) {
    const moe_backend_t *b = &s->daemon->backend;
    *pinned = false;
    if (b->ops->host_alloc != NULL) {
        char msg[256];
        void *ptr = NULL;
        if (b->ops->host_alloc(b->state, bytes, &ptr, msg, sizeof msg) == MOE_OK) {
            *pinned = true;
            return ptr;
        }
        if (!s->pin_warned)
            moe_log(MOE_LOG_WARN, "step", "%s; the step buffers use ordinary memory (slower copies)", msg);
        s->pin_warned = true;
    }
    return malloc(bytes);
}
static void step_free(scheduler_t *s, void *ptr, bool pinned) {
    const moe_backend_t *b = &s->daemon->backend;
    if (pinned) b->ops->host_free(b->state, ptr);
    else free(ptr);
}

static bool grow_step_buffers(scheduler_t *s, size_t tokens) {
    if (tokens == 0) tokens = 1; /* a rank without tokens still passes real buffers */
    if (tokens <= s->step_capacity) return true;
    const moe_model_config_t *m = &s->daemon->cfg.model;
    size_t H = (size_t)m->hidden, k = (size_t)m->top_k;
    /* 1.5x ahead, up to a full step (pinning is slow: not on every new
     * largest step); new buffers, not realloc: nothing in them outlives a step */
    size_t full = (size_t)s->daemon->cfg.moe.max_tokens_per_step, ahead = s->step_capacity * 3 / 2;
    if (ahead > full) ahead = full;
    if (tokens < ahead) tokens = ahead;
    bool pinned;
    const size_t bytes = sizeof(float) * tokens * H; /* float32 rows; bf16 rows use half */
    void *x = step_alloc(s, bytes, &pinned);
    if (x != NULL) step_free(s, s->step_x, s->x_pinned), s->step_x = x, s->x_pinned = pinned;
    void *out = step_alloc(s, bytes, &pinned);
    if (out != NULL) step_free(s, s->step_out, s->out_pinned), s->step_out = out, s->out_pinned = pinned;
    int32_t *ids = realloc(s->step_ids, sizeof(int32_t) * tokens * k);
    if (ids != NULL) s->step_ids = ids;
    float *w = realloc(s->step_weights, sizeof(float) * tokens * k);
    if (w != NULL) s->step_weights = w;
    if (x == NULL || out == NULL || ids == NULL || w == NULL) return false;
    s->step_capacity = tokens;
    return true;
}

/* Steps 4-6 for the chosen layer position. */
static moe_err_t run_step(scheduler_t *s, int pos) {
    moe_daemon_t *daemon = s->daemon;
    const moe_config_t *cfg = &daemon->cfg;
    const size_t H = (size_t)cfg->model.hidden, k = (size_t)cfg->model.top_k;
    fifo_t *fifo = &s->fifos[pos];
    moe_request_t *taken = NULL, **tail = &taken;
    long long tokens = 0;
    while (fifo->head != NULL &&
           (taken == NULL || tokens + fifo->head->n_tokens <= cfg->moe.max_tokens_per_step)) {
        moe_request_t *request = fifo->head;
        fifo->head = request->next;
        if (fifo->head == NULL) fifo->tail = NULL;
        fifo->tokens -= request->n_tokens;
        tokens += request->n_tokens;
        request->next = NULL;
        *tail = request;
        tail = &request->next;
    }
    bool ok = grow_step_buffers(s, (size_t)tokens);
    if (!ok) tokens = 0; /* still join the collective, with nothing */
    size_t at = 0;
    bool routed = cfg->model.routing.method == MOE_ROUTE_CLIENT;
    /* bf16 rows when every request is bf16 (half the bytes to and from the
     * GPU, each payload copied as it is); float32 rows otherwise: rounding
     * f32 requests to bf16 on the host and widening their answers cost
     * more than the copies save (1024-token f32 requests, one run on an
     * H200: 156k -> 142k tokens/s), they keep their float32 output, and
     * f16 ones their precision on the CPU backend */
    bool bf16 = s->bf16_capable;
    for (moe_request_t *r = taken; r != NULL; r = r->next)
        if (r->dtype != MOE_DTYPE_BF16) bf16 = false;
    const size_t row_bytes = moe_step_value_size(bf16) * H;
    for (moe_request_t *r = taken; ok && r != NULL; r = r->next) {
        moe_step_rows_in(r->dtype, r->x, bf16, (uint8_t *)s->step_x + at * row_bytes, (size_t)r->n_tokens * H);
        if (routed) {
            memcpy(s->step_ids + at * k, r->routed_ids, sizeof(int32_t) * r->n_tokens * k);
            memcpy(s->step_weights + at * k, r->routed_weights, sizeof(float) * r->n_tokens * k);
        }
        at += (size_t)r->n_tokens;
    }
    char msg[512] = "";
    moe_route_trace_t trace = {NULL, NULL, s->slot_loads, NULL, false};
    double start = moe_now();
    /* with peers, a step that never ends is a peer gone: the watchdog's to see */
    if (daemon->ep.size > 1) daemon->collective_since = start;
    const moe_backend_ops_t *ops = daemon->backend.ops;
    const int layer = cfg->model.layer_ids[pos];
    moe_err_t err = bf16 ? ops->forward_bf16(daemon->backend.state, layer, s->step_x, (int)tokens,
                                                     routed ? s->step_ids : NULL, routed ? s->step_weights : NULL,
                                                     s->step_out, &trace, msg, sizeof msg)
                                 : ops->forward(daemon->backend.state, layer, s->step_x, (int)tokens,
                                                routed ? s->step_ids : NULL, routed ? s->step_weights : NULL,
                                                s->step_out, &trace, msg, sizeof msg);
    daemon->collective_since = 0;
    double elapsed = moe_now() - start;
    if (err != MOE_OK) {
        moe_log(MOE_LOG_ERROR, "step", "layer %d forward of %lld tokens failed: %s",
                cfg->model.layer_ids[pos], tokens, msg);
        /* Only a rejection before the ranks agreed (MOE_ERR_INVAL) leaves every
         * rank in the same place; any later failure may have left the other
         * ranks inside a collective, so the job must end, not go on. */
        if (err != MOE_ERR_INVAL && daemon->ep.size > 1) return err;
    } else if (!ok) {
        snprintf(msg, sizeof msg, "out of memory for a step of this size");
    }
    at = 0;
    while (taken != NULL) {
        /* read what is needed first: once answered, the request belongs to the
         * I/O thread, which frees it at once when its client is gone */
        moe_request_t *r = taken;
        size_t n_tokens = (size_t)r->n_tokens;
        taken = r->next;
        if (err == MOE_OK && ok) {
            moe_step_rows_out(r->dtype, r->x, bf16, (uint8_t *)s->step_out + at * row_bytes, n_tokens * H);
            answer(daemon, r, MOE_STATUS_OK, NULL);
        } else {
            answer(daemon, r, MOE_STATUS_INTERNAL, msg);
        }
        at += n_tokens;
    }
    /* slot loads of this step, summed on rank 0 for stats and EPLB */
    int n_slots = daemon->backend.ops->slot_count(daemon->backend.state);
    if (err != MOE_OK) memset(s->slot_loads, 0, sizeof(int64_t) * (size_t)n_slots);
    long long step = atomic_fetch_add(&daemon->step, 1) + 1;
    if (daemon->ep.size > 1) {
        MPI_Request request;
        /* every rank keeps the same window, so that EPLB computes the same
         * placement everywhere without a broadcast (DESIGN §6). Counts the
         * backend summed already (CUDA: on its balancer communicator) are
         * the same on every rank: MAX keeps them (and a rank whose step
         * failed, with zeros, takes the others'). The op comes from the
         * backend, not the step, so every rank passes the same one. */
        MPI_Op op = daemon->backend.ops->counts_summed ? MPI_MAX : MPI_SUM;
        MOE_CHECK(collective(daemon, MPI_Iallreduce(s->slot_loads, s->slot_loads_sum, n_slots, MPI_INT64_T, op,
                                                    daemon->ep.comm, &request),
                             &request, "slot loads (MPI_Iallreduce)"));
    } else {
        memcpy(s->slot_loads_sum, s->slot_loads, sizeof(int64_t) * (size_t)n_slots);
    }
    moe_stats_step(&daemon->stats, step, cfg->model.layer_ids[pos], elapsed, s->slot_loads_sum);
    daemon->last_step_done = moe_now();
    return MOE_OK;
}

static int choose_layer(const scheduler_t *s, long long *total_out) {
    const int n_ranks = s->daemon->ep.size, count = REC_FIXED + 2 * s->n_layers;
    int best = -1;
    long long best_tokens = 0, total = 0;
    bool best_starving = false;
    for (int l = 0; l < s->n_layers; l++) {
        long long tokens = 0;
        bool starving = false;
        for (int r = 0; r < n_ranks; r++) {
            tokens += s->records[(size_t)r * count + REC_FIXED + l];
            starving |= s->records[(size_t)r * count + REC_FIXED + s->n_layers + l] != 0;
        }
        total += tokens;
        if (tokens == 0) continue;
        if (best < 0 || (starving && !best_starving) ||
            (starving == best_starving && tokens > best_tokens)) {
            best = l;
            best_tokens = tokens;
            best_starving = starving;
        }
    }
    *total_out = total;
    return best;
}

static void scheduler_free(scheduler_t *s) {
    free(s->fifos);
    free(s->record);
    free(s->records);
    step_free(s, s->step_x, s->x_pinned);
    step_free(s, s->step_out, s->out_pinned);
    free(s->step_ids);
    free(s->step_weights);
    free(s->slot_loads);
    free(s->slot_loads_sum);
}

moe_err_t moe_scheduler_run(moe_daemon_t *daemon) {
    scheduler_t s;
    memset(&s, 0, sizeof s);
    s.daemon = daemon;
    s.bf16_capable = daemon->backend.ops->forward_bf16 != NULL;
    s.n_layers = daemon->cfg.model.n_layers;
    int count = REC_FIXED + 2 * s.n_layers, n_slots = daemon->backend.ops->slot_count(daemon->backend.state);
    s.fifos = calloc((size_t)s.n_layers, sizeof *s.fifos);
    s.record = calloc((size_t)count, sizeof(long long));
    s.records = calloc((size_t)count * daemon->ep.size, sizeof(long long));
    s.slot_loads = calloc((size_t)n_slots, sizeof(int64_t));
    s.slot_loads_sum = calloc((size_t)n_slots, sizeof(int64_t));
    if (!s.fifos || !s.record || !s.records || !s.slot_loads || !s.slot_loads_sum) {
        scheduler_free(&s);
        return MOE_ERR_NOMEM;
    }
    moe_err_t ret = MOE_OK;
    long idle_us = daemon->cfg.scheduler.idle_poll_us;
    double watchdog_interval = 0, last_watchdog = 0;
    bool systemd_watchdog = daemon->ep.rank == 0 && moe_notify_watchdog_enabled(&watchdog_interval);
    for (;;) {
        double now = moe_now();
        take_new(&s, 0);
        expire_and_age(&s, now);
        if ((ret = agree(&s, now)) != MOE_OK) break;
        if (systemd_watchdog && now - last_watchdog > watchdog_interval / 2) {
            moe_notify("WATCHDOG=1");
            last_watchdog = now;
        }
        /* step boundary: what every rank agreed on */
        if (s.records[REC_EPOCH] > daemon->epoch && (ret = apply_reload(&s, (int)s.records[REC_EPOCH])) != MOE_OK)
            break;
        /* EPLB at the boundary: a migration every rank has loaded (or one
         * that failed somewhere) is finished first; then, every
         * rebalance_every_steps steps or when rank 0 was asked (record of
         * rank 0: -1 every layer, else layer+1), a new one may start */
        if (s.migration.active) {
            bool all_loaded = true, failed = false;
            for (int r = 0; r < daemon->ep.size; r++) {
                long long state = s.records[(size_t)r * count + REC_MIGRATION];
                all_loaded &= state == 1;
                failed |= state == 2;
            }
            if (failed || all_loaded) {
                if ((ret = finish_migration(&s, !failed)) != MOE_OK) break;
                if (s.migration.resume >= 0 && (ret = rebalance_from(&s, s.migration.resume,
                                                                     s.migration.forced_layer)) != MOE_OK)
                    break;
            }
        }
        long long forced = s.records[REC_REBALANCE];
        long long steps_done = atomic_load(&daemon->step);
        if (daemon->cfg.eplb.mode == MOE_EPLB_ONLINE && !s.migration.active &&
            (forced != 0 || (steps_done > 0 && steps_done != s.last_rebalance_check &&
                             steps_done % daemon->cfg.eplb.rebalance_every_steps == 0))) {
            s.last_rebalance_check = steps_done;
            if ((ret = rebalance_from(&s, 0, forced)) != MOE_OK) break;
        } else if (forced != 0 && s.migration.active && daemon->ep.rank == 0) {
            moe_log(MOE_LOG_INFO, "eplb", "rebalance: ignored, layer %d is still loading its new placement; ask "
                    "again once it is in", s.migration.layer);
        }
        bool drain = false, shutdown = false, all_closed = true;
        for (int r = 0; r < daemon->ep.size; r++) {
            drain |= s.records[(size_t)r * count + REC_DRAIN] != 0;
            shutdown |= s.records[(size_t)r * count + REC_SHUTDOWN] != 0;
            all_closed &= s.records[(size_t)r * count + REC_CLOSED] != 0;
        }
        if (drain && !atomic_load(&daemon->draining)) moe_server_request_drain(daemon, shutdown);
        /* Shutdown: first every rank closes its inbound queue (a request that
         * races the close is answered shutting_down by the I/O thread, never
         * dropped) and takes what was admitted into its FIFOs; the ranks stop
         * only once all queues are closed and no rank has work left. */
        if (shutdown && !s.closed) {
            moe_queue_close(&daemon->inbound);
            s.closed = true;
            continue;
        }
        long long total = 0;
        int pos = choose_layer(&s, &total);
        daemon->cluster_pending = total;
        if (pos < 0) {
            if (shutdown && all_closed) break; /* every rank saw the same: nothing left anywhere */
            /* idle: wait for a local arrival, backing off up to 2 ms so an
             * idle job costs little CPU; an arrival resets the backoff */
            if (moe_queue_wait(&daemon->inbound, idle_us)) {
                idle_us = daemon->cfg.scheduler.idle_poll_us;
            } else {
                long cap = daemon->cfg.scheduler.idle_poll_us > 2000 ? daemon->cfg.scheduler.idle_poll_us : 2000;
                idle_us = idle_us * 2 < cap ? idle_us * 2 : cap;
            }
            continue;
        }
        idle_us = daemon->cfg.scheduler.idle_poll_us;
        if ((ret = run_step(&s, pos)) != MOE_OK) break;
    }
    /* answer whatever is left (only after a failure): close the inbound queue
     * and take what it holds, so no admitted request goes unanswered */
    moe_server_request_drain(daemon, true);
    moe_queue_close(&daemon->inbound);
    take_new(&s, 0);
    for (int l = 0; l < s.n_layers; l++)
        while (s.fifos[l].head != NULL) {
            moe_request_t *r = s.fifos[l].head;
            s.fifos[l].head = r->next;
            answer(daemon, r, MOE_STATUS_INTERNAL, "the daemon stopped");
        }
    scheduler_free(&s);
    return ret;
}
