/* model_json: moe_config_resolve_model — model shapes and routing from a
 * Hugging Face checkpoint's config.json (see moe_config.h).
 *
 * The checkpoint is the truth about its own shapes: a value the YAML leaves
 * unset is taken from config.json, and a YAML value that disagrees is an
 * error naming both, because serving a checkpoint with the wrong shape would
 * fail much later (or, worse, produce garbage). Each value read from
 * config.json goes through the field table's setter, so it meets the same
 * type and bounds checks as a YAML value. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "config_fields.h"
#include "moe_config.h"

#define CONFIG_JSON_MAX_BYTES (4u << 20) /* real ones are a few KB */
#define MAX_MODEL_LAYERS 4096            /* num_hidden_layers we accept */
#define MAX_FACTS 16

typedef enum { KIND_MIXTRAL, KIND_QWEN2_MOE, KIND_QWEN3_MOE, KIND_DEEPSEEK_V3 } model_kind_t;

static const struct {
    const char *model_type;
    model_kind_t kind;
} model_types[] = {
    {"mixtral", KIND_MIXTRAL},
    {"qwen2_moe", KIND_QWEN2_MOE},
    {"qwen3_moe", KIND_QWEN3_MOE},
    {"deepseek_v3", KIND_DEEPSEEK_V3},
};

/* One value the checkpoint fixes: field path, where it came from (for the
 * message) and its YAML text. */
typedef struct {
    int idx;
    bool yaml_may_override; /* naming: a converted checkpoint may use another scheme */
    char source[96];
    char text[48];
} fact_t;

typedef struct {
    moe_config_t *cfg;
    moe_config_errors_t *errs;
    const char *yaml_name;
    char json_path[MOE_PATH_MAX + 16];
    const cJSON *root;
    int n_errors_at_start;
    moe_config_t checkpoint; /* scratch: facts are validated by setting them here */
    int n_facts;
    fact_t facts[MAX_FACTS];
    int n_moe_layers;
    int moe_layers[MAX_MODEL_LAYERS];
} resolve_t;

/* ---- reading config.json --------------------------------------------------- */

/* The JSON value of key as YAML text ("4096", "true", "2.5"); false with an
 * error when it is not a number or bool. Absent: def (NULL = required). */
static bool json_text(resolve_t *r, const char *key, const char *def, char *text, size_t size) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(r->root, key);
    if (item == NULL || cJSON_IsNull(item)) {
        if (def != NULL) {
            snprintf(text, size, "%s", def);
            return true;
        }
        moe_config_errors_add(r->errs, "%s: %s: missing", r->json_path, key);
        return false;
    }
    if (cJSON_IsBool(item)) {
        snprintf(text, size, "%s", cJSON_IsTrue(item) ? "true" : "false");
        return true;
    }
    if (!cJSON_IsNumber(item)) {
        moe_config_errors_add(r->errs, "%s: %s: expected a number", r->json_path, key);
        return false;
    }
    double value = item->valuedouble;
    /* Integral values print without a fraction so an int field takes them. */
    if (value > -9e15 && value < 9e15 && value == (double)(long long)value) snprintf(text, size, "%lld", (long long)value);
    else snprintf(text, size, "%.17g", value);
    return true;
}

static bool json_int(resolve_t *r, const char *key, long long def, long long min, long long *out) {
    char text[48], fallback[32];
    snprintf(fallback, sizeof fallback, "%lld", def);
    if (!json_text(r, key, def < min ? NULL : fallback, text, sizeof text)) return false;
    char *end = NULL;
    long long value = strtoll(text, &end, 10);
    if (*end != '\0' || value < min || value > MAX_MODEL_LAYERS * 1024LL) {
        moe_config_errors_add(r->errs, "%s: %s: %s is not an integer >= %lld", r->json_path, key,
                              text, min);
        return false;
    }
    *out = value;
    return true;
}

