/* The CPU layer on 1 rank against the dense reference, every routing method,
 * with and without shared expert, replicas and chunking, on fresh random
 * inputs (the seed is in every failure message). */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "../kernels/cpu/moe_cpu.h"
#include "../kernels/moe_backend.h"

#include "support/dense_ref.h"
#include "support/layer_check.h"

ParameterizedTestParameters(layer, matches_dense_reference) {
    static int indices[64];
    for (int i = 0; i < moe_test_case_count; i++) indices[i] = i;
    return cr_make_param_array(int, indices, (size_t)moe_test_case_count);
}

ParameterizedTest(int *index, layer, matches_dense_reference, .timeout = 60) {
    const moe_test_case_t *c = &moe_test_cases[*index];
    moe_config_t cfg;
    moe_test_case_config(c, 1, &cfg);
    uint64_t seed = moe_test_fresh_seed();
    char msg[512] = "";
    const int sizes[] = {0, 1, 5, 64, 203};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        double err = moe_test_layer_check(&cfg, moe_ep_single(), sizes[s], seed + s, msg, sizeof msg);
        cr_assert(err <= 1e-5, "case %s, %d tokens, seed %llu: relative error %g %s", c->name,
                  sizes[s], (unsigned long long)(seed + s), err, msg);
    }
}

