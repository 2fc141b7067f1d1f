/* moe_config: the effective configuration of moed (DESIGN §7) as plain
 * structs, and the loader that fills them from YAML.
 *
 * Owns: the field table (config_fields.c: name, type, default, bounds,
 * reloadable, help), YAML parsing with file:line:column errors, model-shape
 * resolution from a checkpoint's config.json (model_json.c), and the JSON
 * dump of `moed --check-config`. Leaf module: kernels/ and daemon/ read these
 * structs; config/ knows nothing of them. A moe_config_t is a plain value:
 * copy it with `=`, no pointers inside. */
#ifndef MOE_CONFIG_H
#define MOE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "moe_err.h"

#define MOE_PATH_MAX 1024
#define MOE_MAX_LAYERS 256    /* MoE layers one daemon may hold */
#define MOE_MAX_EXPERTS 1024  /* routed experts per layer */
#define MOE_MAX_TOP_K 32
#define MOE_MAX_SLOTS 4096    /* eplb.num_slots */
#define MOE_ADDR_MAX 256

typedef enum { MOE_WEIGHTS_SYNTHETIC = 0, MOE_WEIGHTS_SAFETENSORS } moe_weights_format_t;
typedef enum { MOE_NAMING_MIXTRAL = 0, MOE_NAMING_QWEN_MOE, MOE_NAMING_DEEPSEEK_V3 } moe_naming_t;
typedef enum {
    MOE_ROUTE_SOFTMAX_TOPK = 0,
    MOE_ROUTE_RENORMALIZE,
    MOE_ROUTE_SIGMOID_GROUP_TOPK,
    MOE_ROUTE_CLIENT,
    MOE_ROUTE_UNIFORM,
    MOE_ROUTE_ZIPF,
    MOE_ROUTE_PERFECT,
} moe_route_method_t;
typedef enum { MOE_BACKEND_CPU = 0, MOE_BACKEND_CUDA } moe_backend_kind_t;
typedef enum { MOE_GEMM_AUTO = 0, MOE_GEMM_CUBLAS, MOE_GEMM_GROUPED } moe_gemm_kind_t;
typedef enum { MOE_COMM_AUTO = 0, MOE_COMM_ALLTOALL, MOE_COMM_ALLGATHER } moe_comm_kind_t;
typedef enum { MOE_COMBINE_PARTIAL = 0, MOE_COMBINE_EXACT } moe_combine_kind_t;
typedef enum { MOE_EPLB_OFF = 0, MOE_EPLB_STATIC, MOE_EPLB_ONLINE } moe_eplb_mode_t;

typedef struct {
    moe_route_method_t method;
    bool norm_topk_prob;
    int n_group;
    int topk_group;
    double routed_scaling_factor;
    double zipf_s;
    uint64_t seed;
} moe_routing_config_t;

typedef struct {
    struct {
        moe_weights_format_t format;
        char path[MOE_PATH_MAX];
        moe_naming_t naming;
        uint64_t seed;
    } weights;
    /* Model layer indices served, ascending and distinct. */
    int n_layers;
    int layer_ids[MOE_MAX_LAYERS];
    /* model.layers was an int N rather than a list: layer_ids are 0..N-1
     * until moe_config_resolve_model replaces them with the checkpoint's
     * first N MoE layers (e.g. 3..N+2 for DeepSeek-V3). */
    bool layers_from_count;
    int hidden;
    int moe_intermediate;
    int experts;
    int top_k;
    int shared_intermediate; /* 0 = no shared expert */
    bool shared_expert_gate;  /* qwen_moe: sigmoid(x·g) scales the shared expert */
    moe_routing_config_t routing;
} moe_model_config_t;

typedef struct {
    moe_backend_kind_t backend;
    moe_gemm_kind_t gemm;
    moe_comm_kind_t comm;
    moe_combine_kind_t combine;
    int max_tokens_per_step;
    struct {
        int max_tokens_per_chunk;
        bool overlap;
    } chunking;
    struct {
        int max_tokens;
        char cache[MOE_PATH_MAX];
    } autotune;
} moe_moe_config_t;

