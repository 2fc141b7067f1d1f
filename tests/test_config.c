/* Tests of config/: the field table, the YAML loader and its error messages,
 * cross-field checks, config.json resolution, the JSON dump and the reload
 * diff. Run from the repository root (the examples are read from config/). */
#include <criterion/criterion.h>

#include <cjson/cJSON.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../config/config_fields.h"
#include "../config/moe_config.h"

/* moe_config_t and the error list are large: keep them off the stack. */
static moe_config_t cfg, other;
static moe_config_errors_t errs;

static moe_err_t load(const char *yaml) {
    return moe_config_load_string(yaml, strlen(yaml), "t.yaml", &cfg, &errs);
}

static char all_errors[MOE_CONFIG_MAX_ERRORS * 520];
static const char *errors_text(void) {
    size_t used = 0;
    all_errors[0] = '\0';
    for (int i = 0; i < errs.count; i++)
        used += (size_t)snprintf(all_errors + used, sizeof all_errors - used, "  [%d] %s\n", i,
                                 errs.messages[i]);
    return all_errors;
}

static bool has_error(const char *needle) {
    for (int i = 0; i < errs.count; i++)
        if (strstr(errs.messages[i], needle) != NULL) return true;
    return false;
}

#define EXPECT_ERROR(needle) \
    cr_expect(has_error(needle), "no error containing \"%s\"; got:\n%s", needle, errors_text())
#define ASSERT_LOADS(yaml) \
    cr_assert_eq(load(yaml), MOE_OK, "load failed:\n%s", errors_text())

/* ---- the table -------------------------------------------------------------------- */

Test(config, field_table_is_consistent, .timeout = 10) {
    cr_assert_leq(moe_config_field_count, 256);
    moe_config_t scratch;
    char msg[300];
    for (int i = 0; i < moe_config_field_count; i++) {
        const moe_config_field_t *f = &moe_config_fields[i];
        cr_expect_eq(moe_config_field_index(f->path), i, "%s is listed twice", f->path);
        cr_expect(f->help != NULL && f->help[0] != '\0', "%s has no help", f->path);
        size_t want = 0;
        switch (f->type) {
        case MOE_FIELD_INT:
        case MOE_FIELD_ENUM: want = sizeof(int); break;
        case MOE_FIELD_INT64: want = sizeof(int64_t); break;
        case MOE_FIELD_UINT64: want = sizeof(uint64_t); break;
        case MOE_FIELD_DOUBLE: want = sizeof(double); break;
        case MOE_FIELD_BOOL: want = sizeof(bool); break;
        case MOE_FIELD_STRING: want = f->capacity; break;
        case MOE_FIELD_INT_LIST:
        case MOE_FIELD_LAYERS: want = f->capacity * sizeof(int); break;
        }
        cr_expect_eq(f->size, want, "%s: member size %zu does not match its type", f->path,
                     f->size);
        cr_expect(moe_config_field_set_scalar(i, &scratch, f->def, false, msg, sizeof msg),
                  "default of %s does not parse: %s", f->path, msg);
    }
}

Test(config, defaults_match_design, .timeout = 10) {
    moe_config_defaults(&cfg);
    cr_expect_eq(cfg.model.weights.format, MOE_WEIGHTS_SYNTHETIC);
    cr_expect_eq(cfg.model.weights.seed, 1);
    cr_expect_eq(cfg.model.n_layers, 2);
    cr_expect_eq(cfg.model.layer_ids[1], 1);
    cr_expect(cfg.model.layers_from_count);
    cr_expect_eq(cfg.model.hidden, 2048);
    cr_expect_eq(cfg.model.moe_intermediate, 768);
    cr_expect_eq(cfg.model.experts, 128);
    cr_expect_eq(cfg.model.top_k, 8);
    cr_expect_eq(cfg.model.shared_intermediate, 0);
    cr_expect_not(cfg.model.shared_expert_gate);
    cr_expect_eq(cfg.model.routing.method, MOE_ROUTE_SOFTMAX_TOPK);
    cr_expect(cfg.model.routing.norm_topk_prob);
    cr_expect_eq(cfg.model.routing.n_group, 1);
    cr_expect_float_eq(cfg.model.routing.routed_scaling_factor, 1.0, 1e-12);
    cr_expect_float_eq(cfg.model.routing.zipf_s, 1.2, 1e-12);
    cr_expect_eq(cfg.moe.backend, MOE_BACKEND_CPU);
    cr_expect_eq(cfg.moe.gemm, MOE_GEMM_AUTO);
    cr_expect_eq(cfg.moe.comm, MOE_COMM_AUTO);
    cr_expect_eq(cfg.moe.combine, MOE_COMBINE_PARTIAL);
    cr_expect_eq(cfg.moe.max_tokens_per_step, 8192);
    cr_expect_eq(cfg.moe.chunking.max_tokens_per_chunk, 4096);
    cr_expect(cfg.moe.chunking.overlap);
    cr_expect_eq(cfg.moe.autotune.max_tokens, 16384);
    cr_expect_str_eq(cfg.moe.autotune.cache, "");
    cr_expect_eq(cfg.eplb.mode, MOE_EPLB_OFF);
    cr_expect_eq(cfg.eplb.num_slots, 0);
    cr_expect_eq(cfg.eplb.window_steps, 1000);
    cr_expect_float_eq(cfg.eplb.min_improvement, 0.05, 1e-12);
    cr_expect_eq(cfg.eplb.ranks_per_node, 8);
    cr_expect_eq(cfg.eplb.n_placement, 0);
    cr_expect_eq(cfg.scheduler.idle_poll_us, 50);
    cr_expect_eq(cfg.scheduler.max_wait_ms, 20);
    cr_expect_eq(cfg.scheduler.stall_timeout_ms, 30000);
    cr_expect_str_eq(cfg.serve.data, "127.0.0.1:7600");
    cr_expect_str_eq(cfg.serve.control, "unix:/tmp/moed-control.sock");
    cr_expect_str_eq(cfg.serve.metrics, "");
    cr_expect_eq(cfg.serve.max_frame_bytes, 268435456);
    cr_expect_eq(cfg.serve.max_request_tokens, 16384);
    cr_expect_eq(cfg.serve.max_queue_tokens, 262144);
    cr_expect_eq(cfg.serve.max_connections, 4096);
    cr_expect_eq(cfg.serve.max_output_bytes, 268435456);
    cr_expect_eq(cfg.serve.request_timeout_ms, 30000);
    cr_expect_eq(cfg.log.level, 1);
    for (int i = 0; i < 4; i++) cr_expect_eq(cfg.set_mask[i], 0);
}

Test(config, enum_names, .timeout = 10) {
    cr_expect_str_eq(moe_route_method_name(MOE_ROUTE_SIGMOID_GROUP_TOPK), "sigmoid_group_topk");
    cr_expect_str_eq(moe_route_method_name(MOE_ROUTE_PERFECT), "perfect");
    cr_expect_str_eq(moe_naming_name(MOE_NAMING_QWEN_MOE), "qwen_moe");
    cr_expect_str_eq(moe_backend_name(MOE_BACKEND_CUDA), "cuda");
    cr_expect_str_eq(moe_gemm_name(MOE_GEMM_GROUPED), "grouped");
    cr_expect_str_eq(moe_comm_name(MOE_COMM_ALLGATHER), "allgather");
    cr_expect_str_eq(moe_combine_name(MOE_COMBINE_EXACT), "exact");
    cr_expect_str_eq(moe_eplb_mode_name(MOE_EPLB_ONLINE), "online");
    cr_expect_str_eq(moe_eplb_mode_name((moe_eplb_mode_t)42), "unknown");
}

