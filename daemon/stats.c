/* stats: see moe_stats.h. Percentiles are computed on demand from the last
 * MOE_STATS_SAMPLES samples (a copy sorted under the lock: small and rare). */
#include "moe_stats.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const double hist_bounds[MOE_STATS_HIST_BOUNDS] = {0.0005, 0.001, 0.002, 0.005, 0.01, 0.02,
                                                         0.05,   0.1,   0.2,   0.5,   1.0,  5.0};

moe_err_t moe_stats_init(moe_stats_t *stats, const moe_config_t *cfg, int n_ranks, int n_slots,
                         const int *(*placement)(const void *ctx, int layer), const void *ctx) {
    memset(stats, 0, sizeof *stats);
    pthread_mutex_init(&stats->lock, NULL);
    stats->n_layers = cfg->model.n_layers;
    stats->n_slots = n_slots;
    stats->n_ranks = n_ranks;
    stats->experts = cfg->model.experts;
    stats->window_steps = cfg->eplb.window_steps > 0 ? cfg->eplb.window_steps : 1000;
    stats->layers = calloc((size_t)stats->n_layers, sizeof *stats->layers);
    if (stats->layers == NULL) return MOE_ERR_NOMEM;
    const size_t width = (size_t)stats->experts + (size_t)n_ranks;
    for (int l = 0; l < stats->n_layers; l++) {
        moe_layer_stats_t *ls = &stats->layers[l];
        ls->layer = cfg->model.layer_ids[l];
        ls->bucket_loads = calloc((size_t)(MOE_STATS_BUCKETS + 1) * width, sizeof(int64_t));
        ls->placement = malloc(sizeof(int) * (size_t)n_slots);
        const int *initial = placement(ctx, ls->layer);
        if (ls->bucket_loads == NULL || ls->placement == NULL || initial == NULL) return MOE_ERR_NOMEM;
        memcpy(ls->placement, initial, sizeof(int) * (size_t)n_slots);
        for (int b = 0; b <= MOE_STATS_BUCKETS; b++) ls->bucket_stamp[b] = -1;
        ls->imbalance_before = ls->imbalance_after = NAN;
    }
    return MOE_OK;
}

void moe_stats_destroy(moe_stats_t *stats) {
    for (int l = 0; stats->layers != NULL && l < stats->n_layers; l++) {
        free(stats->layers[l].bucket_loads);
        free(stats->layers[l].placement);
    }
    free(stats->layers);
    stats->layers = NULL;
    pthread_mutex_destroy(&stats->lock);
}

void moe_stats_reconfigure(moe_stats_t *stats, const moe_config_t *cfg) {
    pthread_mutex_lock(&stats->lock);
    stats->window_steps = cfg->eplb.window_steps > 0 ? cfg->eplb.window_steps : 1000;
    pthread_mutex_unlock(&stats->lock);
}

void moe_stats_set_gemm(moe_stats_t *stats, const char *text) {
    pthread_mutex_lock(&stats->lock);
    snprintf(stats->gemm, sizeof stats->gemm, "%s", text != NULL ? text : "");
    pthread_mutex_unlock(&stats->lock);
}

static void hist_add(long long *hist, double value) {
    int b = 0;
    while (b < MOE_STATS_HIST_BOUNDS && value > hist_bounds[b]) b++;
    hist[b]++;
}

void moe_stats_completed(moe_stats_t *stats, double now, double latency_s, int n_tokens) {
    pthread_mutex_lock(&stats->lock);
    stats->completed++;
    stats->completed_tokens += n_tokens;
    stats->latency[stats->latency_count++ % MOE_STATS_SAMPLES] = latency_s;
    hist_add(stats->latency_hist, latency_s);
    stats->latency_sum += latency_s;
    long long second = (long long)now;
    int slot = (int)(second % MOE_STATS_RATE_SLOTS);
    if (stats->rate_second[slot] != second) stats->rate_second[slot] = second, stats->rate_tokens[slot] = 0;
    stats->rate_tokens[slot] += n_tokens;
    pthread_mutex_unlock(&stats->lock);
}

void moe_stats_rejected(moe_stats_t *stats, uint32_t status) {
    pthread_mutex_lock(&stats->lock);
    stats->rejected++;
    if (status < MOE_STATUS_COUNT) stats->rejected_by_status[status]++;
    pthread_mutex_unlock(&stats->lock);
}

