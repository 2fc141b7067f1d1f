/* Routing methods against hand-computed cases, and the slot table. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "../kernels/moe_routing.h"
#include "../kernels/moe_slots.h"

static moe_route_params_t params(moe_route_method_t method, int experts, int top_k) {
    moe_route_params_t p;
    memset(&p, 0, sizeof p);
    p.method = method;
    p.experts = experts;
    p.top_k = top_k;
    p.n_group = 1;
    p.topk_group = 1;
    p.routed_scaling_factor = 1.0f;
    p.zipf_s = 1.2;
    p.seed = 7;
    p.n_ranks = 1;
    return p;
}

static void route(const moe_route_params_t *p, const float *logits, int n_tokens, int32_t *ids,
                  float *w) {
    char msg[256] = "";
    moe_err_t err = moe_route_tokens(p, logits, NULL, NULL, n_tokens, 0, 0, ids, w, msg, sizeof msg);
    cr_assert_eq(err, MOE_OK, "routing failed: %s", msg);
}

Test(routing, softmax_topk_without_renormalisation, .timeout = 10) {
    moe_route_params_t p = params(MOE_ROUTE_SOFTMAX_TOPK, 4, 2);
    float logits[4] = {1, 3, 2, 0};
    int32_t ids[2];
    float w[2];
    route(&p, logits, 1, ids, w);
    double z = exp(0) + exp(1) + exp(2) + exp(3);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(ids[1], 2);
    cr_assert_float_eq(w[0], exp(3) / z, 1e-6);
    cr_assert_float_eq(w[1], exp(2) / z, 1e-6);
}

Test(routing, softmax_topk_renormalised, .timeout = 10) {
    moe_route_params_t p = params(MOE_ROUTE_SOFTMAX_TOPK, 4, 2);
    p.norm_topk_prob = true;
    float logits[4] = {1, 3, 2, 0};
    int32_t ids[2];
    float w[2];
    route(&p, logits, 1, ids, w);
    cr_assert_float_eq(w[0], 1.0 / (1.0 + exp(-1.0)), 1e-6);
    cr_assert_float_eq(w[1], 1.0 / (1.0 + exp(1.0)), 1e-6);
}

Test(routing, ties_go_to_the_lower_index, .timeout = 10) {
    moe_route_params_t p = params(MOE_ROUTE_SOFTMAX_TOPK, 4, 2);
    float logits[4] = {0, 2, 2, 2};
    int32_t ids[2];
    float w[2];
    route(&p, logits, 1, ids, w);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(ids[1], 2);
}

Test(routing, renormalize_is_softmax_over_the_top_k_logits, .timeout = 10) {
    moe_route_params_t p = params(MOE_ROUTE_RENORMALIZE, 5, 3);
    float logits[5] = {0.5f, -1.0f, 4.0f, 2.0f, 3.0f};
    int32_t ids[3];
    float w[3];
    route(&p, logits, 1, ids, w);
    double z = exp(4.0) + exp(3.0) + exp(2.0);
    cr_assert_eq(ids[0], 2);
    cr_assert_eq(ids[1], 4);
    cr_assert_eq(ids[2], 3);
    cr_assert_float_eq(w[0], exp(4.0) / z, 1e-6);
    cr_assert_float_eq(w[1], exp(3.0) / z, 1e-6);
    cr_assert_float_eq(w[2], exp(2.0) / z, 1e-6);
}

static float logit(double s) { return (float)log(s / (1.0 - s)); }

/* Scores s (groups of 2): g0 {0.9, 0.1}=1.0, g1 {0.85, 0.04}=0.89,
 * g2 {0.8, 0.7}=1.5, g3 {0.2, 0.3}=0.5. Best two groups: g2, g0, so expert 2
 * (0.85) is out although it is the second-best expert overall. */
Test(routing, sigmoid_group_topk_restricts_to_the_best_groups, .timeout = 10) {
    moe_route_params_t p = params(MOE_ROUTE_SIGMOID_GROUP_TOPK, 8, 2);
    p.n_group = 4;
    p.topk_group = 2;
    p.norm_topk_prob = true;
    p.routed_scaling_factor = 2.5f;
    const double s[8] = {0.9, 0.1, 0.85, 0.04, 0.8, 0.7, 0.2, 0.3};
    float logits[8];
    for (int e = 0; e < 8; e++) logits[e] = logit(s[e]);
    int32_t ids[2];
    float w[2];
    route(&p, logits, 1, ids, w);
    cr_assert_eq(ids[0], 0);
    cr_assert_eq(ids[1], 4);
    cr_assert_float_eq(w[0], 0.9 / 1.7 * 2.5, 1e-5);
    cr_assert_float_eq(w[1], 0.8 / 1.7 * 2.5, 1e-5);
}