/* ---- valid input -------------------------------------------------------------------- */

Test(config, valid_file_loads_with_expected_values, .timeout = 10) {
    char path[] = "/tmp/moe_cfg_XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    const char *yaml = "model:\n"
                       "  weights: {format: synthetic, seed: 18446744073709551615}\n"
                       "  layers: [5, 1, 3]\n"
                       "  hidden: 64\n"
                       "  experts: 16\n"
                       "  top_k: 4\n"
                       "  shared_intermediate: 32\n"
                       "  shared_expert_gate: yes\n"
                       "  routing: {method: zipf, zipf_s: 0.9}\n"
                       "moe: {backend: cuda, gemm: grouped, chunking: {overlap: false}}\n"
                       "eplb:\n"
                       "  mode: static\n"
                       "  num_slots: 20\n"
                       "  placement: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,\n"
                       "              0, 1, 2, 3]\n"
                       "serve: {data: 'unix:/run/moed/data-%r.sock', metrics: ~}\n"
                       "log: {level: debug}\n";
    cr_assert_eq(write(fd, yaml, strlen(yaml)), (ssize_t)strlen(yaml));
    close(fd);
    moe_err_t ret = moe_config_load(path, &cfg, &errs);
    unlink(path);
    cr_assert_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect_str_eq(cfg.source_path, path);
    cr_expect_eq(cfg.model.weights.seed, UINT64_MAX);
    cr_expect_eq(cfg.model.n_layers, 3);
    cr_expect_not(cfg.model.layers_from_count);
    cr_expect_eq(cfg.model.layer_ids[0], 1);
    cr_expect_eq(cfg.model.layer_ids[1], 3);
    cr_expect_eq(cfg.model.layer_ids[2], 5);
    cr_expect_eq(cfg.model.hidden, 64);
    cr_expect_eq(cfg.model.experts, 16);
    cr_expect_eq(cfg.model.top_k, 4);
    cr_expect(cfg.model.shared_expert_gate);
    cr_expect_eq(cfg.model.routing.method, MOE_ROUTE_ZIPF);
    cr_expect_float_eq(cfg.model.routing.zipf_s, 0.9, 1e-12);
    cr_expect_eq(cfg.moe.backend, MOE_BACKEND_CUDA);
    cr_expect_eq(cfg.moe.gemm, MOE_GEMM_GROUPED);
    cr_expect_not(cfg.moe.chunking.overlap);
    cr_expect_eq(cfg.eplb.mode, MOE_EPLB_STATIC);
    cr_expect_eq(cfg.eplb.n_placement, 20);
    cr_expect_eq(cfg.eplb.placement[19], 3);
    cr_expect_str_eq(cfg.serve.data, "unix:/run/moed/data-%r.sock");
    cr_expect_str_eq(cfg.serve.metrics, "");
    cr_expect_eq(cfg.log.level, 0);
    cr_expect(moe_config_was_set(&cfg, "model.hidden"));
    cr_expect(moe_config_was_set(&cfg, "moe.chunking.overlap"));
    cr_expect_not(moe_config_was_set(&cfg, "model.moe_intermediate"));
    cr_expect_not(moe_config_was_set(&cfg, "no.such.field"));
    cr_expect_eq(cfg.model.moe_intermediate, 768); /* default kept */
}

Test(config, empty_and_null_sections_keep_defaults, .timeout = 10) {
    ASSERT_LOADS("");
    cr_expect_eq(cfg.model.hidden, 2048);
    ASSERT_LOADS("# only a comment\n");
    ASSERT_LOADS("model:\n  routing:\nmoe:\n");
    cr_expect_eq(cfg.moe.max_tokens_per_step, 8192);
}

static void check_example(const char *path) {
    moe_err_t ret = moe_config_load(path, &cfg, &errs);
    cr_expect_eq(ret, MOE_OK, "%s does not load:\n%s", path, errors_text());
}

Test(config, every_example_loads, .timeout = 10) {
    check_example("config/moed.example.yaml");
    DIR *dir = opendir("config/examples");
    cr_assert_not_null(dir, "run the tests from the repository root");
    int count = 0;
    for (struct dirent *entry; (entry = readdir(dir)) != NULL;) {
        size_t len = strlen(entry->d_name);
        if (len < 5 || strcmp(entry->d_name + len - 5, ".yaml") != 0) continue;
        char path[512];
        snprintf(path, sizeof path, "config/examples/%s", entry->d_name);
        check_example(path);
        count++;
    }
    closedir(dir);
    cr_expect_geq(count, 5);
}

Test(config, example_shapes, .timeout = 10) {
    cr_assert_eq(moe_config_load("config/examples/deepseek-v3.yaml", &cfg, &errs), MOE_OK, "%s",
                 errors_text());
    cr_expect_eq(cfg.model.n_layers, 58);
    cr_expect_eq(cfg.model.layer_ids[0], 3);
    cr_expect_eq(cfg.model.layer_ids[57], 60);
    cr_expect_eq(cfg.model.routing.method, MOE_ROUTE_SIGMOID_GROUP_TOPK);
    cr_assert_eq(moe_config_load("config/examples/qwen3-30b-a3b.yaml", &cfg, &errs), MOE_OK);
    cr_expect_eq(cfg.model.n_layers, 48);
    cr_expect_eq(cfg.model.layer_ids[47], 47);
    cr_assert_eq(moe_config_load("config/examples/tiny-cpu-replicas.yaml", &cfg, &errs), MOE_OK);
    cr_expect_eq(cfg.eplb.num_slots, 12);
    cr_expect(cfg.model.shared_expert_gate);
}

/* The example documents every field and its values are the defaults. */
Test(config, example_sets_every_field_to_its_default, .timeout = 10) {
    cr_assert_eq(moe_config_load("config/moed.example.yaml", &cfg, &errs), MOE_OK, "%s",
                 errors_text());
    moe_config_defaults(&other);
    for (int i = 0; i < moe_config_field_count; i++) {
        const char *path = moe_config_fields[i].path;
        cr_expect(moe_config_was_set(&cfg, path), "moed.example.yaml does not set %s", path);
        cr_expect(moe_config_field_equal(i, &cfg, &other), "moed.example.yaml: %s is not the default",
                  path);
    }
}

/* ---- invalid input ------------------------------------------------------------------ */

Test(config, unknown_key_suggests_nearest, .timeout = 10) {
    cr_assert_eq(load("model:\n  hiden: 64\n"), MOE_ERR_CONFIG);
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    EXPECT_ERROR("t.yaml:2:3: model.hiden: unknown key; did you mean 'hidden'?");
    load("model:\n  routing:\n    metod: zipf\n");
    EXPECT_ERROR("t.yaml:3:5: model.routing.metod: unknown key; did you mean 'method'?");
    load("hidden: 64\n");
    EXPECT_ERROR("t.yaml:1:1: hidden: unknown key here; did you mean 'model.hidden'?");
    load("bananas: 1\n");
    EXPECT_ERROR("bananas: unknown key; valid keys here: model, moe, eplb, scheduler, serve, log");
    load("serve: {data: x, contorl: y}\n");
    EXPECT_ERROR("serve.contorl: unknown key; did you mean 'control'?");
}

