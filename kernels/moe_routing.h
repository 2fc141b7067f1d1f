/* moe_routing: step 1 of the MoE forward (DESIGN §4) — per token, choose
 * top-k experts and their weights, float32. Every method is one row of a
 * table (routing.c); the CPU backend calls moe_route_tokens, the CUDA
 * backend has its own kernels tested against it. Pure functions: no MPI, no
 * state beyond the `step` counter the caller passes for benchmark routers. */
#ifndef MOE_ROUTING_H
#define MOE_ROUTING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../config/moe_config.h"
#include "moe_route_token.h"

typedef struct {
    moe_route_method_t method;
    int experts;
    int top_k;
    bool norm_topk_prob;
    int n_group;
    int topk_group;
    float routed_scaling_factor;
    double zipf_s;
    uint64_t seed;
    const float *bias; /* [E] score-correction bias (sigmoid_group_topk), or NULL */
    int rank;          /* EP rank and size (perfect, and seeding uniform/zipf) */
    int n_ranks;
    int layer;         /* model layer index (seeding uniform/zipf) */
} moe_route_params_t;

/* Fills params from a config, for model layer `layer` of EP rank/size. */
void moe_route_params_init(moe_route_params_t *params, const moe_model_config_t *model,
                           const float *bias, int layer, int rank, int n_ranks);

/* Checks that the method can run with these shapes (group divisibility,
 * perfect needs E divisible by the rank count, ...); message in msg. */
moe_err_t moe_route_validate(const moe_route_params_t *params, char *msg, size_t msg_size);

/* True when the method reads router logits (softmax_topk, renormalize,
 * sigmoid_group_topk); the others ignore them and the caller may skip the
 * router GEMM. */
bool moe_route_needs_logits(moe_route_method_t method);

/* Routes n_tokens tokens.
 *   logits:  [n_tokens, E] (methods that need them; else may be NULL)
 *   routed_ids / routed_weights: [n_tokens, k] for `client` (else NULL)
 *   step:    a per-call counter that varies uniform/zipf choices per step
 *   first_token: index of the first token within this rank's step (seeding)
 * Writes ids[t*k+i] (distinct within a token, in descending score order for
 * score-based methods) and weights[t*k+i]. Returns MOE_ERR_INVAL when client
 * ids are out of range or repeated within a token. */
moe_err_t moe_route_tokens(const moe_route_params_t *params, const float *logits,
                           const int32_t *routed_ids, const float *routed_weights, int n_tokens,
                           uint64_t step, int64_t first_token, int32_t *ids, float *weights,
                           char *msg, size_t msg_size);

/* The plain-data form the per-token code (and the CUDA kernel) takes. */
moe_route_token_params_t moe_route_token_params(const moe_route_params_t *params);

/* Cumulative Zipf probabilities of the experts (E entries, last = 1). */
void moe_route_zipf_cdf(int experts, double s, double *cdf);

#endif