/* Bucket b of a window covers steps [b·w/8, (b+1)·w/8); the window is the
 * current bucket and the 8 before it, less what has aged out. */
static long long bucket_width(const moe_stats_t *stats) {
    long long width = stats->window_steps / MOE_STATS_BUCKETS;
    return width < 1 ? 1 : width;
}

void moe_stats_step(moe_stats_t *stats, long long step, int layer, double step_s,
                    const int64_t *slot_loads) {
    pthread_mutex_lock(&stats->lock);
    stats->steps++;
    stats->step_time[stats->step_count++ % MOE_STATS_SAMPLES] = step_s;
    hist_add(stats->step_hist, step_s);
    stats->step_sum += step_s;
    const size_t width = (size_t)stats->experts + (size_t)stats->n_ranks;
    const int per_rank = stats->n_slots / stats->n_ranks;
    for (int l = 0; l < stats->n_layers; l++) {
        moe_layer_stats_t *ls = &stats->layers[l];
        if (ls->layer != layer) continue;
        ls->steps++;
        if (slot_loads == NULL) break;
        long long stamp = step / bucket_width(stats);
        int b = (int)(stamp % (MOE_STATS_BUCKETS + 1));
        int64_t *loads = ls->bucket_loads + (size_t)b * width;
        if (ls->bucket_stamp[b] != stamp) {
            memset(loads, 0, sizeof(int64_t) * width);
            ls->bucket_stamp[b] = stamp;
        }
        for (int s = 0; s < stats->n_slots; s++) {
            loads[ls->placement[s]] += slot_loads[s];
            loads[stats->experts + s / per_rank] += slot_loads[s];
        }
        break;
    }
    pthread_mutex_unlock(&stats->lock);
}

/* Expert loads (E) then rank loads (R) over the window ending at `step`. */
static void window_loads(const moe_stats_t *stats, const moe_layer_stats_t *ls, long long step, double *loads) {
    const size_t width = (size_t)stats->experts + (size_t)stats->n_ranks;
    long long now_stamp = step / bucket_width(stats);
    for (size_t i = 0; i < width; i++) loads[i] = 0;
    for (int b = 0; b <= MOE_STATS_BUCKETS; b++) {
        long long stamp = ls->bucket_stamp[b];
        if (stamp < 0 || stamp < now_stamp - MOE_STATS_BUCKETS || stamp > now_stamp) continue;
        for (size_t i = 0; i < width; i++) loads[i] += (double)ls->bucket_loads[(size_t)b * width + i];
    }
}

static moe_layer_stats_t *find_layer(moe_stats_t *stats, int layer) {
    for (int l = 0; l < stats->n_layers; l++)
        if (stats->layers[l].layer == layer) return &stats->layers[l];
    return NULL;
}

void moe_stats_window_expert_loads(moe_stats_t *stats, int layer, long long step, double *expert_loads) {
    double loads[MOE_MAX_EXPERTS + MOE_MAX_SLOTS];
    pthread_mutex_lock(&stats->lock);
    moe_layer_stats_t *ls = find_layer(stats, layer);
    if (ls != NULL) window_loads(stats, ls, step, loads);
    for (int e = 0; e < stats->experts; e++) expert_loads[e] = ls != NULL ? loads[e] : 0.0;
    pthread_mutex_unlock(&stats->lock);
}

void moe_stats_loading(moe_stats_t *stats, int layer, bool loading) {
    pthread_mutex_lock(&stats->lock);
    moe_layer_stats_t *ls = find_layer(stats, layer);
    if (ls != NULL) ls->loading = loading;
    pthread_mutex_unlock(&stats->lock);
}

