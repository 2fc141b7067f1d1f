/* config_fields: the field table and typed field operations; see
 * config_fields.h. Defaults are stored as YAML text and applied through the
 * same setter as a file's values, so a default can never escape the bounds
 * or the parser a user's value goes through. */
#include "config_fields.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- enum names (index = enum value) ----------------------------------- */

static const char *const weights_format_names[] = {"synthetic", "safetensors", NULL};
static const char *const naming_names[] = {"mixtral", "qwen_moe", "deepseek_v3", NULL};
static const char *const route_method_names[] = {
    "softmax_topk", "renormalize", "sigmoid_group_topk", "client", "uniform", "zipf", "perfect",
    NULL};
static const char *const backend_names[] = {"cpu", "cuda", NULL};
static const char *const gemm_names[] = {"auto", "cublas", "grouped", NULL};
static const char *const comm_names[] = {"auto", "alltoall", "allgather", NULL};
static const char *const combine_names[] = {"partial", "exact", NULL};
static const char *const eplb_mode_names[] = {"off", "static", "online", NULL};
const char *const moe_log_level_names[] = {"debug", "info", "warn", "error", NULL};

static const char *name_of(const char *const *names, int value) {
    for (int i = 0; names[i] != NULL; i++)
        if (i == value) return names[i];
    return "unknown";
}

const char *moe_route_method_name(moe_route_method_t m) { return name_of(route_method_names, (int)m); }
const char *moe_naming_name(moe_naming_t n) { return name_of(naming_names, (int)n); }
const char *moe_backend_name(moe_backend_kind_t b) { return name_of(backend_names, (int)b); }
const char *moe_gemm_name(moe_gemm_kind_t g) { return name_of(gemm_names, (int)g); }
const char *moe_comm_name(moe_comm_kind_t c) { return name_of(comm_names, (int)c); }
const char *moe_combine_name(moe_combine_kind_t c) { return name_of(combine_names, (int)c); }
const char *moe_eplb_mode_name(moe_eplb_mode_t m) { return name_of(eplb_mode_names, (int)m); }

/* ---- the table ------------------------------------------------------------ */

#define MEMBER_SIZE(m) sizeof(((moe_config_t *)0)->m)
#define ROW(path, type, m, cap, count_off, names, def, lo, hi, reload, help) \
    {path, type, offsetof(moe_config_t, m), MEMBER_SIZE(m), cap, count_off, names, def, lo, hi, \
     reload, help}
#define F_INT(path, m, def, lo, hi, reload, help) \
    ROW(path, MOE_FIELD_INT, m, 0, 0, NULL, def, lo, hi, reload, help)
#define F_INT64(path, m, def, lo, hi, reload, help) \
    ROW(path, MOE_FIELD_INT64, m, 0, 0, NULL, def, lo, hi, reload, help)
#define F_UINT64(path, m, def, reload, help) \
    ROW(path, MOE_FIELD_UINT64, m, 0, 0, NULL, def, 0, 0, reload, help)
#define F_DOUBLE(path, m, def, lo, hi, reload, help) \
    ROW(path, MOE_FIELD_DOUBLE, m, 0, 0, NULL, def, lo, hi, reload, help)
#define F_BOOL(path, m, def, reload, help) \
    ROW(path, MOE_FIELD_BOOL, m, 0, 0, NULL, def, 0, 0, reload, help)
#define F_STRING(path, m, def, reload, help) \
    ROW(path, MOE_FIELD_STRING, m, MEMBER_SIZE(m), 0, NULL, def, 0, 0, reload, help)
#define F_ENUM(path, m, names, def, reload, help) \
    ROW(path, MOE_FIELD_ENUM, m, 0, 0, names, def, 0, 0, reload, help)
#define F_LIST(type, path, m, count_m, def, lo, hi, reload, help)                             \
    ROW(path, type, m, MEMBER_SIZE(m) / sizeof(int), offsetof(moe_config_t, count_m), NULL, def, \
        lo, hi, reload, help)

#define K 1024.0
#define MS_DAY 86400000.0

