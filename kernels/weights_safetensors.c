/* weights_safetensors: finds a layer's tensors in a safetensors checkpoint.
 *
 * model.weights.path is a .safetensors file, or a directory holding either
 * model.safetensors.index.json (a sharded checkpoint: its "weight_map" maps
 * tensor name -> shard file name) or a single model.safetensors. Every shard
 * is mapped once, for the object's lifetime (EPLB migration reads experts
 * again later; the page cache is shared by the ranks of a node). Tensor
 * names follow the scheme in model.weights.naming (table below). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "weights_internal.h"

#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"
#define ST_INDEX_MAX_BYTES (64u << 20) /* DeepSeek-V3's index is ~9 MB */
#define ST_NAME_MAX 256

/* One row per naming scheme. Every name is
 *   model.layers.{L}.{block}.gate.weight                    router [E,H]
 *   model.layers.{L}.{block}.experts.{e}.{proj}.weight       W1, W3, W2
 *   model.layers.{L}.{block}.{shared}.{proj}.weight          shared expert
 *   model.layers.{L}.{block}.shared_expert_gate.weight       [1,H] (qwen)
 *   model.layers.{L}.{block}.gate.e_score_correction_bias    [E] (deepseek)
 * so a new scheme is one row, not new code. */
static const struct {
    moe_naming_t naming;
    const char *label; /* model.weights.naming value, for messages */
    const char *block;
    const char *proj[3]; /* gate (W1), up (W3), down (W2) */
    const char *shared;  /* NULL: the scheme has no shared expert */
    bool has_shared_gate;
    bool has_bias;
} st_schemes[] = {
    {MOE_NAMING_MIXTRAL, "mixtral", "block_sparse_moe", {"w1", "w3", "w2"}, NULL, false,
     false},
    {MOE_NAMING_QWEN_MOE, "qwen_moe", "mlp", {"gate_proj", "up_proj", "down_proj"},
     "shared_expert", true, false},
    {MOE_NAMING_DEEPSEEK_V3, "deepseek_v3", "mlp", {"gate_proj", "up_proj", "down_proj"},
     "shared_experts", false, true},
};

static int st_scheme(const moe_weights_t *weights) {
    for (size_t i = 0; i < sizeof st_schemes / sizeof st_schemes[0]; i++)
        if (st_schemes[i].naming == weights->model.weights.naming) return (int)i;
    return 0;
}

static int st_cmp_index(const void *a, const void *b) {
    return strcmp(((const moe_weights_index_entry_t *)a)->name,
                  ((const moe_weights_index_entry_t *)b)->name);
}

static moe_err_t st_join(char *dst, size_t size, const char *dir, const char *name, char *msg,
                         size_t msg_size) {
    int n = snprintf(dst, size, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= size)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "%s: path too long", dir);
    return MOE_OK;
}

static bool st_is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static moe_err_t st_add_file(moe_weights_t *weights, const char *path, char *msg,
                             size_t msg_size) {
    moe_st_file_t **files = realloc(weights->files, (size_t)(weights->n_files + 1) * sizeof *files);
    if (files == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "%s: out of memory", path);
    weights->files = files;
    moe_err_t ret = moe_st_open(path, &files[weights->n_files], msg, msg_size);
    if (ret == MOE_OK) weights->n_files++;
    return ret;
}

/* Reads a whole (small) file into a NUL-terminated buffer. */
static moe_err_t st_read_text(const char *path, char **out, size_t *len, char *msg,
                              size_t msg_size) {
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: cannot open: %s", path,
                           strerror(errno));
    char *buf = NULL;
    size_t used = 0, cap = 0;
    moe_err_t ret = MOE_OK;
    for (;;) {
        if (cap - used < 65536) {
            if (cap >= ST_INDEX_MAX_BYTES) {
                ret = moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: larger than %u bytes",
                                  path, ST_INDEX_MAX_BYTES);
                break;
            }
            cap = cap ? cap * 2 : 131072;
            char *grown = realloc(buf, cap + 1);
            if (grown == NULL) {
                ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "%s: out of memory", path);
                break;
            }
            buf = grown;
        }
        size_t got = fread(buf + used, 1, cap - used, f);
        used += got;
        if (got == 0) {
            if (ferror(f))
                ret = moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: read error", path);
            break;
        }
    }
    fclose(f);
    if (ret != MOE_OK) {
        free(buf);
        return ret;
    }
    buf[used] = '\0';
    *out = buf;
    *len = used;
    return MOE_OK;
}

/* Opens the shards named by DIR/model.safetensors.index.json. Shard names
 * come from a file we do not trust, so they must be plain names inside DIR:
 * no '/', no "..", not empty. */
