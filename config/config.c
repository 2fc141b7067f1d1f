/* config: YAML loading, cross-field validation and the config's public
 * views (JSON dump, reload diff, README reference); see moe_config.h.
 *
 * The loader uses libyaml's document API: the whole file becomes a node
 * tree with positions, which we walk against the field table. Nothing stops
 * at the first problem: every bad key or value adds one
 * "FILE:LINE:COL: field.path: message" and the walk goes on, so a user fixes
 * a config in one round trip (nginx -t style). */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <yaml.h>

#include "config_fields.h"
#include "moe_config.h"
#include "moe_log.h"

/* A config is a few KB; anything larger is not a config (and is not read
 * into memory or parsed: the daemon's I/O thread loads configs on reload). */
#define MOE_CONFIG_MAX_FILE_BYTES (4u << 20)
#define KEY_MAX 128
#define PATH_TEXT_MAX 256
/* The duplicate-key check compares each key with the ones before it, which
 * is quadratic; no section has more than a few dozen keys, so a mapping
 * longer than this is refused before the scan. A list is at most one entry
 * per slot (eplb.placement). */
#define MAX_MAPPING_ENTRIES 256
#define MAX_SEQUENCE_ENTRIES MOE_MAX_SLOTS
/* A result frame's header: MOE_FRAME_HEADER_SIZE of protocol/moe_frame.h
 * (config/ sits below protocol/ and does not include it). */
#define RESULT_HEADER_BYTES 48

typedef struct {
    const char *name; /* file name in messages */
    moe_config_t *cfg;
    moe_config_errors_t *errs;
    yaml_document_t *doc;
    yaml_mark_t marks[256]; /* where each set field's value is, for cross checks */
    uint64_t bad[4];        /* fields whose YAML value was rejected */
    bool model_resolved;    /* model shapes are final (config.json, if any, was read) */
} load_ctx_t;

static bool bit_get(const uint64_t *mask, int idx) { return (mask[idx / 64] >> (idx % 64)) & 1u; }
static void bit_set(uint64_t *mask, int idx) { mask[idx / 64] |= 1ull << (idx % 64); }

/* One message at a YAML position; libyaml's marks are 0-based. */
static void error_at(load_ctx_t *ctx, yaml_mark_t mark, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void error_at(load_ctx_t *ctx, yaml_mark_t mark, const char *path, const char *fmt, ...) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    moe_config_errors_add(ctx->errs, "%s:%zu:%zu: %s: %s", ctx->name, mark.line + 1,
                          mark.column + 1, path, msg);
}

/* ---- unknown keys: suggest the nearest valid one -------------------------- */

static int levenshtein(const char *a, const char *b) {
    size_t la = strnlen(a, KEY_MAX), lb = strnlen(b, KEY_MAX);
    int row[KEY_MAX + 1];
    for (size_t j = 0; j <= lb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diagonal = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int above = row[j];
            int best = diagonal + (a[i - 1] != b[j - 1]);
            if (above + 1 < best) best = above + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diagonal = above;
        }
    }
    return row[lb];
}

/* The distinct key names valid directly under prefix ("" = top level),
 * comma-separated into list; returns the distance of the one nearest to key,
 * which goes into nearest. */
static int keys_under(const char *prefix, const char *key, char *list, size_t size,
                      char *nearest, size_t nearest_size) {
    enum { MAX_NAMES = 64 };
    char names[MAX_NAMES][KEY_MAX];
    int n_names = 0, best = 1 << 30;
    size_t prefix_len = strlen(prefix), used = 0;
    list[0] = nearest[0] = '\0';
    for (int i = 0; i < moe_config_field_count && n_names < MAX_NAMES; i++) {
        const char *path = moe_config_fields[i].path;
        if (prefix_len > 0 && (strncmp(path, prefix, prefix_len) != 0 || path[prefix_len] != '.'))
            continue;
        const char *start = prefix_len > 0 ? path + prefix_len + 1 : path;
        snprintf(names[n_names], KEY_MAX, "%.*s", (int)strcspn(start, "."), start);
        bool seen = false;
        for (int j = 0; j < n_names && !seen; j++) seen = strcmp(names[j], names[n_names]) == 0;
        if (seen) continue;
        const char *name = names[n_names++];
        if (used < size)
            used += (size_t)snprintf(list + used, size - used, "%s%s", used ? ", " : "", name);
        int distance = levenshtein(key, name);
        if (distance < best) {
            best = distance;
            snprintf(nearest, nearest_size, "%s", name);
        }
    }
    return best;
}