/* Reloadable per DESIGN §7: EPLB statistics windows and thresholds,
 * moe.gemm, chunking, step and queue limits, timeouts, log level. Not
 * reloadable: anything that sizes or places weights and buffers at startup
 * (model.*, backend, comm, autotune) and the listen addresses. The EPLB
 * placement (mode, slots, placement, ranks_per_node) is fixed at startup
 * too: moving experts between slots of a running engine needs online
 * migration, which does not exist yet, so a reload may not change it. */
const moe_config_field_t moe_config_fields[] = {
    F_ENUM("model.weights.format", model.weights.format, weights_format_names, "synthetic", false,
           "synthetic: seeded random weights; safetensors: read from model.weights.path"),
    F_STRING("model.weights.path", model.weights.path, "", false,
             "safetensors file or checkpoint directory; its config.json supplies the shapes"),
    F_ENUM("model.weights.naming", model.weights.naming, naming_names, "mixtral", false,
           "tensor naming scheme; taken from config.json's model_type when not set"),
    F_UINT64("model.weights.seed", model.weights.seed, "1", false,
             "seed of synthetic weights (reproducible per seed, layer, expert)"),
    F_LIST(MOE_FIELD_LAYERS, "model.layers", model.layer_ids, model.n_layers, "2", 0, 65535, false,
           "MoE layers served: an int N (the first N MoE layers) or a list of layer indices"),
    F_INT("model.hidden", model.hidden, "2048", 1, 65536, false, "hidden size H"),
    F_INT("model.moe_intermediate", model.moe_intermediate, "768", 1, 131072, false,
          "intermediate size I of one routed expert"),
    F_INT("model.experts", model.experts, "128", 1, MOE_MAX_EXPERTS, false,
          "routed experts per layer E"),
    F_INT("model.top_k", model.top_k, "8", 1, MOE_MAX_TOP_K, false, "experts chosen per token"),
    F_INT("model.shared_intermediate", model.shared_intermediate, "0", 0, 131072, false,
          "intermediate size of the shared expert; 0 = no shared expert"),
    F_BOOL("model.shared_expert_gate", model.shared_expert_gate, "false", false,
           "scale the shared expert by sigmoid(x·g) (Qwen-MoE)"),
    F_ENUM("model.routing.method", model.routing.method, route_method_names, "softmax_topk", false,
           "router: model scores (softmax_topk, renormalize, sigmoid_group_topk), client-routed, "
           "or a benchmark router (uniform, zipf, perfect)"),
    F_BOOL("model.routing.norm_topk_prob", model.routing.norm_topk_prob, "true", false,
           "renormalise the k chosen weights to sum to 1 (softmax_topk)"),
    F_INT("model.routing.n_group", model.routing.n_group, "1", 1, MOE_MAX_EXPERTS, false,
          "expert groups (sigmoid_group_topk); must divide model.experts"),
    F_INT("model.routing.topk_group", model.routing.topk_group, "1", 1, MOE_MAX_EXPERTS, false,
          "groups kept per token (sigmoid_group_topk); <= n_group"),
    F_DOUBLE("model.routing.routed_scaling_factor", model.routing.routed_scaling_factor, "1.0",
             0.001, 1000, false, "multiplies the routed weights (DeepSeek-V3: 2.5)"),
    F_DOUBLE("model.routing.zipf_s", model.routing.zipf_s, "1.2", 0, 10, false,
             "exponent of the zipf benchmark router (0 = uniform)"),
    F_UINT64("model.routing.seed", model.routing.seed, "1", false,
             "seed of the uniform and zipf benchmark routers"),

    F_ENUM("moe.backend", moe.backend, backend_names, "cpu", false,
           "cpu (reference, always built) or cuda"),
    F_ENUM("moe.gemm", moe.gemm, gemm_names, "auto", true,
           "CUDA expert GEMM: cublas (cuBLAS, group sizes on the host); grouped (moed's own "
           "kernel: one launch, no host sync; needs hidden and moe_intermediate multiples of 8); "
           "auto (timed per token-count bucket at startup, see moe.autotune)"),
    F_ENUM("moe.comm", moe.comm, comm_names, "auto", false,
           "token exchange: alltoall (counts, then only the rows each rank needs); allgather "
           "(every rank gets all rows, reduce-scatter returns the sums: for tiny steps); auto "
           "(allgather up to a token count measured at startup, alltoall above). Not reloadable"),
    F_ENUM("moe.combine", moe.combine, combine_names, "partial", false,
           "cuda, more than one rank: partial (each rank returns one summed row per token, bf16); "
           "exact (one row per (token, expert), summed on the token's rank in expert order: outputs "
           "do not depend on the placement, so EPLB swaps change no bit; up to k times the "
           "combine bytes; needs moe.gemm grouped, uses alltoall). The cpu backend is always exact"),
    F_INT("moe.max_tokens_per_step", moe.max_tokens_per_step, "8192", 1, K * K, true,
          "tokens one step takes off the queue, at most"),
    F_INT("moe.chunking.max_tokens_per_chunk", moe.chunking.max_tokens_per_chunk, "4096", 1,
          K * K, true, "a larger step runs as chunks of at most this many tokens"),
    F_BOOL("moe.chunking.overlap", moe.chunking.overlap, "true", true,
           "cuda: run chunk i+1's routing and dispatch beside chunk i's experts (a second "
           "stream); the cpu backend runs chunks one after another either way"),
    F_INT("moe.autotune.max_tokens", moe.autotune.max_tokens, "16384", 1, 65536, false,
          "largest token-count bucket (received rows per chunk, powers of two) the moe.gemm: "
          "auto tuner times; larger chunks use its choice"),
    F_STRING("moe.autotune.cache", moe.autotune.cache, "", false,
             "file caching the moe.gemm: auto table, keyed by device, shapes, EP size and "
             "slots; empty = tune at every start"),

    F_ENUM("eplb.mode", eplb.mode, eplb_mode_names, "off", false,
           "off: slot = expert; static: placement from config; online: from live statistics; "
           "needs a restart: a reload does not migrate weights (online mode rebalances by itself)"),
    F_INT("eplb.num_slots", eplb.num_slots, "0", 0, MOE_MAX_SLOTS, false,
          "physical expert slots per layer, >= experts, divisible by the rank count; 0 = experts"),
    F_INT("eplb.window_steps", eplb.window_steps, "1000", 1, 100000000, true,
          "steps of expert-load statistics per window"),
    F_INT("eplb.rebalance_every_steps", eplb.rebalance_every_steps, "1000", 1, 100000000, true,
          "steps between placement recomputations (online)"),
    F_DOUBLE("eplb.min_improvement", eplb.min_improvement, "0.05", 0, 1, true,
             "adopt a new placement only if it cuts predicted imbalance by this fraction"),
    F_INT("eplb.ranks_per_node", eplb.ranks_per_node, "8", 1, 1024, false,
          "ranks per node for hierarchical placement; needs a restart until online "
          "rebalancing exists"),
    F_STRING("eplb.placement_file", eplb.placement_file, "", false,
             "JSON file with a static placement (slot -> expert); needs a restart until online "
             "rebalancing exists"),
    F_LIST(MOE_FIELD_INT_LIST, "eplb.placement", eplb.placement, eplb.n_placement, "[]", 0,
           MOE_MAX_EXPERTS - 1, false,
           "static placement, slot -> expert, for every layer; [] = default placement; needs a "
           "restart until online rebalancing exists"),

    F_INT("scheduler.idle_poll_us", scheduler.idle_poll_us, "50", 1, 1000000, true,
          "wait for work this long when no rank has any"),
    F_INT("scheduler.max_wait_ms", scheduler.max_wait_ms, "20", 0, MS_DAY, true,
          "a layer whose oldest request is older than this wins the next step"),
    F_INT("scheduler.stall_timeout_ms", scheduler.stall_timeout_ms, "30000", 10, MS_DAY, true,
          "queued work with no finished step for this long = stalled (watchdog aborts)"),

    F_STRING("serve.data", serve.data, "127.0.0.1:7600", false,
             "data plane: HOST:PORT (rank r adds r to the port) or unix:PATH with %r"),
    F_STRING("serve.control", serve.control, "unix:/tmp/moed-control.sock", false,
             "control channel on rank 0: unix:PATH (mode 0600) or loopback HOST:PORT"),
    F_STRING("serve.metrics", serve.metrics, "", false,
             "Prometheus /metrics HOST:PORT on rank 0; empty = off"),
    F_STRING("serve.token_file", serve.token_file, "", true,
             "file holding the control token for state-changing commands; empty = none"),
    /* Below 4 GiB: a frame is handed to libuv as one uv_buf_t, whose
     * uv_buf_init takes an unsigned int length. */
    F_INT64("serve.max_frame_bytes", serve.max_frame_bytes, "268435456", 48, 4294967295.0, true,
            "largest data frame accepted, header included; under 4 GiB because libuv buffer "
            "lengths are unsigned int"),
    F_INT("serve.max_request_tokens", serve.max_request_tokens, "16384", 1, 16 * K * K, true,
          "most tokens in one request"),
    F_INT64("serve.max_queue_tokens", serve.max_queue_tokens, "262144", 1, 17179869184.0, true,
            "most tokens queued per rank; more is answered 'overloaded'"),
    F_INT("serve.max_connections", serve.max_connections, "4096", 1, K * K, true,
          "open data connections per rank"),
    F_INT64("serve.max_output_bytes", serve.max_output_bytes, "268435456", 48, 1099511627776.0,
            true,
            "unsent output bytes per connection before the client is dropped; at least one "
            "largest result, max_request_tokens * hidden * 4 + 48"),
    F_INT("serve.request_timeout_ms", serve.request_timeout_ms, "30000", 1, MS_DAY, true,
          "a request not answered in this time fails with 'timeout'"),

    F_ENUM("log.level", log.level, moe_log_level_names, "info", true, "debug, info, warn, error"),
};

