/* moe_route_token: the routing of ONE token (DESIGN §4 step 1), shared by
 * the CPU backend (routing.c) and the CUDA routing kernel, so that both make
 * the same decision from the same logits. Small fixed-size state only (no
 * E-sized arrays): top-k lists are kept sorted by insertion while the
 * experts are scanned in ascending order, which breaks score ties toward
 * the lower expert index, exactly like a repeated argmax.
 * Header-only, host and device (MOE_ROUTE_HD). */
#ifndef MOE_ROUTE_TOKEN_H
#define MOE_ROUTE_TOKEN_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>

#include "moe_synth.h"

#ifdef __CUDACC__
#define MOE_ROUTE_HD __host__ __device__ __forceinline__
#else
#define MOE_ROUTE_HD static inline
#endif

#define MOE_ROUTE_MAX_K 32 /* = MOE_MAX_TOP_K; also the bound of topk_group */

enum {
    MOE_ROUTE_TOKEN_SOFTMAX_TOPK = 0, /* values of moe_route_method_t */
    MOE_ROUTE_TOKEN_RENORMALIZE,
    MOE_ROUTE_TOKEN_SIGMOID_GROUP_TOPK,
    MOE_ROUTE_TOKEN_CLIENT,
    MOE_ROUTE_TOKEN_UNIFORM,
    MOE_ROUTE_TOKEN_ZIPF,
    MOE_ROUTE_TOKEN_PERFECT,
};

/* Plain-data parameters of one routing call (copyable to the device). */
typedef struct {
    int method;
    int experts;
    int top_k;
    int norm_topk_prob;
    int n_group;
    int topk_group;
    float routed_scaling_factor;
    uint64_t seed;
    int rank;
    int n_ranks;
    int layer;
} moe_route_token_params_t;

/* Inserts (value, index) into a list sorted descending, keeping `cap`
 * entries; an equal value goes after the entries already there (they have
 * lower indices, as the scan is ascending). */
MOE_ROUTE_HD void moe_route_insert(float *values, int32_t *indices, int *count, int cap,
                                   float value, int32_t index) {
    int n = *count;
    if (n == cap && !(value > values[cap - 1])) return;
    int at = n < cap ? n : cap - 1;
    while (at > 0 && value > values[at - 1]) {
        values[at] = values[at - 1];
        indices[at] = indices[at - 1];
        at--;
    }
    values[at] = value;
    indices[at] = index;
    if (n < cap) *count = n + 1;
}

MOE_ROUTE_HD float moe_route_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* softmax over E, top-k, optionally renormalised (Mixtral, Qwen-MoE) */
MOE_ROUTE_HD void moe_route_softmax_topk(const moe_route_token_params_t *p, const float *l,
                                         int32_t *ids, float *weights) {
    float top[MOE_ROUTE_MAX_K];
    int count = 0;
    float max = l[0];
    for (int e = 0; e < p->experts; e++) {
        max = l[e] > max ? l[e] : max;
        moe_route_insert(top, ids, &count, p->top_k, l[e], e);
    }
    float sum = 0.0f;
    for (int e = 0; e < p->experts; e++) sum += expf(l[e] - max);
    float chosen = 0.0f;
    for (int i = 0; i < p->top_k; i++) {
        weights[i] = expf(top[i] - max) / sum;
        chosen += weights[i];
    }
    if (p->norm_topk_prob)
        for (int i = 0; i < p->top_k; i++) weights[i] /= chosen;
}

/* top-k of the logits, softmax over those k */
MOE_ROUTE_HD void moe_route_renormalize(const moe_route_token_params_t *p, const float *l,
                                        int32_t *ids, float *weights) {
    float top[MOE_ROUTE_MAX_K];
    int count = 0;
    for (int e = 0; e < p->experts; e++) moe_route_insert(top, ids, &count, p->top_k, l[e], e);
    float sum = 0.0f;
    for (int i = 0; i < p->top_k; i++) {
        weights[i] = expf(top[i] - top[0]);
        sum += weights[i];
    }
    for (int i = 0; i < p->top_k; i++) weights[i] /= sum;
}

/* DeepSeek-V3 (noaux_tc): choose with sigmoid(l) + bias inside the
 * topk_group best groups (a group scores the sum of its two best biased
 * scores); weigh with the unbiased sigmoid, renormalised, times the scale. */
