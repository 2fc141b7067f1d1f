/* dense_ref: see dense_ref.h. Deliberately naive: no slots, no ranks, no
 * grouping — every token visits its chosen experts one by one. */
#include "dense_ref.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../kernels/moe_weights.h"

typedef struct {
    int layer;
    float *router, *bias, *w1, *w3, *w2, *s1, *s3, *s2, *sgate;
} ref_layer_t;

struct moe_test_ref {
    moe_config_t cfg;
    ref_layer_t *layers;
};

void moe_test_ref_destroy(moe_test_ref_t *ref) {
    if (ref == NULL) return;
    for (int l = 0; ref->layers != NULL && l < ref->cfg.model.n_layers; l++) {
        ref_layer_t *L = &ref->layers[l];
        free(L->router), free(L->bias), free(L->w1), free(L->w3), free(L->w2);
        free(L->s1), free(L->s3), free(L->s2), free(L->sgate);
    }
    free(ref->layers);
    free(ref);
}

moe_test_ref_t *moe_test_ref_create(const moe_config_t *cfg, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &cfg->model;
    size_t H = m->hidden, I = m->moe_intermediate, E = m->experts, Is = m->shared_intermediate;
    moe_test_ref_t *ref = calloc(1, sizeof *ref);
    moe_weights_t *w = NULL;
    if (ref == NULL) return NULL;
    ref->cfg = *cfg;
    ref->layers = calloc((size_t)m->n_layers, sizeof(ref_layer_t));
    if (ref->layers == NULL || moe_weights_open(m, &w, msg, msg_size) != MOE_OK) goto fail;
    for (int l = 0; l < m->n_layers; l++) {
        ref_layer_t *L = &ref->layers[l];
        L->layer = m->layer_ids[l];
        L->router = malloc(sizeof(float) * E * H);
        L->bias = calloc(E, sizeof(float));
        L->w1 = malloc(sizeof(float) * E * I * H);
        L->w3 = malloc(sizeof(float) * E * I * H);
        L->w2 = malloc(sizeof(float) * E * H * I);
        if (!L->router || !L->bias || !L->w1 || !L->w3 || !L->w2) goto fail;
        if (moe_weights_router(w, L->layer, L->router, msg, msg_size) != MOE_OK) goto fail;
        if (m->routing.method == MOE_ROUTE_SIGMOID_GROUP_TOPK &&
            moe_weights_bias(w, L->layer, L->bias, msg, msg_size) != MOE_OK)
            goto fail;
        for (size_t e = 0; e < E; e++)
            if (moe_weights_expert(w, L->layer, (int)e, L->w1 + e * I * H, L->w3 + e * I * H,
                                   L->w2 + e * H * I, msg, msg_size) != MOE_OK)
                goto fail;
        if (Is > 0) {
            L->s1 = malloc(sizeof(float) * Is * H);
            L->s3 = malloc(sizeof(float) * Is * H);
            L->s2 = malloc(sizeof(float) * H * Is);
            L->sgate = m->shared_expert_gate ? malloc(sizeof(float) * H) : NULL;
            if (!L->s1 || !L->s3 || !L->s2 || (m->shared_expert_gate && !L->sgate)) goto fail;
            if (moe_weights_shared(w, L->layer, L->s1, L->s3, L->s2, L->sgate, msg, msg_size) != MOE_OK)
                goto fail;
        }
    }
    moe_weights_close(w);
    return ref;
fail:
    moe_weights_close(w);
    moe_test_ref_destroy(ref);
    return NULL;
}

/* y += scale · W2·(silu(W1 x) ⊙ W3 x), all in double. */
static void ref_expert(const float *x, int H, int I, const float *w1, const float *w3,
                       const float *w2, double scale, double *y) {
    double *a = malloc(sizeof(double) * (size_t)I);
    for (int i = 0; i < I; i++) {
        double g = 0, u = 0;
        for (int h = 0; h < H; h++) {
            g += (double)w1[(size_t)i * H + h] * x[h];
            u += (double)w3[(size_t)i * H + h] * x[h];
        }
        a[i] = g / (1.0 + exp(-g)) * u;
    }
    for (int h = 0; h < H; h++) {
        double s = 0;
        for (int i = 0; i < I; i++) s += (double)w2[(size_t)h * I + i] * a[i];
        y[h] += scale * s;
    }
    free(a);
}