/* set_mask has 256 bits, one per row. */
_Static_assert(sizeof moe_config_fields / sizeof moe_config_fields[0] <= 256,
               "moe_config_t.set_mask has 256 bits");
const int moe_config_field_count = (int)(sizeof moe_config_fields / sizeof moe_config_fields[0]);

int moe_config_field_index(const char *path) {
    for (int i = 0; i < moe_config_field_count; i++)
        if (strcmp(moe_config_fields[i].path, path) == 0) return i;
    return -1;
}

/* ---- typed access ---------------------------------------------------------- */

static void *field_ptr(const moe_config_field_t *f, moe_config_t *cfg) {
    return (char *)cfg + f->offset;
}
static const void *field_cptr(const moe_config_field_t *f, const moe_config_t *cfg) {
    return (const char *)cfg + f->offset;
}
static int *count_ptr(const moe_config_field_t *f, moe_config_t *cfg) {
    return (int *)((char *)cfg + f->count_offset);
}
static int count_of(const moe_config_field_t *f, const moe_config_t *cfg) {
    return *(const int *)((const char *)cfg + f->count_offset);
}

/* YAML's null: an empty plain scalar or ~/null. */
static bool is_null(const char *text, bool quoted) {
    return !quoted && (text[0] == '\0' || strcmp(text, "~") == 0 || strcasecmp(text, "null") == 0);
}