Test(config, wrong_types, .timeout = 10) {
    load("model:\n"
         "  hidden: abc\n"
         "  experts: \"16\"\n"
         "  top_k: 2.5\n"
         "  shared_expert_gate: maybe\n"
         "  moe_intermediate: {a: 1}\n"
         "  routing: 5\n"
         "  layers: [1, x]\n"
         "eplb: {min_improvement: lots, placement: 3}\n"
         "serve: {data: [1, 2]}\n"
         "moe: 7\n");
    EXPECT_ERROR("t.yaml:2:11: model.hidden: expected an integer, got 'abc'");
    EXPECT_ERROR("model.experts: expected an integer, got the string \"16\"");
    EXPECT_ERROR("model.top_k: expected an integer, got '2.5'");
    EXPECT_ERROR("model.shared_expert_gate: expected true or false, got 'maybe'");
    EXPECT_ERROR("model.moe_intermediate: expected int [1, 131072], got a mapping");
    EXPECT_ERROR("model.routing: expected a mapping of routing settings, got a scalar");
    EXPECT_ERROR("t.yaml:8:15: model.layers[1]: expected an integer, got 'x'");
    EXPECT_ERROR("eplb.min_improvement: expected a number, got 'lots'");
    EXPECT_ERROR("eplb.placement: expected a list of integers");
    EXPECT_ERROR("serve.data: expected string");
    EXPECT_ERROR("moe: expected a mapping of moe settings, got a scalar");
    cr_expect_eq(errs.count, 11, "%s", errors_text());
    load("- a\n- b\n");
    EXPECT_ERROR("t.yaml:1:1: (top level): expected a mapping of sections");
}

Test(config, out_of_bounds_values_name_the_bounds, .timeout = 10) {
    load("model: {hidden: 0, experts: 5000, routing: {routed_scaling_factor: 0}}\n"
         "eplb: {min_improvement: 1.5, num_slots: -1}\n"
         "serve: {max_frame_bytes: 99999999999999}\n"
         "model2: 1\n");
    EXPECT_ERROR("model.hidden: 0 is out of bounds [1, 65536]");
    EXPECT_ERROR("model.experts: 5000 is out of bounds [1, 1024]");
    EXPECT_ERROR("model.routing.routed_scaling_factor: 0 is out of bounds [0.001, 1000]");
    EXPECT_ERROR("eplb.min_improvement: 1.5 is out of bounds [0, 1]");
    EXPECT_ERROR("eplb.num_slots: -1 is out of bounds [0, 4096]");
    EXPECT_ERROR("serve.max_frame_bytes: 99999999999999 is out of bounds [48, 4294967295]");
    EXPECT_ERROR("model2: unknown key; did you mean 'model'?");
    load("model: {layers: 0, weights: {seed: -1}}\n");
    EXPECT_ERROR("model.layers: 0 is out of bounds [1, 256]");
    EXPECT_ERROR("model.weights.seed: expected a non-negative integer, got '-1'");
    load("serve: {data: '%0300d'}\n");
    cr_expect_eq(errs.count, 0, "%s", errors_text()); /* 5 bytes, fine */
    char yaml[600] = "serve: {data: '";
    memset(yaml + strlen(yaml), 'a', 300);
    strcat(yaml, "'}\n");
    load(yaml);
    EXPECT_ERROR("serve.data: is 300 bytes, longer than the limit of 255");
}

Test(config, bad_enum_lists_valid_names, .timeout = 10) {
    load("model: {routing: {method: softmax}, weights: {naming: llama}}\n"
         "log: {level: verbose}\nmoe: {backend: tpu}\n");
    EXPECT_ERROR("t.yaml:1:27: model.routing.method: 'softmax' is not one of: softmax_topk, "
                 "renormalize, sigmoid_group_topk, client, uniform, zipf, perfect");
    EXPECT_ERROR("model.weights.naming: 'llama' is not one of: mixtral, qwen_moe, deepseek_v3");
    EXPECT_ERROR("log.level: 'verbose' is not one of: debug, info, warn, error");
    EXPECT_ERROR("moe.backend: 'tpu' is not one of: cpu, cuda");
}

Test(config, duplicate_keys, .timeout = 10) {
    load("model:\n  hidden: 64\n  hidden: 128\nmodel:\n  experts: 4\n");
    EXPECT_ERROR("t.yaml:3:3: model.hidden: duplicate key (first given at line 2, column 3)");
    EXPECT_ERROR("t.yaml:4:1: model: duplicate key (first given at line 1, column 1)");
    cr_expect_eq(cfg.model.hidden, 64, "the first value stands");
}

Test(config, yaml_syntax_errors_have_positions, .timeout = 10) {
    cr_assert_eq(load("model:\n  hidden: 64\n   experts: 8\n"), MOE_ERR_CONFIG);
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    EXPECT_ERROR("t.yaml:3:");
    EXPECT_ERROR("yaml: syntax error: mapping values are not allowed in this context");
    load("model: {hidden: [1, 2}\n");
    EXPECT_ERROR("t.yaml:1:22: yaml: syntax error:");
    load("model: {hidden: 64}\n---\nmoe: {}\n");
    EXPECT_ERROR("t.yaml:3:1: yaml: a second YAML document");
    load("a: *undefined\n");
    EXPECT_ERROR("yaml: syntax error: found undefined alias");
}

Test(config, multiple_errors_all_reported, .timeout = 10) {
    load("model:\n"
         "  hiden: 1\n"
         "  experts: -3\n"
         "  routing: {method: nope}\n"
         "eplb: {mode: maybe}\n"
         "serve: {max_connections: lots}\n");
    cr_expect_eq(errs.count, 5, "%s", errors_text());
    EXPECT_ERROR("t.yaml:2:3: model.hiden");
    EXPECT_ERROR("t.yaml:3:12: model.experts");
    EXPECT_ERROR("t.yaml:4:21: model.routing.method");
    EXPECT_ERROR("t.yaml:5:14: eplb.mode");
    EXPECT_ERROR("t.yaml:6:26: serve.max_connections");
}

Test(config, error_list_is_bounded, .timeout = 10) {
    static char yaml[20000];
    size_t used = 0;
    for (int i = 0; i < 100; i++)
        used += (size_t)snprintf(yaml + used, sizeof yaml - used, "unknown_%d: 1\n", i);
    load(yaml);
    cr_expect_eq(errs.count, MOE_CONFIG_MAX_ERRORS);
    cr_expect(strstr(errs.messages[MOE_CONFIG_MAX_ERRORS - 1], "too many errors") != NULL);
}