/* The bias decides the choice but not the weight. */
Test(routing, sigmoid_group_topk_bias_chooses_but_does_not_weigh, .timeout = 10) {
    moe_route_params_t p = params(MOE_ROUTE_SIGMOID_GROUP_TOPK, 8, 2);
    p.n_group = 4;
    p.topk_group = 2;
    p.norm_topk_prob = true;
    p.routed_scaling_factor = 2.5f;
    const double s[8] = {0.9, 0.1, 0.85, 0.04, 0.8, 0.7, 0.2, 0.3};
    float bias[8] = {0, 1.0f, 0, 0, 0, 0, 0, 0};
    p.bias = bias;
    float logits[8];
    for (int e = 0; e < 8; e++) logits[e] = logit(s[e]);
    int32_t ids[2];
    float w[2];
    route(&p, logits, 1, ids, w);
    cr_assert_eq(ids[0], 1); /* 0.1 + 1.0 */
    cr_assert_eq(ids[1], 0);
    cr_assert_float_eq(w[0], 0.1 / 1.0 * 2.5, 1e-5);
    cr_assert_float_eq(w[1], 0.9 / 1.0 * 2.5, 1e-5);
}

Test(routing, client_ids_are_checked, .timeout = 10) {
    moe_route_params_t p = params(MOE_ROUTE_CLIENT, 8, 2);
    int32_t given[4] = {3, 5, 7, 0}, ids[4];
    float gw[4] = {0.25f, 0.75f, 1.0f, 2.0f}, w[4];
    char msg[256];
    cr_assert_eq(moe_route_tokens(&p, NULL, given, gw, 2, 0, 0, ids, w, msg, sizeof msg), MOE_OK);
    cr_assert(memcmp(ids, given, sizeof ids) == 0);
    cr_assert(memcmp(w, gw, sizeof w) == 0);
    int32_t bad[2] = {3, 8};
    cr_assert_eq(moe_route_tokens(&p, NULL, bad, gw, 1, 0, 0, ids, w, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert(strstr(msg, "out of range") != NULL, "%s", msg);
    int32_t twice[2] = {4, 4};
    cr_assert_eq(moe_route_tokens(&p, NULL, twice, gw, 1, 0, 0, ids, w, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert_eq(moe_route_tokens(&p, NULL, NULL, NULL, 1, 0, 0, ids, w, msg, sizeof msg), MOE_ERR_INVAL);
}

Test(routing, perfect_matches_the_formula_by_hand, .timeout = 10) {
    moe_route_params_t p = params(MOE_ROUTE_PERFECT, 8, 2);
    p.n_ranks = 2;
    int32_t ids[4];
    float w[4];
    route(&p, NULL, 2, ids, w);
    const int32_t rank0[4] = {0, 4, 1, 5};
    cr_assert(memcmp(ids, rank0, sizeof ids) == 0, "%d %d %d %d", ids[0], ids[1], ids[2], ids[3]);
    cr_assert_float_eq(w[0], 0.5f, 1e-7);
    p.rank = 1;
    route(&p, NULL, 2, ids, w);
    const int32_t rank1[4] = {4, 1, 5, 2};
    cr_assert(memcmp(ids, rank1, sizeof ids) == 0, "%d %d %d %d", ids[0], ids[1], ids[2], ids[3]);
}

Test(routing, perfect_is_balanced_over_all_experts, .timeout = 10) {
    enum { E = 16, K = 4, R = 4, T = 64 };
    int count[E] = {0};
    for (int r = 0; r < R; r++) {
        moe_route_params_t p = params(MOE_ROUTE_PERFECT, E, K);
        p.n_ranks = R;
        p.rank = r;
        int32_t ids[T * K];
        float w[T * K];
        route(&p, NULL, T, ids, w);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < K; i++) {
                count[ids[t * K + i]]++;
                for (int j = 0; j < i; j++) cr_assert_neq(ids[t * K + i], ids[t * K + j]);
            }
    }
    for (int e = 0; e < E; e++) cr_assert_eq(count[e], R * T * K / E, "expert %d: %d", e, count[e]);
}

Test(routing, uniform_is_distinct_seeded_and_spread, .timeout = 10) {
    enum { E = 16, K = 4, T = 20000 };
    static int32_t ids[T * K], again[T * K];
    static float w[T * K];
    moe_route_params_t p = params(MOE_ROUTE_UNIFORM, E, K);
    route(&p, NULL, T, ids, w);
    route(&p, NULL, T, again, w);
    cr_assert(memcmp(ids, again, sizeof ids) == 0, "same seed and step must repeat");
    int count[E] = {0};
    for (int t = 0; t < T; t++)
        for (int i = 0; i < K; i++) {
            cr_assert(ids[t * K + i] >= 0 && ids[t * K + i] < E);
            for (int j = 0; j < i; j++) cr_assert_neq(ids[t * K + i], ids[t * K + j]);
            count[ids[t * K + i]]++;
            cr_assert_float_eq(w[t * K + i], 0.25f, 1e-7);
        }
    for (int e = 0; e < E; e++)
        cr_assert(fabs(count[e] - T * K / (double)E) < 0.05 * T * K / E, "expert %d: %d", e, count[e]);
    char msg[64];
    moe_route_tokens(&p, NULL, NULL, NULL, T, 1, 0, again, w, msg, sizeof msg);
    cr_assert(memcmp(ids, again, sizeof ids) != 0, "another step must draw anew");
}

Test(routing, zipf_frequencies_follow_the_power_law, .timeout = 10) {
    enum { E = 32, T = 200000 };
    static int32_t ids[T];
    static float w[T];
    moe_route_params_t p = params(MOE_ROUTE_ZIPF, E, 1);
    route(&p, NULL, T, ids, w);
    double total = 0;
    for (int e = 0; e < E; e++) total += pow(e + 1, -1.2);
    int count[E] = {0};
    for (int t = 0; t < T; t++) count[ids[t]]++;
    for (int e = 0; e < 4; e++) {
        double expect = T * pow(e + 1, -1.2) / total;
        cr_assert(fabs(count[e] - expect) < 0.03 * expect, "expert %d: %d vs %.0f", e, count[e], expect);
    }
}

Test(routing, validation_names_the_problem, .timeout = 10) {
    char msg[256];
    moe_route_params_t p = params(MOE_ROUTE_SIGMOID_GROUP_TOPK, 10, 2);
    p.n_group = 4;
    cr_assert_eq(moe_route_validate(&p, msg, sizeof msg), MOE_ERR_CONFIG);
    cr_assert(strstr(msg, "n_group") != NULL, "%s", msg);
    p = params(MOE_ROUTE_PERFECT, 10, 2);
    p.n_ranks = 4;
    cr_assert_eq(moe_route_validate(&p, msg, sizeof msg), MOE_ERR_CONFIG);
    p = params(MOE_ROUTE_SOFTMAX_TOPK, 4, 5);
    cr_assert_eq(moe_route_validate(&p, msg, sizeof msg), MOE_ERR_CONFIG);
}

Test(slots, off_mode_is_identity, .timeout = 10) {
    moe_eplb_config_t eplb;
    memset(&eplb, 0, sizeof eplb);
    moe_slot_table_t table;
    char msg[256];
    cr_assert_eq(moe_slots_build(&eplb, 8, 2, &table, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(table.slots_per_rank, 4);
    for (int e = 0; e < 8; e++) cr_assert_eq(moe_slots_pick(&table, e, 0, 0), e);
    eplb.num_slots = 10;
    cr_assert_eq(moe_slots_build(&eplb, 8, 2, &table, msg, sizeof msg), MOE_ERR_CONFIG);
    cr_assert_eq(moe_slots_build(&eplb, 6, 4, &table, msg, sizeof msg), MOE_ERR_CONFIG);
}

Test(slots, replicas_prefer_the_own_rank_then_spread, .timeout = 10) {
    moe_eplb_config_t eplb;
    memset(&eplb, 0, sizeof eplb);
    eplb.mode = MOE_EPLB_STATIC;
    eplb.num_slots = 6;
    /* rank 0: slots 0-2 = experts 0,1,2; rank 1: slots 3-5 = experts 3,0,0 */
    int placement[6] = {0, 1, 2, 3, 0, 0};
    memcpy(eplb.placement, placement, sizeof placement);
    eplb.n_placement = 6;
    moe_slot_table_t table;
    char msg[256];
    cr_assert_eq(moe_slots_build(&eplb, 4, 2, &table, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(moe_slots_pick(&table, 0, 0, 5), 0);
    int s1 = moe_slots_pick(&table, 0, 1, 0), s2 = moe_slots_pick(&table, 0, 1, 1);
    cr_assert(s1 == 4 || s1 == 5);
    cr_assert_eq(s1, 4, "first local replica");
    cr_assert_eq(s2, 4);
    /* expert 3 lives only on rank 1; rank 0 tokens go there */
    cr_assert_eq(moe_slots_pick(&table, 3, 0, 7), 3);
    int missing[6] = {0, 1, 2, 0, 0, 0};
    memcpy(eplb.placement, missing, sizeof missing);
    cr_assert_eq(moe_slots_build(&eplb, 4, 2, &table, msg, sizeof msg), MOE_ERR_CONFIG);
    cr_assert(strstr(msg, "expert 3 has no slot") != NULL, "%s", msg);
}

Test(slots, replicas_on_other_ranks_alternate_by_token, .timeout = 10) {
    int placement[6] = {0, 1, 0, 2, 3, 0};
    moe_slot_table_t table;
    char msg[256];
    cr_assert_eq(moe_slots_from_placement(placement, 6, 4, 3, &table, msg, sizeof msg), MOE_OK);
    /* expert 0 in slots 0, 2, 5 → ranks 0, 1, 2; a rank-1 token picks slot 2 */
    cr_assert_eq(moe_slots_pick(&table, 0, 1, 3), 2);
    int placement2[6] = {1, 2, 3, 4, 0, 0};
    cr_assert_eq(moe_slots_from_placement(placement2, 6, 5, 3, &table, msg, sizeof msg), MOE_OK);
    /* expert 0 only on rank 2 (slots 4, 5): rank-0 tokens alternate */
    cr_assert_eq(moe_slots_pick(&table, 0, 0, 0), 4);
    cr_assert_eq(moe_slots_pick(&table, 0, 0, 1), 5);
}
