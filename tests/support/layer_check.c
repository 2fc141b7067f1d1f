/* layer_check: see layer_check.h. */
#include "layer_check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/cpu/moe_cpu.h"
#include "../../kernels/moe_synth.h"
#include "dense_ref.h"

const moe_test_case_t moe_test_cases[] = {
    {"softmax_topk", MOE_ROUTE_SOFTMAX_TOPK, 0, 0, 0},
    {"softmax_topk_shared_chunked", MOE_ROUTE_SOFTMAX_TOPK, 1, 0, 7},
    {"softmax_topk_replicas", MOE_ROUTE_SOFTMAX_TOPK, 0, 1, 0},
    {"renormalize", MOE_ROUTE_RENORMALIZE, 0, 0, 0},
    {"renormalize_replicas_shared", MOE_ROUTE_RENORMALIZE, 1, 1, 16},
    {"sigmoid_group_topk", MOE_ROUTE_SIGMOID_GROUP_TOPK, 1, 0, 0},
    {"sigmoid_group_topk_replicas", MOE_ROUTE_SIGMOID_GROUP_TOPK, 1, 1, 0},
    {"client", MOE_ROUTE_CLIENT, 0, 0, 0},
    {"client_replicas", MOE_ROUTE_CLIENT, 0, 1, 5},
    {"uniform", MOE_ROUTE_UNIFORM, 0, 0, 0},
    {"uniform_replicas", MOE_ROUTE_UNIFORM, 1, 1, 0},
    {"zipf", MOE_ROUTE_ZIPF, 0, 0, 0},
    {"zipf_replicas", MOE_ROUTE_ZIPF, 0, 1, 9},
    {"perfect", MOE_ROUTE_PERFECT, 0, 0, 0},
    {"perfect_replicas", MOE_ROUTE_PERFECT, 1, 1, 0},
};
const int moe_test_case_count = (int)(sizeof moe_test_cases / sizeof moe_test_cases[0]);

void moe_test_client_routing(uint64_t seed, int n_tokens, int k, int experts, int32_t *ids, float *weights) {
    for (int t = 0; t < n_tokens; t++)
        for (int i = 0; i < k; i++) {
            int32_t id = (int32_t)((moe_synth_mix(seed + (uint64_t)t) + (uint64_t)i * 3) % (uint64_t)experts);
            for (int j = 0; j < i; j++) /* distinct within the token */
                if (ids[t * k + j] == id) id = (id + 1) % experts, j = -1;
            ids[t * k + i] = id;
            weights[t * k + i] = 0.25f + 0.5f * (float)i;
        }
}

void moe_test_case_config(const moe_test_case_t *c, int n_ranks, moe_config_t *cfg) {
    moe_config_defaults(cfg);
    moe_model_config_t *m = &cfg->model;
    m->weights.format = MOE_WEIGHTS_SYNTHETIC;
    m->weights.seed = 11;
    m->n_layers = 2;
    m->layer_ids[0] = 0;
    m->layer_ids[1] = 3;
    m->hidden = 48;
    m->moe_intermediate = 40;
    m->experts = 8;
    m->top_k = c->method == MOE_ROUTE_SIGMOID_GROUP_TOPK ? 3 : 2;
    m->shared_intermediate = c->shared ? 24 : 0;
    m->shared_expert_gate = c->shared && c->method != MOE_ROUTE_SIGMOID_GROUP_TOPK;
    m->routing.method = c->method;
    m->routing.norm_topk_prob = c->method != MOE_ROUTE_SOFTMAX_TOPK || !c->shared;
    m->routing.n_group = c->method == MOE_ROUTE_SIGMOID_GROUP_TOPK ? 4 : 1;
    m->routing.topk_group = c->method == MOE_ROUTE_SIGMOID_GROUP_TOPK ? 2 : 1;
    m->routing.routed_scaling_factor = c->method == MOE_ROUTE_SIGMOID_GROUP_TOPK ? 2.5 : 1.0;
    m->routing.seed = 5;
    cfg->moe.backend = MOE_BACKEND_CPU;
    if (c->chunk > 0) cfg->moe.chunking.max_tokens_per_chunk = c->chunk;
    if (c->replicas) {
        /* 4 extra slots per 2 ranks: replicas of experts 0 and 1 on every
         * rank, so both the own-rank and the spread rules are used */
        cfg->eplb.mode = MOE_EPLB_STATIC;
        cfg->eplb.num_slots = 12;
        int per_rank = 12 / n_ranks, s = 0;
        for (int r = 0; r < n_ranks; r++) {
            for (int j = 0; j < per_rank; j++, s++) {
                int base = 8 / n_ranks;
                cfg->eplb.placement[s] = j < base ? r * base + j : (j - base) % 2 == 0 ? 0 : 1 + r;
            }
        }
        cfg->eplb.n_placement = 12;
    }
}