MOE_ROUTE_HD void moe_route_sigmoid_group_topk(const moe_route_token_params_t *p, const float *l,
                                               const float *bias, int32_t *ids, float *weights) {
    const int group_size = p->experts / p->n_group;
    float group_top[MOE_ROUTE_MAX_K];
    int32_t groups[MOE_ROUTE_MAX_K];
    int n_groups = 0;
    for (int g = 0; g < p->n_group; g++) {
        float best[2];
        int32_t best_index[2];
        int count = 0;
        int take = group_size < 2 ? group_size : 2;
        for (int j = 0; j < group_size; j++) {
            int e = g * group_size + j;
            float biased = moe_route_sigmoid(l[e]) + (bias != 0 ? bias[e] : 0.0f);
            moe_route_insert(best, best_index, &count, take, biased, j);
        }
        float score = 0.0f;
        for (int i = 0; i < take; i++) score += best[i];
        moe_route_insert(group_top, groups, &n_groups, p->topk_group, score, g);
    }
    float top[MOE_ROUTE_MAX_K];
    int count = 0;
    for (int e = 0; e < p->experts; e++) {
        bool allowed = false;
        for (int i = 0; i < n_groups; i++) allowed |= groups[i] == e / group_size;
        if (allowed)
            moe_route_insert(top, ids, &count, p->top_k, moe_route_sigmoid(l[e]) + (bias != 0 ? bias[e] : 0.0f), e);
    }
    float sum = 0.0f;
    for (int i = 0; i < p->top_k; i++) {
        weights[i] = moe_route_sigmoid(l[ids[i]]);
        sum += weights[i];
    }
    for (int i = 0; i < p->top_k; i++) {
        if (p->norm_topk_prob) weights[i] /= sum + 1e-20f;
        weights[i] *= p->routed_scaling_factor;
    }
}

/* A seeded uniform draw in [0, 1) for (token, draw) of this rank, layer, step. */
MOE_ROUTE_HD double moe_route_draw(const moe_route_token_params_t *p, uint64_t step, int64_t token, int draw) {
    uint64_t h = moe_synth_mix(p->seed ^ 0x5eed0000ull);
    h = moe_synth_mix(h ^ ((uint64_t)(uint32_t)p->layer << 32) ^ (uint32_t)p->rank);
    h = moe_synth_mix(h ^ step);
    h = moe_synth_mix(h ^ ((uint64_t)token << 8) ^ (uint64_t)draw);
    return (double)(h >> 11) * (1.0 / 9007199254740992.0);
}

/* k distinct experts drawn with the cumulative distribution cdf (NULL:
 * uniform); a repeat is redrawn a few times, then replaced by the lowest free
 * expert, so the cost per token stays bounded. Weights 1/k. */
MOE_ROUTE_HD void moe_route_draw_distinct(const moe_route_token_params_t *p, const double *cdf, uint64_t step,
                                          int64_t token, int32_t *ids, float *weights) {
    const int n = p->experts;
    int draw = 0;
    for (int i = 0; i < p->top_k; i++) {
        int expert = -1;
        for (int attempt = 0; attempt < 8 && expert < 0; attempt++) {
            double u = moe_route_draw(p, step, token, draw++);
            int e;
            if (cdf == 0) {
                e = (int)(u * n);
                if (e >= n) e = n - 1;
            } else {
                int lo = 0, hi = n - 1; /* first e with cdf[e] > u */
                while (lo < hi) {
                    int mid = (lo + hi) / 2;
                    if (cdf[mid] > u) hi = mid;
                    else lo = mid + 1;
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

/* DESIGN §4: slot j = t·k + i of rank r goes to expert
 * ((j + r) mod R)·(E/R) + ((j + r) / R) mod (E/R). */
MOE_ROUTE_HD void moe_route_perfect(const moe_route_token_params_t *p, int64_t token, int32_t *ids,
                                    float *weights) {
    const int64_t n_ranks = p->n_ranks, per_rank = p->experts / p->n_ranks;
    for (int i = 0; i < p->top_k; i++) {
        int64_t j = token * p->top_k + i + p->rank;
        ids[i] = (int32_t)((j % n_ranks) * per_rank + (j / n_ranks) % per_rank);
        weights[i] = 1.0f / (float)p->top_k;
    }
}

/* Routes one token by a model-score or benchmark method (not `client`,
 * whose ids the caller checks and copies). zipf_cdf: E cumulative
 * probabilities (zipf only). */
MOE_ROUTE_HD void moe_route_token(const moe_route_token_params_t *p, const float *logits, const float *bias,
                                  const double *zipf_cdf, uint64_t step, int64_t token, int32_t *ids,
                                  float *weights) {
    switch (p->method) {
    case MOE_ROUTE_TOKEN_SOFTMAX_TOPK: moe_route_softmax_topk(p, logits, ids, weights); break;
    case MOE_ROUTE_TOKEN_RENORMALIZE: moe_route_renormalize(p, logits, ids, weights); break;
    case MOE_ROUTE_TOKEN_SIGMOID_GROUP_TOPK: moe_route_sigmoid_group_topk(p, logits, bias, ids, weights); break;
    case MOE_ROUTE_TOKEN_UNIFORM: moe_route_draw_distinct(p, 0, step, token, ids, weights); break;
    case MOE_ROUTE_TOKEN_ZIPF: moe_route_draw_distinct(p, zipf_cdf, step, token, ids, weights); break;
    case MOE_ROUTE_TOKEN_PERFECT: moe_route_perfect(p, token, ids, weights); break;
    default: break;
    }
}

#endif