Test(config, layers_list_rules, .timeout = 10) {
    load("model: {layers: [4, 2, 4]}\n");
    EXPECT_ERROR("model.layers: layer 4 is listed twice");
    load("model: {layers: []}\n");
    EXPECT_ERROR("model.layers: an empty list serves no layer");
    load("model: {layers: [-1]}\n");
    EXPECT_ERROR("model.layers[0]: -1 is out of bounds [0, 65535]");
    ASSERT_LOADS("model: {layers: 5}\n");
    cr_expect_eq(cfg.model.n_layers, 5);
    cr_expect(cfg.model.layers_from_count);
}

Test(config, cross_field_checks, .timeout = 10) {
    load("model: {experts: 8, top_k: 9}\n");
    EXPECT_ERROR("t.yaml:1:28: model.top_k: 9 exceeds model.experts = 8");
    load("model: {experts: 8, top_k: 2, routing: {n_group: 3, topk_group: 4}}\n");
    EXPECT_ERROR("model.routing.n_group: 3 does not divide model.experts = 8");
    EXPECT_ERROR("model.routing.topk_group: 4 exceeds model.routing.n_group = 3");
    load("model: {experts: 16, top_k: 8, routing: {method: sigmoid_group_topk, n_group: 8, "
         "topk_group: 2}}\n");
    EXPECT_ERROR("model.top_k: 8 exceeds the 4 experts in the topk_group = 2 kept groups of 2");
    load("model: {experts: 16, top_k: 4}\neplb: {mode: static, num_slots: 12}\n");
    EXPECT_ERROR("eplb.num_slots: 12 is fewer than model.experts = 16");
    load("model: {experts: 8, top_k: 2}\neplb: {num_slots: 12}\n");
    EXPECT_ERROR("eplb.num_slots: 12 slots for 8 experts need eplb.mode static or online");
    load("model: {shared_expert_gate: true}\n");
    EXPECT_ERROR("model.shared_expert_gate: is true but model.shared_intermediate is 0");
    load("model: {weights: {format: safetensors}}\n");
    EXPECT_ERROR("t.yaml: model.weights.path: is required with format safetensors");
    /* A field with its own error is not cross-checked again. */
    load("model: {experts: 0, top_k: 8}\n");
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    /* the exact combine: one GEMM form (grouped), entries over alltoall */
    load("moe: {backend: cuda, combine: exact}\n");
    EXPECT_ERROR("moe.combine: 'exact' needs moe.gemm: grouped (one GEMM form at every size; have 'auto')");
    ASSERT_LOADS("moe: {backend: cpu, combine: exact, comm: allgather}\n"); /* the cpu backend is always exact */
    load("moe: {backend: cuda, combine: exact, gemm: grouped, comm: allgather}\n");
    EXPECT_ERROR("moe.combine: 'exact' returns a row per expert over alltoall");
    ASSERT_LOADS("moe: {combine: exact, gemm: grouped, comm: auto}\n");
    ASSERT_LOADS("moe: {combine: exact, gemm: grouped, comm: alltoall}\n");
    /* max_tokens_per_chunk above max_tokens_per_step is fine: chunks only cap. */
    ASSERT_LOADS("moe: {max_tokens_per_step: 100, chunking: {max_tokens_per_chunk: 4096}}\n");
}

Test(config, placement_checks, .timeout = 10) {
    ASSERT_LOADS("model: {experts: 4, top_k: 2}\n"
                 "eplb: {mode: static, num_slots: 6, placement: [0, 1, 2, 3, 1, 0]}\n");
    ASSERT_LOADS("model: {experts: 4, top_k: 2}\n"
                 "eplb: {mode: static, placement: [3, 2, 1, 0]}\n");
    load("model: {experts: 4, top_k: 2}\n"
         "eplb: {mode: static, num_slots: 6, placement: [0, 1, 2, 3, 1]}\n");
    EXPECT_ERROR("eplb.placement: has 5 entries; it needs one per slot (6, eplb.num_slots)");
    load("model: {experts: 4, top_k: 2}\neplb: {mode: static, placement: [0, 1, 2, 2]}\n");
    EXPECT_ERROR("eplb.placement: 1 expert(s) have no slot: 3");
    load("model: {experts: 4, top_k: 2}\neplb: {mode: static, placement: [0, 1, 2, 9]}\n");
    EXPECT_ERROR("eplb.placement: slot 3 holds expert 9, but model.experts is 4");
    load("model: {experts: 4, top_k: 2}\neplb: {placement: [0, 1, 2, 3]}\n");
    EXPECT_ERROR("eplb.placement: is given but eplb.mode is off");
    load("model: {experts: 4, top_k: 2}\n"
         "eplb: {mode: static, placement_file: p.json, placement: [0, 1, 2, 3]}\n");
    EXPECT_ERROR("give eplb.placement or eplb.placement_file, not both");
    load("eplb: {mode: static, placement: [0, 1, 2048]}\n");
    EXPECT_ERROR("eplb.placement[2]: 2048 is out of bounds [0, 1023]");
}

/* ---- config.json resolution ----------------------------------------------------------- */

static char model_dir[64];

static void write_checkpoint(const char *json) {
    snprintf(model_dir, sizeof model_dir, "/tmp/moe_model_XXXXXX");
    cr_assert_not_null(mkdtemp(model_dir));
    char path[128];
    snprintf(path, sizeof path, "%s/config.json", model_dir);
    FILE *file = fopen(path, "w");
    cr_assert_not_null(file);
    fputs(json, file);
    fclose(file);
    snprintf(path, sizeof path, "%s/model.safetensors", model_dir);
    file = fopen(path, "w");
    cr_assert_not_null(file);
    fclose(file);
}

