/* routing: the routing methods of DESIGN §4, one function per method, chosen
 * through a table. Score ties are broken by the lower expert index, so
 * every backend and the test references agree on a decision. */
#include "moe_routing.h"

#include <math.h>
#include <string.h>

#include "moe_synth.h"

typedef moe_err_t (*route_fn)(const moe_route_params_t *p, const float *logits,
                              const int32_t *routed_ids, const float *routed_weights, int t,
                              uint64_t step, int64_t token, int32_t *ids, float *weights,
                              char *msg, size_t msg_size);

/* Picks the k largest of score[0..n) (ties: lower index first) into
 * chosen[0..k), in descending order. O(k·n): n ≤ MOE_MAX_EXPERTS, k ≤ 32. */
static void top_k_indices(const float *score, int n, int k, const bool *allowed, int32_t *chosen) {
    bool taken[MOE_MAX_EXPERTS];
    memset(taken, 0, sizeof(bool) * (size_t)n);
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int e = 0; e < n; e++) {
            if (taken[e] || (allowed != NULL && !allowed[e])) continue;
            if (best < 0 || score[e] > score[best]) best = e;
        }
        chosen[i] = best;
        if (best >= 0) taken[best] = true;
    }
}

static moe_err_t route_softmax_topk(const moe_route_params_t *p, const float *logits,
                                    const int32_t *routed_ids, const float *routed_weights,
                                    int t, uint64_t step, int64_t token, int32_t *ids,
                                    float *weights, char *msg, size_t msg_size) {
    (void)routed_ids, (void)routed_weights, (void)step, (void)token, (void)msg, (void)msg_size;
    const float *l = logits + (size_t)t * p->experts;
    float max = l[0];
    for (int e = 1; e < p->experts; e++) max = l[e] > max ? l[e] : max;
    float sum = 0.0f;
    for (int e = 0; e < p->experts; e++) sum += expf(l[e] - max);
    /* softmax is monotone: the top-k of the logits are the top-k of the probabilities */
    top_k_indices(l, p->experts, p->top_k, NULL, ids);
    float chosen_sum = 0.0f;
    for (int i = 0; i < p->top_k; i++) {
        weights[i] = expf(l[ids[i]] - max) / sum;
        chosen_sum += weights[i];
    }
    if (p->norm_topk_prob)
        for (int i = 0; i < p->top_k; i++) weights[i] /= chosen_sum;
    return MOE_OK;
}

static moe_err_t route_renormalize(const moe_route_params_t *p, const float *logits,
                                   const int32_t *routed_ids, const float *routed_weights, int t,
                                   uint64_t step, int64_t token, int32_t *ids, float *weights,
                                   char *msg, size_t msg_size) {
    (void)routed_ids, (void)routed_weights, (void)step, (void)token, (void)msg, (void)msg_size;
    const float *l = logits + (size_t)t * p->experts;
    top_k_indices(l, p->experts, p->top_k, NULL, ids);
    float max = l[ids[0]], sum = 0.0f;
    for (int i = 0; i < p->top_k; i++) {
        weights[i] = expf(l[ids[i]] - max);
        sum += weights[i];
    }
    for (int i = 0; i < p->top_k; i++) weights[i] /= sum;
    return MOE_OK;
}

/* DeepSeek-V3 (noaux_tc): choose with sigmoid(l) + bias inside the best
 * groups (a group's score is the sum of its two best biased scores); weigh
 * with the unbiased sigmoid, renormalised, times the scaling factor. */