void moe_stats_rebalanced(moe_stats_t *stats, int layer, const int *placement, double before, double after,
                          long long bytes, double ms) {
    pthread_mutex_lock(&stats->lock);
    moe_layer_stats_t *ls = find_layer(stats, layer);
    if (ls != NULL) {
        memcpy(ls->placement, placement, sizeof(int) * (size_t)stats->n_slots);
        ls->rebalances++;
        ls->migration_bytes += bytes;
        ls->migration_ms = ms;
        ls->imbalance_before = before;
        ls->imbalance_after = after;
    }
    pthread_mutex_unlock(&stats->lock);
}

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Percentiles of the last samples, in milliseconds. */
static void percentiles(const double *samples, long long count, const double *q, double *out, int n_q) {
    int n = (int)(count < MOE_STATS_SAMPLES ? count : MOE_STATS_SAMPLES);
    for (int i = 0; i < n_q; i++) out[i] = 0.0;
    if (n == 0) return;
    double *copy = malloc(sizeof(double) * (size_t)n);
    if (copy == NULL) return;
    memcpy(copy, samples, sizeof(double) * (size_t)n);
    qsort(copy, (size_t)n, sizeof(double), compare_double);
    for (int i = 0; i < n_q; i++) {
        int at = (int)ceil(q[i] * n) - 1;
        out[i] = copy[at < 0 ? 0 : at >= n ? n - 1 : at] * 1e3;
    }
    free(copy);
}

/* Tokens completed in the last 10 whole seconds (the current partial second
 * excluded, so the rate does not dip at each second boundary). */
static long long tokens_last_10s(const moe_stats_t *stats, double now) {
    long long second = (long long)now, total = 0;
    for (int i = 1; i <= 10; i++)
        for (int s = 0; s < MOE_STATS_RATE_SLOTS; s++)
            if (stats->rate_second[s] == second - i) total += stats->rate_tokens[s];
    return total;
}

void moe_stats_local_counters(moe_stats_t *stats, double now, long long queued, long long *out) {
    pthread_mutex_lock(&stats->lock);
    out[MOE_COUNTER_COMPLETED] = stats->completed;
    out[MOE_COUNTER_COMPLETED_TOKENS] = stats->completed_tokens;
    out[MOE_COUNTER_REJECTED] = stats->rejected;
    out[MOE_COUNTER_QUEUED] = queued;
    out[MOE_COUNTER_TOKENS_10S] = tokens_last_10s(stats, now);
    for (int s = 0; s < MOE_STATUS_COUNT; s++) out[MOE_COUNTER_BY_STATUS + s] = stats->rejected_by_status[s];
    pthread_mutex_unlock(&stats->lock);
}

void moe_stats_set_cluster(moe_stats_t *stats, const long long *sums) {
    pthread_mutex_lock(&stats->lock);
    memcpy(stats->cluster, sums, sizeof stats->cluster);
    stats->have_cluster = true;
    pthread_mutex_unlock(&stats->lock);
}

static void add_number_or_null(cJSON *obj, const char *name, double value) {
    if (isfinite(value)) cJSON_AddNumberToObject(obj, name, value);
    else cJSON_AddNullToObject(obj, name);
}

static cJSON *layer_json(const moe_stats_t *stats, const moe_layer_stats_t *ls, long long step) {
    double loads[MOE_MAX_EXPERTS + MOE_MAX_SLOTS];
    cJSON *obj = cJSON_CreateObject();
    if (obj == NULL) return NULL;
    window_loads(stats, ls, step, loads);
    cJSON_AddNumberToObject(obj, "layer", ls->layer);
    cJSON_AddNumberToObject(obj, "steps", (double)ls->steps);
    cJSON_AddNumberToObject(obj, "window_steps", stats->window_steps);
    cJSON *experts = cJSON_AddArrayToObject(obj, "expert_loads");
    cJSON *ranks = cJSON_AddArrayToObject(obj, "rank_loads");
    cJSON *placement = cJSON_AddArrayToObject(obj, "placement");
    for (int s = 0; s < stats->n_slots; s++) cJSON_AddItemToArray(placement, cJSON_CreateNumber(ls->placement[s]));
    double max = 0, sum = 0;
    for (int e = 0; e < stats->experts; e++) cJSON_AddItemToArray(experts, cJSON_CreateNumber(loads[e]));
    for (int r = 0; r < stats->n_ranks; r++) {
        double load = loads[stats->experts + r];
        cJSON_AddItemToArray(ranks, cJSON_CreateNumber(load));
        max = load > max ? load : max;
        sum += load;
    }
    add_number_or_null(obj, "imbalance", sum > 0 ? max / (sum / stats->n_ranks) : NAN);
    add_number_or_null(obj, "imbalance_before", ls->imbalance_before);
    add_number_or_null(obj, "imbalance_after", ls->imbalance_after);
    cJSON_AddNumberToObject(obj, "rebalances", (double)ls->rebalances);
    cJSON_AddNumberToObject(obj, "migration_bytes", (double)ls->migration_bytes);
    cJSON_AddNumberToObject(obj, "migration_ms", ls->migration_ms);
    cJSON_AddBoolToObject(obj, "loading", ls->loading);
    return obj;
}