Test(layer, rejects_unknown_layer_and_bad_client_ids, .timeout = 30) {
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[7], 1, &cfg); /* client routing */
    cr_assert_eq(cfg.model.routing.method, MOE_ROUTE_CLIENT);
    char msg[512] = "";
    moe_cpu_engine_t *engine = NULL;
    cr_assert_eq(moe_cpu_create(&cfg, moe_ep_single(), &engine, msg, sizeof msg), MOE_OK, "%s", msg);
    float x[2 * 48] = {0}, out[2 * 48];
    int32_t ids[4] = {0, 1, 2, 9};
    float w[4] = {1, 1, 1, 1};
    cr_assert_eq(moe_cpu_forward(engine, 1, x, 2, ids, w, out, NULL, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert(strstr(msg, "layer 1") != NULL, "%s", msg);
    cr_assert_eq(moe_cpu_forward(engine, 3, x, 2, ids, w, out, NULL, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert(strstr(msg, "expert id 9") != NULL, "%s", msg);
    ids[3] = 3;
    cr_assert_eq(moe_cpu_forward(engine, 3, x, 2, ids, w, out, NULL, msg, sizeof msg), MOE_OK, "%s", msg);
    moe_cpu_destroy(engine);
}

Test(layer, rejects_shapes_that_cannot_be_placed, .timeout = 30) {
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[0], 3, &cfg);
    char msg[512] = "";
    moe_cpu_engine_t *engine = NULL;
    moe_ep_t three = {0, 3, MPI_COMM_NULL};
    cr_assert_eq(moe_cpu_create(&cfg, three, &engine, msg, sizeof msg), MOE_ERR_CONFIG);
    cr_assert(strstr(msg, "3 ranks") != NULL, "%s", msg);
    cr_assert_null(engine);
}

Test(layer, backend_table_refuses_what_this_version_lacks, .timeout = 30) {
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[0], 1, &cfg);
    char msg[512] = "";
    moe_backend_t backend;
    cfg.moe.comm = MOE_COMM_AUTO;
    cr_assert_eq(moe_backend_create(&cfg, moe_ep_single(), &backend, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_str_eq(backend.ops->name, "cpu");
    moe_backend_destroy(&backend);
    /* no GPU on the test machines: cuda is either not built or finds no device */
    cfg.moe.backend = MOE_BACKEND_CUDA;
    cr_assert_neq(moe_backend_create(&cfg, moe_ep_single(), &backend, msg, sizeof msg), MOE_OK);
    cr_assert(strstr(msg, "cuda") != NULL, "%s", msg);
    moe_backend_destroy(&backend);
}

/* EPLB migration: a new placement (replicas moved, experts swapped between
 * slots) gives the same layer — checked against the dense reference before
 * and after, and before against after: bit-identical (DESIGN §6). */
Test(layer, migration_keeps_the_layer, .timeout = 60) {
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[2], 1, &cfg); /* softmax_topk with 12 slots */
    uint64_t seed = moe_test_fresh_seed();
    char msg[512] = "";
    moe_cpu_engine_t *engine = NULL;
    moe_test_ref_t *ref = moe_test_ref_create(&cfg, msg, sizeof msg);
    cr_assert_not_null(ref, "%s", msg);
    cr_assert_eq(moe_cpu_create(&cfg, moe_ep_single(), &engine, msg, sizeof msg), MOE_OK, "%s", msg);
    enum { T = 57, H = 48 };
    static float x[T * H], before[T * H], after[T * H];
    static double want[T * H];
    moe_test_fill_random(x, T * H, seed);
    int layer = cfg.model.layer_ids[1];
    cr_assert_eq(moe_cpu_forward(engine, layer, x, T, NULL, NULL, before, NULL, msg, sizeof msg), MOE_OK, "%s", msg);
    int next[12] = {7, 6, 5, 4, 3, 2, 1, 0, 3, 3, 5, 2};
    int64_t bytes = -1;
    cr_assert_eq(moe_cpu_migrate(engine, layer, next, &bytes, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(bytes, 0, "every expert of the new placement was already on this (only) rank: copied, not read");
    cr_assert(memcmp(moe_cpu_placement(engine, layer), next, sizeof next) == 0);
    cr_assert(memcmp(moe_cpu_placement(engine, cfg.model.layer_ids[0]), next, sizeof next) != 0,
              "only the migrated layer changes");
    cr_assert_eq(moe_cpu_forward(engine, layer, x, T, NULL, NULL, after, NULL, msg, sizeof msg), MOE_OK, "%s", msg);
    moe_test_ref_forward(ref, layer, x, T, 0, 1, NULL, NULL, want, NULL);
    cr_assert(moe_test_rel_error(before, want, T * H) <= 1e-5, "seed %llu", (unsigned long long)seed);
    cr_assert(moe_test_rel_error(after, want, T * H) <= 1e-5, "seed %llu", (unsigned long long)seed);
    int differing = 0;
    for (int i = 0; i < T * H; i++) differing += memcmp(&before[i], &after[i], sizeof(float)) != 0;
    cr_assert_eq(differing, 0, "before vs after the swap: %d of %d values differ (seed %llu)", differing, T * H,
                 (unsigned long long)seed);
    /* in two halves, with a forward while the new weights load: it still
     * serves the current placement; a dropped migration changes nothing,
     * a committed one the placement only */
    int again[12] = {0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 0, 1};
    static float during[T * H];
    for (int commit = 0; commit < 2; commit++) {
        cr_assert_eq(moe_cpu_migrate_begin(engine, layer, again, msg, sizeof msg), MOE_OK, "%s", msg);
        cr_assert_eq(moe_cpu_migrate_begin(engine, layer, again, msg, sizeof msg), MOE_ERR_INVAL,
                     "one migration at a time");
        cr_assert_eq(moe_cpu_forward(engine, layer, x, T, NULL, NULL, during, NULL, msg, sizeof msg), MOE_OK, "%s", msg);
        cr_assert(memcmp(moe_cpu_placement(engine, layer), next, sizeof next) == 0, "loading changes nothing yet");
        while (moe_cpu_migrate_poll(engine) == MOE_TASK_RUNNING) usleep(1000);
        cr_assert_eq(moe_cpu_migrate_poll(engine), MOE_TASK_DONE);
        cr_assert_eq(moe_cpu_migrate_end(engine, commit, &bytes, msg, sizeof msg), MOE_OK, "%s", msg);
        cr_assert(memcmp(moe_cpu_placement(engine, layer), commit ? again : next, sizeof next) == 0);
        cr_assert_eq(moe_cpu_forward(engine, layer, x, T, NULL, NULL, after, NULL, msg, sizeof msg), MOE_OK, "%s", msg);
        cr_assert(memcmp(during, before, sizeof before) == 0 && memcmp(after, before, sizeof before) == 0,
                  "outputs during and after a migration are bit-identical (seed %llu)", (unsigned long long)seed);
    }
    cr_assert_eq(moe_cpu_migrate_end(engine, true, &bytes, msg, sizeof msg), MOE_ERR_INVAL, "nothing in flight");
    int bad[12] = {0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6}; /* expert 7 missing */
    cr_assert_eq(moe_cpu_migrate(engine, layer, bad, &bytes, msg, sizeof msg), MOE_ERR_CONFIG);
    cr_assert(memcmp(moe_cpu_placement(engine, layer), again, sizeof again) == 0, "a refused placement changes nothing");
    moe_cpu_destroy(engine);
    moe_test_ref_destroy(ref);
}

/* eplb.placement_file: a placement per layer, each honoured (and the layer
 * still matches the reference). */
Test(layer, placement_file_per_layer, .timeout = 60) {
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[2], 1, &cfg); /* 12 slots, static */
    cfg.eplb.n_placement = 0;
    char path[] = "/tmp/moe-placement-XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    const char *json = "{\"layers\": [3, 0], \"placement\": [[7,6,5,4,3,2,1,0,0,0,1,1], [0,1,2,3,4,5,6,7,7,7,6,6]]}";
    cr_assert_eq(write(fd, json, strlen(json)), (ssize_t)strlen(json));
    close(fd);
    snprintf(cfg.eplb.placement_file, sizeof cfg.eplb.placement_file, "%s", path);
    char msg[512] = "";
    moe_cpu_engine_t *engine = NULL;
    moe_err_t err = moe_cpu_create(&cfg, moe_ep_single(), &engine, msg, sizeof msg);
    unlink(path);
    cr_assert_eq(err, MOE_OK, "%s", msg);
    const int want0[12] = {0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 6, 6}, want3[12] = {7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 1, 1};
    cr_assert(memcmp(moe_cpu_placement(engine, 0), want0, sizeof want0) == 0);
    cr_assert(memcmp(moe_cpu_placement(engine, 3), want3, sizeof want3) == 0);
    moe_cpu_destroy(engine);
    fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0600);
    cr_assert(fd >= 0);
    cr_assert_eq(write(fd, json, strlen(json)), (ssize_t)strlen(json));
    close(fd);
    uint64_t seed = moe_test_fresh_seed();
    double worst = moe_test_layer_check(&cfg, moe_ep_single(), 77, seed, msg, sizeof msg);
    unlink(path);
    cr_assert(worst <= 1e-5, "with per-layer placements, seed %llu: %g %s", (unsigned long long)seed, worst, msg);
    /* a broken file is a startup error naming it */
    snprintf(cfg.eplb.placement_file, sizeof cfg.eplb.placement_file, "/nonexistent/placement.json");
    cr_assert_neq(moe_cpu_create(&cfg, moe_ep_single(), &engine, msg, sizeof msg), MOE_OK);
    cr_assert(strstr(msg, "/nonexistent/placement.json") != NULL, "%s", msg);
    cr_assert_null(engine);
}
