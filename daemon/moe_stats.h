/* moe_stats: the daemon's counters and windows (DESIGN §8 stats, metrics):
 * requests completed/rejected (by status), tokens, request latency and step
 * time samples, and per layer the slot loads over the last
 * eplb.window_steps steps. Written by both threads under one mutex; read by
 * the control channel (JSON) and /metrics (Prometheus text). Rank 0 holds
 * the loads of all ranks (the step loop reduces them there). */
#ifndef MOE_STATS_H
#define MOE_STATS_H

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "../config/moe_config.h"
#include "../protocol/moe_frame.h"

#define MOE_STATS_SAMPLES 4096  /* latency samples kept for percentiles */
#define MOE_STATS_BUCKETS 8     /* a load window is kept as 8 buckets of steps */
#define MOE_STATS_RATE_SLOTS 16 /* tokens/s over the last 16 one-second slots */

/* Prometheus histogram bounds (seconds) for request latency and step time. */
#define MOE_STATS_HIST_BOUNDS 12

typedef struct {
    int layer;
    long long steps;
    long long bucket_stamp[MOE_STATS_BUCKETS + 1];
    /* per bucket: E expert loads, then R rank loads (converted from slot
     * loads with the placement in force at that step, so a rebalance does
     * not mix placements) */
    int64_t *bucket_loads;
    int *placement;          /* [n_slots] slot -> expert now */
    long long rebalances;
    long long migration_bytes; /* all ranks, all rebalances */
    double migration_ms;       /* the last rebalance's */
    double imbalance_before, imbalance_after; /* predicted, at the last rebalance */
    bool loading;              /* a new placement's weights are loading in the background */
} moe_layer_stats_t;

/* Request counters each rank reports at every agreement; rank 0 sums them
 * so that `stats` speaks for the whole job. */
enum {
    MOE_COUNTER_COMPLETED = 0,
    MOE_COUNTER_COMPLETED_TOKENS,
    MOE_COUNTER_REJECTED,
    MOE_COUNTER_QUEUED,
    MOE_COUNTER_TOKENS_10S, /* tokens completed in the last 10 whole seconds */
    MOE_COUNTER_BY_STATUS,  /* MOE_STATUS_COUNT entries follow */
    MOE_COUNTERS = MOE_COUNTER_BY_STATUS + MOE_STATUS_COUNT
};

typedef struct moe_stats {
    pthread_mutex_t lock;
    char gemm[1024]; /* the backend's expert-GEMM table ("" on cpu) */
    int n_layers;
    int n_slots;
    int n_ranks;
    int experts;
    int window_steps;
    moe_layer_stats_t *layers;

    long long completed;
    long long completed_tokens;
    long long rejected;
    long long rejected_by_status[MOE_STATUS_COUNT];
    long long steps;
    double latency[MOE_STATS_SAMPLES];
    long long latency_count;
    double step_time[MOE_STATS_SAMPLES];
    long long step_count;
    long long latency_hist[MOE_STATS_HIST_BOUNDS + 1];
    double latency_sum;
    long long step_hist[MOE_STATS_HIST_BOUNDS + 1];
    double step_sum;
    long long rate_tokens[MOE_STATS_RATE_SLOTS];
    long long rate_second[MOE_STATS_RATE_SLOTS];
    bool have_cluster;
    long long cluster[MOE_COUNTERS];
} moe_stats_t;

/* placement(layer) gives each layer's initial slot -> expert table. */
moe_err_t moe_stats_init(moe_stats_t *stats, const moe_config_t *cfg, int n_ranks, int n_slots,
                         const int *(*placement)(const void *ctx, int layer), const void *ctx);
void moe_stats_destroy(moe_stats_t *stats);
/* Applies a reloaded window length (eplb.window_steps). */
/* Records the backend's expert-GEMM table (text) for `stats`. */
void moe_stats_set_gemm(moe_stats_t *stats, const char *text);
void moe_stats_reconfigure(moe_stats_t *stats, const moe_config_t *cfg);

void moe_stats_completed(moe_stats_t *stats, double now, double latency_s, int n_tokens);
void moe_stats_rejected(moe_stats_t *stats, uint32_t status);
/* One finished step of model layer `layer`; slot_loads (n_slots entries,
 * summed over ranks) may be NULL. */
void moe_stats_step(moe_stats_t *stats, long long step, int layer, double step_s,
                    const int64_t *slot_loads);

/* Expert loads of a layer over the window ending at `step` (E values). */
void moe_stats_window_expert_loads(moe_stats_t *stats, int layer, long long step, double *expert_loads);

/* A rebalance of `layer` took effect: its new placement, the predicted
 * imbalance before and after, the bytes of weights loaded on all ranks and
 * the time it took. */
/* A layer's new placement started (true) or stopped (false) loading. */
void moe_stats_loading(moe_stats_t *stats, int layer, bool loading);
void moe_stats_rebalanced(moe_stats_t *stats, int layer, const int *placement, double before, double after,
                          long long bytes, double ms);

/* This rank's counters (MOE_COUNTERS values); queued is passed in. */
void moe_stats_local_counters(moe_stats_t *stats, double now, long long queued, long long *out);
/* Rank 0: the counters summed over every rank. */
void moe_stats_set_cluster(moe_stats_t *stats, const long long *sums);

/* The `stats` result object (DESIGN §8); layer < 0: every layer. Caller
 * adds the daemon-level fields (queued, uptime) and owns the object. */
cJSON *moe_stats_json(moe_stats_t *stats, double now, long long step, int layer);

/* Prometheus text exposition of the same, appended to out. */
void moe_stats_prometheus(moe_stats_t *stats, double now, FILE *out);

#endif
