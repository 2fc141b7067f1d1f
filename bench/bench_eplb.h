/* The EPLB side of moe-bench (--rebalance): the rank loads one step of the
 * configured router really produces, and a rebalance from measured loads
 * the way the daemon's online EPLB does it (moe_eplb_place, then the
 * backend's migration on every rank, committed only when every rank
 * loaded its weights). Collective over the EP group. */
#ifndef MOE_BENCH_EPLB_H
#define MOE_BENCH_EPLB_H

#include "../kernels/moe_backend.h"

/* Seconds on the monotonic clock (moe-bench's timings). */
double moe_bench_now(void);

/* One traced forward of n_tokens (x, out: [n_tokens, H]; ids/weights for a
 * client router, else NULL). Adds the step's (token, expert) counts of
 * every rank to expert_load[E] (unless NULL) and writes the imbalance of the step's rank
 * loads (max / mean; 1 for an empty step). */
moe_err_t moe_bench_step_loads(moe_backend_t *backend, moe_ep_t ep, int layer,
                               const float *x, int n_tokens, const int32_t *ids, const float *weights, float *out,
                               double *expert_load, double *imbalance, char *msg, size_t msg_size);

typedef struct {
    bool migrated;              /* false: the loads ask for the current placement, or for one that
                                   is not eplb.min_improvement better */
    double predicted_before;    /* imbalance of the current placement under the loads */
    double predicted_after;     /* ... of the new one */
    long long bytes;            /* weight bytes loaded, all ranks */
    double ms;                  /* from the decision to the swap */
} moe_bench_rebalance_t;

/* A placement for `layer` from expert_load[E] (every rank passes the same
 * loads), migrated in and swapped on every rank when it is adopted (as the
 * daemon adopts one: predicted imbalance lower by eplb.min_improvement). */
moe_err_t moe_bench_rebalance(moe_backend_t *backend, const moe_config_t *cfg, moe_ep_t ep, int layer,
                              const double *expert_load, moe_bench_rebalance_t *result, char *msg, size_t msg_size);

#endif