/* Records a fact after checking it with the field's own setter. */
static void fact(resolve_t *r, const char *path, const char *source, const char *text,
                 bool yaml_may_override) {
    int idx = moe_config_field_index(path);
    char msg[300];
    if (idx < 0 || r->n_facts >= MAX_FACTS) return;
    if (!moe_config_field_set_scalar(idx, &r->checkpoint, text, false, msg, sizeof msg)) {
        moe_config_errors_add(r->errs, "%s: %s: %s (for %s)", r->json_path, source, msg, path);
        return;
    }
    fact_t *f = &r->facts[r->n_facts++];
    f->idx = idx;
    f->yaml_may_override = yaml_may_override;
    snprintf(f->source, sizeof f->source, "%s", source);
    snprintf(f->text, sizeof f->text, "%s", text);
}

/* A fact read straight from a config.json key. */
static void fact_key(resolve_t *r, const char *path, const char *key, const char *def) {
    char text[48];
    if (json_text(r, key, def, text, sizeof text)) fact(r, path, key, text, false);
}

/* ---- per model type ------------------------------------------------------------ */

/* Fields read straight from config.json, per family: field, key, default
 * when absent (NULL = required). Hugging Face's Qwen2MoeConfig and
 * Qwen3MoeConfig default norm_topk_prob to false, DeepseekV3Config to true. */
typedef struct {
    const char *path, *key, *def;
} json_key_t;

static const json_key_t mixtral_keys[] = {
    {"model.hidden", "hidden_size", NULL},
    {"model.moe_intermediate", "intermediate_size", NULL},
    {"model.experts", "num_local_experts", NULL},
    {"model.top_k", "num_experts_per_tok", NULL},
    {NULL, NULL, NULL},
};
static const json_key_t qwen_moe_keys[] = {
    {"model.hidden", "hidden_size", NULL},
    {"model.moe_intermediate", "moe_intermediate_size", NULL},
    {"model.experts", "num_experts", NULL},
    {"model.top_k", "num_experts_per_tok", NULL},
    {"model.routing.norm_topk_prob", "norm_topk_prob", "false"},
    {NULL, NULL, NULL},
};
static const json_key_t deepseek_v3_keys[] = {
    {"model.hidden", "hidden_size", NULL},
    {"model.moe_intermediate", "moe_intermediate_size", NULL},
    {"model.experts", "n_routed_experts", NULL},
    {"model.top_k", "num_experts_per_tok", NULL},
    {"model.routing.n_group", "n_group", "1"},
    {"model.routing.topk_group", "topk_group", "1"},
    {"model.routing.routed_scaling_factor", "routed_scaling_factor", "1.0"},
    {"model.routing.norm_topk_prob", "norm_topk_prob", "true"},
    {NULL, NULL, NULL},
};

static void fact_keys(resolve_t *r, const json_key_t *keys) {
    for (; keys->path != NULL; keys++) fact_key(r, keys->path, keys->key, keys->def);
}

static bool read_mixtral(resolve_t *r, long long n_layers) {
    fact_keys(r, mixtral_keys);
    fact(r, "model.shared_intermediate", "the shared expert size (mixtral has none)", "0", false);
    fact(r, "model.shared_expert_gate", "the shared expert gate (mixtral has none)", "false",
         false);
    fact(r, "model.routing.method", "the mixtral router", "softmax_topk", false);
    fact(r, "model.routing.norm_topk_prob", "norm_topk_prob (always true for mixtral)", "true",
         false);
    fact(r, "model.weights.naming", "model_type", "mixtral", true);
    for (int i = 0; i < n_layers; i++) r->moe_layers[r->n_moe_layers++] = i;
    return true;
}

static bool read_qwen_moe(resolve_t *r, long long n_layers) {
    fact_keys(r, qwen_moe_keys);
    long long shared = 0, sparse_step = 1;
    if (json_int(r, "shared_expert_intermediate_size", 0, 0, &shared)) {
        char text[32];
        snprintf(text, sizeof text, "%lld", shared);
        fact(r, "model.shared_intermediate", "shared_expert_intermediate_size", text, false);
        /* Qwen-MoE always gates its shared expert with sigmoid(x·g). */
        fact(r, "model.shared_expert_gate", "shared_expert_intermediate_size > 0",
             shared > 0 ? "true" : "false", false);
    }
    fact(r, "model.routing.method", "the qwen_moe router", "softmax_topk", false);
    fact(r, "model.weights.naming", "model_type", "qwen_moe", true);
    if (!json_int(r, "decoder_sparse_step", 1, 1, &sparse_step)) return false;
    const cJSON *mlp_only = cJSON_GetObjectItemCaseSensitive(r->root, "mlp_only_layers");
    if (mlp_only != NULL && !cJSON_IsNull(mlp_only) && !cJSON_IsArray(mlp_only)) {
        moe_config_errors_add(r->errs, "%s: mlp_only_layers: expected a list of layer indices",
                              r->json_path);
        return false;
    }
    for (int i = 0; i < n_layers; i++) {
        bool dense = false;
        const cJSON *item;
        cJSON_ArrayForEach(item, mlp_only) {
            if (cJSON_IsNumber(item) && item->valuedouble == i) dense = true;
        }
        if (!dense && (i + 1) % sparse_step == 0) r->moe_layers[r->n_moe_layers++] = i;
    }
    return true;
}