void moe_config_field_bounds_text(const moe_config_field_t *f, char *buf, size_t size) {
    buf[0] = '\0';
    switch (f->type) {
    case MOE_FIELD_INT:
    case MOE_FIELD_INT64: snprintf(buf, size, "[%.0f, %.0f]", f->min, f->max); break;
    case MOE_FIELD_DOUBLE: snprintf(buf, size, "[%g, %g]", f->min, f->max); break;
    case MOE_FIELD_STRING: snprintf(buf, size, "< %zu bytes", f->capacity); break;
    case MOE_FIELD_INT_LIST:
        snprintf(buf, size, "<= %zu entries in [%.0f, %.0f]", f->capacity, f->min, f->max);
        break;
    case MOE_FIELD_LAYERS:
        snprintf(buf, size, "N in [1, %zu], or <= %zu distinct ids in [%.0f, %.0f]", f->capacity,
                 f->capacity, f->min, f->max);
        break;
    case MOE_FIELD_ENUM: {
        size_t used = 0;
        for (int i = 0; f->names[i] != NULL && used < size; i++)
            used += (size_t)snprintf(buf + used, size - used, "%s%s", i ? ", " : "", f->names[i]);
        break;
    }
    case MOE_FIELD_UINT64:
    case MOE_FIELD_BOOL: break;
    }
}