static void remove_checkpoint(void) {
    char path[128];
    snprintf(path, sizeof path, "%s/config.json", model_dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/model.safetensors", model_dir);
    unlink(path);
    rmdir(model_dir);
}

/* Loads YAML whose weights point at the checkpoint; extra goes under model:,
 * serve (a whole section, or "") after it. */
static moe_err_t load_checkpoint_serving(const char *file, const char *extra, const char *serve) {
    char yaml[2048];
    snprintf(yaml, sizeof yaml, "model:\n  weights: {format: safetensors, path: %s/%s}\n%s%s",
             model_dir, file, extra, serve);
    return moe_config_load_string(yaml, strlen(yaml), "moed.yaml", &cfg, &errs);
}

/* The default max_output_bytes (256 MiB) holds no 16384-token result of
 * hidden 4096 or 7168: the checkpoint tests take smaller requests. */
static moe_err_t load_checkpoint(const char *file, const char *extra) {
    return load_checkpoint_serving(file, extra, "serve: {max_request_tokens: 4096}\n");
}

static const char *const mixtral_json =
    "{\"model_type\": \"mixtral\", \"hidden_size\": 4096, \"intermediate_size\": 14336,"
    " \"num_local_experts\": 8, \"num_experts_per_tok\": 2, \"num_hidden_layers\": 32}";

Test(config, resolves_mixtral, .timeout = 10) {
    write_checkpoint(mixtral_json);
    moe_err_t ret = load_checkpoint("model.safetensors", ""); /* a file: its directory */
    remove_checkpoint();
    cr_assert_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect_eq(cfg.model.hidden, 4096);
    cr_expect_eq(cfg.model.moe_intermediate, 14336);
    cr_expect_eq(cfg.model.experts, 8);
    cr_expect_eq(cfg.model.top_k, 2);
    cr_expect_eq(cfg.model.shared_intermediate, 0);
    cr_expect_eq(cfg.model.n_layers, 32);
    cr_expect_eq(cfg.model.layer_ids[31], 31);
    cr_expect_eq(cfg.model.routing.method, MOE_ROUTE_SOFTMAX_TOPK);
    cr_expect(cfg.model.routing.norm_topk_prob);
    cr_expect_eq(cfg.model.weights.naming, MOE_NAMING_MIXTRAL);
    cr_expect_not(moe_config_was_set(&cfg, "model.hidden"), "config.json values are not 'set'");
}

Test(config, resolves_qwen2_moe_with_sparse_layers, .timeout = 10) {
    write_checkpoint("{\"model_type\": \"qwen2_moe\", \"hidden_size\": 2048,"
                     " \"moe_intermediate_size\": 1408, \"num_experts\": 60,"
                     " \"num_experts_per_tok\": 4, \"shared_expert_intermediate_size\": 5632,"
                     " \"decoder_sparse_step\": 2, \"mlp_only_layers\": [3],"
                     " \"num_hidden_layers\": 8}");
    moe_err_t ret = load_checkpoint("", "");
    remove_checkpoint();
    cr_assert_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect_eq(cfg.model.hidden, 2048);
    cr_expect_eq(cfg.model.moe_intermediate, 1408);
    cr_expect_eq(cfg.model.experts, 60);
    cr_expect_eq(cfg.model.top_k, 4);
    cr_expect_eq(cfg.model.shared_intermediate, 5632);
    cr_expect(cfg.model.shared_expert_gate);
    cr_expect_not(cfg.model.routing.norm_topk_prob, "qwen2_moe defaults to false");
    cr_expect_eq(cfg.model.weights.naming, MOE_NAMING_QWEN_MOE);
    /* (i + 1) % 2 == 0 and not 3: layers 1, 5, 7 */
    cr_assert_eq(cfg.model.n_layers, 3);
    cr_expect_eq(cfg.model.layer_ids[0], 1);
    cr_expect_eq(cfg.model.layer_ids[1], 5);
    cr_expect_eq(cfg.model.layer_ids[2], 7);
}

static const char *const qwen3_json =
    "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 2048, \"moe_intermediate_size\": 768,"
    " \"num_experts\": 128, \"num_experts_per_tok\": 8, \"norm_topk_prob\": true,"
    " \"num_hidden_layers\": 48, \"mlp_only_layers\": []}";

Test(config, resolves_qwen3_moe, .timeout = 10) {
    write_checkpoint(qwen3_json);
    moe_err_t ret = load_checkpoint("", "  layers: 4\n  routing: {method: perfect}\n");
    remove_checkpoint();
    cr_assert_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect(cfg.model.routing.norm_topk_prob);
    cr_expect_eq(cfg.model.shared_intermediate, 0);
    cr_expect_not(cfg.model.shared_expert_gate);
    cr_expect_eq(cfg.model.n_layers, 4);
    cr_expect_eq(cfg.model.layer_ids[3], 3);
    cr_expect_eq(cfg.model.routing.method, MOE_ROUTE_PERFECT, "benchmark routers are kept");
}

static const char *const deepseek_json =
    "{\"model_type\": \"deepseek_v3\", \"hidden_size\": 7168, \"moe_intermediate_size\": 2048,"
    " \"n_routed_experts\": 256, \"num_experts_per_tok\": 8, \"n_group\": 8, \"topk_group\": 4,"
    " \"routed_scaling_factor\": 2.5, \"n_shared_experts\": 1, \"first_k_dense_replace\": 3,"
    " \"moe_layer_freq\": 1, \"num_hidden_layers\": 61}";

Test(config, resolves_deepseek_v3, .timeout = 10) {
    write_checkpoint(deepseek_json);
    moe_err_t ret = load_checkpoint("", "");
    cr_assert_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect_eq(cfg.model.hidden, 7168);
    cr_expect_eq(cfg.model.experts, 256);
    cr_expect_eq(cfg.model.shared_intermediate, 2048);
    cr_expect_eq(cfg.model.routing.method, MOE_ROUTE_SIGMOID_GROUP_TOPK);
    cr_expect_eq(cfg.model.routing.n_group, 8);
    cr_expect_eq(cfg.model.routing.topk_group, 4);
    cr_expect_float_eq(cfg.model.routing.routed_scaling_factor, 2.5, 1e-12);
    cr_expect(cfg.model.routing.norm_topk_prob);
    cr_expect_eq(cfg.model.weights.naming, MOE_NAMING_DEEPSEEK_V3);
    cr_expect_eq(cfg.model.n_layers, 58);
    cr_expect_eq(cfg.model.layer_ids[0], 3);
    cr_expect_eq(cfg.model.layer_ids[57], 60);

    /* An int N is the first N MoE layers, not 0..N-1. */
    ret = load_checkpoint("", "  layers: 3\n");
    cr_expect_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect_eq(cfg.model.n_layers, 3);
    cr_expect_eq(cfg.model.layer_ids[0], 3);
    cr_expect_eq(cfg.model.layer_ids[2], 5);
    /* A list must name MoE layers. */
    ret = load_checkpoint("", "  layers: [2, 10, 60]\n");
    cr_expect_eq(ret, MOE_ERR_CONFIG);
    EXPECT_ERROR("moed.yaml: model.layers: layer 2 is not a MoE layer of");
    EXPECT_ERROR("(MoE layers: 3-60)");
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    ret = load_checkpoint("", "  layers: 59\n");
    EXPECT_ERROR("model.layers: 59 in moed.yaml asks for more MoE layers than the 58 (3-60)");
    ret = load_checkpoint("", "  layers: [3, 60]\n");
    cr_expect_eq(ret, MOE_OK, "%s", errors_text());
    remove_checkpoint();
}

Test(config, yaml_contradicting_config_json_is_an_error, .timeout = 10) {
    write_checkpoint(deepseek_json);
    char expected[300];
    moe_err_t ret = load_checkpoint("", "  hidden: 1024\n  experts: 256\n"
                                        "  routing: {method: softmax_topk, n_group: 4}\n"
                                        "  shared_intermediate: 0\n");
    cr_expect_eq(ret, MOE_ERR_CONFIG);
    snprintf(expected, sizeof expected,
             "moed.yaml: model.hidden: 1024 in moed.yaml contradicts hidden_size = 7168 in "
             "%s/config.json",
             model_dir);
    EXPECT_ERROR(expected);
    EXPECT_ERROR("model.routing.method: softmax_topk in moed.yaml contradicts the deepseek_v3 "
                 "router = sigmoid_group_topk");
    EXPECT_ERROR("model.routing.n_group: 4 in moed.yaml contradicts n_group = 8");
    EXPECT_ERROR("model.shared_intermediate: 0 in moed.yaml contradicts n_shared_experts * "
                 "moe_intermediate_size = 2048");
    cr_expect_not(has_error("model.experts"), "an agreeing value is fine:\n%s", errors_text());
    cr_expect_eq(errs.count, 4, "%s", errors_text());
    /* Client and benchmark routers replace the scores on purpose. */
    ret = load_checkpoint("", "  routing: {method: client}\n");
    cr_expect_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect_eq(cfg.model.routing.method, MOE_ROUTE_CLIENT);
    /* A naming set in the YAML wins (a converted checkpoint may differ). */
    char yaml[512];
    snprintf(yaml, sizeof yaml,
             "model: {weights: {format: safetensors, path: %s, naming: qwen_moe}}\n"
             "serve: {max_request_tokens: 4096}\n",
             model_dir);
    ret = moe_config_load_string(yaml, strlen(yaml), "moed.yaml", &cfg, &errs);
    cr_expect_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect_eq(cfg.model.weights.naming, MOE_NAMING_QWEN_MOE);
    ret = load_checkpoint("", "  routing: {method: uniform}\n");
    cr_expect_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect_eq(cfg.model.routing.method, MOE_ROUTE_UNIFORM);
    remove_checkpoint();

    write_checkpoint(mixtral_json);
    ret = load_checkpoint("", "  routing: {norm_topk_prob: false}\n  top_k: 3\n");
    remove_checkpoint();
    EXPECT_ERROR("model.routing.norm_topk_prob: false in moed.yaml contradicts norm_topk_prob "
                 "(always true for mixtral) = true");
    EXPECT_ERROR("model.top_k: 3 in moed.yaml contradicts num_experts_per_tok = 2");
}

Test(config, bad_config_json, .timeout = 10) {
    write_checkpoint("{\"hidden_size\": ");
    load_checkpoint("", "");
    EXPECT_ERROR("/config.json: invalid JSON near byte");
    remove_checkpoint();
    write_checkpoint("[1, 2]");
    load_checkpoint("", "");
    EXPECT_ERROR("/config.json: expected a JSON object at the top level");
    remove_checkpoint();
    write_checkpoint("{\"model_type\": \"llama\", \"num_hidden_layers\": 2}");
    load_checkpoint("", "");
    EXPECT_ERROR("model_type: 'llama' is not a supported MoE model");
    remove_checkpoint();
    write_checkpoint("{\"model_type\": \"mixtral\", \"hidden_size\": \"big\","
                     " \"num_local_experts\": 4096, \"num_hidden_layers\": 2}");
    cr_expect_eq(load_checkpoint("", ""), MOE_ERR_CONFIG);
    EXPECT_ERROR("/config.json: hidden_size: expected a number");
    EXPECT_ERROR("/config.json: intermediate_size: missing");
    EXPECT_ERROR("num_local_experts: 4096 is out of bounds [1, 1024] (for model.experts)");
    remove_checkpoint();
    /* No model_type: the family is told by its keys. */
    write_checkpoint("{\"hidden_size\": 64, \"intermediate_size\": 32, \"num_local_experts\": 4,"
                     " \"num_experts_per_tok\": 2, \"num_hidden_layers\": 2}");
    cr_expect_eq(load_checkpoint("", ""), MOE_OK, "%s", errors_text());
    cr_expect_eq(cfg.model.weights.naming, MOE_NAMING_MIXTRAL);
    cr_expect_eq(cfg.model.experts, 4);
    remove_checkpoint();
}

Test(config, checkpoint_without_config_json_keeps_yaml, .timeout = 10) {
    snprintf(model_dir, sizeof model_dir, "/tmp/moe_model_XXXXXX");
    cr_assert_not_null(mkdtemp(model_dir));
    moe_err_t ret = load_checkpoint("", "  hidden: 96\n");
    rmdir(model_dir);
    cr_expect_eq(ret, MOE_OK, "%s", errors_text());
    cr_expect_eq(cfg.model.hidden, 96);
    ret = load_checkpoint("", "");
    EXPECT_ERROR("model.weights.path: '");
}

/* ---- views ------------------------------------------------------------------------------ */

Test(config, to_json_round_trip, .timeout = 10) {
    ASSERT_LOADS("model: {hidden: 96, layers: [7, 3], routing: {method: zipf}}\n"
                 "eplb: {mode: static, num_slots: 0, placement: []}\nlog: {level: warn}\n");
    char *text = moe_config_to_json(&cfg);
    cr_assert_not_null(text);
    cJSON *root = cJSON_Parse(text);
    free(text);
    cr_assert_not_null(root);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(model, "hidden")->valueint, 96);
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(model, "layers");
    cr_assert(cJSON_IsArray(layers));
    cr_expect_eq(cJSON_GetArraySize(layers), 2);
    cr_expect_eq(cJSON_GetArrayItem(layers, 0)->valueint, 3);
    const cJSON *routing = cJSON_GetObjectItemCaseSensitive(model, "routing");
    cr_expect_str_eq(cJSON_GetObjectItemCaseSensitive(routing, "method")->valuestring, "zipf");
    cr_expect(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(routing, "norm_topk_prob")));
    const cJSON *weights = cJSON_GetObjectItemCaseSensitive(model, "weights");
    cr_expect_str_eq(cJSON_GetObjectItemCaseSensitive(weights, "format")->valuestring,
                     "synthetic");
    const cJSON *eplb = cJSON_GetObjectItemCaseSensitive(root, "eplb");
    cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(eplb, "placement")), 0);
    const cJSON *serve = cJSON_GetObjectItemCaseSensitive(root, "serve");
    cr_expect_eq(cJSON_GetObjectItemCaseSensitive(serve, "max_frame_bytes")->valuedouble,
                 268435456.0);
    const cJSON *log = cJSON_GetObjectItemCaseSensitive(root, "log");
    cr_expect_str_eq(cJSON_GetObjectItemCaseSensitive(log, "level")->valuestring, "warn");
    /* Every field of the table is in the dump. */
    int leaves = 0;
    for (int i = 0; i < moe_config_field_count; i++) {
        char path[256];
        snprintf(path, sizeof path, "%s", moe_config_fields[i].path);
        const cJSON *node = root;
        for (char *save = NULL, *part = strtok_r(path, ".", &save); part != NULL;
             part = strtok_r(NULL, ".", &save))
            node = cJSON_GetObjectItemCaseSensitive(node, part);
        leaves += node != NULL;
    }
    cr_expect_eq(leaves, moe_config_field_count);
    cJSON_Delete(root);
}