/* index of the best of v[0..n) not yet used (and allowed), ties → lower index */
static int ref_argmax(const float *v, int n, const char *used) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!used[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

static void ref_route(const moe_model_config_t *m, const ref_layer_t *L, const float *x, int t,
                      int rank, int n_ranks, int32_t *ids, double *w) {
    const int H = m->hidden, E = m->experts, k = m->top_k;
    float logits[MOE_MAX_EXPERTS] = {0};
    char used[MOE_MAX_EXPERTS] = {0};
    for (int e = 0; e < E; e++) {
        float s = 0.0f; /* sequential float: the same decision as the engine */
        for (int h = 0; h < H; h++) s += x[h] * L->router[(size_t)e * H + h];
        logits[e] = s;
    }
    switch (m->routing.method) {
    case MOE_ROUTE_SOFTMAX_TOPK: {
        double z = 0, mx = logits[0], sum = 0;
        for (int e = 1; e < E; e++) mx = logits[e] > mx ? logits[e] : mx;
        for (int e = 0; e < E; e++) z += exp(logits[e] - mx);
        for (int i = 0; i < k; i++) {
            ids[i] = ref_argmax(logits, E, used);
            used[ids[i]] = 1;
            w[i] = exp(logits[ids[i]] - mx) / z;
            sum += w[i];
        }
        if (m->routing.norm_topk_prob)
            for (int i = 0; i < k; i++) w[i] /= sum;
        break;
    }
    case MOE_ROUTE_RENORMALIZE: {
        double sum = 0;
        for (int i = 0; i < k; i++) {
            ids[i] = ref_argmax(logits, E, used);
            used[ids[i]] = 1;
        }
        for (int i = 0; i < k; i++) sum += exp((double)logits[ids[i]] - logits[ids[0]]);
        for (int i = 0; i < k; i++) w[i] = exp((double)logits[ids[i]] - logits[ids[0]]) / sum;
        break;
    }
    case MOE_ROUTE_SIGMOID_GROUP_TOPK: {
        const int G = m->routing.n_group, per = E / G;
        float biased[MOE_MAX_EXPERTS], gscore[MOE_MAX_EXPERTS];
        for (int e = 0; e < E; e++) biased[e] = 1.0f / (1.0f + expf(-logits[e])) + L->bias[e];
        for (int g = 0; g < G; g++) {
            char gu[MOE_MAX_EXPERTS] = {0};
            int a = ref_argmax(biased + g * per, per, gu);
            gscore[g] = biased[g * per + a];
            if (per > 1) {
                gu[a] = 1;
                gscore[g] += biased[g * per + ref_argmax(biased + g * per, per, gu)];
            }
        }
        char gused[MOE_MAX_EXPERTS] = {0};
        memset(used, 1, (size_t)E);
        for (int i = 0; i < m->routing.topk_group; i++) {
            int g = ref_argmax(gscore, G, gused);
            gused[g] = 1;
            memset(used + g * per, 0, (size_t)per);
        }
        double sum = 0;
        for (int i = 0; i < k; i++) {
            ids[i] = ref_argmax(biased, E, used);
            used[ids[i]] = 1;
            w[i] = 1.0 / (1.0 + exp(-(double)logits[ids[i]]));
            sum += w[i];
        }
        for (int i = 0; i < k; i++)
            w[i] = (m->routing.norm_topk_prob ? w[i] / sum : w[i]) * m->routing.routed_scaling_factor;
        break;
    }
    case MOE_ROUTE_PERFECT:
        for (int i = 0; i < k; i++) {
            long long j = (long long)t * k + i + rank;
            ids[i] = (int32_t)((j % n_ranks) * (E / n_ranks) + (j / n_ranks) % (E / n_ranks));
            w[i] = 1.0 / k;
        }
        break;
    default:
        break; /* client, uniform, zipf: given by the caller */
    }
}

int moe_test_ref_forward(const moe_test_ref_t *ref, int layer, const float *x, int n_tokens,
                         int rank, int n_ranks, const int32_t *given_ids,
                         const float *given_weights, double *out, int32_t *ids_out) {
    const moe_model_config_t *m = &ref->cfg.model;
    const ref_layer_t *L = NULL;
    for (int l = 0; l < m->n_layers; l++)
        if (ref->layers[l].layer == layer) L = &ref->layers[l];
    if (L == NULL) return -1;
    const int H = m->hidden, I = m->moe_intermediate, k = m->top_k, Is = m->shared_intermediate;
    const moe_route_method_t method = m->routing.method;
    const int given = method == MOE_ROUTE_CLIENT || method == MOE_ROUTE_UNIFORM || method == MOE_ROUTE_ZIPF;
    for (int t = 0; t < n_tokens; t++) {
        const float *row = x + (size_t)t * H;
        double *y = out + (size_t)t * H;
        int32_t ids[MOE_MAX_TOP_K];
        double w[MOE_MAX_TOP_K];
        memset(y, 0, sizeof(double) * (size_t)H);
        if (given) {
            for (int i = 0; i < k; i++) {
                ids[i] = given_ids[(size_t)t * k + i];
                w[i] = given_weights[(size_t)t * k + i];
            }
        } else {
            ref_route(m, L, row, t, rank, n_ranks, ids, w);
        }
        for (int i = 0; i < k; i++) {
            size_t e = (size_t)ids[i];
            ref_expert(row, H, I, L->w1 + e * I * H, L->w3 + e * I * H, L->w2 + e * H * I, w[i], y);
            if (ids_out != NULL) ids_out[(size_t)t * k + i] = ids[i];
        }
        if (Is > 0) {
            double gate = 1.0;
            if (L->sgate != NULL) {
                double d = 0;
                for (int h = 0; h < H; h++) d += (double)L->sgate[h] * row[h];
                gate = 1.0 / (1.0 + exp(-d));
            }
            ref_expert(row, H, Is, L->s1, L->s3, L->s2, gate, y);
        }
    }
    return 0;
}

double moe_test_rel_error(const float *got, const double *want, size_t n) {
    double max_want = 1e-30, max_diff = 0;
    for (size_t i = 0; i < n; i++) {
        max_want = fmax(max_want, fabs(want[i]));
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= max_diff)) max_diff = isnan(d) ? INFINITY : d; /* NaN counts as worst */
    }
    return max_diff / max_want;
}

double moe_test_rel_error_l2(const float *got, const double *want, size_t n) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = (double)got[i] - want[i];
        diff += d * d;
        norm += want[i] * want[i];
    }
    if (isnan(diff)) return INFINITY;
    return norm > 0 ? sqrt(diff / norm) : sqrt(diff);
}

void moe_test_fill_random(float *x, size_t n, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    }
}

uint64_t moe_test_fresh_seed(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ ((uint64_t)getpid() << 40);
}