const char *moe_config_field_type_name(const moe_config_field_t *f) {
    switch (f->type) {
    case MOE_FIELD_INT: return "int";
    case MOE_FIELD_INT64: return "int64";
    case MOE_FIELD_UINT64: return "uint64";
    case MOE_FIELD_DOUBLE: return "float";
    case MOE_FIELD_BOOL: return "bool";
    case MOE_FIELD_STRING: return "string";
    case MOE_FIELD_ENUM: return "enum";
    case MOE_FIELD_INT_LIST: return "list of int";
    case MOE_FIELD_LAYERS: return "int or list of int";
    }
    return "?";
}

static bool out_of_bounds(const moe_config_field_t *f, double value, const char *text, char *msg,
                          size_t size) {
    if (value >= f->min && value <= f->max) return false;
    char bounds[64];
    moe_config_field_bounds_text(f, bounds, sizeof bounds);
    snprintf(msg, size, "%.64s is out of bounds %s", text, bounds);
    return true;
}

bool moe_config_parse_int(const char *text, bool quoted, double min, double max, int64_t *out,
                          char *msg, size_t size) {
    if (quoted) {
        snprintf(msg, size, "expected an integer, got the string \"%.64s\"", text);
        return false;
    }
    char *end = NULL;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    /* strtoll skips leading blanks and stops at junk: insist on all of it. */
    if (text[0] == '\0' || isspace((unsigned char)text[0]) || end == text || *end != '\0') {
        snprintf(msg, size, "expected an integer, got '%.64s'", text);
        return false;
    }
    if (errno == ERANGE || (double)value < min || (double)value > max) {
        snprintf(msg, size, "%.64s is out of bounds [%.0f, %.0f]", text, min, max);
        return false;
    }
    *out = value;
    return true;
}

static bool parse_bool(const char *text, bool quoted, bool *out) {
    static const char *const yes[] = {"true", "yes", "on"};
    static const char *const no[] = {"false", "no", "off"};
    if (quoted) return false;
    for (int i = 0; i < 3; i++) {
        if (strcasecmp(text, yes[i]) == 0) return *out = true, true;
        if (strcasecmp(text, no[i]) == 0) return *out = false, true;
    }
    return false;
}