/* The dump is itself a valid config (JSON is YAML) that loads to the same
 * values: what --check-config prints can be fed back. */
Test(config, to_json_reloads_to_the_same_config, .timeout = 10) {
    cr_assert_eq(moe_config_load("config/examples/tiny-cpu-replicas.yaml", &other, &errs), MOE_OK);
    char *text = moe_config_to_json(&other);
    cr_assert_not_null(text);
    moe_err_t ret = load(text);
    free(text);
    cr_assert_eq(ret, MOE_OK, "%s", errors_text());
    for (int i = 0; i < moe_config_field_count; i++)
        cr_expect(moe_config_field_equal(i, &cfg, &other), "%s differs",
                  moe_config_fields[i].path);
}

Test(config, nonreloadable_diff, .timeout = 10) {
    moe_config_defaults(&cfg);
    other = cfg;
    char buf[256];
    cr_expect_eq(moe_config_nonreloadable_diff(&cfg, &other, buf, sizeof buf), 0);
    cr_expect_str_eq(buf, "");
    other.moe.gemm = MOE_GEMM_CUBLAS;          /* reloadable */
    other.eplb.min_improvement = 0.2;          /* reloadable */
    other.serve.max_queue_tokens = 1000;       /* reloadable */
    other.log.level = 3;                       /* reloadable */
    other.moe.chunking.max_tokens_per_chunk = 7; /* reloadable */
    cr_expect_eq(moe_config_nonreloadable_diff(&cfg, &other, buf, sizeof buf), 0, "%s", buf);
    other.model.hidden = 4096;
    snprintf(other.serve.data, sizeof other.serve.data, "127.0.0.1:9000");
    other.model.layer_ids[1] = 9;
    other.moe.backend = MOE_BACKEND_CUDA;
    cr_expect_eq(moe_config_nonreloadable_diff(&cfg, &other, buf, sizeof buf), 4, "%s", buf);
    cr_expect_str_eq(buf, "model.layers, model.hidden, moe.backend, serve.data");
    char tiny[8];
    cr_expect_eq(moe_config_nonreloadable_diff(&cfg, &other, tiny, sizeof tiny), 4);
    cr_expect_eq(strlen(tiny), sizeof tiny - 1, "truncated, still terminated");
}