static bool read_deepseek_v3(resolve_t *r, long long n_layers) {
    fact_keys(r, deepseek_v3_keys);
    long long n_shared = 0, intermediate = 0, first_dense = 0, freq = 1;
    if (json_int(r, "n_shared_experts", 0, 0, &n_shared) &&
        json_int(r, "moe_intermediate_size", 1, 1, &intermediate)) {
        /* The shared experts of DeepSeek-V3 run as one MLP of n times the
         * routed size (its DeepseekV3MLP), so that is the size we serve. */
        char text[32];
        snprintf(text, sizeof text, "%lld", n_shared * intermediate);
        fact(r, "model.shared_intermediate", "n_shared_experts * moe_intermediate_size", text,
             false);
    }
    fact(r, "model.shared_expert_gate", "the shared expert gate (deepseek_v3 has none)", "false",
         false);
    fact(r, "model.routing.method", "the deepseek_v3 router", "sigmoid_group_topk", false);
    fact(r, "model.weights.naming", "model_type", "deepseek_v3", true);
    if (!json_int(r, "first_k_dense_replace", 0, 0, &first_dense) ||
        !json_int(r, "moe_layer_freq", 1, 1, &freq))
        return false;
    for (int i = 0; i < n_layers; i++)
        if (i >= first_dense && i % freq == 0) r->moe_layers[r->n_moe_layers++] = i;
    return true;
}

static bool detect_kind(resolve_t *r, model_kind_t *kind) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(r->root, "model_type");
    if (cJSON_IsString(type)) {
        for (size_t i = 0; i < sizeof model_types / sizeof model_types[0]; i++) {
            if (strcmp(type->valuestring, model_types[i].model_type) == 0) {
                *kind = model_types[i].kind;
                return true;
            }
        }
        moe_config_errors_add(r->errs,
                              "%s: model_type: '%.64s' is not a supported MoE model (mixtral, "
                              "qwen2_moe, qwen3_moe, deepseek_v3)",
                              r->json_path, type->valuestring);
        return false;
    }
    /* No model_type: each family's expert-count key is unique to it. */
    if (cJSON_HasObjectItem(r->root, "n_routed_experts")) *kind = KIND_DEEPSEEK_V3;
    else if (cJSON_HasObjectItem(r->root, "num_local_experts")) *kind = KIND_MIXTRAL;
    else if (cJSON_HasObjectItem(r->root, "num_experts")) *kind = KIND_QWEN2_MOE;
    else {
        moe_config_errors_add(r->errs,
                              "%s: model_type: missing, and no n_routed_experts, "
                              "num_local_experts or num_experts to tell the model family",
                              r->json_path);
        return false;
    }
    return true;
}

/* ---- applying ----------------------------------------------------------------- */

/* The field's value as text for a message ("4096", "softmax_topk"). */
static void value_text(int idx, const moe_config_t *cfg, char *buf, size_t size) {
    cJSON *item = moe_config_field_to_json(idx, cfg);
    char *text = item != NULL ? cJSON_PrintUnformatted(item) : NULL;
    if (cJSON_IsString(item)) snprintf(buf, size, "%s", item->valuestring);
    else snprintf(buf, size, "%s", text != NULL ? text : "?");
    free(text);
    cJSON_Delete(item);
}

