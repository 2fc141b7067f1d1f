/* bench_eplb: measured rank loads and a rebalance for moe-bench --rebalance
 * (see bench_eplb.h). */
#include "bench_eplb.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../kernels/moe_eplb.h"

double moe_bench_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The largest of every rank's flag (collective; no MPI on one rank). */
static moe_err_t any_rank(moe_ep_t ep, int *flag, char *msg, size_t msg_size) {
    if (ep.size > 1 && MPI_Allreduce(MPI_IN_PLACE, flag, 1, MPI_INT, MPI_MAX, ep.comm) != MPI_SUCCESS)
        return moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "moe-bench: agreement (MPI_Allreduce) failed");
    return MOE_OK;
}

moe_err_t moe_bench_step_loads(moe_backend_t *backend, moe_ep_t ep, int layer,
                               const float *x, int n_tokens, const int32_t *ids, const float *weights, float *out,
                               double *expert_load, double *imbalance, char *msg, size_t msg_size) {
    const int n_slots = backend->ops->slot_count(backend->state), R = ep.size;
    int64_t *counts = calloc((size_t)n_slots, sizeof *counts);
    if (counts == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "moe-bench: out of memory for slot counts");
    moe_route_trace_t trace = {NULL, NULL, counts, NULL, false};
    moe_err_t ret = backend->ops->forward(backend->state, layer, x, n_tokens, ids, weights, out, &trace, msg, msg_size);
    /* counts a backend summed already are the same everywhere: MAX keeps them */
    if (ret == MOE_OK && R > 1 &&
        MPI_Allreduce(MPI_IN_PLACE, counts, n_slots, MPI_INT64_T, backend->ops->counts_summed ? MPI_MAX : MPI_SUM,
                      ep.comm) != MPI_SUCCESS)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "moe-bench: slot counts (MPI_Allreduce) failed");
    if (ret == MOE_OK) {
        const int *placement = backend->ops->placement(backend->state, layer);
        const int per_rank = n_slots / R;
        double rank_load[R], total = 0, most = 0;
        memset(rank_load, 0, sizeof rank_load);
        for (int s = 0; s < n_slots; s++) {
            rank_load[s / per_rank] += (double)counts[s];
            if (expert_load != NULL) expert_load[placement[s]] += (double)counts[s];
            total += (double)counts[s];
        }
        for (int r = 0; r < R; r++)
            if (rank_load[r] > most) most = rank_load[r];
        *imbalance = total > 0 ? most / (total / R) : 1.0;
    }
    free(counts);
    return ret;
}

moe_err_t moe_bench_rebalance(moe_backend_t *backend, const moe_config_t *cfg, moe_ep_t ep, int layer,
                              const double *expert_load, moe_bench_rebalance_t *result, char *msg, size_t msg_size) {
    const int E = cfg->model.experts, R = ep.size, n_slots = backend->ops->slot_count(backend->state);
    memset(result, 0, sizeof *result);
    if (backend->ops->migrate_begin == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_UNSUPPORTED, "moe-bench: this backend cannot migrate weights");
    int *next = malloc(sizeof(int) * (size_t)n_slots);
    if (next == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "moe-bench: out of memory for a placement");
    const int *current = backend->ops->placement(backend->state, layer);
    moe_err_t ret = moe_eplb_place(expert_load, E, n_slots, R, cfg->eplb.ranks_per_node, next, NULL, msg, msg_size);
    if (ret != MOE_OK) goto done;
    result->predicted_before = moe_eplb_imbalance(expert_load, E, current, n_slots, R, NULL);
    result->predicted_after = moe_eplb_imbalance(expert_load, E, next, n_slots, R, NULL);
    /* adopted as the daemon adopts it: a new placement, better by eplb.min_improvement */
    if (memcmp(current, next, sizeof(int) * (size_t)n_slots) == 0 ||
        !moe_eplb_should_adopt(result->predicted_before, result->predicted_after, cfg->eplb.min_improvement))
        goto done;
    const double start = moe_bench_now();
    ret = backend->ops->migrate_begin(backend->state, layer, next, msg, msg_size);
    int failed = ret != MOE_OK;
    if (ret == MOE_OK) {
        /* the loads run in the background; a rank that failed to load says so here */
        struct timespec pause = {0, 1000000};
        int state;
        while ((state = backend->ops->migrate_poll(backend->state)) == MOE_TASK_RUNNING) nanosleep(&pause, NULL);
        failed = state != MOE_TASK_DONE;
    }
    moe_err_t agreed = any_rank(ep, &failed, msg, msg_size);
    if (agreed != MOE_OK) { /* no agreement: drop the loads here, never swap alone */
        char drop_msg[256];
        if (ret == MOE_OK) (void)backend->ops->migrate_end(backend->state, false, NULL, drop_msg, sizeof drop_msg);
        ret = agreed;
        goto done;
    }
    int64_t bytes = 0;
    char end_msg[512] = "";
    moe_err_t ended = MOE_OK;
    if (ret == MOE_OK) ended = backend->ops->migrate_end(backend->state, !failed, &bytes, end_msg, sizeof end_msg);
    if (ret == MOE_OK && failed && ended == MOE_OK)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "moe-bench: loading the new placement failed on a rank");
    else if (ret == MOE_OK && ended != MOE_OK)
        ret = moe_err_fmt(msg, msg_size, ended, "moe-bench: migration: %s", end_msg);
    long long total = bytes;
    if (R > 1 && MPI_Allreduce(MPI_IN_PLACE, &total, 1, MPI_LONG_LONG, MPI_SUM, ep.comm) != MPI_SUCCESS && ret == MOE_OK)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "moe-bench: migration bytes (MPI_Allreduce) failed");
    result->migrated = ret == MOE_OK;
    result->bytes = total;
    result->ms = (moe_bench_now() - start) * 1e3;
done:
    free(next);
    return ret;
}