bool moe_config_field_set_scalar(int idx, moe_config_t *cfg, const char *text, bool quoted,
                                 char *msg, size_t size) {
    const moe_config_field_t *f = &moe_config_fields[idx];
    void *p = field_ptr(f, cfg);
    int64_t integer = 0;
    switch (f->type) {
    case MOE_FIELD_INT:
    case MOE_FIELD_INT64: {
        /* The field's own bounds, so that an overflowing literal is told the
         * range it must be in, not the range of int64_t. */
        if (!moe_config_parse_int(text, quoted, f->min, f->max, &integer, msg, size))
            return false;
        if (f->type == MOE_FIELD_INT) *(int *)p = (int)integer;
        else *(int64_t *)p = integer;
        return true;
    }
    case MOE_FIELD_UINT64: {
        char *end = NULL;
        errno = 0;
        /* strtoull would silently negate "-1" into 2^64-1. */
        unsigned long long value = strtoull(text, &end, 10);
        if (quoted || !isdigit((unsigned char)text[0]) || *end != '\0') {
            snprintf(msg, size, "expected a non-negative integer, got '%.64s'", text);
            return false;
        }
        if (errno == ERANGE) {
            snprintf(msg, size, "%.64s does not fit in 64 bits", text);
            return false;
        }
        *(uint64_t *)p = value;
        return true;
    }
    case MOE_FIELD_DOUBLE: {
        char *end = NULL;
        double value = quoted ? 0 : strtod(text, &end);
        if (quoted || text[0] == '\0' || isspace((unsigned char)text[0]) || *end != '\0' ||
            !isfinite(value)) {
            snprintf(msg, size, "expected a number, got '%.64s'", text);
            return false;
        }
        if (out_of_bounds(f, value, text, msg, size)) return false;
        *(double *)p = value;
        return true;
    }
    case MOE_FIELD_BOOL:
        if (!parse_bool(text, quoted, (bool *)p)) {
            snprintf(msg, size, "expected true or false, got '%.64s'", text);
            return false;
        }
        return true;
    case MOE_FIELD_STRING: {
        if (is_null(text, quoted)) text = "";
        size_t len = strlen(text);
        if (len >= f->capacity) {
            snprintf(msg, size, "is %zu bytes, longer than the limit of %zu", len,
                     f->capacity - 1);
            return false;
        }
        memcpy(p, text, len + 1);
        return true;
    }
    case MOE_FIELD_ENUM:
        for (int i = 0; f->names[i] != NULL; i++) {
            if (strcmp(text, f->names[i]) == 0) {
                *(int *)p = i;
                return true;
            }
        }
        char names[256];
        moe_config_field_bounds_text(f, names, sizeof names);
        snprintf(msg, size, "'%.64s' is not one of: %s", text, names);
        return false;
    case MOE_FIELD_INT_LIST:
        if (is_null(text, quoted) || strcmp(text, "[]") == 0) {
            *count_ptr(f, cfg) = 0;
            return true;
        }
        snprintf(msg, size, "expected a list of integers such as [0, 1, 2], got '%.64s'", text);
        return false;
    case MOE_FIELD_LAYERS: {
        char why[160];
        if (!moe_config_parse_int(text, quoted, 1, (double)f->capacity, &integer, why,
                                  sizeof why)) {
            snprintf(msg, size, "%s (give a layer count or a list of layer indices)", why);
            return false;
        }
        cfg->model.n_layers = (int)integer;
        for (int i = 0; i < (int)integer; i++) cfg->model.layer_ids[i] = i;
        cfg->model.layers_from_count = true;
        return true;
    }
    }
    snprintf(msg, size, "internal: unknown field type");
    return false;
}