static void apply_facts(resolve_t *r) {
    char msg[300], yaml_value[64];
    for (int i = 0; i < r->n_facts; i++) {
        const fact_t *f = &r->facts[i];
        const char *path = moe_config_fields[f->idx].path;
        bool set = moe_config_was_set(r->cfg, path);
        if (set && f->yaml_may_override) continue;
        /* Benchmark and client routers replace the model's scores on
         * purpose; only a different *model-score* router contradicts. */
        if (set && strcmp(path, "model.routing.method") == 0 &&
            r->cfg->model.routing.method >= MOE_ROUTE_CLIENT)
            continue;
        if (set && !moe_config_field_equal(f->idx, r->cfg, &r->checkpoint)) {
            value_text(f->idx, r->cfg, yaml_value, sizeof yaml_value);
            moe_config_errors_add(r->errs, "%s: %s: %s in %s contradicts %s = %s in %s",
                                  r->yaml_name, path, yaml_value, r->yaml_name, f->source,
                                  f->text, r->json_path);
            continue;
        }
        moe_config_field_set_scalar(f->idx, r->cfg, f->text, false, msg, sizeof msg);
    }
}

/* "3-60" or "0, 2, 4-9" for messages (bounded). */
static void ranges_text(const int *ids, int count, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < count && used + 16 < size; i++) {
        int j = i;
        while (j + 1 < count && ids[j + 1] == ids[j] + 1) j++;
        if (j > i) used += (size_t)snprintf(buf + used, size - used, "%s%d-%d", i ? ", " : "",
                                            ids[i], ids[j]);
        else used += (size_t)snprintf(buf + used, size - used, "%s%d", i ? ", " : "", ids[i]);
        i = j;
    }
}

static void apply_layers(resolve_t *r) {
    moe_model_config_t *model = &r->cfg->model;
    char ranges[200];
    ranges_text(r->moe_layers, r->n_moe_layers, ranges, sizeof ranges);
    if (r->n_moe_layers == 0) {
        moe_config_errors_add(r->errs, "%s: num_hidden_layers: the checkpoint has no MoE layer",
                              r->json_path);
        return;
    }
    if (!moe_config_was_set(r->cfg, "model.layers")) {
        if (r->n_moe_layers > MOE_MAX_LAYERS) {
            moe_config_errors_add(r->errs,
                                  "%s: model.layers: the checkpoint has %d MoE layers, more than "
                                  "%d; list the ones this daemon serves",
                                  r->yaml_name, r->n_moe_layers, MOE_MAX_LAYERS);
            return;
        }
        model->n_layers = r->n_moe_layers;
        memcpy(model->layer_ids, r->moe_layers, (size_t)r->n_moe_layers * sizeof(int));
        model->layers_from_count = false;
    } else if (model->layers_from_count) {
        if (model->n_layers > r->n_moe_layers) {
            moe_config_errors_add(r->errs,
                                  "%s: model.layers: %d in %s asks for more MoE layers than the "
                                  "%d (%s) in %s",
                                  r->yaml_name, model->n_layers, r->yaml_name, r->n_moe_layers,
                                  ranges, r->json_path);
            return;
        }
        memcpy(model->layer_ids, r->moe_layers, (size_t)model->n_layers * sizeof(int));
    } else {
        for (int i = 0; i < model->n_layers; i++) {
            bool found = false;
            for (int j = 0; j < r->n_moe_layers && !found; j++)
                found = r->moe_layers[j] == model->layer_ids[i];
            if (!found)
                moe_config_errors_add(r->errs,
                                      "%s: model.layers: layer %d is not a MoE layer of %s (MoE "
                                      "layers: %s)",
                                      r->yaml_name, model->layer_ids[i], r->json_path, ranges);
        }
    }
}

/* Reads DIR/config.json into r->root; false without a file (not an error)
 * or with an error added. */
