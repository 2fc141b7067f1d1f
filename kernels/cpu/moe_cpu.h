/* moe_cpu: the reference backend — the MoE layer forward of DESIGN §4 in
 * float32, multi-threaded (OpenMP), expert-parallel over MPI ranks.
 *
 * Each rank holds the router of every layer and the experts of its own slots
 * (eplb off: slot = expert; static: the slot table's placement, replicas
 * honoured when routing). A forward is a collective over the EP group: every
 * rank calls it for the same layer, with its own tokens (possibly none).
 * Used by the daemon's step loop (through moe_backend), moe-bench and tests. */
#ifndef MOE_CPU_H
#define MOE_CPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../../config/moe_config.h"
#include "../moe_ep.h"

typedef struct moe_cpu_engine moe_cpu_engine_t;

/* What routing chose for each token, expert-level (before slot mapping):
 * ids[t*k+i], weights[t*k+i]; and, when slot_counts is non-NULL, the number
 * of this rank's (token, expert) entries sent to each physical slot
 * (n_slots entries; EPLB statistics); and, from the CUDA backend, the
 * router logits routing saw. Each member may be NULL. slot_counts_global:
 * set by a backend that returns the counts already summed over every rank
 * (CUDA: all-reduced on its balancer communicator), so the caller must not
 * sum them again. */
typedef struct {
    int32_t *ids;
    float *weights;
    int64_t *slot_counts;
    float *logits; /* [n_tokens, E] router logits (CUDA backend; methods that use them) */
    bool slot_counts_global;
} moe_route_trace_t;

/* Builds the engine: the slot table, then loads the router (and bias, shared
 * expert) of every layer and the experts of this rank's slots from the
 * configured weight source. cfg is copied. Errors (with context) go to msg.
 * The caller owns *out; free it with moe_cpu_destroy. */
moe_err_t moe_cpu_create(const moe_config_t *cfg, moe_ep_t ep, moe_cpu_engine_t **out,
                         char *msg, size_t msg_size);
void moe_cpu_destroy(moe_cpu_engine_t *engine);

/* One layer forward, collective over the EP group.
 *   layer:   a model layer index from cfg->model.layer_ids
 *   x:       [n_tokens, H] float32 inputs of this rank
 *   routed_ids / routed_weights: [n_tokens, k] for routing method `client`
 *            (NULL otherwise); ids must be in [0, E)
 *   out:     [n_tokens, H] float32, fully written
 *   trace:   optional, receives the routing decision
 * Returns MOE_OK, MOE_ERR_INVAL (bad layer, bad routed ids: checked before
 * any communication so that every rank still joins the collective — the
 * caller validates requests first), or MOE_ERR_MPI. */
moe_err_t moe_cpu_forward(moe_cpu_engine_t *engine, int layer, const float *x, int n_tokens,
                          const int32_t *routed_ids, const float *routed_weights, float *out,
                          moe_route_trace_t *trace, char *msg, size_t msg_size);

/* The same with bf16 rows in and out (uint16_t bit patterns): x widened
 * exactly, the float32 output rounded to nearest even — what the daemon's
 * edge does for a bf16 request, so a bf16 client gets the same bits
 * either way. The daemon's steps of bf16 requests take this form, so its
 * bf16-row path (the one the CUDA backend serves with) runs, and is
 * tested, on every machine. */
moe_err_t moe_cpu_forward_bf16(moe_cpu_engine_t *engine, int layer, const uint16_t *x, int n_tokens,
                               const int32_t *routed_ids, const float *routed_weights, uint16_t *out,
                               moe_route_trace_t *trace, char *msg, size_t msg_size);

/* Applies the reloadable fields of cfg (chunking; the rest is the
 * daemon's). The model, slots and backend must be unchanged. */
void moe_cpu_reconfigure(moe_cpu_engine_t *engine, const moe_config_t *cfg);

/* Number of physical slots (eplb.num_slots, or experts). */
int moe_cpu_slot_count(const moe_cpu_engine_t *engine);

/* Slot s -> expert of model layer `layer`, n_slots entries (its placement),
 * or NULL for a layer not served. */
const int *moe_cpu_placement(const moe_cpu_engine_t *engine, int layer);

/* EPLB: gives model layer `layer` the placement slot_expert (n_slots
 * entries, every expert at least once). Not a collective: every rank calls
 * it with the same placement at the same step boundary (the placement is
 * computed identically everywhere). Loads this rank's new experts (copies
 * those it already held); bytes_loaded receives what was read. On error the
 * old placement stays. */
moe_err_t moe_cpu_migrate(moe_cpu_engine_t *engine, int layer, const int *slot_expert, int64_t *bytes_loaded,
                          char *msg, size_t msg_size);

/* The same in two halves, so that serving goes on while weights load:
 * begin checks the placement and fills a second set of this rank's slot
 * buffers on a background thread (one migration at a time; forwards keep
 * using the current placement meanwhile); poll returns MOE_TASK_RUNNING,
 * MOE_TASK_DONE or MOE_TASK_FAILED without waiting; end waits for the
 * thread and swaps the new placement in (commit, between forwards) or
 * drops it. */
moe_err_t moe_cpu_migrate_begin(moe_cpu_engine_t *engine, int layer, const int *slot_expert, char *msg,
                                size_t msg_size);
int moe_cpu_migrate_poll(moe_cpu_engine_t *engine);
moe_err_t moe_cpu_migrate_end(moe_cpu_engine_t *engine, bool commit, int64_t *bytes_loaded, char *msg,
                              size_t msg_size);

/* Number of floating-point operations of the forward for n_tokens tokens of
 * this rank (router + k experts per token + shared expert). */
double moe_cpu_flops(const moe_config_t *cfg, int64_t n_tokens);

#endif