static moe_err_t route_sigmoid_group_topk(const moe_route_params_t *p, const float *logits,
                                          const int32_t *routed_ids,
                                          const float *routed_weights, int t, uint64_t step,
                                          int64_t token, int32_t *ids, float *weights,
                                          char *msg, size_t msg_size) {
    (void)routed_ids, (void)routed_weights, (void)step, (void)token, (void)msg, (void)msg_size;
    const int n_experts = p->experts, group_size = p->experts / p->n_group;
    const float *l = logits + (size_t)t * n_experts;
    float score[MOE_MAX_EXPERTS], biased[MOE_MAX_EXPERTS], group_score[MOE_MAX_EXPERTS];
    bool allowed[MOE_MAX_EXPERTS];
    for (int e = 0; e < n_experts; e++) {
        score[e] = 1.0f / (1.0f + expf(-l[e]));
        biased[e] = score[e] + (p->bias != NULL ? p->bias[e] : 0.0f);
    }
    for (int g = 0; g < p->n_group; g++) {
        int32_t best[2];
        int take = group_size < 2 ? group_size : 2;
        top_k_indices(biased + (size_t)g * group_size, group_size, take, NULL, best);
        group_score[g] = 0.0f;
        for (int i = 0; i < take; i++) group_score[g] += biased[g * group_size + best[i]];
    }
    int32_t groups[MOE_MAX_EXPERTS];
    top_k_indices(group_score, p->n_group, p->topk_group, NULL, groups);
    memset(allowed, 0, sizeof(bool) * (size_t)n_experts);
    for (int i = 0; i < p->topk_group; i++)
        for (int e = 0; e < group_size; e++) allowed[groups[i] * group_size + e] = true;
    top_k_indices(biased, n_experts, p->top_k, allowed, ids);
    float sum = 0.0f;
    for (int i = 0; i < p->top_k; i++) {
        weights[i] = score[ids[i]];
        sum += weights[i];
    }
    for (int i = 0; i < p->top_k; i++) {
        if (p->norm_topk_prob) weights[i] /= sum + 1e-20f;
        weights[i] *= p->routed_scaling_factor;
    }
    return MOE_OK;
}