static moe_err_t st_open_index(moe_weights_t *weights, const char *dir, const char *index_path,
                               char *msg, size_t msg_size) {
    char *text = NULL;
    size_t len = 0;
    MOE_CHECK(st_read_text(index_path, &text, &len, msg, msg_size));
    weights->index_json = cJSON_ParseWithLength(text, len);
    free(text);
    if (weights->index_json == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: not valid JSON", index_path);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(weights->index_json, "weight_map");
    if (!cJSON_IsObject(map))
        return moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: no \"weight_map\" object",
                           index_path);
    int n = cJSON_GetArraySize(map);
    weights->index = calloc(n > 0 ? (size_t)n : 1, sizeof *weights->index);
    /* Distinct shard names, in order of first use, parallel to files[]. */
    const char **shard_names = calloc(n > 0 ? (size_t)n : 1, sizeof *shard_names);
    if (weights->index == NULL || shard_names == NULL) {
        free(shard_names);
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "%s: out of memory", index_path);
    }
    moe_err_t ret = MOE_OK;
    const cJSON *entry;
    cJSON_ArrayForEach(entry, map) {
        const char *shard = cJSON_IsString(entry) ? entry->valuestring : NULL;
        if (shard == NULL || shard[0] == '\0' || strchr(shard, '/') != NULL ||
            strstr(shard, "..") != NULL) {
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                              "%s: tensor '%s': shard file name %s%s%s is not a plain file "
                              "name inside the directory",
                              index_path, entry->string, shard ? "'" : "",
                              shard ? shard : "(not a string)", shard ? "'" : "");
            goto done;
        }
        int file = 0;
        while (file < weights->n_files && strcmp(shard_names[file], shard) != 0) file++;
        if (file == weights->n_files) {
            char path[MOE_PATH_MAX];
            MOE_CHECK_GOTO(st_join(path, sizeof path, dir, shard, msg, msg_size), ret, done);
            MOE_CHECK_GOTO(st_add_file(weights, path, msg, msg_size), ret, done);
            shard_names[file] = shard;
        }
        weights->index[weights->n_index].name = entry->string;
        weights->index[weights->n_index].file = file;
        weights->n_index++;
    }
    qsort(weights->index, (size_t)weights->n_index, sizeof *weights->index, st_cmp_index);
    /* An index that points at a shard without the tensor is a broken
     * checkpoint; say so at startup rather than at the first lookup. */
    for (int i = 0; i < weights->n_index; i++) {
        const moe_weights_index_entry_t *e = &weights->index[i];
        if (moe_st_find(weights->files[e->file], e->name) == NULL) {
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT,
                              "%s: tensor '%s' is mapped to %s, which does not contain it",
                              index_path, e->name, moe_st_path(weights->files[e->file]));
            goto done;
        }
    }
    if (weights->n_index == 0)
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_FORMAT, "%s: empty weight_map", index_path);
done:
    free(shard_names);
    return ret;
}

moe_err_t moe_weights_st_open(moe_weights_t *weights, char *msg, size_t msg_size) {
    const char *path = weights->model.weights.path;
    struct stat st;
    if (path[0] == '\0')
        return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                           "model.weights.path is empty (format safetensors)");
    if (stat(path, &st) != 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOT_FOUND, "%s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) {
        snprintf(weights->source, sizeof weights->source, "%s", path);
        return st_add_file(weights, path, msg, msg_size);
    }
    char index_path[MOE_PATH_MAX], single_path[MOE_PATH_MAX];
    MOE_CHECK(st_join(index_path, sizeof index_path, path, ST_INDEX_NAME, msg, msg_size));
    MOE_CHECK(st_join(single_path, sizeof single_path, path, ST_SINGLE_NAME, msg, msg_size));
    if (st_is_file(index_path)) {
        snprintf(weights->source, sizeof weights->source, "%s", index_path);
        return st_open_index(weights, path, index_path, msg, msg_size);
    }
    if (st_is_file(single_path)) {
        snprintf(weights->source, sizeof weights->source, "%s", single_path);
        return st_add_file(weights, single_path, msg, msg_size);
    }
    return moe_err_fmt(msg, msg_size, MOE_ERR_NOT_FOUND,
                       "%s: directory holds neither %s nor %s", path, ST_INDEX_NAME,
                       ST_SINGLE_NAME);
}

void moe_weights_st_close(moe_weights_t *weights) {
    for (int i = 0; i < weights->n_files; i++) moe_st_close(weights->files[i]);
    free(weights->files);
    free(weights->index);
    cJSON_Delete(weights->index_json);
}

static const moe_st_tensor_t *st_lookup(const moe_weights_t *weights, const char *name) {
    if (weights->n_index == 0)
        return weights->n_files > 0 ? moe_st_find(weights->files[0], name) : NULL;
    moe_weights_index_entry_t key = {.name = name};
    const moe_weights_index_entry_t *hit = bsearch(&key, weights->index, (size_t)weights->n_index,
                                                   sizeof key, st_cmp_index);
    return hit ? moe_st_find(weights->files[hit->file], name) : NULL;
}

static void st_format_shape(char *buf, size_t size, int n_dims, const int64_t *shape) {
    size_t used = 0;
    used += (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < n_dims && used < size; d++)
        used += (size_t)snprintf(buf + used, size - used, "%s%" PRId64, d ? "," : "", shape[d]);
    if (used < size) snprintf(buf + used, size - used, "]");
}

