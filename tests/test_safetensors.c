/* test_safetensors: the safetensors reader (kernels/safetensors.c) against
 * files written here by tests/support/st_writer.c — valid round trips and
 * every kind of lie a header can tell — and moe_weights (kernels/weights*.c)
 * for each naming scheme, sharded directories and synthetic weights. Tensor
 * names are spelled out here from the naming spec, independently of the
 * table in weights_safetensors.c. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/moe_safetensors.h"
#include "../kernels/moe_synth.h"
#include "../kernels/moe_weights.h"
#include "support/st_writer.h"

static char tmp_dir[512];

static void make_dir(void) { cr_assert_eq(moe_test_mkdtemp(tmp_dir, sizeof tmp_dir), 0); }
static void remove_dir(void) { moe_test_rmdir(tmp_dir); }

static void tmp_path(char *buf, size_t size, const char *name) {
    snprintf(buf, size, "%s/%s", tmp_dir, name);
}

/* Opens path expecting failure `want`; msg must contain `needle`. */
static void expect_open_error(const char *path, moe_err_t want, const char *needle) {
    moe_st_file_t *file = NULL;
    char msg[512] = "";
    moe_err_t ret = moe_st_open(path, &file, msg, sizeof msg);
    cr_assert_eq(ret, want, "expected %s, got %s (%s)", moe_err_name(want), moe_err_name(ret),
                 msg);
    cr_assert_null(file);
    cr_assert(strstr(msg, needle) != NULL, "message '%s' lacks '%s'", msg, needle);
}

/* Writes a raw header + data_size bytes of data and expects an error. */
static void expect_header_error(const char *header, size_t data_size, const char *needle) {
    char path[600];
    tmp_path(path, sizeof path, "bad.safetensors");
    uint8_t *data = calloc(data_size ? data_size : 1, 1);
    cr_assert_eq(moe_test_st_write_raw(path, header, data, data_size), 0);
    free(data);
    expect_open_error(path, MOE_ERR_FORMAT, needle);
}

TestSuite(safetensors, .init = make_dir, .fini = remove_dir, .timeout = 20);