static moe_err_t route_client(const moe_route_params_t *p, const float *logits,
                              const int32_t *routed_ids, const float *routed_weights, int t,
                              uint64_t step, int64_t token, int32_t *ids, float *weights,
                              char *msg, size_t msg_size) {
    (void)logits, (void)step, (void)token;
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

/* A seeded uniform draw in [0, 1) for (token, draw) of this rank, layer, step. */
static double bench_draw(const moe_route_params_t *p, uint64_t step, int64_t token, int draw) {
    uint64_t h = moe_synth_mix(p->seed ^ 0x5eed0000ull);
    h = moe_synth_mix(h ^ ((uint64_t)(uint32_t)p->layer << 32) ^ (uint32_t)p->rank);
    h = moe_synth_mix(h ^ step);
    h = moe_synth_mix(h ^ ((uint64_t)token << 8) ^ (uint64_t)draw);
    return (double)(h >> 11) * (1.0 / 9007199254740992.0);
}

/* Draws k distinct experts with probability proportional to pdf (NULL:
 * uniform). A repeat is redrawn a few times, then replaced by the next free
 * expert, so the cost per token stays bounded. Weights are 1/k. */
static void draw_distinct(const moe_route_params_t *p, const double *cdf, uint64_t step,
                          int64_t token, int32_t *ids, float *weights) {
    const int n = p->experts;
    int draw = 0;
    for (int i = 0; i < p->top_k; i++) {
        int expert = -1;
        for (int attempt = 0; attempt < 8 && expert < 0; attempt++) {
            double u = bench_draw(p, step, token, draw++);
            int e;
            if (cdf == NULL) {
                e = (int)(u * n);
                if (e >= n) e = n - 1;
            } else {
                int lo = 0, hi = n - 1; /* first e with cdf[e] > u */
                while (lo < hi) {
                    int mid = (lo + hi) / 2;
                    if (cdf[mid] > u) hi = mid; else lo = mid + 1;
                }
                e = lo;
            }
            bool repeat = false;
            for (int j = 0; j < i; j++) repeat |= ids[j] == e;
            if (!repeat) expert = e;
        }
        for (int e = 0; expert < 0; e++) {
            bool repeat = false;
            for (int j = 0; j < i; j++) repeat |= ids[j] == e;
            if (!repeat) expert = e;
        }
        ids[i] = expert;
        weights[i] = 1.0f / (float)p->top_k;
    }
}

static moe_err_t route_uniform(const moe_route_params_t *p, const float *logits,
                               const int32_t *routed_ids, const float *routed_weights, int t,
                               uint64_t step, int64_t token, int32_t *ids, float *weights,
                               char *msg, size_t msg_size) {
    (void)logits, (void)routed_ids, (void)routed_weights, (void)t, (void)msg, (void)msg_size;
    draw_distinct(p, NULL, step, token, ids, weights);
    return MOE_OK;
}

/* Zipf: expert e is drawn with probability ∝ 1/(e+1)^s — expert 0 hottest,
 * so the hot experts sit together on rank 0, the case EPLB exists for. */
static moe_err_t route_zipf(const moe_route_params_t *p, const float *logits,
                            const int32_t *routed_ids, const float *routed_weights, int t,
                            uint64_t step, int64_t token, int32_t *ids, float *weights,
                            char *msg, size_t msg_size) {
    (void)logits, (void)routed_ids, (void)routed_weights, (void)t, (void)msg, (void)msg_size;
    double cdf[MOE_MAX_EXPERTS], total = 0.0;
    for (int e = 0; e < p->experts; e++) {
        total += pow((double)(e + 1), -p->zipf_s);
        cdf[e] = total;
    }
    for (int e = 0; e < p->experts; e++) cdf[e] /= total;
    cdf[p->experts - 1] = 1.0;
    draw_distinct(p, cdf, step, token, ids, weights);
    return MOE_OK;
}

/* DESIGN §4: slot j = t·k + i of rank r goes to expert
 * ((j + r) mod R)·(E/R) + ((j + r) / R) mod (E/R): consecutive slots cycle
 * over the ranks, so every rank's tokens spread evenly over all experts. */
static moe_err_t route_perfect(const moe_route_params_t *p, const float *logits,
                               const int32_t *routed_ids, const float *routed_weights, int t,
                               uint64_t step, int64_t token, int32_t *ids, float *weights,
                               char *msg, size_t msg_size) {
    (void)logits, (void)routed_ids, (void)routed_weights, (void)t, (void)step, (void)msg,
        (void)msg_size;
    const int64_t n_ranks = p->n_ranks, per_rank = p->experts / p->n_ranks;
    for (int i = 0; i < p->top_k; i++) {
        int64_t j = token * p->top_k + i + p->rank;
        ids[i] = (int32_t)((j % n_ranks) * per_rank + (j / n_ranks) % per_rank);
        weights[i] = 1.0f / (float)p->top_k;
    }
    return MOE_OK;
}

static const struct {
    moe_route_method_t method;
    route_fn fn;
    bool needs_logits;
} route_table[] = {
    {MOE_ROUTE_SOFTMAX_TOPK, route_softmax_topk, true},
    {MOE_ROUTE_RENORMALIZE, route_renormalize, true},
    {MOE_ROUTE_SIGMOID_GROUP_TOPK, route_sigmoid_group_topk, true},
    {MOE_ROUTE_CLIENT, route_client, false},
    {MOE_ROUTE_UNIFORM, route_uniform, false},
    {MOE_ROUTE_ZIPF, route_zipf, false},
    {MOE_ROUTE_PERFECT, route_perfect, false},
};
#define ROUTE_TABLE_SIZE (sizeof route_table / sizeof route_table[0])

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
    route_fn fn = NULL;
    for (size_t i = 0; i < ROUTE_TABLE_SIZE; i++)
        if (route_table[i].method == params->method) fn = route_table[i].fn;
    if (fn == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "routing: unknown method %d",
                           (int)params->method);
    if (moe_route_needs_logits(params->method) && logits == NULL && n_tokens > 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "routing: method needs logits");
    for (int t = 0; t < n_tokens; t++) {
        size_t at = (size_t)t * params->top_k;
        MOE_CHECK(fn(params, logits, routed_ids, routed_weights, t, step, first_token + t,
                     ids + at, weights + at, msg, msg_size));
    }
    return MOE_OK;
}