typedef struct {
    moe_eplb_mode_t mode;
    int num_slots; /* 0 = experts (no redundant slots) */
    int window_steps;
    int rebalance_every_steps;
    double min_improvement;
    int ranks_per_node;
    char placement_file[MOE_PATH_MAX];
    /* eplb.placement: slot -> expert, same for every layer; n_placement == 0
     * means "not given" (static mode then uses the default placement). */
    int n_placement;
    int placement[MOE_MAX_SLOTS];
} moe_eplb_config_t;

typedef struct {
    int idle_poll_us;
    int max_wait_ms;
    int stall_timeout_ms;
} moe_scheduler_config_t;

typedef struct {
    char data[MOE_ADDR_MAX];
    char control[MOE_ADDR_MAX];
    char metrics[MOE_ADDR_MAX];
    char token_file[MOE_PATH_MAX];
    int64_t max_frame_bytes;
    int max_request_tokens;
    int64_t max_queue_tokens;
    int max_connections;
    int64_t max_output_bytes;
    int request_timeout_ms;
} moe_serve_config_t;

typedef struct {
    moe_model_config_t model;
    moe_moe_config_t moe;
    moe_eplb_config_t eplb;
    moe_scheduler_config_t scheduler;
    moe_serve_config_t serve;
    struct {
        int level; /* moe_log_level_t */
    } log;
    char source_path[MOE_PATH_MAX]; /* file it was loaded from ("" = defaults) */
    /* Bit i set: field i of the field table was given in the YAML. */
    uint64_t set_mask[4];
} moe_config_t;

/* Collected errors of one load: every problem, not only the first. */
#define MOE_CONFIG_MAX_ERRORS 64
typedef struct {
    int count;
    char messages[MOE_CONFIG_MAX_ERRORS][512];
} moe_config_errors_t;

/* Fills cfg with the table defaults. */
void moe_config_defaults(moe_config_t *cfg);

/* Loads and validates a YAML file: defaults, then the file's values, then
 * model resolution (moe_config_resolve_model) and cross-field checks.
 * Returns MOE_OK, or MOE_ERR_CONFIG with every problem in errs, each as
 * "FILE:LINE:COL: field.path: message". errs may be NULL. */
moe_err_t moe_config_load(const char *path, moe_config_t *cfg, moe_config_errors_t *errs);

/* Same, from a YAML string (name is used in messages). */
moe_err_t moe_config_load_string(const char *yaml, size_t len, const char *name,
                                 moe_config_t *cfg, moe_config_errors_t *errs);

/* When model.weights.format is safetensors and the model directory holds a
 * config.json, reads shapes and routing from it; YAML values that contradict
 * it are errors naming the field and both values. Called by the loaders. */
moe_err_t moe_config_resolve_model(moe_config_t *cfg, moe_config_errors_t *errs);

/* True when the field at this dotted path ("model.hidden") was given in the
 * YAML (as opposed to a default or a value read from config.json). */
bool moe_config_was_set(const moe_config_t *cfg, const char *path);

/* The effective config as a JSON text (malloc'd, caller frees), or NULL on
 * allocation failure. */
char *moe_config_to_json(const moe_config_t *cfg);

/* Names of the fields that differ between a and b and cannot change on
 * reload, comma-separated into buf; returns how many there are. */
int moe_config_nonreloadable_diff(const moe_config_t *a, const moe_config_t *b, char *buf,
                                  size_t size);

/* Name tables for the enums (for logs, JSON and help). */
const char *moe_route_method_name(moe_route_method_t method);
const char *moe_naming_name(moe_naming_t naming);
const char *moe_backend_name(moe_backend_kind_t backend);
const char *moe_gemm_name(moe_gemm_kind_t gemm);
const char *moe_comm_name(moe_comm_kind_t comm);
const char *moe_combine_name(moe_combine_kind_t combine);
const char *moe_eplb_mode_name(moe_eplb_mode_t mode);

/* Writes the README's config reference (a Markdown table generated from the
 * field table) to the stream; used by `moed --print-config-reference`. */
#include <stdio.h>
void moe_config_print_reference(FILE *out);

#endif