cJSON *moe_stats_json(moe_stats_t *stats, double now, long long step, int layer) {
    static const double q[3] = {0.5, 0.9, 0.99};
    double lat[3], step_q[3];
    cJSON *root = cJSON_CreateObject();
    if (root == NULL) return NULL;
    long long local[MOE_COUNTERS];
    moe_stats_local_counters(stats, now, 0, local);
    pthread_mutex_lock(&stats->lock);
    /* every rank's counters as of the last agreement (at most a few ms old);
     * before the first one, this rank's own */
    const long long *c = stats->have_cluster ? stats->cluster : local;
    cJSON *requests = cJSON_AddObjectToObject(root, "requests");
    cJSON_AddNumberToObject(requests, "completed", (double)c[MOE_COUNTER_COMPLETED]);
    cJSON_AddNumberToObject(requests, "completed_tokens", (double)c[MOE_COUNTER_COMPLETED_TOKENS]);
    cJSON_AddNumberToObject(requests, "rejected", (double)c[MOE_COUNTER_REJECTED]);
    cJSON_AddNumberToObject(requests, "queued", (double)c[MOE_COUNTER_QUEUED]);
    cJSON_AddNumberToObject(requests, "tokens_per_s", (double)c[MOE_COUNTER_TOKENS_10S] / 10.0);
    cJSON *by_code = cJSON_AddObjectToObject(requests, "rejected_by_code");
    for (uint32_t s = 1; s < MOE_STATUS_COUNT; s++)
        if (c[MOE_COUNTER_BY_STATUS + s] > 0)
            cJSON_AddNumberToObject(by_code, moe_status_name(s), (double)c[MOE_COUNTER_BY_STATUS + s]);
    percentiles(stats->latency, stats->latency_count, q, lat, 3);
    cJSON *latency = cJSON_AddObjectToObject(root, "latency_ms");
    cJSON_AddNumberToObject(latency, "p50", lat[0]);
    cJSON_AddNumberToObject(latency, "p90", lat[1]);
    cJSON_AddNumberToObject(latency, "p99", lat[2]);
    cJSON_AddNumberToObject(latency, "samples",
                            (double)(stats->latency_count < MOE_STATS_SAMPLES ? stats->latency_count : MOE_STATS_SAMPLES));
    percentiles(stats->step_time, stats->step_count, q, step_q, 3);
    cJSON *step_ms = cJSON_AddObjectToObject(root, "step_ms");
    cJSON_AddNumberToObject(step_ms, "p50", step_q[0]);
    cJSON_AddNumberToObject(step_ms, "p99", step_q[2]);
    if (stats->gemm[0] != '\0') cJSON_AddStringToObject(root, "gemm", stats->gemm);
    cJSON *layers = cJSON_AddArrayToObject(root, "layers");
    for (int l = 0; l < stats->n_layers; l++)
        if (layer < 0 || stats->layers[l].layer == layer)
            cJSON_AddItemToArray(layers, layer_json(stats, &stats->layers[l], step));
    pthread_mutex_unlock(&stats->lock);
    return root;
}