Test(safetensors, round_trip_f32_f16_bf16) {
    /* Values exactly representable in bf16 and f16, so every dtype must
     * give them back bit for bit. */
    const float values[6] = {0.0f, -1.5f, 0.25f, 3.0f, -1024.0f, 0.0078125f};
    int64_t shape[2] = {2, 3};
    moe_test_st_t *st = moe_test_st_new();
    cr_assert_not_null(st);
    cr_assert_eq(moe_test_st_add_f32(st, "a.f32", "F32", 2, shape, values), 0);
    cr_assert_eq(moe_test_st_add_f32(st, "b.f16", "F16", 2, shape, values), 0);
    cr_assert_eq(moe_test_st_add_f32(st, "c.bf16", "BF16", 2, shape, values), 0);
    /* f16 special cases written as raw bits: smallest subnormal, largest
     * subnormal, -0, +inf, -inf, NaN, max finite. */
    const uint16_t special[7] = {0x0001, 0x03ff, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0x7bff};
    int64_t special_shape[1] = {7};
    cr_assert_eq(moe_test_st_add_raw(st, "d.special", "F16", 1, special_shape, special,
                                     sizeof special), 0);
    const int64_t ints[2] = {7, -9};
    int64_t int_shape[1] = {2};
    cr_assert_eq(moe_test_st_add_raw(st, "e.i64", "I64", 1, int_shape, ints, sizeof ints), 0);
    char path[600];
    tmp_path(path, sizeof path, "ok.safetensors");
    cr_assert_eq(moe_test_st_save(st, path), 0);
    moe_test_st_free(st);

    moe_st_file_t *file = NULL;
    char msg[512] = "";
    cr_assert_eq(moe_st_open(path, &file, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_str_eq(moe_st_path(file), path);
    cr_assert_eq(moe_st_count(file), 5);
    cr_assert_null(moe_st_at(file, 5));
    cr_assert_null(moe_st_find(file, "nope"));
    const char *names[3] = {"a.f32", "b.f16", "c.bf16"};
    const moe_st_dtype_t dtypes[3] = {MOE_ST_F32, MOE_ST_F16, MOE_ST_BF16};
    for (int k = 0; k < 3; k++) {
        const moe_st_tensor_t *t = moe_st_find(file, names[k]);
        cr_assert_not_null(t, "%s", names[k]);
        cr_assert_str_eq(t->name, names[k]);
        cr_assert_eq(t->dtype, dtypes[k]);
        cr_assert_eq(t->n_dims, 2);
        cr_assert_eq(t->shape[0], 2);
        cr_assert_eq(t->shape[1], 3);
        float got[6];
        cr_assert_eq(moe_st_to_f32(t, got, 6), MOE_OK);
        for (int i = 0; i < 6; i++)
            cr_assert_eq(got[i], values[i], "%s[%d]: %g != %g", names[k], i, got[i], values[i]);
        cr_assert_eq(moe_st_to_f32(t, got, 7), MOE_ERR_RANGE, "n beyond the tensor");
    }
    const moe_st_tensor_t *t = moe_st_find(file, "d.special");
    float got[7];
    cr_assert_eq(moe_st_to_f32(t, got, 7), MOE_OK);
    cr_assert_eq(got[0], ldexpf(1.0f, -24));
    cr_assert_eq(got[1], 1023.0f * ldexpf(1.0f, -24));
    cr_assert(got[2] == 0.0f && signbit(got[2]));
    cr_assert(isinf(got[3]) && got[3] > 0);
    cr_assert(isinf(got[4]) && got[4] < 0);
    cr_assert(isnan(got[5]));
    cr_assert_eq(got[6], 65504.0f);
    const moe_st_tensor_t *ti = moe_st_find(file, "e.i64");
    cr_assert_eq(ti->dtype, MOE_ST_OTHER);
    cr_assert_eq(ti->n_bytes, 16u);
    cr_assert_eq(moe_st_to_f32(ti, got, 1), MOE_ERR_UNSUPPORTED);
    moe_st_close(file);
}

Test(safetensors, writer_rounding_matches_reader) {
    /* The writer's f16/bf16 rounding feeds the oracle comparisons; check it
     * against the reader on values that need rounding. */
    const float values[5] = {0.1f, -3.14159f, 1e-6f, 70000.0f, 1.0f + 1.0f / 2048.0f};
    const float want_f16[5] = {0.0999755859375f, -3.140625f, 1.0132789611816406e-06f, INFINITY,
                               1.0f};
    for (int i = 0; i < 5; i++) {
        uint16_t h = moe_test_f32_to_f16(values[i]);
        moe_st_tensor_t t = {.name = "x", .dtype = MOE_ST_F16, .n_dims = 1, .data = &h,
                             .n_bytes = 2};
        float got;
        cr_assert_eq(moe_st_to_f32(&t, &got, 1), MOE_OK);
        cr_assert_eq(got, want_f16[i], "f16(%g) = %.10g, want %.10g", values[i], got,
                     want_f16[i]);
    }
    cr_assert_eq(moe_test_f32_to_bf16(1.0f + 1.0f / 256.0f), 0x3f80); /* tie -> even */
    cr_assert_eq(moe_test_f32_to_bf16(1.0f + 3.0f / 256.0f), 0x3f82);
}

Test(safetensors, truncated_files) {
    char path[600];
    tmp_path(path, sizeof path, "short.safetensors");
    cr_assert_eq(moe_test_write_bytes(path, "", 0), 0);
    expect_open_error(path, MOE_ERR_FORMAT, "truncated");
    cr_assert_eq(moe_test_write_bytes(path, "\x10\0\0", 3), 0);
    expect_open_error(path, MOE_ERR_FORMAT, "truncated");
    expect_open_error("/nonexistent/x.safetensors", MOE_ERR_NOT_FOUND, "/nonexistent/x");
}

Test(safetensors, header_length_beyond_file) {
    char path[600];
    tmp_path(path, sizeof path, "long.safetensors");
    uint8_t bytes[20] = {0};
    bytes[0] = 0xe8; /* 1000 */
    bytes[1] = 0x03;
    memcpy(bytes + 8, "{}", 2);
    cr_assert_eq(moe_test_write_bytes(path, bytes, sizeof bytes), 0);
    expect_open_error(path, MOE_ERR_FORMAT, "truncated");
    /* A length past the 100 MiB cap is refused before it is used at all. */
    memset(bytes, 0xff, 8);
    cr_assert_eq(moe_test_write_bytes(path, bytes, sizeof bytes), 0);
    expect_open_error(path, MOE_ERR_FORMAT, "exceeds the limit");
}

Test(safetensors, bad_json_header) {
    expect_header_error("{\"x\": {\"dtype\": ", 0, "not valid JSON");
    expect_header_error("[1, 2, 3]", 0, "not a JSON object");
    expect_header_error("{\"x\": 5}", 0, "'x': entry is not an object");
    expect_header_error("{\"x\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "dtype");
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, "shape");
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}",
                        4, "data_offsets");
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
                        " \"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
                        4, "appears twice");
}