/* Finds `name`, checks its shape is exactly {dims}, converts it to float32. */
static moe_err_t st_load(const moe_weights_t *weights, const char *name, int n_dims,
                         const int64_t *dims, float *dst, char *msg, size_t msg_size) {
    const moe_st_tensor_t *t = st_lookup(weights, name);
    if (t == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOT_FOUND, "tensor '%s' not found in %s", name,
                           weights->source);
    bool same = t->n_dims == n_dims;
    for (int d = 0; same && d < n_dims; d++) same = t->shape[d] == dims[d];
    if (!same) {
        char want[128], got[128];
        st_format_shape(want, sizeof want, n_dims, dims);
        st_format_shape(got, sizeof got, t->n_dims, t->shape);
        return moe_err_fmt(msg, msg_size, MOE_ERR_SHAPE,
                           "%s: tensor '%s': expected shape %s, got %s", weights->source, name,
                           want, got);
    }
    size_t n = 1;
    for (int d = 0; d < n_dims; d++) n *= (size_t)dims[d];
    moe_err_t ret = moe_st_to_f32(t, dst, n);
    if (ret != MOE_OK)
        return moe_err_fmt(msg, msg_size, ret, "%s: tensor '%s': dtype is not F32, F16 or BF16",
                           weights->source, name);
    return MOE_OK;
}

moe_err_t moe_weights_st_router(moe_weights_t *weights, int layer, float *wg, char *msg,
                                size_t msg_size) {
    const moe_model_config_t *m = &weights->model;
    char name[ST_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%d.%s.gate.weight", layer,
             st_schemes[st_scheme(weights)].block);
    int64_t dims[2] = {m->experts, m->hidden};
    return st_load(weights, name, 2, dims, wg, msg, msg_size);
}

/* The three projections under one prefix ("...experts.3" or
 * "...shared_expert"), with intermediate size `inter`. */
static moe_err_t st_load_ffn(moe_weights_t *weights, const char *prefix, int inter, float *w1,
                             float *w3, float *w2, char *msg, size_t msg_size) {
    int scheme = st_scheme(weights);
    int64_t up[2] = {inter, weights->model.hidden};
    int64_t down[2] = {weights->model.hidden, inter};
    float *dst[3] = {w1, w3, w2};
    for (int p = 0; p < 3; p++) {
        char name[ST_NAME_MAX];
        snprintf(name, sizeof name, "%s.%s.weight", prefix, st_schemes[scheme].proj[p]);
        MOE_CHECK(st_load(weights, name, 2, p == 2 ? down : up, dst[p], msg, msg_size));
    }
    return MOE_OK;
}

moe_err_t moe_weights_st_expert(moe_weights_t *weights, int layer, int expert, float *w1,
                                float *w3, float *w2, char *msg, size_t msg_size) {
    char prefix[ST_NAME_MAX];
    snprintf(prefix, sizeof prefix, "model.layers.%d.%s.experts.%d", layer,
             st_schemes[st_scheme(weights)].block, expert);
    return st_load_ffn(weights, prefix, weights->model.moe_intermediate, w1, w3, w2, msg,
                       msg_size);
}

moe_err_t moe_weights_st_shared(moe_weights_t *weights, int layer, float *w1, float *w3,
                                float *w2, float *gate, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &weights->model;
    int scheme = st_scheme(weights);
    const char *naming = st_schemes[scheme].label;
    if (st_schemes[scheme].shared == NULL)
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOT_FOUND,
                           "naming %s has no shared expert, but shared_intermediate is %d",
                           naming, m->shared_intermediate);
    char prefix[ST_NAME_MAX];
    snprintf(prefix, sizeof prefix, "model.layers.%d.%s.%s", layer, st_schemes[scheme].block,
             st_schemes[scheme].shared);
    MOE_CHECK(st_load_ffn(weights, prefix, m->shared_intermediate, w1, w3, w2, msg, msg_size));
    if (!m->shared_expert_gate || gate == NULL) return MOE_OK;
    if (!st_schemes[scheme].has_shared_gate)
        return moe_err_fmt(msg, msg_size, MOE_ERR_NOT_FOUND,
                           "naming %s has no shared expert gate, but shared_expert_gate is set",
                           naming);
    char name[ST_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%d.%s.shared_expert_gate.weight", layer,
             st_schemes[scheme].block);
    int64_t dims[2] = {1, m->hidden};
    return st_load(weights, name, 2, dims, gate, msg, msg_size);
}

moe_err_t moe_weights_st_bias(moe_weights_t *weights, int layer, float *bias, char *msg,
                              size_t msg_size) {
    const moe_model_config_t *m = &weights->model;
    int scheme = st_scheme(weights);
    if (!st_schemes[scheme].has_bias) {
        /* Schemes without a correction bias route on the plain scores. */
        memset(bias, 0, (size_t)m->experts * sizeof *bias);
        return MOE_OK;
    }
    char name[ST_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%d.%s.gate.e_score_correction_bias", layer,
             st_schemes[scheme].block);
    int64_t dims[1] = {m->experts};
    return st_load(weights, name, 1, dims, bias, msg, msg_size);
}