static bool load_json(resolve_t *r, cJSON **root) {
    *root = NULL;
    FILE *file = fopen(r->json_path, "rb");
    if (file == NULL) {
        if (errno != ENOENT)
            moe_config_errors_add(r->errs, "%s: cannot open: %s", r->json_path, strerror(errno));
        return false;
    }
    struct stat st;
    char *text = NULL;
    if (fstat(fileno(file), &st) != 0 || !S_ISREG(st.st_mode) ||
        st.st_size > (off_t)CONFIG_JSON_MAX_BYTES) {
        moe_config_errors_add(r->errs, "%s: not a regular file of at most %u bytes", r->json_path,
                              CONFIG_JSON_MAX_BYTES);
    } else if ((text = malloc((size_t)st.st_size + 1)) != NULL) {
        size_t got = fread(text, 1, (size_t)st.st_size, file);
        text[got] = '\0';
        *root = cJSON_ParseWithLength(text, got);
        if (*root == NULL) {
            const char *at = cJSON_GetErrorPtr();
            long offset = at != NULL && at >= text && at <= text + got ? (long)(at - text) : -1;
            moe_config_errors_add(r->errs, "%s: invalid JSON near byte %ld", r->json_path,
                                  offset);
        } else if (!cJSON_IsObject(*root)) {
            moe_config_errors_add(r->errs, "%s: expected a JSON object at the top level",
                                  r->json_path);
            cJSON_Delete(*root);
            *root = NULL;
        }
    }
    free(text);
    fclose(file);
    return *root != NULL;
}

static void resolve_dir(resolve_t *r) {
    const char *path = r->cfg->model.weights.path;
    struct stat st;
    if (stat(path, &st) != 0) {
        moe_config_errors_add(r->errs, "%s: model.weights.path: '%s': %s", r->yaml_name, path,
                              strerror(errno));
        return;
    }
    /* A file (model.safetensors) lives in the checkpoint directory. */
    if (S_ISDIR(st.st_mode)) {
        size_t len = strlen(path);
        while (len > 1 && path[len - 1] == '/') len--; /* "dir/" names dir too */
        snprintf(r->json_path, sizeof r->json_path, "%.*s/config.json", (int)len, path);
    } else {
        const char *slash = strrchr(path, '/');
        if (slash == NULL) snprintf(r->json_path, sizeof r->json_path, "config.json");
        else snprintf(r->json_path, sizeof r->json_path, "%.*s/config.json",
                      (int)(slash - path), path);
    }
    cJSON *root = NULL;
    if (!load_json(r, &root)) return;
    r->root = root;
    r->checkpoint = *r->cfg;
    model_kind_t kind;
    long long n_layers = 0;
    bool ok = detect_kind(r, &kind) && json_int(r, "num_hidden_layers", 0, 1, &n_layers);
    if (ok && n_layers > MAX_MODEL_LAYERS) {
        moe_config_errors_add(r->errs, "%s: num_hidden_layers: %lld is more than %d", r->json_path,
                              n_layers, MAX_MODEL_LAYERS);
        ok = false;
    }
    if (ok) {
        switch (kind) {
        case KIND_MIXTRAL: ok = read_mixtral(r, n_layers); break;
        case KIND_QWEN2_MOE:
        case KIND_QWEN3_MOE: ok = read_qwen_moe(r, n_layers); break;
        case KIND_DEEPSEEK_V3: ok = read_deepseek_v3(r, n_layers); break;
        }
    }
    /* Apply only a fully readable checkpoint: half of one is worse than the
     * YAML's values, and its errors are already listed. */
    if (ok && r->errs->count == r->n_errors_at_start) {
        apply_facts(r);
        apply_layers(r);
    }
    cJSON_Delete(root);
    r->root = NULL;
}

moe_err_t moe_config_resolve_model(moe_config_t *cfg, moe_config_errors_t *errs) {
    if (cfg->model.weights.format != MOE_WEIGHTS_SAFETENSORS || cfg->model.weights.path[0] == '\0')
        return MOE_OK; /* synthetic, or the cross-field check reports the missing path */
    moe_config_errors_t local_errs = {0};
    if (errs == NULL) errs = &local_errs;
    resolve_t *r = calloc(1, sizeof *r);
    if (r == NULL) return MOE_ERR_NOMEM;
    r->cfg = cfg;
    r->errs = errs;
    r->yaml_name = cfg->source_path[0] ? cfg->source_path : "(config)";
    r->n_errors_at_start = errs->count;
    resolve_dir(r);
    bool failed = errs->count > r->n_errors_at_start;
    free(r);
    return failed ? MOE_ERR_CONFIG : MOE_OK;
}
