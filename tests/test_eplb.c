/* Tests of kernels/eplb.c: invariants of moe_eplb_place over random cases,
 * placement quality on Zipf loads (flat and hierarchical) against the
 * identity placement, the adoption rule, argument errors and static
 * placement files. Random cases print their seed in every failure. */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../kernels/moe_eplb.h"
#include "../kernels/moe_slots.h"

static uint64_t rng_next(uint64_t *state) { /* splitmix64 */
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static int rng_int(uint64_t *state, int n) { return (int)(rng_next(state) % (uint64_t)n); }

/* Expert e's load proportional to 1 / (e + 1)^s. */
static void zipf_loads(double *load, int experts, double s) {
    for (int e = 0; e < experts; e++) load[e] = 1000.0 / pow(e + 1, s);
}

typedef struct {
    uint64_t seed;
    int experts, n_slots, n_ranks, ranks_per_node;
} place_case_t;

/* Every invariant of a placement that holds for any input. */
static void check_invariants(const place_case_t *c, const double *load, const int *slot_expert,
                             const double *rank_load) {
    int slots_per_rank = c->n_slots / c->n_ranks;
    int replicas[MOE_MAX_EXPERTS] = {0};
    for (int s = 0; s < c->n_slots; s++) {
        int e = slot_expert[s];
        cr_assert(e >= 0 && e < c->experts, "seed %llu: slot %d holds expert %d of %d",
                  (unsigned long long)c->seed, s, e, c->experts);
        replicas[e]++;
        /* ascending expert id within a rank */
        if (s % slots_per_rank != 0)
            cr_assert(slot_expert[s - 1] <= e, "seed %llu: slot %d out of order in its rank",
                      (unsigned long long)c->seed, s);
    }
    for (int e = 0; e < c->experts; e++)
        cr_assert(replicas[e] >= 1, "seed %llu: expert %d has no slot", (unsigned long long)c->seed,
                  e);
    /* No rank holds an expert twice while the expert has no more replicas
     * than there are ranks to hold them (in its node, when hierarchical). */
    bool flat = c->ranks_per_node <= 0 || c->ranks_per_node >= c->n_ranks ||
                c->experts < c->n_ranks / c->ranks_per_node;
    int group_ranks = flat ? c->n_ranks : c->ranks_per_node;
    for (int s = 1; s < c->n_slots; s++) {
        int e = slot_expert[s];
        if (s % slots_per_rank != 0 && slot_expert[s - 1] == e)
            cr_assert(replicas[e] > group_ranks,
                      "seed %llu: rank %d holds expert %d twice with %d replicas over %d ranks",
                      (unsigned long long)c->seed, s / slots_per_rank, e, replicas[e], group_ranks);
    }
    /* Hierarchical: all replicas of an expert in one node. */
    if (!flat) {
        int slots_per_node = slots_per_rank * c->ranks_per_node;
        int node_of[MOE_MAX_EXPERTS];
        memset(node_of, -1, sizeof node_of);
        for (int s = 0; s < c->n_slots; s++) {
            int e = slot_expert[s], node = s / slots_per_node;
            cr_assert(node_of[e] < 0 || node_of[e] == node,
                      "seed %llu: expert %d on nodes %d and %d", (unsigned long long)c->seed, e,
                      node_of[e], node);
            node_of[e] = node;
        }
    }
    double expected[MOE_MAX_SLOTS];
    moe_eplb_imbalance(load, c->experts, slot_expert, c->n_slots, c->n_ranks, expected);
    for (int r = 0; r < c->n_ranks; r++)
        cr_assert(rank_load[r] == expected[r], "seed %llu: rank %d load %g, imbalance says %g",
                  (unsigned long long)c->seed, r, rank_load[r], expected[r]);
}

Test(eplb, random_invariants, .timeout = 60) {
    static const int rank_choices[] = {1, 2, 4, 8};
    static double load[MOE_MAX_EXPERTS], rank_load[MOE_MAX_SLOTS], again_load[MOE_MAX_SLOTS];
    static int slot_expert[MOE_MAX_SLOTS], again[MOE_MAX_SLOTS];
    char msg[256];
    for (uint64_t seed = 1; seed <= 2000; seed++) {
        uint64_t state = seed;
        place_case_t c = {.seed = seed};
        c.experts = 2 + rng_int(&state, 255);
        c.n_ranks = rank_choices[rng_int(&state, 4)];
        int base = (c.experts + c.n_ranks - 1) / c.n_ranks * c.n_ranks;
        c.n_slots = base + c.n_ranks * rng_int(&state, 9);
        int rpn = rng_int(&state, 3);
        c.ranks_per_node = rpn == 0 ? 0 : rpn == 1 ? 2 : 4;
        int zero_percent = rng_int(&state, 4) * 30; /* 0, 30, 60 or 90 % idle experts */
        for (int e = 0; e < c.experts; e++)
            load[e] = rng_int(&state, 100) < zero_percent ? 0.0 : (double)rng_int(&state, 100000);
        if (rng_int(&state, 3) == 0) /* skewed: a few very hot experts */
            for (int k = 0; k < 3; k++) load[rng_int(&state, c.experts)] *= 50.0;

        moe_err_t err = moe_eplb_place(load, c.experts, c.n_slots, c.n_ranks, c.ranks_per_node,
                                       slot_expert, rank_load, msg, sizeof msg);
        cr_assert_eq(err, MOE_OK, "seed %llu: %s", (unsigned long long)seed, msg);
        check_invariants(&c, load, slot_expert, rank_load);
        err = moe_eplb_place(load, c.experts, c.n_slots, c.n_ranks, c.ranks_per_node, again,
                             again_load, msg, sizeof msg);
        cr_assert_eq(err, MOE_OK, "seed %llu: %s", (unsigned long long)seed, msg);
        cr_assert(memcmp(again, slot_expert, sizeof(int) * (size_t)c.n_slots) == 0 &&
                      memcmp(again_load, rank_load, sizeof(double) * (size_t)c.n_ranks) == 0,
                  "seed %llu: two calls gave different placements", (unsigned long long)seed);
    }
}

/* Imbalance of the placement of Zipf(1.2) loads over 128 experts, 160 slots,
 * 8 ranks; also checks the invariants. */
static double zipf_case(int ranks_per_node, const char *label) {
    double load[128], rank_load[8];
    int slot_expert[160], identity[128];
    char msg[256];
    zipf_loads(load, 128, 1.2);
    cr_assert_eq(moe_eplb_place(load, 128, 160, 8, ranks_per_node, slot_expert, rank_load, msg,
                                sizeof msg),
                 MOE_OK, "%s", msg);
    place_case_t c = {0, 128, 160, 8, ranks_per_node};
    check_invariants(&c, load, slot_expert, rank_load);
    double imbalance = moe_eplb_imbalance(load, 128, slot_expert, 160, 8, NULL);
    for (int e = 0; e < 128; e++) identity[e] = e;
    double identity_imbalance = moe_eplb_imbalance(load, 128, identity, 128, 8, NULL);
    cr_log_info("eplb zipf s=1.2 E=128 slots=160 ranks=8 %s: imbalance %.4f (identity %.4f)",
                label, imbalance, identity_imbalance);
    printf("eplb zipf s=1.2 E=128 slots=160 ranks=8 %s: imbalance %.4f (identity %.4f)\n", label,
           imbalance, identity_imbalance);
    cr_assert_lt(imbalance, identity_imbalance, "%s: %.4f not better than identity %.4f", label,
                 imbalance, identity_imbalance);
    return imbalance;
}

Test(eplb, zipf_quality, .timeout = 10) {
    double imbalance = zipf_case(0, "flat");
    cr_assert_leq(imbalance, 1.05, "flat imbalance %.4f", imbalance);
}

Test(eplb, zipf_hierarchical, .timeout = 10) {
    double imbalance = zipf_case(4, "2 nodes x 4 ranks");
    cr_assert_leq(imbalance, 1.10, "hierarchical imbalance %.4f", imbalance);
}

/* Node loads of hierarchical placements stay within one hot expert of the
 * mean: the greedy bound (every expert went to the least loaded node). */
Test(eplb, hierarchical_node_balance, .timeout = 30) {
    static double load[256], rank_load[8];
    static int slot_expert[MOE_MAX_SLOTS];
    char msg[256];
    for (uint64_t seed = 1; seed <= 500; seed++) {
        uint64_t state = seed * 7919;
        place_case_t c = {.seed = seed, .n_ranks = 8, .ranks_per_node = 4};
        c.experts = 8 + rng_int(&state, 249);
        c.n_slots = (c.experts + 7) / 8 * 8 + 8 * rng_int(&state, 6);
        double max_load = 0.0, total = 0.0;
        for (int e = 0; e < c.experts; e++) {
            load[e] = (double)rng_int(&state, 1000) * (rng_int(&state, 10) == 0 ? 20.0 : 1.0);
            max_load = fmax(max_load, load[e]);
            total += load[e];
        }
        cr_assert_eq(moe_eplb_place(load, c.experts, c.n_slots, 8, 4, slot_expert, rank_load, msg,
                                    sizeof msg),
                     MOE_OK, "seed %llu: %s", (unsigned long long)seed, msg);
        check_invariants(&c, load, slot_expert, rank_load);
        for (int node = 0; node < 2; node++) {
            double node_load = 0.0;
            for (int r = node * 4; r < node * 4 + 4; r++) node_load += rank_load[r];
            cr_assert_leq(node_load, total / 2 + max_load + 1e-6 * total,
                          "seed %llu: node %d load %g, mean %g, hottest expert %g",
                          (unsigned long long)seed, node, node_load, total / 2, max_load);
        }
    }
}

Test(eplb, small_cases_by_hand, .timeout = 10) {
    char msg[256];
    int slot_expert[8];
    double rank_load[2];
    /* 3 experts, 4 slots, 2 ranks: expert 0 (load 6) gets the extra slot
     * (3 per replica); replicas 0:3, 0:3, 1:2, 2:1 -> rank 0 gets 0 then 1
     * (loads tie at 3, lower rank), rank 1 gets 0 then 2. */
    double load[3] = {6, 2, 1};
    cr_assert_eq(moe_eplb_place(load, 3, 4, 2, 0, slot_expert, rank_load, msg, sizeof msg), MOE_OK);
    int expected[4] = {0, 1, 0, 2};
    cr_assert_arr_eq(slot_expert, expected, sizeof expected);
    cr_assert_float_eq(rank_load[0], 5.0, 1e-12);
    cr_assert_float_eq(rank_load[1], 4.0, 1e-12);
    /* All loads zero: the extra slots go round-robin from the lowest id,
     * and the imbalance is 1. */
    double zero[4] = {0, 0, 0, 0};
    cr_assert_eq(moe_eplb_place(zero, 4, 8, 2, 0, slot_expert, rank_load, msg, sizeof msg), MOE_OK);
    int expected_zero[8] = {0, 1, 2, 3, 0, 1, 2, 3};
    cr_assert_arr_eq(slot_expert, expected_zero, sizeof expected_zero);
    cr_assert_float_eq(moe_eplb_imbalance(zero, 4, slot_expert, 8, 2, NULL), 1.0, 1e-12);
}

Test(eplb, argument_errors, .timeout = 10) {
    char msg[256];
    int slot_expert[16];
    double load[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    cr_assert_eq(moe_eplb_place(load, 0, 8, 2, 0, slot_expert, NULL, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert(strstr(msg, "experts") != NULL, "%s", msg);
    cr_assert_eq(moe_eplb_place(load, 8, 6, 2, 0, slot_expert, NULL, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert(strstr(msg, "6 slots for 8 experts") != NULL, "%s", msg);
    cr_assert_eq(moe_eplb_place(load, 8, 9, 2, 0, slot_expert, NULL, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert(strstr(msg, "split evenly over 2 ranks") != NULL, "%s", msg);
    cr_assert_eq(moe_eplb_place(load, 8, MOE_MAX_SLOTS + 2, 2, 0, slot_expert, NULL, msg, sizeof msg),
                 MOE_ERR_INVAL);
    cr_assert_eq(moe_eplb_place(load, 8, 12, 6, 4, slot_expert, NULL, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert(strstr(msg, "nodes of 4 ranks") != NULL, "%s", msg);
    load[3] = -1.0;
    cr_assert_eq(moe_eplb_place(load, 8, 8, 2, 0, slot_expert, NULL, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert(strstr(msg, "expert 3") != NULL, "%s", msg);
    load[3] = NAN;
    cr_assert_eq(moe_eplb_place(load, 8, 8, 2, 0, slot_expert, NULL, msg, sizeof msg), MOE_ERR_INVAL);
    int bad[4] = {0, 1, 9, 2};
    cr_assert(isnan(moe_eplb_imbalance(load, 4, bad, 4, 2, NULL)));
}

Test(eplb, should_adopt, .timeout = 10) {
    cr_assert(moe_eplb_should_adopt(1.50, 1.40, 0.05));  /* 1.40 <= 1.425 */
    cr_assert(!moe_eplb_should_adopt(1.50, 1.45, 0.05)); /* 1.45 > 1.425 */
    cr_assert(moe_eplb_should_adopt(2.00, 1.00, 0.50));  /* exactly the bound */
    cr_assert(!moe_eplb_should_adopt(1.20, 1.20, 0.01)); /* no gain */
    cr_assert(moe_eplb_should_adopt(1.20, 1.20, 0.0));   /* 0: any non-worse one */
    cr_assert(!moe_eplb_should_adopt(1.50, NAN, 0.05));
}

/* ---- placement files ---- */

static char file_path[64];

static const char *write_file(const char *text) {
    snprintf(file_path, sizeof file_path, "/tmp/test_eplb_XXXXXX");
    int fd = mkstemp(file_path);
    cr_assert(fd >= 0);
    cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return file_path;
}

/* Loads text (written to a temporary file, removed again) as a 4-expert,
 * 6-slot placement for the daemon layers {3, 5}. */
static moe_err_t load_text(const char *text, int *slot_expert, char *msg, size_t msg_size) {
    static const int layer_ids[2] = {3, 5};
    const char *path = write_file(text);
    moe_err_t err = moe_eplb_load_placement_file(path, 4, 6, 2, layer_ids, slot_expert, msg,
                                                 msg_size);
    unlink(path);
    return err;
}

/* The file is refused with a message naming the file and containing needle. */
static void expect_error(const char *text, const char *needle) {
    int slot_expert[12];
    char msg[512] = "";
    moe_err_t err = load_text(text, slot_expert, msg, sizeof msg);
    cr_assert_neq(err, MOE_OK, "accepted: %s", text);
    cr_assert(strstr(msg, file_path) != NULL, "message does not name the file: %s", msg);
    cr_assert(strstr(msg, needle) != NULL, "message \"%s\" lacks \"%s\"", msg, needle);
}

Test(eplb, file_single_list, .timeout = 10) {
    int slot_expert[12];
    char msg[256];
    cr_assert_eq(load_text("{\"placement\": [0, 1, 2, 3, 0, 1]}", slot_expert, msg, sizeof msg),
                 MOE_OK, "%s", msg);
    int expected[12] = {0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1};
    cr_assert_arr_eq(slot_expert, expected, sizeof expected);
}

Test(eplb, file_per_layer, .timeout = 10) {
    int slot_expert[12];
    char msg[256];
    /* listed in the other order than the daemon's layers: matched by id */
    cr_assert_eq(load_text("{\"layers\": [5, 3], \"placement\": [[3, 2, 1, 0, 0, 0], "
                           "[0, 1, 2, 3, 3, 3]]}",
                           slot_expert, msg, sizeof msg),
                 MOE_OK, "%s", msg);
    int expected[12] = {0, 1, 2, 3, 3, 3, 3, 2, 1, 0, 0, 0};
    cr_assert_arr_eq(slot_expert, expected, sizeof expected);
    /* without "layers": in order */
    cr_assert_eq(load_text("{\"placement\": [[3, 2, 1, 0, 0, 0], [0, 1, 2, 3, 3, 3]]}",
                           slot_expert, msg, sizeof msg),
                 MOE_OK, "%s", msg);
    int in_order[12] = {3, 2, 1, 0, 0, 0, 0, 1, 2, 3, 3, 3};
    cr_assert_arr_eq(slot_expert, in_order, sizeof in_order);
}

Test(eplb, file_errors, .timeout = 10) {
    expect_error("{\"placement\": [0, 1, 2", "not valid JSON");
    expect_error("[0, 1, 2, 3, 0, 1]", "\"placement\"");
    expect_error("{\"placement\": [0, 1, 2, 3, 0]}", "placement: 5 entries for 6 slots");
    expect_error("{\"placement\": [0, 1, 2, 3, 0, 4]}", "placement[5]: expert 4 out of range [0, 4)");
    expect_error("{\"placement\": [0, 1, 2, -1, 0, 1]}", "placement[3]: expert -1 out of range");
    expect_error("{\"placement\": [0, 1, 2, 1.5, 0, 1]}", "placement[3]: expected an integer");
    expect_error("{\"placement\": [0, 1, 2, 0, 0, 1]}", "placement: expert 3 has no slot");
    expect_error("{\"placement\": [[0, 1, 2, 3, 0, 1]]}", "1 per-layer lists for 2 layers");
    expect_error("{\"placement\": [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]]}",
                 "3 per-layer lists for 2 layers");
    expect_error("{\"layers\": [3, 4], \"placement\": [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]]}",
                 "no placement for layer 5");
    expect_error("{\"layers\": [3], \"placement\": [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]]}",
                 "layers: expected a list of 2 layer ids");
    expect_error("{\"layers\": [3, 5], \"placement\": [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 1]]}",
                 "placement[1]: expert 3 has no slot");
    int slot_expert[12];
    char msg[256];
    cr_assert_eq(moe_eplb_load_placement_file("/nonexistent/p.json", 4, 6, 1, NULL, slot_expert,
                                              msg, sizeof msg),
                 MOE_ERR_IO);
    cr_assert(strstr(msg, "/nonexistent/p.json: cannot open") != NULL, "%s", msg);
}

/* At most one replica per rank until every expert has one on every rank:
 * 3 experts, 6 slots on 2 ranks, one hot expert. The even split used to
 * give expert 0 all three extra slots (two on one rank, where routing's
 * own-rank pick leaves the second idle); now every expert sits on both. */
Test(eplb, replicas_one_per_rank_first, .timeout = 10) {
    char msg[256];
    int slot_expert[6];
    double load[3] = {100, 1, 1}, rank_load[2];
    cr_assert_eq(moe_eplb_place(load, 3, 6, 2, 0, slot_expert, rank_load, msg, sizeof msg), MOE_OK, "%s", msg);
    int expected[6] = {0, 1, 2, 0, 1, 2};
    cr_assert_arr_eq(slot_expert, expected, sizeof expected);
    cr_assert_float_eq(rank_load[0], 51.0, 1e-9);
    cr_assert_float_eq(rank_load[1], 51.0, 1e-9);
    /* more slots than experts x ranks: the rest go beyond one per rank */
    int many[8];
    double two[2] = {10, 1};
    cr_assert_eq(moe_eplb_place(two, 2, 8, 2, 0, many, NULL, msg, sizeof msg), MOE_OK, "%s", msg);
    int count0 = 0;
    for (int s = 0; s < 8; s++) count0 += many[s] == 0;
    cr_assert_eq(count0, 6, "expert 0 has %d of 8 slots", count0);
}

/* Neither replication rule wins everywhere: on these loads one copy per
 * rank first predicts 1.133 and the hottest-per-copy rule 1.000 (found by a
 * review); the placement must keep the better one. */
Test(eplb, keeps_the_better_replication_rule, .timeout = 10) {
    char msg[256];
    int slot_expert[12];
    double load[5] = {1, 1, 0, 3, 0};
    cr_assert_eq(moe_eplb_place(load, 5, 12, 4, 0, slot_expert, NULL, msg, sizeof msg), MOE_OK, "%s", msg);
    const double imbalance = moe_eplb_imbalance(load, 5, slot_expert, 12, 4, NULL);
    cr_assert_leq(imbalance, 1.0 + 1e-12, "predicted imbalance %.4f", imbalance);
}

/* The predicted rank loads against routing's own pick (moe_slots_pick),
 * token by token: on random placements (replicas doubled up on a rank
 * allowed), every rank sends L_e tokens to expert e, L_e a multiple of 60
 * so that tokens of ranks without a replica split exactly over up to 6
 * replicas. The prediction must equal the count. */
Test(eplb, prediction_follows_the_pick, .timeout = 30) {
    static moe_slot_table_t table;
    char msg[256];
    for (uint64_t seed = 1; seed <= 300; seed++) {
        uint64_t state = seed * 104729;
        const int n_ranks = 2 + rng_int(&state, 4), per_rank = 2 + rng_int(&state, 4);
        /* at least n_slots / 6 experts, so that 6 replicas each fill the slots */
        const int n_slots = n_ranks * per_rank, min_experts = (n_slots + 5) / 6;
        const int experts = min_experts + rng_int(&state, n_slots - min_experts + 1);
        int slot_expert[64], replicas[64] = {0};
        /* every expert once, the other slots random, at most 6 replicas */
        for (int s = 0; s < n_slots; s++) {
            int e = s < experts ? s : rng_int(&state, experts);
            while (replicas[e] == 6) e = (e + 1) % experts;
            slot_expert[s] = e, replicas[e]++;
        }
        for (int s = n_slots - 1; s > 0; s--) { /* shuffle across ranks */
            int o = rng_int(&state, s + 1), t = slot_expert[s];
            slot_expert[s] = slot_expert[o], slot_expert[o] = t;
        }
        double load[64], counted[8] = {0}, predicted[8];
        cr_assert_eq(moe_slots_from_placement(slot_expert, n_slots, experts, n_ranks, &table, msg, sizeof msg),
                     MOE_OK, "seed %llu: %s", (unsigned long long)seed, msg);
        for (int e = 0; e < experts; e++) {
            const int per_source = 60 * (1 + rng_int(&state, 5));
            load[e] = (double)per_source * n_ranks;
            for (int r = 0; r < n_ranks; r++)
                for (int t = 0; t < per_source; t++)
                    counted[moe_slots_pick(&table, e, r, t) / per_rank] += 1.0;
        }
        const double imbalance = moe_eplb_imbalance(load, experts, slot_expert, n_slots, n_ranks, predicted);
        double most = 0, total = 0;
        for (int r = 0; r < n_ranks; r++) {
            cr_assert_float_eq(predicted[r], counted[r], 1e-6 * counted[r] + 1e-9,
                               "seed %llu: rank %d predicted %g, routing sends %g", (unsigned long long)seed, r,
                               predicted[r], counted[r]);
            most = fmax(most, counted[r]), total += counted[r];
        }
        cr_assert_float_eq(imbalance, most / (total / n_ranks), 1e-9, "seed %llu", (unsigned long long)seed);
    }
}