Test(config, print_reference_lists_every_field, .timeout = 10) {
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    cr_assert_not_null(out);
    moe_config_print_reference(out);
    fclose(out);
    cr_expect(strstr(text, "| field | type | default | bounds | reloadable | help |") != NULL);
    cr_expect(strstr(text, "| `model.hidden` | int | `2048` | [1, 65536] | no |") != NULL, "%s",
              text);
    cr_expect(strstr(text, "| `eplb.mode` | enum | `off` | off, static, online | no |") != NULL);
    for (int i = 0; i < moe_config_field_count; i++) {
        char cell[128];
        snprintf(cell, sizeof cell, "| `%s` |", moe_config_fields[i].path);
        cr_expect(strstr(text, cell) != NULL, "%s missing from the reference", cell);
    }
    free(text);
}

Test(config, missing_file_is_an_io_error, .timeout = 10) {
    cr_expect_eq(moe_config_load("/nonexistent/moed.yaml", &cfg, &errs), MOE_ERR_IO);
    EXPECT_ERROR("/nonexistent/moed.yaml: cannot open: No such file or directory");
    cr_expect_eq(moe_config_load("/tmp", &cfg, &errs), MOE_ERR_CONFIG);
    cr_expect_eq(moe_config_load_string("model: {hidden: 0}", 18, NULL, &cfg, NULL),
                 MOE_ERR_CONFIG, "errs may be NULL");
}

Test(config, nul_byte_in_value_is_rejected, .timeout = 10) {
    static const char yaml[] = "serve: {data: \"a\\0b\"}\n";
    load(yaml);
    EXPECT_ERROR("serve.data: value contains a NUL byte");
}

/* ---- review fixes: reload flags, limits, bounds ------------------------------------ */

/* The engine cannot move experts between slots while it runs (no online
 * migration yet): the placement is fixed at startup; the statistics windows
 * and thresholds may change. */
Test(config, eplb_placement_is_not_reloadable, .timeout = 10) {
    static const char *const fixed[] = {"eplb.mode", "eplb.num_slots", "eplb.placement",
                                        "eplb.placement_file", "eplb.ranks_per_node"};
    static const char *const reloadable[] = {"eplb.window_steps", "eplb.rebalance_every_steps",
                                             "eplb.min_improvement"};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
        int idx = moe_config_field_index(fixed[i]);
        cr_assert_geq(idx, 0, "%s", fixed[i]);
        cr_expect_not(moe_config_fields[idx].reloadable, "%s must need a restart", fixed[i]);
        /* num_slots sizes buffers: it was never reloadable and says so elsewhere. */
        if (strcmp(fixed[i], "eplb.num_slots") != 0)
            cr_expect(strstr(moe_config_fields[idx].help, "restart") != NULL,
                      "%s's help does not say it needs a restart", fixed[i]);
    }
    for (size_t i = 0; i < sizeof reloadable / sizeof reloadable[0]; i++) {
        int idx = moe_config_field_index(reloadable[i]);
        cr_assert_geq(idx, 0, "%s", reloadable[i]);
        cr_expect(moe_config_fields[idx].reloadable, "%s should be reloadable", reloadable[i]);
    }
    moe_config_defaults(&cfg);
    other = cfg;
    other.eplb.window_steps = 7;
    other.eplb.rebalance_every_steps = 9;
    other.eplb.min_improvement = 0.5;
    char buf[256];
    cr_expect_eq(moe_config_nonreloadable_diff(&cfg, &other, buf, sizeof buf), 0, "%s", buf);
    other.eplb.mode = MOE_EPLB_STATIC;
    other.eplb.ranks_per_node = 4;
    snprintf(other.eplb.placement_file, sizeof other.eplb.placement_file, "p.json");
    other.eplb.n_placement = 1;
    cr_expect_eq(moe_config_nonreloadable_diff(&cfg, &other, buf, sizeof buf), 4, "%s", buf);
    cr_expect_str_eq(buf, "eplb.mode, eplb.ranks_per_node, eplb.placement_file, eplb.placement");
}

/* libuv takes a buffer length as unsigned int: a frame limit of 4 GiB or
 * more could not be written as one buffer. */
Test(config, max_frame_bytes_stays_below_4_gib, .timeout = 10) {
    load("serve: {max_frame_bytes: 4294967296}\n");
    EXPECT_ERROR("t.yaml:1:26: serve.max_frame_bytes: 4294967296 is out of bounds "
                 "[48, 4294967295]");
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    ASSERT_LOADS("serve: {max_frame_bytes: 4294967295}\n");
    cr_expect_eq(cfg.serve.max_frame_bytes, 4294967295LL);
}

Test(config, max_output_bytes_holds_one_largest_result, .timeout = 10) {
    /* The defaults (hidden 2048, 16384 tokens: 128 MiB + 48) fit 256 MiB. */
    ASSERT_LOADS("");
    /* 256 tokens * 64 * 4 + 48 = 65584 exactly. */
    ASSERT_LOADS("model: {hidden: 64}\nserve: {max_request_tokens: 256, max_output_bytes: 65584}\n");
    cr_expect_eq(load("model: {hidden: 64}\n"
                      "serve: {max_request_tokens: 256, max_output_bytes: 65583}\n"),
                 MOE_ERR_CONFIG);
    EXPECT_ERROR("t.yaml:2:52: serve.max_output_bytes: 65583 is less than one largest result: "
                 "serve.max_request_tokens * model.hidden * 4 + 48 = 256 * 64 * 4 + 48 = 65584 "
                 "bytes; raise it to at least that or lower serve.max_request_tokens");
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    /* A default max_output_bytes has no position: the message names the file. */
    load("model: {hidden: 7168}\n");
    EXPECT_ERROR("t.yaml: serve.max_output_bytes: 268435456 is less than one largest result: "
                 "serve.max_request_tokens * model.hidden * 4 + 48 = 16384 * 7168 * 4 + 48 = "
                 "469762096 bytes");
    /* A field with its own error is not checked against the others. */
    load("model: {hidden: 7168}\nserve: {max_request_tokens: 0}\n");
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    /* With safetensors, hidden comes from config.json: the check sees 7168. */
    write_checkpoint(deepseek_json);
    cr_expect_eq(load_checkpoint_serving("", "", ""), MOE_ERR_CONFIG);
    EXPECT_ERROR("moed.yaml: serve.max_output_bytes: 268435456 is less than one largest result: "
                 "serve.max_request_tokens * model.hidden * 4 + 48 = 16384 * 7168 * 4 + 48 = "
                 "469762096 bytes");
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    cr_expect_eq(load_checkpoint_serving("", "", "serve: {max_output_bytes: 469762096}\n"), MOE_OK,
                 "%s", errors_text());
    remove_checkpoint();
}