static void prom_histogram(FILE *out, const char *name, const char *help, const long long *hist,
                           double sum) {
    fprintf(out, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    long long cumulative = 0;
    for (int b = 0; b < MOE_STATS_HIST_BOUNDS; b++) {
        cumulative += hist[b];
        fprintf(out, "%s_bucket{le=\"%g\"} %lld\n", name, hist_bounds[b], cumulative);
    }
    cumulative += hist[MOE_STATS_HIST_BOUNDS];
    fprintf(out, "%s_bucket{le=\"+Inf\"} %lld\n%s_sum %.6f\n%s_count %lld\n", name, cumulative,
            name, sum, name, cumulative);
}

void moe_stats_prometheus(moe_stats_t *stats, double now, FILE *out) {
    (void)now;
    pthread_mutex_lock(&stats->lock);
    fprintf(out, "# HELP moed_requests_completed_total FORWARD requests answered with a RESULT.\n"
                 "# TYPE moed_requests_completed_total counter\nmoed_requests_completed_total %lld\n",
            stats->completed);
    fprintf(out, "# HELP moed_tokens_completed_total Tokens in completed requests.\n"
                 "# TYPE moed_tokens_completed_total counter\nmoed_tokens_completed_total %lld\n",
            stats->completed_tokens);
    fprintf(out, "# HELP moed_requests_rejected_total Requests answered with an ERROR, by code.\n"
                 "# TYPE moed_requests_rejected_total counter\n");
    for (uint32_t s = 1; s < MOE_STATUS_COUNT; s++)
        fprintf(out, "moed_requests_rejected_total{code=\"%s\"} %lld\n", moe_status_name(s),
                stats->rejected_by_status[s]);
    fprintf(out, "# HELP moed_steps_total Steps of the step loop.\n# TYPE moed_steps_total counter\n"
                 "moed_steps_total %lld\n", stats->steps);
    prom_histogram(out, "moed_request_latency_seconds", "Admission to answer, per request.",
                   stats->latency_hist, stats->latency_sum);
    prom_histogram(out, "moed_step_seconds", "Time of one layer step.", stats->step_hist, stats->step_sum);
    double *loads = malloc(sizeof(double) * ((size_t)MOE_MAX_EXPERTS + MOE_MAX_SLOTS));
    if (loads != NULL) {
        fprintf(out, "# HELP moed_expert_load Token-expert assignments over the EPLB window.\n"
                     "# TYPE moed_expert_load gauge\n");
        for (int l = 0; l < stats->n_layers; l++) {
            window_loads(stats, &stats->layers[l], stats->steps, loads);
            for (int e = 0; e < stats->experts; e++)
                fprintf(out, "moed_expert_load{layer=\"%d\",expert=\"%d\"} %.0f\n", stats->layers[l].layer, e,
                        loads[e]);
        }
        /* one family after the other: Prometheus wants each family grouped */
        double imbalance[MOE_MAX_LAYERS];
        fprintf(out, "# HELP moed_rank_load Token-expert assignments per rank over the EPLB window.\n"
                     "# TYPE moed_rank_load gauge\n");
        for (int l = 0; l < stats->n_layers; l++) {
            window_loads(stats, &stats->layers[l], stats->steps, loads);
            double max = 0, sum = 0;
            for (int r = 0; r < stats->n_ranks; r++) {
                double load = loads[stats->experts + r];
                fprintf(out, "moed_rank_load{layer=\"%d\",rank=\"%d\"} %.0f\n", stats->layers[l].layer, r, load);
                max = load > max ? load : max;
                sum += load;
            }
            imbalance[l] = sum > 0 ? max / (sum / stats->n_ranks) : 1.0;
        }
        fprintf(out, "# HELP moed_imbalance Max rank load / mean rank load over the EPLB window.\n"
                     "# TYPE moed_imbalance gauge\n");
        for (int l = 0; l < stats->n_layers; l++)
            fprintf(out, "moed_imbalance{layer=\"%d\"} %.4f\n", stats->layers[l].layer, imbalance[l]);
        fprintf(out, "# HELP moed_rebalances_total EPLB placement swaps.\n# TYPE moed_rebalances_total counter\n");
        for (int l = 0; l < stats->n_layers; l++)
            fprintf(out, "moed_rebalances_total{layer=\"%d\"} %lld\n", stats->layers[l].layer,
                    stats->layers[l].rebalances);
        fprintf(out, "# HELP moed_migration_bytes_total Expert weight bytes migrated by EPLB (all ranks).\n"
                     "# TYPE moed_migration_bytes_total counter\n");
        for (int l = 0; l < stats->n_layers; l++)
            fprintf(out, "moed_migration_bytes_total{layer=\"%d\"} %lld\n", stats->layers[l].layer,
                    stats->layers[l].migration_bytes);
        free(loads);
    }
    pthread_mutex_unlock(&stats->lock);
}
