/* test_oracle: the CPU engine on real checkpoint layouts against an
 * independent float64 numpy oracle (tests/oracle/make_oracle.py) — Mixtral
 * (bf16), Qwen2-MoE with a gated shared expert (f16) and DeepSeek-V3 with
 * group routing, correction bias and a shared expert (f32, sharded). Shapes
 * and routing come from each checkpoint's config.json through
 * moe_config_resolve_model, exactly as the daemon reads them. Fresh random
 * weights and inputs every run; the seed is in every failure message.
 * Needs python3 with numpy (CI installs python3-numpy). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../config/moe_config.h"
#include "../kernels/cpu/moe_cpu.h"

#define ORACLE_DIR "build/oracle"
#define ORACLE_TOKENS 37
/* Weights are identical on both sides (rounded to the checkpoint dtype
 * first); what is left is float32 vs float64 arithmetic. */
#define ORACLE_ATOL 1e-4
#define ORACLE_RTOL 1e-3

typedef struct {
    const char *name;
    moe_naming_t naming;
    int hidden, experts, top_k, moe_intermediate, shared_intermediate;
    bool shared_expert_gate;
    moe_route_method_t method;
    bool norm_topk_prob;
    int n_layers;
    int layers[4];
} oracle_model_t;

/* Runs make_oracle.py for one model; returns its seed line for messages. */
static void run_make_oracle(const char *name, char *seed_line, size_t size) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "python3 tests/oracle/make_oracle.py %s --only %s 2>&1",
             ORACLE_DIR, name);
    FILE *pipe = popen(cmd, "r");
    cr_assert_not_null(pipe, "cannot run '%s'", cmd);
    char output[8192] = "";
    size_t used = 0, got;
    while ((got = fread(output + used, 1, sizeof output - 1 - used, pipe)) > 0) used += got;
    output[used] = '\0';
    int status = pclose(pipe);
    cr_assert_eq(status, 0,
                 "'%s' failed (status %d). The oracle needs python3 with numpy "
                 "(apt-get install python3-numpy). Output:\n%s",
                 cmd, status, output);
    const char *seed = strstr(output, "seed ");
    if (seed == NULL) seed = "seed unknown";
    int n = 5 + (int)strcspn(seed + 5, " \n"); /* "seed 1234" */
    snprintf(seed_line, size, "%.*s", n, seed);
}

/* Reads exactly count floats from dir/file. */
static void read_f32(const char *dir, const char *file, float *dst, size_t count,
                     const char *seed) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s: cannot open (%s)", path, seed);
    size_t got = fread(dst, sizeof *dst, count, f);
    int extra = fgetc(f);
    fclose(f);
    cr_assert(got == count && extra == EOF, "%s: expected exactly %zu floats (%s)", path, count,
              seed);
}