static char *big_yaml;

static void free_big_yaml(void) {
    free(big_yaml);
    big_yaml = NULL;
}

/* n entries "k<i>: 1" (a mapping under model:) or n list entries. */
static const char *make_big_yaml(int n, bool mapping) {
    size_t size = (size_t)n * 24 + 64, used = 0;
    big_yaml = realloc(big_yaml, size);
    cr_assert_not_null(big_yaml);
    used += (size_t)snprintf(big_yaml, size, mapping ? "model:\n" : "eplb: {placement: [");
    for (int i = 0; i < n; i++) {
        if (mapping) used += (size_t)snprintf(big_yaml + used, size - used, "  k%d: 1\n", i);
        else used += (size_t)snprintf(big_yaml + used, size - used, "%s0", i ? ", " : "");
    }
    if (!mapping) snprintf(big_yaml + used, size - used, "]}\n");
    return big_yaml;
}

/* The duplicate-key scan is quadratic: a huge mapping must be refused
 * before it, and quickly (a reload runs on the daemon's I/O thread). */
Test(config, huge_mappings_and_lists_are_refused, .timeout = 10, .fini = free_big_yaml) {
    load(make_big_yaml(257, true));
    EXPECT_ERROR("t.yaml:2:3: model: too many entries (257, at most 256)");
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    load(make_big_yaml(200000, true));
    EXPECT_ERROR("t.yaml:2:3: model: too many entries (200000, at most 256)");
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    /* The top level is a mapping too. */
    size_t size = 300 * 16, used = 0;
    char *top = malloc(size);
    cr_assert_not_null(top);
    for (int i = 0; i < 300; i++) used += (size_t)snprintf(top + used, size - used, "k%d: 1\n", i);
    load(top);
    free(top);
    EXPECT_ERROR("t.yaml:1:1: (top level): too many entries (300, at most 256)");
    /* 256 entries are only 256 unknown keys. */
    load(make_big_yaml(256, true));
    cr_expect_not(has_error("too many entries"), "%s", errors_text());
    load(make_big_yaml(MOE_MAX_SLOTS + 1, false));
    EXPECT_ERROR("t.yaml:1:19: eplb.placement: too many entries (4097, at most 4096)");
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    load("serve: {data: [1, 2]}\n");
    cr_expect_not(has_error("too many entries"), "%s", errors_text());
}

Test(config, oversized_file_is_refused_before_parsing, .timeout = 10) {
    char path[] = "/tmp/moe_big_config_XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    FILE *file = fdopen(fd, "w");
    cr_assert_not_null(file);
    /* Valid YAML all the way: only the size is wrong. */
    fputs("log: {level: info}\n", file);
    for (long i = 0; ftell(file) <= 4L << 20; i++) fputs("# a comment line of padding\n", file);
    long size = ftell(file);
    fclose(file);
    moe_err_t ret = moe_config_load(path, &cfg, &errs);
    unlink(path);
    cr_expect_eq(ret, MOE_ERR_CONFIG);
    char expected[256];
    snprintf(expected, sizeof expected, "%s: is %ld bytes; a config may be at most 4194304 bytes",
             path, size);
    EXPECT_ERROR(expected);
    cr_expect_eq(errs.count, 1, "%s", errors_text());
    /* The string loader has the same limit. */
    size_t len = (4u << 20) + 1;
    char *text = malloc(len + 1);
    cr_assert_not_null(text);
    memset(text, '\n', len);
    text[len] = '\0';
    cr_expect_eq(moe_config_load_string(text, len, "s.yaml", &cfg, &errs), MOE_ERR_CONFIG);
    free(text);
    EXPECT_ERROR("s.yaml: is 4194305 bytes; a config may be at most 4194304 bytes (4 MiB)");
    /* 4 MiB exactly is still a (large) config. */
    text = malloc(4u << 20);
    cr_assert_not_null(text);
    memset(text, '\n', 4u << 20);
    cr_expect_eq(moe_config_load_string(text, 4u << 20, "s.yaml", &cfg, &errs), MOE_OK, "%s",
                 errors_text());
    free(text);
}

/* An integer too large for 64 bits is still told its field's bounds. */
Test(config, overflowing_integers_quote_the_field_bounds, .timeout = 10) {
    load("model: {hidden: 99999999999999999999999, experts: -99999999999999999999999}\n"
         "serve: {max_queue_tokens: 99999999999999999999999, max_frame_bytes: 9223372036854775807}\n"
         "eplb: {mode: static, placement: [99999999999999999999999]}\n");
    EXPECT_ERROR("model.hidden: 99999999999999999999999 is out of bounds [1, 65536]");
    EXPECT_ERROR("model.experts: -99999999999999999999999 is out of bounds [1, 1024]");
    EXPECT_ERROR("serve.max_queue_tokens: 99999999999999999999999 is out of bounds "
                 "[1, 17179869184]");
    EXPECT_ERROR("serve.max_frame_bytes: 9223372036854775807 is out of bounds [48, 4294967295]");
    EXPECT_ERROR("eplb.placement[0]: 99999999999999999999999 is out of bounds [0, 1023]");
    cr_expect_not(has_error("9200000000000000000"), "%s", errors_text());
    load("model: {layers: 99999999999999999999999}\n");
    EXPECT_ERROR("model.layers: 99999999999999999999999 is out of bounds [1, 256]");
    /* Every int and int64 row: one past its maximum, and an overflow. */
    for (int i = 0; i < moe_config_field_count; i++) {
        const moe_config_field_t *f = &moe_config_fields[i];
        if (f->type != MOE_FIELD_INT && f->type != MOE_FIELD_INT64) continue;
        char bounds[64], msg[300], want[200];
        moe_config_field_bounds_text(f, bounds, sizeof bounds);
        moe_config_defaults(&cfg);
        static const char *const overflows[] = {"99999999999999999999999",
                                                "-99999999999999999999999"};
        for (int j = 0; j < 2; j++) {
            cr_expect_not(moe_config_field_set_scalar(i, &cfg, overflows[j], false, msg, sizeof msg),
                          "%s took %s", f->path, overflows[j]);
            snprintf(want, sizeof want, "%s is out of bounds %s", overflows[j], bounds);
            cr_expect_str_eq(msg, want, "%s", f->path);
        }
        char above[32];
        snprintf(above, sizeof above, "%.0f", f->max + 1);
        cr_expect_not(moe_config_field_set_scalar(i, &cfg, above, false, msg, sizeof msg), "%s",
                      f->path);
        snprintf(want, sizeof want, "%s is out of bounds %s", above, bounds);
        cr_expect_str_eq(msg, want, "%s", f->path);
    }
}