static void unknown_key(load_ctx_t *ctx, const char *prefix, const char *key, yaml_mark_t mark,
                        const char *path) {
    char list[512], nearest[KEY_MAX];
    int distance = keys_under(prefix, key, list, sizeof list, nearest, sizeof nearest);
    /* A typo changes a character or two; beyond that a "did you mean" is
     * noise, so fall back to a field of that name elsewhere, then the list. */
    int allowed = (int)strlen(key) / 3 > 2 ? (int)strlen(key) / 3 : 2;
    if (nearest[0] != '\0' && distance <= allowed) {
        error_at(ctx, mark, path, "unknown key; did you mean '%s'?", nearest);
        return;
    }
    for (int i = 0; i < moe_config_field_count; i++) {
        const char *full = moe_config_fields[i].path;
        const char *last = strrchr(full, '.');
        if (last != NULL && strcmp(last + 1, key) == 0) {
            error_at(ctx, mark, path, "unknown key here; did you mean '%s'?", full);
            return;
        }
    }
    error_at(ctx, mark, path, "unknown key; valid keys here: %s", list);
}

/* ---- the walk ------------------------------------------------------------- */

static bool is_section(const char *path) {
    size_t len = strlen(path);
    for (int i = 0; i < moe_config_field_count; i++) {
        const char *field = moe_config_fields[i].path;
        if (strncmp(field, path, len) == 0 && field[len] == '.') return true;
    }
    return false;
}

static const char *node_kind(const yaml_node_t *node) {
    return node->type == YAML_MAPPING_NODE ? "a mapping"
           : node->type == YAML_SEQUENCE_NODE ? "a list"
                                               : "a scalar";
}