static void check_model(const oracle_model_t *want) {
    char seed[128];
    run_make_oracle(want->name, seed, sizeof seed);

    moe_config_t cfg;
    moe_config_defaults(&cfg);
    cfg.model.weights.format = MOE_WEIGHTS_SAFETENSORS;
    cfg.model.weights.naming = want->naming;
    snprintf(cfg.model.weights.path, sizeof cfg.model.weights.path, "%s/%s", ORACLE_DIR,
             want->name);
    moe_config_errors_t errs;
    memset(&errs, 0, sizeof errs);
    moe_err_t ret = moe_config_resolve_model(&cfg, &errs);
    cr_assert_eq(ret, MOE_OK, "%s: resolving config.json: %s (%s)", want->name,
                 errs.count ? errs.messages[0] : moe_strerror(ret), seed);

    /* What config.json says, as resolved: a wrong value here explains a
     * numeric failure below better than the numbers would. */
    const moe_model_config_t *m = &cfg.model;
    cr_expect_eq(m->hidden, want->hidden, "%s: hidden", want->name);
    cr_expect_eq(m->experts, want->experts, "%s: experts", want->name);
    cr_expect_eq(m->top_k, want->top_k, "%s: top_k", want->name);
    cr_expect_eq(m->moe_intermediate, want->moe_intermediate, "%s: moe_intermediate",
                 want->name);
    cr_expect_eq(m->shared_intermediate, want->shared_intermediate, "%s: shared_intermediate",
                 want->name);
    cr_expect_eq(m->shared_expert_gate, want->shared_expert_gate, "%s: shared_expert_gate",
                 want->name);
    cr_expect_eq(m->routing.method, want->method, "%s: routing.method", want->name);
    cr_expect_eq(m->routing.norm_topk_prob, want->norm_topk_prob, "%s: norm_topk_prob",
                 want->name);
    if (want->method == MOE_ROUTE_SIGMOID_GROUP_TOPK) {
        cr_expect_eq(m->routing.n_group, 4, "%s: n_group", want->name);
        cr_expect_eq(m->routing.topk_group, 2, "%s: topk_group", want->name);
        cr_expect(fabs(m->routing.routed_scaling_factor - 2.5) < 1e-12,
                  "%s: routed_scaling_factor %g", want->name, m->routing.routed_scaling_factor);
    }
    cr_assert_eq(m->n_layers, want->n_layers, "%s: %d MoE layers resolved, want %d",
                 want->name, m->n_layers, want->n_layers);
    for (int i = 0; i < want->n_layers; i++)
        cr_assert_eq(m->layer_ids[i], want->layers[i], "%s: layer_ids[%d] = %d, want %d",
                     want->name, i, m->layer_ids[i], want->layers[i]);

    moe_cpu_engine_t *engine = NULL;
    char msg[1024] = "";
    ret = moe_cpu_create(&cfg, moe_ep_single(), &engine, msg, sizeof msg);
    cr_assert_eq(ret, MOE_OK, "%s: moe_cpu_create: %s (%s)", want->name, msg, seed);

    size_t count = (size_t)ORACLE_TOKENS * (size_t)m->hidden;
    float *x = malloc(count * sizeof *x), *expected = malloc(count * sizeof *x),
          *out = malloc(count * sizeof *x);
    cr_assert(x && expected && out);
    for (int i = 0; i < m->n_layers; i++) {
        int layer = m->layer_ids[i];
        char file[64];
        snprintf(file, sizeof file, "input_L%d.f32", layer);
        read_f32(m->weights.path, file, x, count, seed);
        snprintf(file, sizeof file, "expected_L%d.f32", layer);
        read_f32(m->weights.path, file, expected, count, seed);
        for (size_t j = 0; j < count; j++) out[j] = NAN; /* an unwritten element fails */
        ret = moe_cpu_forward(engine, layer, x, ORACLE_TOKENS, NULL, NULL, out, NULL, msg,
                              sizeof msg);
        cr_assert_eq(ret, MOE_OK, "%s layer %d: forward: %s (%s)", want->name, layer, msg, seed);
        double worst = 0, worst_excess = -1;
        size_t worst_at = 0;
        for (size_t j = 0; j < count; j++) {
            double err = isnan(out[j]) ? INFINITY : fabs((double)out[j] - (double)expected[j]);
            double excess = err - (ORACLE_ATOL + ORACLE_RTOL * fabs((double)expected[j]));
            if (err > worst) worst = err;
            if (excess > worst_excess) {
                worst_excess = excess;
                worst_at = j;
            }
        }
        cr_log_info("oracle %s layer %d: worst |out - expected| = %.3g (%s)", want->name, layer,
                    worst, seed);
        cr_expect(worst_excess <= 0,
                  "%s layer %d: token %zu dim %zu: out %.7g, expected %.7g (|err| %.3g > "
                  "%g + %g*|exp|); worst error %.3g (%s)",
                  want->name, layer, worst_at / (size_t)m->hidden, worst_at % (size_t)m->hidden,
                  out[worst_at], expected[worst_at],
                  fabs((double)out[worst_at] - (double)expected[worst_at]), ORACLE_ATOL,
                  ORACLE_RTOL, worst, seed);
    }
    free(x);
    free(expected);
    free(out);
    moe_cpu_destroy(engine);
}

Test(oracle, mixtral_bf16, .timeout = 60) {
    oracle_model_t want = {"mixtral", MOE_NAMING_MIXTRAL, 32, 8, 2, 16, 0, false,
                           MOE_ROUTE_SOFTMAX_TOPK, true, 2, {0, 1}};
    check_model(&want);
}

Test(oracle, qwen_moe_f16_shared_gate, .timeout = 60) {
    oracle_model_t want = {"qwen_moe", MOE_NAMING_QWEN_MOE, 32, 8, 2, 16, 24, true,
                           MOE_ROUTE_SOFTMAX_TOPK, false, 2, {0, 1}};
    check_model(&want);
}

Test(oracle, deepseek_v3_f32_sharded, .timeout = 60) {
    oracle_model_t want = {"deepseek_v3", MOE_NAMING_DEEPSEEK_V3, 32, 16, 4, 16, 16, false,
                           MOE_ROUTE_SIGMOID_GROUP_TOPK, true, 2, {1, 2}};
    check_model(&want);
}