double moe_test_layer_check(const moe_config_t *cfg, moe_ep_t ep, int n_tokens, uint64_t seed,
                            char *msg, size_t msg_size) {
    const int H = cfg->model.hidden, k = cfg->model.top_k, E = cfg->model.experts;
    double worst = INFINITY;
    moe_cpu_engine_t *engine = NULL;
    moe_test_ref_t *ref = NULL;
    size_t rows = (size_t)n_tokens + 1;
    float *x = malloc(sizeof(float) * rows * H), *out = malloc(sizeof(float) * rows * H);
    double *want = malloc(sizeof(double) * rows * H);
    int32_t *ids = malloc(sizeof(int32_t) * rows * k), *client_ids = malloc(sizeof(int32_t) * rows * k);
    float *weights = malloc(sizeof(float) * rows * k), *client_w = malloc(sizeof(float) * rows * k);
    int32_t *ref_ids = malloc(sizeof(int32_t) * rows * k);
    if (!ref_ids || !x || !out || !want || !ids || !client_ids || !weights || !client_w) {
        snprintf(msg, msg_size, "out of memory");
        goto done;
    }
    if (moe_cpu_create(cfg, ep, &engine, msg, msg_size) != MOE_OK) goto done;
    if ((ref = moe_test_ref_create(cfg, msg, msg_size)) == NULL) goto done;
    worst = 0.0;
    for (int l = 0; l < cfg->model.n_layers; l++) {
        int layer = cfg->model.layer_ids[l];
        moe_test_fill_random(x, (size_t)n_tokens * H, seed + (uint64_t)l);
        moe_test_client_routing(seed, n_tokens, k, E, client_ids, client_w);
        for (size_t i = 0; i < (size_t)n_tokens * H; i++) out[i] = NAN; /* poison */
        moe_route_trace_t trace = {ids, weights, NULL, NULL, false};
        bool client = cfg->model.routing.method == MOE_ROUTE_CLIENT;
        if (moe_cpu_forward(engine, layer, x, n_tokens, client ? client_ids : NULL,
                            client ? client_w : NULL, out, &trace, msg, msg_size) != MOE_OK) {
            worst = INFINITY;
            goto done;
        }
        /* client: the reference gets the request's own ids, not the engine's */
        if (moe_test_ref_forward(ref, layer, x, n_tokens, ep.rank, ep.size,
                                 client ? client_ids : ids, client ? client_w : weights, want,
                                 ref_ids) != 0) {
            snprintf(msg, msg_size, "reference has no layer %d", layer);
            worst = INFINITY;
            goto done;
        }
        for (size_t i = 0; i < (size_t)n_tokens * k; i++)
            if (ids[i] != ref_ids[i]) {
                snprintf(msg, msg_size, "layer %d token %zu: engine chose expert %d, reference %d",
                         layer, i / (size_t)k, ids[i], ref_ids[i]);
                worst = INFINITY;
                goto done;
            }
        double err = moe_test_rel_error(out, want, (size_t)n_tokens * H);
        if (!(err <= worst)) worst = err;
    }
done:
    moe_cpu_destroy(engine);
    moe_test_ref_destroy(ref);
    free(x), free(out), free(want), free(ids), free(client_ids), free(weights), free(client_w), free(ref_ids);
    return worst;
}

moe_ep_t moe_test_mpi_start(int *argc, char ***argv, unsigned long long *seed) {
    MPI_Init(argc, argv);
    moe_ep_t ep = {0, 1, MPI_COMM_WORLD};
    MPI_Comm_rank(MPI_COMM_WORLD, &ep.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ep.size);
    *seed = *argc > 1 ? strtoull((*argv)[1], NULL, 10) : moe_test_fresh_seed();
    MPI_Bcast(seed, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
    return ep;
}
