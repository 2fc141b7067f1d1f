/* routing: the routing methods of DESIGN §4 on the host: a table of
 * methods, validation, and the loop over tokens. The per-token math lives
 * in moe_route_token.h, shared with the CUDA kernel. Score ties are broken by
 * the lower expert index, so every backend and the test references agree on
 * a decision. */
#include "moe_routing.h"

#include <math.h>
#include <string.h>

#include "moe_route_token.h"

static moe_err_t route_client(const moe_route_params_t *p, const int32_t *routed_ids,
                              const float *routed_weights, int t, int32_t *ids, float *weights,
                              char *msg, size_t msg_size) {
    if (routed_ids == NULL || routed_weights == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "routing method 'client' needs expert ids and weights with the request");
    for (int i = 0; i < p->top_k; i++) {
        int32_t id = routed_ids[(size_t)t * p->top_k + i];
        if (id < 0 || id >= p->experts)
            return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                               "token %d: expert id %d out of range [0, %d)", t, id, p->experts);
        for (int j = 0; j < i; j++)
            if (ids[j] == id)
                return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                                   "token %d: expert id %d given twice", t, id);
        float w = routed_weights[(size_t)t * p->top_k + i];
        if (!isfinite(w))
            return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "token %d: weight %d is not finite",
                               t, i);
        ids[i] = id;
        weights[i] = w;
    }
    return MOE_OK;
}

static const struct {
    moe_route_method_t method;
    int token_method; /* MOE_ROUTE_TOKEN_* of moe_route_token.h */
    bool needs_logits;
} route_table[] = {
    {MOE_ROUTE_SOFTMAX_TOPK, MOE_ROUTE_TOKEN_SOFTMAX_TOPK, true},
    {MOE_ROUTE_RENORMALIZE, MOE_ROUTE_TOKEN_RENORMALIZE, true},
    {MOE_ROUTE_SIGMOID_GROUP_TOPK, MOE_ROUTE_TOKEN_SIGMOID_GROUP_TOPK, true},
    {MOE_ROUTE_CLIENT, MOE_ROUTE_TOKEN_CLIENT, false},
    {MOE_ROUTE_UNIFORM, MOE_ROUTE_TOKEN_UNIFORM, false},
    {MOE_ROUTE_ZIPF, MOE_ROUTE_TOKEN_ZIPF, false},
    {MOE_ROUTE_PERFECT, MOE_ROUTE_TOKEN_PERFECT, false},
};
#define ROUTE_TABLE_SIZE (sizeof route_table / sizeof route_table[0])

moe_route_token_params_t moe_route_token_params(const moe_route_params_t *p) {
    moe_route_token_params_t t;
    memset(&t, 0, sizeof t);
    for (size_t i = 0; i < ROUTE_TABLE_SIZE; i++)
        if (route_table[i].method == p->method) t.method = route_table[i].token_method;
    t.experts = p->experts;
    t.top_k = p->top_k;
    t.norm_topk_prob = p->norm_topk_prob;
    t.n_group = p->n_group;
    t.topk_group = p->topk_group;
    t.routed_scaling_factor = p->routed_scaling_factor;
    t.seed = p->seed;
    t.rank = p->rank;
    t.n_ranks = p->n_ranks;
    t.layer = p->layer;
    return t;
}

void moe_route_zipf_cdf(int experts, double s, double *cdf) {
    double total = 0.0;
    for (int e = 0; e < experts; e++) {
        total += pow((double)(e + 1), -s);
        cdf[e] = total;
    }
    for (int e = 0; e < experts; e++) cdf[e] /= total;
    cdf[experts - 1] = 1.0;
}

void moe_route_params_init(moe_route_params_t *params, const moe_model_config_t *model,
                           const float *bias, int layer, int rank, int n_ranks) {
    memset(params, 0, sizeof *params);
    params->method = model->routing.method;
    params->experts = model->experts;
    params->top_k = model->top_k;
    params->norm_topk_prob = model->routing.norm_topk_prob;
    params->n_group = model->routing.n_group;
    params->topk_group = model->routing.topk_group;
    params->routed_scaling_factor = (float)model->routing.routed_scaling_factor;
    params->zipf_s = model->routing.zipf_s;
    params->seed = model->routing.seed;
    params->bias = bias;
    params->rank = rank;
    params->n_ranks = n_ranks;
    params->layer = layer;
}

moe_err_t moe_route_validate(const moe_route_params_t *p, char *msg, size_t msg_size) {
    if (p->experts < 1 || p->experts > MOE_MAX_EXPERTS || p->top_k < 1 || p->top_k > p->experts ||
        p->top_k > MOE_MAX_TOP_K)
        return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                           "routing: top_k %d must be in [1, min(experts %d, %d)]", p->top_k,
                           p->experts, MOE_MAX_TOP_K);
    if (p->method == MOE_ROUTE_SIGMOID_GROUP_TOPK) {
        if (p->n_group < 1 || p->experts % p->n_group != 0 || p->topk_group < 1 ||
            p->topk_group > p->n_group)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                               "routing: sigmoid_group_topk needs n_group (%d) dividing experts "
                               "(%d) and 1 <= topk_group (%d) <= n_group",
                               p->n_group, p->experts, p->topk_group);
        if (p->topk_group > MOE_ROUTE_MAX_K)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                               "routing: topk_group %d exceeds %d", p->topk_group, MOE_ROUTE_MAX_K);
        if (p->top_k > p->topk_group * (p->experts / p->n_group))
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                               "routing: top_k %d exceeds the %d experts of %d kept groups",
                               p->top_k, p->topk_group * (p->experts / p->n_group),
                               p->topk_group);
    }
    if (p->method == MOE_ROUTE_PERFECT && p->experts % p->n_ranks != 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                           "routing: 'perfect' needs experts (%d) divisible by the rank count (%d)",
                           p->experts, p->n_ranks);
    return MOE_OK;
}

bool moe_route_needs_logits(moe_route_method_t method) {
    for (size_t i = 0; i < ROUTE_TABLE_SIZE; i++)
        if (route_table[i].method == method) return route_table[i].needs_logits;
    return false;
}

moe_err_t moe_route_tokens(const moe_route_params_t *params, const float *logits,
                           const int32_t *routed_ids, const float *routed_weights, int n_tokens,
                           uint64_t step, int64_t first_token, int32_t *ids, float *weights,
                           char *msg, size_t msg_size) {
    bool known = false;
    for (size_t i = 0; i < ROUTE_TABLE_SIZE; i++) known |= route_table[i].method == params->method;
    if (!known)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "routing: unknown method %d",
                           (int)params->method);
    if (moe_route_needs_logits(params->method) && logits == NULL && n_tokens > 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "routing: method needs logits");
    if (params->method == MOE_ROUTE_CLIENT) {
        for (int t = 0; t < n_tokens; t++)
            MOE_CHECK(route_client(params, routed_ids, routed_weights, t, ids + (size_t)t * params->top_k,
                                   weights + (size_t)t * params->top_k, msg, msg_size));
        return MOE_OK;
    }
    double cdf[MOE_MAX_EXPERTS];
    if (params->method == MOE_ROUTE_ZIPF) moe_route_zipf_cdf(params->experts, params->zipf_s, cdf);
    moe_route_token_params_t p = moe_route_token_params(params);
    for (int t = 0; t < n_tokens; t++) {
        size_t at = (size_t)t * params->top_k;
        moe_route_token(&p, logits != NULL ? logits + (size_t)t * params->experts : NULL, params->bias, cdf,
                        step, first_token + t, ids + at, weights + at);
    }
    return MOE_OK;
}