static int compare_ints(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

bool moe_config_field_set_list(int idx, moe_config_t *cfg, const int64_t *values, int count,
                               char *msg, size_t size) {
    const moe_config_field_t *f = &moe_config_fields[idx];
    if (f->type != MOE_FIELD_INT_LIST && f->type != MOE_FIELD_LAYERS) {
        snprintf(msg, size, "expected a single value, got a list");
        return false;
    }
    if (count > (int)f->capacity) {
        snprintf(msg, size, "has %d entries, more than the limit of %zu", count, f->capacity);
        return false;
    }
    if (f->type == MOE_FIELD_LAYERS && count == 0) {
        snprintf(msg, size, "an empty list serves no layer");
        return false;
    }
    int tmp[MOE_MAX_SLOTS > MOE_MAX_LAYERS ? MOE_MAX_SLOTS : MOE_MAX_LAYERS];
    for (int i = 0; i < count; i++) tmp[i] = (int)values[i];
    if (f->type == MOE_FIELD_LAYERS) {
        /* Layer ids are kept ascending so that "first N" and lookups agree
         * across ranks however the user ordered them. */
        qsort(tmp, (size_t)count, sizeof tmp[0], compare_ints);
        for (int i = 1; i < count; i++) {
            if (tmp[i] == tmp[i - 1]) {
                snprintf(msg, size, "layer %d is listed twice", tmp[i]);
                return false;
            }
        }
        cfg->model.layers_from_count = false;
    }
    memcpy(field_ptr(f, cfg), tmp, (size_t)count * sizeof tmp[0]);
    *count_ptr(f, cfg) = count;
    return true;
}

bool moe_config_field_equal(int idx, const moe_config_t *a, const moe_config_t *b) {
    const moe_config_field_t *f = &moe_config_fields[idx];
    const void *pa = field_cptr(f, a), *pb = field_cptr(f, b);
    switch (f->type) {
    case MOE_FIELD_INT:
    case MOE_FIELD_ENUM: return *(const int *)pa == *(const int *)pb;
    case MOE_FIELD_INT64: return *(const int64_t *)pa == *(const int64_t *)pb;
    case MOE_FIELD_UINT64: return *(const uint64_t *)pa == *(const uint64_t *)pb;
    case MOE_FIELD_DOUBLE: return *(const double *)pa == *(const double *)pb;
    case MOE_FIELD_BOOL: return *(const bool *)pa == *(const bool *)pb;
    case MOE_FIELD_STRING: return strcmp(pa, pb) == 0;
    case MOE_FIELD_INT_LIST:
    case MOE_FIELD_LAYERS: {
        int n = count_of(f, a);
        return n == count_of(f, b) && memcmp(pa, pb, (size_t)n * sizeof(int)) == 0;
    }
    }
    return false;
}

/* cJSON_CreateIntArray of cJSON 1.7.15 dereferences a NULL child when the
 * count is 0, and an unset placement is exactly that: build it by hand. */
static cJSON *int_array(const int *values, int count) {
    cJSON *array = cJSON_CreateArray();
    for (int i = 0; array != NULL && i < count; i++) {
        cJSON *item = cJSON_CreateNumber(values[i]);
        if (item == NULL || !cJSON_AddItemToArray(array, item)) {
            cJSON_Delete(item);
            cJSON_Delete(array);
            return NULL;
        }
    }
    return array;
}

cJSON *moe_config_field_to_json(int idx, const moe_config_t *cfg) {
    const moe_config_field_t *f = &moe_config_fields[idx];
    const void *p = field_cptr(f, cfg);
    switch (f->type) {
    case MOE_FIELD_INT: return cJSON_CreateNumber(*(const int *)p);
    case MOE_FIELD_INT64: return cJSON_CreateNumber((double)*(const int64_t *)p);
    case MOE_FIELD_UINT64: {
        uint64_t value = *(const uint64_t *)p;
        /* JSON numbers are doubles in most readers: beyond 2^53 keep the
         * exact digits as a string rather than print a different seed. */
        if (value <= (1ULL << 53)) return cJSON_CreateNumber((double)value);
        char digits[24];
        snprintf(digits, sizeof digits, "%" PRIu64, value);
        return cJSON_CreateString(digits);
    }
    case MOE_FIELD_DOUBLE: return cJSON_CreateNumber(*(const double *)p);
    case MOE_FIELD_BOOL: return cJSON_CreateBool(*(const bool *)p);
    case MOE_FIELD_STRING: return cJSON_CreateString(p);
    case MOE_FIELD_ENUM: return cJSON_CreateString(name_of(f->names, *(const int *)p));
    case MOE_FIELD_INT_LIST:
    case MOE_FIELD_LAYERS: return int_array(p, count_of(f, cfg));
    }
    return NULL;
}

void moe_config_errors_add(moe_config_errors_t *errs, const char *fmt, ...) {
    if (errs == NULL || errs->count >= MOE_CONFIG_MAX_ERRORS) return;
    char *slot = errs->messages[errs->count];
    size_t size = sizeof errs->messages[0];
    if (errs->count == MOE_CONFIG_MAX_ERRORS - 1) {
        snprintf(slot, size, "too many errors (more than %d); the rest are not shown",
                 MOE_CONFIG_MAX_ERRORS - 1);
    } else {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(slot, size, fmt, ap);
        va_end(ap);
    }
    errs->count++;
}
