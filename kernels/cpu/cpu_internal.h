/* cpu_internal: the CPU engine's state, shared by its own files only
 * (cpu_engine.c: build and weights; cpu_forward.c: the forward;
 * cpu_experts.c: the expert math). */
#ifndef MOE_CPU_INTERNAL_H
#define MOE_CPU_INTERNAL_H

#include <stdint.h>

#include "../moe_routing.h"
#include "../moe_slots.h"
#include "../moe_task.h"
#include "moe_cpu.h"

typedef struct {
    int layer;         /* model layer index */
    float *router;     /* [E, H] */
    float *bias;       /* [E] or NULL */
    float *shared_w1;  /* [Is, H] or NULL */
    float *shared_w3;  /* [Is, H] */
    float *shared_w2;  /* [H, Is] */
    float *shared_gate; /* [H] or NULL */
    float *slot_w1;    /* [slots_per_rank, I, H] */
    float *slot_w3;    /* [slots_per_rank, I, H] */
    float *slot_w2;    /* [slots_per_rank, H, I] */
    moe_slot_table_t *slots; /* this layer's placement (EPLB changes it per layer) */
    uint64_t step;     /* forward calls so far (seeds the benchmark routers) */
} moe_cpu_layer_t;

/* Grow-only scratch buffers: a steady-state forward allocates nothing. */
typedef struct {
    void *ptr;
    size_t size;
} moe_cpu_buffer_t;

typedef struct {
    moe_cpu_buffer_t step_ids, step_weights, logits, slot, send_token, send_rows, send_meta,
        recv_rows, recv_meta, slot_start, slot_fill, pair_order, tasks, pair_out, partial, back,
        per_entry, scratch, bf16_x, bf16_out;
} moe_cpu_workspace_t;

/* One routed (token, expert) entry as it travels to the expert's rank. */
typedef struct {
    int32_t local_slot; /* -1: this entry's expert is on another rank */
    float weight;
} moe_cpu_meta_t;

struct moe_cpu_engine {
    moe_config_t cfg;
    moe_ep_t ep;
    moe_slot_table_t slots; /* the configured placement every layer starts from */
    int n_layers;
    moe_cpu_layer_t *layers;
    moe_cpu_workspace_t ws;
    /* moe.comm: a chunk whose largest per-rank token count is at most this
     * uses allgather + reduce-scatter, else all-to-all (alltoall: -1,
     * allgather: INT_MAX, auto: measured at startup, the same on every rank) */
    int allgather_max_tokens;
    /* an EPLB migration in flight (moe_cpu_migrate_begin .. _end) */
    struct {
        bool active;
        moe_task_t task;
        moe_cpu_layer_t *layer;
        moe_slot_table_t *table;
        float *w1, *w3, *w2;
        int64_t bytes;
    } migration;
};

/* Sets engine->allgather_max_tokens from moe.comm (auto: times both
 * exchanges, without expert math, on 1..MOE_COMM_TUNE_MAX tokens per rank;
 * collective). */
#define MOE_COMM_TUNE_MAX 1024
moe_err_t moe_cpu_tune_comm(moe_cpu_engine_t *engine, char *msg, size_t msg_size);

/* Returns buffer->ptr grown to at least size bytes, or NULL. */
void *moe_cpu_reserve(moe_cpu_buffer_t *buffer, size_t size);

/* y[n_rows, H] = W2 · (silu(W1 x) ⊙ (W3 x)) for rows x[n_rows, H] of one
 * expert of intermediate size I; `hidden` is 2·I floats of scratch. */
void moe_cpu_swiglu_rows(const float *x, int n_rows, int H, int I, const float *w1,
                         const float *w3, const float *w2, float *hidden, float *y);

#endif