Test(safetensors, data_offsets_out_of_range) {
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [25], "
                        "\"data_offsets\": [0, 100]}}",
                        64, "tensor 'x': data_offsets [0,100] exceed data size 64");
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [8, 4]}}",
                        64, "exceed data size");
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}",
                        64, "non-negative");
    expect_header_error("{\"x\": {\"dtype\": \"U8\", \"shape\": [1], "
                        "\"data_offsets\": [0, 1e300]}}", 64, "non-negative");
}

Test(safetensors, size_shape_mismatch) {
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}",
                        64, "tensor 'x'");
    expect_header_error("{\"y\": {\"dtype\": \"BF16\", \"shape\": [2, 2], "
                        "\"data_offsets\": [0, 16]}}",
                        64, "need 8");
    expect_header_error("{\"z\": {\"dtype\": \"I64\", \"shape\": [2], \"data_offsets\": [0, 8]}}",
                        64, "tensor 'z'");
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}",
                        64, "shape[0]");
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}",
                        64, "shape[0]");
    /* 2^52 * 2^52 * 4 overflows 64 bits; it must not wrap to a small size. */
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [4503599627370496, "
                        "4503599627370496], \"data_offsets\": [0, 0]}}", 64, "more than");
    expect_header_error("{\"x\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], "
                        "\"data_offsets\": [0, 4]}}", 64, "dimensions");
    /* Unknown dtypes are accepted with bounds checks only; __metadata__ is
     * skipped. */
    char path[600];
    tmp_path(path, sizeof path, "meta.safetensors");
    const char *header = "{\"__metadata__\": {\"format\": \"pt\"}, \"q\": {\"dtype\": \"Q4_X\", "
                         "\"shape\": [3], \"data_offsets\": [0, 5]}}";
    uint8_t data[8] = {0};
    cr_assert_eq(moe_test_st_write_raw(path, header, data, sizeof data), 0);
    moe_st_file_t *file = NULL;
    char msg[512] = "";
    cr_assert_eq(moe_st_open(path, &file, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(moe_st_count(file), 1);
    cr_assert_eq(moe_st_at(file, 0)->n_bytes, 5u);
    moe_st_close(file);
}

/* ---- moe_weights over a model written here ---- */

enum { H = 8, I = 4, E = 4, IS = 6, LAYER = 1 };

/* Exact in bf16 and f16: k/16 with |k| <= 11. */
static float model_value(int layer, int tag, int index) {
    return (float)((layer * 37 + tag * 131 + index * 7) % 23 - 11) / 16.0f;
}

static const char *block_of(moe_naming_t naming) {
    return naming == MOE_NAMING_MIXTRAL ? "block_sparse_moe" : "mlp";
}

static void expert_name(char *buf, size_t size, moe_naming_t naming, int layer, int expert,
                        int proj) {
    static const char *mixtral[3] = {"w1", "w3", "w2"};
    static const char *hf[3] = {"gate_proj", "up_proj", "down_proj"};
    if (naming == MOE_NAMING_MIXTRAL)
        snprintf(buf, size, "model.layers.%d.block_sparse_moe.experts.%d.%s.weight", layer,
                 expert, mixtral[proj]);
    else
        snprintf(buf, size, "model.layers.%d.mlp.experts.%d.%s.weight", layer, expert, hf[proj]);
}

static void shared_name(char *buf, size_t size, moe_naming_t naming, int layer, int proj) {
    static const char *hf[3] = {"gate_proj", "up_proj", "down_proj"};
    snprintf(buf, size, "model.layers.%d.mlp.%s.%s.weight", layer,
             naming == MOE_NAMING_QWEN_MOE ? "shared_expert" : "shared_experts", hf[proj]);
}

typedef struct {
    moe_naming_t naming;
    const char *dtype;
    const char *omit;    /* tensor left out, or NULL */
    const char *reshape; /* tensor written with its last dim + 1, or NULL */
    int n_shards;        /* 0: single file at path; else a directory + index */
} model_spec_t;

static moe_test_st_t *shards[4];
static char index_json[65536];
static size_t index_used;
static int n_added; /* tensors written so far; spreads them over shards */

static void add_tensor(const model_spec_t *spec, const char *name, int n_dims,
                       const int64_t *shape, int tag) {
    if (spec->omit && strcmp(name, spec->omit) == 0) return;
    int64_t dims[2] = {shape[0], n_dims > 1 ? shape[1] : 0};
    if (spec->reshape && strcmp(name, spec->reshape) == 0) dims[n_dims - 1]++;
    int n = (int)(dims[0] * (n_dims > 1 ? dims[1] : 1));
    float *values = malloc((size_t)n * sizeof *values);
    for (int i = 0; i < n; i++) values[i] = model_value(LAYER, tag, i);
    int shard = spec->n_shards ? n_added % spec->n_shards : 0;
    cr_assert_eq(moe_test_st_add_f32(shards[shard], name, spec->dtype, n_dims, dims, values), 0);
    free(values);
    if (spec->n_shards)
        index_used += (size_t)snprintf(index_json + index_used, sizeof index_json - index_used,
                                       "%s\"%s\": \"shard-%d.safetensors\"",
                                       n_added ? ", " : "", name, shard);
    n_added++;
}

/* Writes the model of LAYER for the spec; returns the weights path. */
static void write_model(const model_spec_t *spec, char *path, size_t size) {
    int n_files = spec->n_shards ? spec->n_shards : 1;
    for (int s = 0; s < n_files; s++) shards[s] = moe_test_st_new();
    n_added = 0;
    index_used = (size_t)snprintf(index_json, sizeof index_json, "{\"weight_map\": {");
    char name[256];
    int64_t router[2] = {E, H}, up[2] = {I, H}, down[2] = {H, I};
    snprintf(name, sizeof name, "model.layers.%d.%s.gate.weight", LAYER, block_of(spec->naming));
    add_tensor(spec, name, 2, router, 1);
    for (int e = 0; e < E; e++)
        for (int p = 0; p < 3; p++) {
            expert_name(name, sizeof name, spec->naming, LAYER, e, p);
            add_tensor(spec, name, 2, p == 2 ? down : up, 10 + 3 * e + p);
        }
    if (spec->naming != MOE_NAMING_MIXTRAL) {
        int64_t sup[2] = {IS, H}, sdown[2] = {H, IS};
        for (int p = 0; p < 3; p++) {
            shared_name(name, sizeof name, spec->naming, LAYER, p);
            add_tensor(spec, name, 2, p == 2 ? sdown : sup, 100 + p);
        }
    }
    if (spec->naming == MOE_NAMING_QWEN_MOE) {
        int64_t gate[2] = {1, H};
        snprintf(name, sizeof name, "model.layers.%d.mlp.shared_expert_gate.weight", LAYER);
        add_tensor(spec, name, 2, gate, 200);
    }
    if (spec->naming == MOE_NAMING_DEEPSEEK_V3) {
        int64_t bias[1] = {E};
        snprintf(name, sizeof name, "model.layers.%d.mlp.gate.e_score_correction_bias", LAYER);
        add_tensor(spec, name, 1, bias, 300);
    }
    if (spec->n_shards) {
        for (int s = 0; s < n_files; s++) {
            snprintf(path, size, "%s/shard-%d.safetensors", tmp_dir, s);
            cr_assert_eq(moe_test_st_save(shards[s], path), 0);
        }
        snprintf(index_json + index_used, sizeof index_json - index_used, "}}");
        snprintf(path, size, "%s/model.safetensors.index.json", tmp_dir);
        cr_assert_eq(moe_test_write_bytes(path, index_json, strlen(index_json)), 0);
        snprintf(path, size, "%s", tmp_dir);
    } else {
        snprintf(path, size, "%s/model.safetensors", tmp_dir);
        cr_assert_eq(moe_test_st_save(shards[0], path), 0);
    }
    for (int s = 0; s < n_files; s++) moe_test_st_free(shards[s]);
}

static moe_model_config_t model_config(moe_naming_t naming, const char *path) {
    moe_model_config_t m;
    memset(&m, 0, sizeof m);
    m.weights.format = MOE_WEIGHTS_SAFETENSORS;
    m.weights.naming = naming;
    snprintf(m.weights.path, sizeof m.weights.path, "%s", path);
    m.n_layers = 1;
    m.layer_ids[0] = LAYER;
    m.hidden = H;
    m.moe_intermediate = I;
    m.experts = E;
    m.top_k = 2;
    m.shared_intermediate = naming == MOE_NAMING_MIXTRAL ? 0 : IS;
    m.shared_expert_gate = naming == MOE_NAMING_QWEN_MOE;
    return m;
}

static void check_values(const float *got, int n, int tag, const char *what) {
    for (int i = 0; i < n; i++)
        cr_assert_eq(got[i], model_value(LAYER, tag, i), "%s[%d] = %g, want %g", what, i,
                     got[i], model_value(LAYER, tag, i));
}

/* Loads everything the spec's model has and compares with model_value. */
static void check_model(const model_spec_t *spec, const char *path) {
    moe_model_config_t m = model_config(spec->naming, path);
    moe_weights_t *w = NULL;
    char msg[512] = "";
    cr_assert_eq(moe_weights_open(&m, &w, msg, sizeof msg), MOE_OK, "%s", msg);
    float wg[E * H], w1[IS * H], w3[IS * H], w2[H * IS], gate[H], bias[E];
    cr_assert_eq(moe_weights_router(w, LAYER, wg, msg, sizeof msg), MOE_OK, "%s", msg);
    check_values(wg, E * H, 1, "router");
    for (int e = 0; e < E; e++) {
        cr_assert_eq(moe_weights_expert(w, LAYER, e, w1, w3, w2, msg, sizeof msg), MOE_OK, "%s",
                     msg);
        check_values(w1, I * H, 10 + 3 * e, "w1");
        check_values(w3, I * H, 11 + 3 * e, "w3");
        check_values(w2, H * I, 12 + 3 * e, "w2");
    }
    cr_assert_eq(moe_weights_expert(w, LAYER, E, w1, w3, w2, msg, sizeof msg), MOE_ERR_INVAL);
    if (spec->naming != MOE_NAMING_MIXTRAL) {
        for (int i = 0; i < H; i++) gate[i] = -7.0f;
        cr_assert_eq(moe_weights_shared(w, LAYER, w1, w3, w2, gate, msg, sizeof msg), MOE_OK,
                     "%s", msg);
        check_values(w1, IS * H, 100, "shared w1");
        check_values(w3, IS * H, 101, "shared w3");
        check_values(w2, H * IS, 102, "shared w2");
        if (spec->naming == MOE_NAMING_QWEN_MOE)
            check_values(gate, H, 200, "shared gate");
        else
            cr_assert_eq(gate[0], -7.0f, "gate untouched without shared_expert_gate");
    }
    for (int e = 0; e < E; e++) bias[e] = -7.0f;
    cr_assert_eq(moe_weights_bias(w, LAYER, bias, msg, sizeof msg), MOE_OK, "%s", msg);
    if (spec->naming == MOE_NAMING_DEEPSEEK_V3)
        check_values(bias, E, 300, "bias");
    else
        for (int e = 0; e < E; e++) cr_assert_eq(bias[e], 0.0f, "no bias -> zeros");
    /* Another layer is simply not in the checkpoint. */
    cr_assert_eq(moe_weights_router(w, LAYER + 1, wg, msg, sizeof msg), MOE_ERR_NOT_FOUND);
    moe_weights_close(w);
}

/* Writes the spec's model and loads every tensor back. */
static void round_trip_model(moe_naming_t naming, const char *dtype, int n_shards) {
    model_spec_t spec = {naming, dtype, NULL, NULL, n_shards};
    char path[600];
    write_model(&spec, path, sizeof path);
    check_model(&spec, path);
    if (n_shards == 0) check_model(&spec, tmp_dir); /* a directory with model.safetensors */
}

Test(safetensors, naming_mixtral_bf16) { round_trip_model(MOE_NAMING_MIXTRAL, "BF16", 0); }

Test(safetensors, naming_qwen_moe_f16_shared_gate) {
    round_trip_model(MOE_NAMING_QWEN_MOE, "F16", 0);
}

Test(safetensors, naming_deepseek_v3_f32_bias_shared) {
    round_trip_model(MOE_NAMING_DEEPSEEK_V3, "F32", 0);
}

Test(safetensors, sharded_directory) { round_trip_model(MOE_NAMING_DEEPSEEK_V3, "BF16", 3); }

Test(safetensors, sharded_index_escaping_directory) {
    char path[600];
    const char *bad[3] = {"{\"weight_map\": {\"x\": \"../evil.safetensors\"}}",
                          "{\"weight_map\": {\"x\": \"/etc/passwd\"}}",
                          "{\"weight_map\": {\"x\": 1}}"};
    for (int i = 0; i < 3; i++) {
        tmp_path(path, sizeof path, "model.safetensors.index.json");
        cr_assert_eq(moe_test_write_bytes(path, bad[i], strlen(bad[i])), 0);
        moe_model_config_t m = model_config(MOE_NAMING_MIXTRAL, tmp_dir);
        moe_weights_t *w = NULL;
        char msg[512] = "";
        cr_assert_eq(moe_weights_open(&m, &w, msg, sizeof msg), MOE_ERR_FORMAT, "%s", msg);
        cr_assert(strstr(msg, "not a plain file name") != NULL, "%s", msg);
        cr_assert_null(w);
    }
    /* An index pointing at a shard that lacks the tensor is broken too. */
    moe_test_st_t *st = moe_test_st_new();
    float v = 1.0f;
    int64_t one[1] = {1};
    moe_test_st_add_f32(st, "y", "F32", 1, one, &v);
    tmp_path(path, sizeof path, "s.safetensors");
    cr_assert_eq(moe_test_st_save(st, path), 0);
    moe_test_st_free(st);
    tmp_path(path, sizeof path, "model.safetensors.index.json");
    const char *lying = "{\"weight_map\": {\"x\": \"s.safetensors\"}}";
    cr_assert_eq(moe_test_write_bytes(path, lying, strlen(lying)), 0);
    moe_model_config_t m = model_config(MOE_NAMING_MIXTRAL, tmp_dir);
    moe_weights_t *w = NULL;
    char msg[512] = "";
    cr_assert_eq(moe_weights_open(&m, &w, msg, sizeof msg), MOE_ERR_FORMAT, "%s", msg);
    cr_assert(strstr(msg, "'x'") != NULL, "%s", msg);
}

Test(safetensors, empty_directory) {
    moe_model_config_t m = model_config(MOE_NAMING_MIXTRAL, tmp_dir);
    moe_weights_t *w = NULL;
    char msg[512] = "";
    cr_assert_eq(moe_weights_open(&m, &w, msg, sizeof msg), MOE_ERR_NOT_FOUND, "%s", msg);
    cr_assert(strstr(msg, "model.safetensors") != NULL, "%s", msg);
}

/* One missing tensor and one mis-shaped tensor per naming scheme. */
static void check_missing_and_misshaped(moe_naming_t naming, const char *dtype, int n_shards) {
    char missing[256], misshaped[256], path[600], msg[512];
    float w1[IS * H], w3[IS * H], w2[H * IS], gate[H], bias[E], wg[E * H];
    expert_name(missing, sizeof missing, naming, LAYER, 3, 2);
    model_spec_t spec = {naming, dtype, missing, NULL, n_shards};
    write_model(&spec, path, sizeof path);
    moe_model_config_t m = model_config(naming, path);
    moe_weights_t *w = NULL;
    cr_assert_eq(moe_weights_open(&m, &w, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(moe_weights_expert(w, LAYER, 2, w1, w3, w2, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(moe_weights_expert(w, LAYER, 3, w1, w3, w2, msg, sizeof msg), MOE_ERR_NOT_FOUND);
    cr_assert(strstr(msg, missing) != NULL, "message '%s' lacks the tensor", msg);
    cr_assert(strstr(msg, tmp_dir) != NULL, "message '%s' lacks the file", msg);
    moe_weights_close(w);

    /* Mis-shaped: the router for mixtral, the shared gate for qwen, the
     * bias for deepseek — each scheme's own extra tensor. */
    int64_t want[2] = {E, H};
    int want_dims = 2;
    if (naming == MOE_NAMING_MIXTRAL)
        snprintf(misshaped, sizeof misshaped, "model.layers.%d.block_sparse_moe.gate.weight",
                 LAYER);
    else if (naming == MOE_NAMING_QWEN_MOE) {
        snprintf(misshaped, sizeof misshaped, "model.layers.%d.mlp.shared_expert_gate.weight",
                 LAYER);
        want[0] = 1;
    } else {
        snprintf(misshaped, sizeof misshaped,
                 "model.layers.%d.mlp.gate.e_score_correction_bias", LAYER);
        want_dims = 1;
    }
    moe_test_rmdir(tmp_dir);
    cr_assert_eq(moe_test_mkdtemp(tmp_dir, sizeof tmp_dir), 0);
    model_spec_t spec2 = {naming, dtype, NULL, misshaped, n_shards};
    write_model(&spec2, path, sizeof path);
    m = model_config(naming, path);
    cr_assert_eq(moe_weights_open(&m, &w, msg, sizeof msg), MOE_OK, "%s", msg);
    moe_err_t ret;
    if (naming == MOE_NAMING_MIXTRAL)
        ret = moe_weights_router(w, LAYER, wg, msg, sizeof msg);
    else if (naming == MOE_NAMING_QWEN_MOE)
        ret = moe_weights_shared(w, LAYER, w1, w3, w2, gate, msg, sizeof msg);
    else
        ret = moe_weights_bias(w, LAYER, bias, msg, sizeof msg);
    cr_assert_eq(ret, MOE_ERR_SHAPE, "%s", msg);
    char want_text[64], got_text[64];
    if (want_dims == 2) {
        snprintf(want_text, sizeof want_text, "expected shape [%d,%d]", (int)want[0],
                 (int)want[1]);
        snprintf(got_text, sizeof got_text, "got [%d,%d]", (int)want[0], (int)want[1] + 1);
    } else {
        snprintf(want_text, sizeof want_text, "expected shape [%d]", E);
        snprintf(got_text, sizeof got_text, "got [%d]", E + 1);
    }
    cr_assert(strstr(msg, misshaped) != NULL, "message '%s' lacks the tensor", msg);
    cr_assert(strstr(msg, want_text) != NULL, "message '%s' lacks '%s'", msg, want_text);
    cr_assert(strstr(msg, got_text) != NULL, "message '%s' lacks '%s'", msg, got_text);
    moe_weights_close(w);
}

Test(safetensors, missing_and_misshaped_mixtral) {
    check_missing_and_misshaped(MOE_NAMING_MIXTRAL, "BF16", 0);
}

Test(safetensors, missing_and_misshaped_qwen_moe) {
    check_missing_and_misshaped(MOE_NAMING_QWEN_MOE, "F16", 0);
}

Test(safetensors, missing_and_misshaped_deepseek_v3_sharded) {
    check_missing_and_misshaped(MOE_NAMING_DEEPSEEK_V3, "F32", 2);
}

Test(safetensors, mixtral_has_no_shared_expert) {
    model_spec_t spec = {MOE_NAMING_MIXTRAL, "F32", NULL, NULL, 0};
    char path[600], msg[512];
    write_model(&spec, path, sizeof path);
    moe_model_config_t m = model_config(MOE_NAMING_MIXTRAL, path);
    m.shared_intermediate = IS;
    moe_weights_t *w = NULL;
    cr_assert_eq(moe_weights_open(&m, &w, msg, sizeof msg), MOE_OK, "%s", msg);
    float w1[IS * H], w3[IS * H], w2[H * IS];
    cr_assert_eq(moe_weights_shared(w, LAYER, w1, w3, w2, NULL, msg, sizeof msg),
                 MOE_ERR_NOT_FOUND);
    cr_assert(strstr(msg, "mixtral") != NULL, "%s", msg);
    moe_weights_close(w);
}

/* ---- synthetic weights ---- */

static moe_model_config_t synth_config(uint64_t seed) {
    moe_model_config_t m;
    memset(&m, 0, sizeof m);
    m.weights.format = MOE_WEIGHTS_SYNTHETIC;
    m.weights.seed = seed;
    m.n_layers = 2;
    m.layer_ids[0] = 3;
    m.layer_ids[1] = 4;
    m.hidden = 64;
    m.moe_intermediate = 16;
    m.experts = 8;
    m.top_k = 2;
    m.shared_intermediate = 24;
    m.shared_expert_gate = true;
    return m;
}

Test(safetensors, synthetic_weights) {
    enum { SH = 64, SI = 16, SE = 8, SIS = 24 };
    moe_model_config_t m = synth_config(42);
    moe_weights_t *a = NULL, *b = NULL, *c = NULL;
    char msg[512] = "";
    cr_assert_eq(moe_weights_open(&m, &a, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(moe_weights_open(&m, &b, msg, sizeof msg), MOE_OK, "%s", msg);
    moe_model_config_t m2 = synth_config(43);
    cr_assert_eq(moe_weights_open(&m2, &c, msg, sizeof msg), MOE_OK, "%s", msg);

    static float w1a[SI * SH], w3a[SI * SH], w2a[SH * SI], w1b[SI * SH], w3b[SI * SH],
        w2b[SH * SI];
    cr_assert_eq(moe_weights_expert(a, 3, 5, w1a, w3a, w2a, msg, sizeof msg), MOE_OK);
    cr_assert_eq(moe_weights_expert(b, 3, 5, w1b, w3b, w2b, msg, sizeof msg), MOE_OK);
    cr_assert_eq(memcmp(w1a, w1b, sizeof w1a), 0, "same seed, same values");
    cr_assert_eq(memcmp(w2a, w2b, sizeof w2a), 0);
    cr_assert_eq(moe_weights_expert(b, 3, 6, w1b, w3b, w2b, msg, sizeof msg), MOE_OK);
    cr_assert_neq(memcmp(w1a, w1b, sizeof w1a), 0, "different expert, different values");
    cr_assert_eq(moe_weights_expert(c, 3, 5, w1b, w3b, w2b, msg, sizeof msg), MOE_OK);
    cr_assert_neq(memcmp(w1a, w1b, sizeof w1a), 0, "different seed, different values");
    cr_assert_neq(memcmp(w1a, w3a, sizeof w1a), 0, "W1 and W3 differ");

    /* Element index = row * fan_in + column, as moe_synth.h documents. */
    const int idx[4] = {0, 1, 77, SI * SH - 1};
    for (int k = 0; k < 4; k++) {
        cr_assert_eq(w1a[idx[k]], moe_synth_value(42, 3, MOE_SYNTH_W1, 5, (uint64_t)idx[k], SH));
        cr_assert_eq(w3a[idx[k]], moe_synth_value(42, 3, MOE_SYNTH_W3, 5, (uint64_t)idx[k], SH));
        cr_assert_eq(w2a[idx[k]], moe_synth_value(42, 3, MOE_SYNTH_W2, 5, (uint64_t)idx[k], SI));
    }
    float bound1 = 1.0f / sqrtf((float)SH), bound2 = 1.0f / sqrtf((float)SI);
    double sum_sq = 0;
    for (int i = 0; i < SI * SH; i++) {
        cr_assert(fabsf(w1a[i]) <= bound1 && fabsf(w3a[i]) <= bound1 && fabsf(w2a[i]) <= bound2,
                  "element %d out of scale", i);
        sum_sq += (double)w1a[i] * w1a[i];
    }
    /* Uniform on [-s, s) has mean square s^2/3: the values are spread, not
     * stuck near zero. */
    double mean_sq = sum_sq / (SI * SH) / (bound1 * bound1);
    cr_assert(mean_sq > 0.25 && mean_sq < 0.42, "mean square %g of scale^2", mean_sq);

    static float wg[SE * SH], bias[SE], gate[SH], s1[SIS * SH], s3[SIS * SH], s2[SH * SIS];
    cr_assert_eq(moe_weights_router(a, 4, wg, msg, sizeof msg), MOE_OK);
    for (int k = 0; k < 3; k++) {
        int i = (k * 131) % (SE * SH);
        cr_assert_eq(wg[i], moe_synth_value(42, 4, MOE_SYNTH_ROUTER, -1, (uint64_t)i, SH));
        cr_assert(fabsf(wg[i]) <= 4.0f / sqrtf((float)SH));
    }
    cr_assert_eq(moe_weights_bias(a, 4, bias, msg, sizeof msg), MOE_OK);
    for (int e = 0; e < SE; e++) {
        cr_assert_eq(bias[e], moe_synth_value(42, 4, MOE_SYNTH_BIAS, -1, (uint64_t)e, 1));
        cr_assert(fabsf(bias[e]) <= 0.05f);
    }
    cr_assert_eq(moe_weights_shared(a, 4, s1, s3, s2, gate, msg, sizeof msg), MOE_OK);
    cr_assert_eq(s1[9], moe_synth_value(42, 4, MOE_SYNTH_W1, MOE_SYNTH_SHARED_EXPERT, 9, SH));
    cr_assert_eq(s3[9], moe_synth_value(42, 4, MOE_SYNTH_W3, MOE_SYNTH_SHARED_EXPERT, 9, SH));
    cr_assert_eq(s2[9], moe_synth_value(42, 4, MOE_SYNTH_W2, MOE_SYNTH_SHARED_EXPERT, 9, SIS));
    cr_assert_eq(gate[5], moe_synth_value(42, 4, MOE_SYNTH_SHARED_GATE, -1, 5, SH));
    moe_weights_close(a);
    moe_weights_close(b);
    moe_weights_close(c);
}