static bool is_null_scalar(const yaml_node_t *node) {
    if (node->type != YAML_SCALAR_NODE || node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    const char *text = (const char *)node->data.scalar.value;
    return text[0] == '\0' || strcmp(text, "~") == 0 || strcmp(text, "null") == 0;
}

/* The scalar's text, or NULL (with an error) when it hides a NUL byte that
 * would silently cut it short. */
static const char *scalar_text(load_ctx_t *ctx, const yaml_node_t *node, const char *path) {
    const char *text = (const char *)node->data.scalar.value;
    if (strlen(text) != node->data.scalar.length) {
        error_at(ctx, node->start_mark, path, "value contains a NUL byte");
        return NULL;
    }
    return text;
}

/* True (with an error) when a mapping or list has more entries than any
 * config needs; checked before anything walks its entries. */
static bool too_many_entries(load_ctx_t *ctx, const yaml_node_t *node, const char *path) {
    size_t count = 0, limit = 0;
    if (node->type == YAML_MAPPING_NODE) {
        count = (size_t)(node->data.mapping.pairs.top - node->data.mapping.pairs.start);
        limit = MAX_MAPPING_ENTRIES;
    } else if (node->type == YAML_SEQUENCE_NODE) {
        count = (size_t)(node->data.sequence.items.top - node->data.sequence.items.start);
        limit = MAX_SEQUENCE_ENTRIES;
    }
    if (count <= limit) return false;
    error_at(ctx, node->start_mark, path, "too many entries (%zu, at most %zu)", count, limit);
    return true;
}

static void set_list(load_ctx_t *ctx, int idx, const yaml_node_t *seq, const char *path) {
    const moe_config_field_t *field = &moe_config_fields[idx];
    int count = (int)(seq->data.sequence.items.top - seq->data.sequence.items.start);
    char msg[300];
    if (count > (int)field->capacity) {
        error_at(ctx, seq->start_mark, path, "has %d entries, more than the limit of %zu", count,
                 field->capacity);
        bit_set(ctx->bad, idx);
        return;
    }
    int64_t values[MOE_MAX_SLOTS > MOE_MAX_LAYERS ? MOE_MAX_SLOTS : MOE_MAX_LAYERS];
    bool ok = true;
    for (int i = 0; i < count; i++) {
        yaml_node_t *item = yaml_document_get_node(ctx->doc, seq->data.sequence.items.start[i]);
        char item_path[PATH_TEXT_MAX + 16];
        snprintf(item_path, sizeof item_path, "%s[%d]", path, i);
        if (item->type != YAML_SCALAR_NODE) {
            error_at(ctx, item->start_mark, item_path, "expected an integer, got %s",
                     node_kind(item));
            ok = false;
            continue;
        }
        const char *text = scalar_text(ctx, item, item_path);
        if (text == NULL) {
            ok = false;
            continue;
        }
        bool quoted = item->data.scalar.style != YAML_PLAIN_SCALAR_STYLE;
        if (!moe_config_parse_int(text, quoted, field->min, field->max, &values[i], msg,
                                  sizeof msg)) {
            error_at(ctx, item->start_mark, item_path, "%s", msg);
            ok = false;
        }
    }
    if (ok && !moe_config_field_set_list(idx, ctx->cfg, values, count, msg, sizeof msg)) {
        error_at(ctx, seq->start_mark, path, "%s", msg);
        ok = false;
    }
    if (ok) bit_set(ctx->cfg->set_mask, idx);
    else bit_set(ctx->bad, idx);
}

static void set_field(load_ctx_t *ctx, int idx, const yaml_node_t *value, const char *path) {
    const moe_config_field_t *field = &moe_config_fields[idx];
    char msg[300];
    ctx->marks[idx] = value->start_mark;
    if (too_many_entries(ctx, value, path)) {
        bit_set(ctx->bad, idx);
        return;
    }
    if (value->type == YAML_SEQUENCE_NODE &&
        (field->type == MOE_FIELD_INT_LIST || field->type == MOE_FIELD_LAYERS)) {
        set_list(ctx, idx, value, path);
        return;
    }
    if (value->type != YAML_SCALAR_NODE) {
        char bounds[256];
        moe_config_field_bounds_text(field, bounds, sizeof bounds);
        error_at(ctx, value->start_mark, path, "expected %s%s%s, got %s",
                 moe_config_field_type_name(field), bounds[0] ? " " : "", bounds,
                 node_kind(value));
        bit_set(ctx->bad, idx);
        return;
    }
    const char *text = scalar_text(ctx, value, path);
    bool quoted = value->data.scalar.style != YAML_PLAIN_SCALAR_STYLE;
    if (text != NULL && moe_config_field_set_scalar(idx, ctx->cfg, text, quoted, msg, sizeof msg)) {
        bit_set(ctx->cfg->set_mask, idx);
        return;
    }
    if (text != NULL) error_at(ctx, value->start_mark, path, "%s", msg);
    bit_set(ctx->bad, idx);
}

static void walk_mapping(load_ctx_t *ctx, const yaml_node_t *map, const char *prefix) {
    if (too_many_entries(ctx, map, prefix[0] ? prefix : "(top level)")) return;
    yaml_node_pair_t *start = map->data.mapping.pairs.start;
    for (yaml_node_pair_t *pair = start; pair < map->data.mapping.pairs.top; pair++) {
        yaml_node_t *key = yaml_document_get_node(ctx->doc, pair->key);
        yaml_node_t *value = yaml_document_get_node(ctx->doc, pair->value);
        const char *where = prefix[0] ? prefix : "(top level)";
        if (key->type != YAML_SCALAR_NODE) {
            error_at(ctx, key->start_mark, where, "keys must be plain names, got %s",
                     node_kind(key));
            continue;
        }
        const char *name = (const char *)key->data.scalar.value;
        char path[PATH_TEXT_MAX];
        int len = snprintf(path, sizeof path, "%s%s%.*s", prefix, prefix[0] ? "." : "", KEY_MAX,
                           name);
        if (len < 0 || (size_t)len >= sizeof path || strlen(name) >= KEY_MAX) {
            error_at(ctx, key->start_mark, where, "key '%.40s...' is too long", name);
            continue;
        }
        bool duplicate = false;
        for (yaml_node_pair_t *earlier = start; earlier < pair && !duplicate; earlier++) {
            yaml_node_t *other = yaml_document_get_node(ctx->doc, earlier->key);
            if (other->type == YAML_SCALAR_NODE &&
                strcmp((const char *)other->data.scalar.value, name) == 0) {
                error_at(ctx, key->start_mark, path,
                         "duplicate key (first given at line %zu, column %zu)",
                         other->start_mark.line + 1, other->start_mark.column + 1);
                duplicate = true;
            }
        }
        if (duplicate) continue;
        int idx = moe_config_field_index(path);
        if (idx >= 0) {
            set_field(ctx, idx, value, path);
        } else if (is_section(path)) {
            if (value->type == YAML_MAPPING_NODE) walk_mapping(ctx, value, path);
            else if (!is_null_scalar(value)) /* "routing:" with nothing under it is fine */
                error_at(ctx, value->start_mark, path, "expected a mapping of %s settings, got %s",
                         name, node_kind(value));
        } else {
            unknown_key(ctx, prefix, name, key->start_mark, path);
        }
    }
}

/* ---- cross-field checks ----------------------------------------------------- */

/* A cross-field message points at the field's YAML position when the field
 * was given there; a value from a default or config.json has no position. */
static void cross_error(load_ctx_t *ctx, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void cross_error(load_ctx_t *ctx, const char *path, const char *fmt, ...) {
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int idx = moe_config_field_index(path);
    if (idx >= 0 && bit_get(ctx->cfg->set_mask, idx))
        error_at(ctx, ctx->marks[idx], path, "%s", msg);
    else
        moe_config_errors_add(ctx->errs, "%s: %s: %s", ctx->name, path, msg);
}

/* False when one of the fields (a NULL-terminated list of paths) had its own
 * error: it holds its default, and checking it against others only adds
 * noise to the real error. */
static bool usable(const load_ctx_t *ctx, ...) {
    va_list ap;
    va_start(ap, ctx);
    bool ok = true;
    for (const char *path; (path = va_arg(ap, const char *)) != NULL;) {
        int idx = moe_config_field_index(path);
        if (idx >= 0 && bit_get(ctx->bad, idx)) ok = false;
    }
    va_end(ap);
    return ok;
}

static void check_placement(load_ctx_t *ctx) {
    const moe_config_t *cfg = ctx->cfg;
    const moe_eplb_config_t *eplb = &cfg->eplb;
    int experts = cfg->model.experts;
    if (eplb->n_placement == 0 ||
        !usable(ctx, "eplb.placement", "eplb.num_slots", "model.experts", NULL))
        return;
    if (eplb->placement_file[0] != '\0')
        cross_error(ctx, "eplb.placement", "give eplb.placement or eplb.placement_file, not both");
    int slots = eplb->num_slots > 0 ? eplb->num_slots : experts;
    if (eplb->n_placement != slots)
        cross_error(ctx, "eplb.placement", "has %d entries; it needs one per slot (%d, %s)",
                    eplb->n_placement, slots,
                    eplb->num_slots > 0 ? "eplb.num_slots" : "model.experts, as num_slots is 0");
    int replicas[MOE_MAX_EXPERTS] = {0};
    for (int slot = 0; slot < eplb->n_placement; slot++) {
        int expert = eplb->placement[slot];
        if (expert >= experts)
            cross_error(ctx, "eplb.placement", "slot %d holds expert %d, but model.experts is %d",
                        slot, expert, experts);
        else
            replicas[expert]++;
    }
    char missing[200] = "";
    int n_missing = 0;
    for (int expert = 0; expert < experts; expert++) {
        if (replicas[expert] > 0) continue;
        size_t used = strlen(missing);
        if (n_missing < 10)
            snprintf(missing + used, sizeof missing - used, "%s%d", n_missing ? ", " : "", expert);
        n_missing++;
    }
    if (n_missing > 0)
        cross_error(ctx, "eplb.placement", "%d expert(s) have no slot: %s%s", n_missing, missing,
                    n_missing > 10 ? ", ..." : "");
}

/* The daemon drops a connection whose unsent output passes max_output_bytes:
 * a limit below one largest result (every token of a max-size request, f32,
 * plus the frame header) would drop every client that sends one. Needs the
 * final hidden size, so it runs only once config.json has been read. */
static void check_output_limit(load_ctx_t *ctx) {
    const moe_config_t *cfg = ctx->cfg;
    if (!ctx->model_resolved ||
        !usable(ctx, "serve.max_output_bytes", "serve.max_request_tokens", "model.hidden", NULL))
        return;
    int64_t largest = (int64_t)cfg->serve.max_request_tokens * cfg->model.hidden *
                          (int64_t)sizeof(float) + RESULT_HEADER_BYTES;
    if (cfg->serve.max_output_bytes < largest)
        cross_error(ctx, "serve.max_output_bytes",
                    "%" PRId64 " is less than one largest result: serve.max_request_tokens * "
                    "model.hidden * 4 + %d = %d * %d * 4 + %d = %" PRId64
                    " bytes; raise it to at least that or lower serve.max_request_tokens",
                    cfg->serve.max_output_bytes, RESULT_HEADER_BYTES,
                    cfg->serve.max_request_tokens, cfg->model.hidden, RESULT_HEADER_BYTES,
                    largest);
}

static void check_cross_fields(load_ctx_t *ctx) {
    const moe_config_t *cfg = ctx->cfg;
    const moe_model_config_t *model = &cfg->model;
    const moe_routing_config_t *routing = &model->routing;
    if (usable(ctx, "model.top_k", "model.experts", NULL) && model->top_k > model->experts)
        cross_error(ctx, "model.top_k", "%d exceeds model.experts = %d", model->top_k,
                    model->experts);
    if (usable(ctx, "model.routing.n_group", "model.experts", NULL) &&
        model->experts % routing->n_group != 0)
        cross_error(ctx, "model.routing.n_group", "%d does not divide model.experts = %d",
                    routing->n_group, model->experts);
    if (usable(ctx, "model.routing.n_group", "model.routing.topk_group", NULL) &&
        routing->topk_group > routing->n_group)
        cross_error(ctx, "model.routing.topk_group", "%d exceeds model.routing.n_group = %d",
                    routing->topk_group, routing->n_group);
    if (routing->method == MOE_ROUTE_SIGMOID_GROUP_TOPK && routing->topk_group <= routing->n_group &&
        model->experts % routing->n_group == 0 &&
        usable(ctx, "model.top_k", "model.experts", "model.routing.n_group",
               "model.routing.topk_group", "model.routing.method", NULL)) {
        int reachable = routing->topk_group * (model->experts / routing->n_group);
        if (model->top_k > reachable)
            cross_error(ctx, "model.top_k",
                        "%d exceeds the %d experts in the topk_group = %d kept groups of %d",
                        model->top_k, reachable, routing->topk_group,
                        model->experts / routing->n_group);
    }
    if (model->shared_expert_gate && model->shared_intermediate == 0 &&
        usable(ctx, "model.shared_expert_gate", "model.shared_intermediate", NULL))
        cross_error(ctx, "model.shared_expert_gate",
                    "is true but model.shared_intermediate is 0 (no shared expert)");
    if (model->weights.format == MOE_WEIGHTS_SAFETENSORS && model->weights.path[0] == '\0' &&
        usable(ctx, "model.weights.format", "model.weights.path", NULL))
        cross_error(ctx, "model.weights.path", "is required with format safetensors");
    /* moed's grouped GEMM loads 16-byte row pieces (kernels/cuda/cuda_grouped.cu) */
    if (cfg->moe.gemm == MOE_GEMM_GROUPED && (model->hidden % 8 != 0 || model->moe_intermediate % 8 != 0) &&
        usable(ctx, "moe.gemm", "model.hidden", "model.moe_intermediate", NULL))
        cross_error(ctx, "moe.gemm",
                    "'grouped' needs model.hidden and model.moe_intermediate to be multiples of 8 (have "
                    "%d and %d); use cublas or auto",
                    model->hidden, model->moe_intermediate);
    /* exact combine: one GEMM form at every size, and no reduce-scatter */
    const bool exact_cuda = cfg->moe.combine == MOE_COMBINE_EXACT && cfg->moe.backend == MOE_BACKEND_CUDA;
    if (exact_cuda && cfg->moe.gemm != MOE_GEMM_GROUPED && usable(ctx, "moe.combine", "moe.gemm", "moe.backend", NULL))
        cross_error(ctx, "moe.combine",
                    "'exact' needs moe.gemm: grouped (one GEMM form at every size; have '%s')",
                    moe_gemm_name(cfg->moe.gemm));
    if (exact_cuda && cfg->moe.comm == MOE_COMM_ALLGATHER && usable(ctx, "moe.combine", "moe.comm", "moe.backend", NULL))
        cross_error(ctx, "moe.combine",
                    "'exact' returns a row per expert over alltoall; moe.comm 'allgather' sums "
                    "partial rows in its reduce-scatter (use alltoall or auto)");
    const moe_eplb_config_t *eplb = &cfg->eplb;
    if (eplb->num_slots != 0 && eplb->num_slots < model->experts &&
        usable(ctx, "eplb.num_slots", "model.experts", NULL))
        cross_error(ctx, "eplb.num_slots",
                    "%d is fewer than model.experts = %d; every expert needs a slot (0 = experts)",
                    eplb->num_slots, model->experts);
    /* mode off means slot = expert: extra slots or a placement would be
     * silently ignored, which is never what the user meant. */
    if (eplb->mode == MOE_EPLB_OFF && usable(ctx, "eplb.mode", "eplb.num_slots", NULL) &&
        eplb->num_slots > model->experts)
        cross_error(ctx, "eplb.num_slots", "%d slots for %d experts need eplb.mode static or online",
                    eplb->num_slots, model->experts);
    if (eplb->mode == MOE_EPLB_OFF && (eplb->n_placement > 0 || eplb->placement_file[0] != '\0'))
        cross_error(ctx, eplb->n_placement > 0 ? "eplb.placement" : "eplb.placement_file",
                    "is given but eplb.mode is off; set mode static");
    check_placement(ctx);
    check_output_limit(ctx);
}

/* ---- loading ---------------------------------------------------------------- */

void moe_config_defaults(moe_config_t *cfg) {
    memset(cfg, 0, sizeof *cfg);
    char msg[300];
    for (int i = 0; i < moe_config_field_count; i++) {
        /* The defaults are compile-time text checked by the tests; a bad one
         * would be a bug in the table, never the user's. */
        const moe_config_field_t *field = &moe_config_fields[i];
        if (!moe_config_field_set_scalar(i, cfg, field->def, false, msg, sizeof msg))
            moe_log(MOE_LOG_ERROR, "config", "bad default for %s: %s", field->path, msg);
    }
}

static void syntax_error(load_ctx_t *ctx, const yaml_parser_t *parser) {
    char context[160] = "";
    if (parser->context != NULL)
        snprintf(context, sizeof context, " %s (line %zu, column %zu)", parser->context,
                 parser->context_mark.line + 1, parser->context_mark.column + 1);
    error_at(ctx, parser->problem_mark, "yaml", "syntax error: %s%s",
             parser->problem ? parser->problem : "unknown problem", context);
}

static void too_large(moe_config_errors_t *errs, const char *name, unsigned long long bytes) {
    moe_config_errors_add(errs, "%s: is %llu bytes; a config may be at most %u bytes (4 MiB)", name,
                          bytes, MOE_CONFIG_MAX_FILE_BYTES);
}

moe_err_t moe_config_load_string(const char *yaml, size_t len, const char *name,
                                 moe_config_t *cfg, moe_config_errors_t *errs) {
    moe_config_errors_t local_errs;
    if (errs == NULL) errs = &local_errs;
    errs->count = 0;
    if (name == NULL) name = "<string>";
    moe_config_defaults(cfg);
    snprintf(cfg->source_path, sizeof cfg->source_path, "%s", name);
    if (len > MOE_CONFIG_MAX_FILE_BYTES) {
        too_large(errs, name, len);
        return MOE_ERR_CONFIG;
    }

    load_ctx_t *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) return MOE_ERR_NOMEM;
    ctx->name = name;
    ctx->cfg = cfg;
    ctx->errs = errs;

    yaml_parser_t parser;
    yaml_document_t doc, extra;
    bool parsed = false;
    if (!yaml_parser_initialize(&parser)) {
        free(ctx);
        return MOE_ERR_NOMEM;
    }
    yaml_parser_set_input_string(&parser, (const unsigned char *)yaml, len);
    if (!yaml_parser_load(&parser, &doc)) {
        syntax_error(ctx, &parser);
    } else {
        parsed = true;
        ctx->doc = &doc;
        yaml_node_t *root = yaml_document_get_root_node(&doc);
        if (root == NULL) {
            /* An empty file: every field keeps its default. */
        } else if (root->type == YAML_MAPPING_NODE) {
            walk_mapping(ctx, root, "");
        } else if (!is_null_scalar(root)) {
            error_at(ctx, root->start_mark, "(top level)",
                     "expected a mapping of sections (model, moe, eplb, ...), got %s",
                     node_kind(root));
        }
        /* A second document would be silently ignored by a loader that stops
         * at the first; say so instead. */
        if (!yaml_parser_load(&parser, &extra)) {
            syntax_error(ctx, &parser);
        } else {
            yaml_node_t *second = yaml_document_get_root_node(&extra);
            if (second != NULL)
                error_at(ctx, second->start_mark, "yaml",
                         "a second YAML document; a config is one document");
            yaml_document_delete(&extra);
        }
        yaml_document_delete(&doc);
        ctx->doc = NULL;
    }
    yaml_parser_delete(&parser);

    if (parsed) {
        /* Cross checks come after resolution: with safetensors the shapes
         * (model.hidden, ...) are only known once config.json is read. */
        ctx->model_resolved = moe_config_resolve_model(cfg, errs) == MOE_OK;
        check_cross_fields(ctx);
    }
    free(ctx);
    return errs->count > 0 ? MOE_ERR_CONFIG : MOE_OK;
}

moe_err_t moe_config_load(const char *path, moe_config_t *cfg, moe_config_errors_t *errs) {
    if (errs != NULL) errs->count = 0;
    moe_config_defaults(cfg);
    FILE *file = fopen(path, "rb");
    struct stat st;
    if (file == NULL || fstat(fileno(file), &st) != 0) {
        moe_config_errors_add(errs, "%s: cannot open: %s", path, strerror(errno));
        if (file != NULL) fclose(file);
        return MOE_ERR_IO;
    }
    if (!S_ISREG(st.st_mode) || st.st_size > (off_t)MOE_CONFIG_MAX_FILE_BYTES) {
        if (S_ISREG(st.st_mode))
            too_large(errs, path, (unsigned long long)st.st_size);
        else
            moe_config_errors_add(errs, "%s: not a regular file", path);
        fclose(file);
        return MOE_ERR_CONFIG;
    }
    size_t size = (size_t)st.st_size;
    char *text = malloc(size + 1);
    if (text == NULL) {
        fclose(file);
        return MOE_ERR_NOMEM;
    }
    size_t got = fread(text, 1, size, file);
    bool read_failed = ferror(file) != 0;
    fclose(file);
    if (read_failed) {
        moe_config_errors_add(errs, "%s: read failed: %s", path, strerror(errno));
        free(text);
        return MOE_ERR_IO;
    }
    text[got] = '\0';
    moe_err_t ret = moe_config_load_string(text, got, path, cfg, errs);
    free(text);
    return ret;
}

/* ---- views ------------------------------------------------------------------ */

bool moe_config_was_set(const moe_config_t *cfg, const char *path) {
    int idx = moe_config_field_index(path);
    return idx >= 0 && bit_get(cfg->set_mask, idx);
}

/* Adds item at a dotted path under root, creating the objects on the way. */
static bool json_put(cJSON *root, const char *path, cJSON *item) {
    char name[PATH_TEXT_MAX];
    cJSON *object = root;
    for (const char *dot; (dot = strchr(path, '.')) != NULL; path = dot + 1) {
        snprintf(name, sizeof name, "%.*s", (int)(dot - path), path);
        cJSON *child = cJSON_GetObjectItemCaseSensitive(object, name);
        if (child == NULL) {
            child = cJSON_AddObjectToObject(object, name);
            if (child == NULL) return false;
        }
        object = child;
    }
    return cJSON_AddItemToObject(object, path, item);
}

char *moe_config_to_json(const moe_config_t *cfg) {
    cJSON *root = cJSON_CreateObject();
    if (root == NULL) return NULL;
    for (int i = 0; i < moe_config_field_count; i++) {
        cJSON *item = moe_config_field_to_json(i, cfg);
        if (item == NULL || !json_put(root, moe_config_fields[i].path, item)) {
            cJSON_Delete(item);
            cJSON_Delete(root);
            return NULL;
        }
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    return text;
}

int moe_config_nonreloadable_diff(const moe_config_t *a, const moe_config_t *b, char *buf,
                                  size_t size) {
    int count = 0;
    size_t used = 0;
    if (buf != NULL && size > 0) buf[0] = '\0';
    for (int i = 0; i < moe_config_field_count; i++) {
        if (moe_config_fields[i].reloadable || moe_config_field_equal(i, a, b)) continue;
        if (buf != NULL && used < size)
            used += (size_t)snprintf(buf + used, size - used, "%s%s", count ? ", " : "",
                                     moe_config_fields[i].path);
        count++;
    }
    return count;
}

void moe_config_print_reference(FILE *out) {
    fprintf(out, "| field | type | default | bounds | reloadable | help |\n");
    fprintf(out, "|---|---|---|---|---|---|\n");
    for (int i = 0; i < moe_config_field_count; i++) {
        const moe_config_field_t *field = &moe_config_fields[i];
        char bounds[256];
        moe_config_field_bounds_text(field, bounds, sizeof bounds);
        bool empty_string = field->type == MOE_FIELD_STRING && field->def[0] == '\0';
        fprintf(out, "| `%s` | %s | `%s` | %s | %s | %s |\n", field->path,
                moe_config_field_type_name(field), empty_string ? "\"\"" : field->def,
                bounds[0] ? bounds : "-", field->reloadable ? "yes" : "no", field->help);
    }
}
