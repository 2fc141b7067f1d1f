/* moe-bench: the MoE layer without sockets, alone or under mpirun.
 *   moe-bench --config F [--tokens 1,16,256,4096] [--iters N] [--warmup N] [--settle-ms N] [--json]
 *             [--peak-tbps 3.0] [--peak-tflops 750] [--rebalance]
 * For each token count (per rank) it runs the layers of the config in turn
 * and prints ms per layer (median over iterations of the slowest rank),
 * tokens/s and TFLOP/s over all ranks, the bytes of expert weights the step
 * must read (the experts routing reaches, expected for random routing) per
 * second, and the fraction of the roofline max(bytes / peak bandwidth,
 * flops / peak rate), the peaks per GPU times the ranks. The CUDA backend times with CUDA events on
 * device-resident inputs, and reports the bytes each GPU sent to the others;
 * the CPU backend times with the host clock. After the timing, one more
 * step of each size measures its rank loads: imbalance = max / mean.
 * --rebalance (eplb.mode online): after the sizes, a placement from the
 * loads they measured is migrated in as the daemon's EPLB does it, and the
 * sizes run again. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../config/moe_config.h"
#include "../config/moe_log.h"
#include "../daemon/moe_mpi_boot.h"
#include "../kernels/cpu/moe_cpu.h"
#include "../kernels/moe_backend.h"
#include "bench_eplb.h"
#include <math.h>

#define MAX_SIZES 32

typedef struct {
    const char *config;
    int sizes[MAX_SIZES];
    int n_sizes;
    int iters;
    int warmup;
    int json;
    double peak_tbps;   /* memory bandwidth of the roofline, TB/s */
    double peak_tflops; /* bf16 rate of the roofline, TFLOP/s */
    int rebalance;      /* time the sizes, rebalance from their loads, time them again */
    int settle_ms;      /* idle before the first size; -1: 2000 after the CUDA autotuner, else 0 */
} bench_args_t;

static void usage(FILE *out) {
    fprintf(out,
            "usage: moe-bench --config FILE [--tokens 1,16,256,4096] [--iters N] [--warmup N] [--json]\n"
            "  Runs the configured MoE layers without sockets (alone, or under mpirun -np N).\n"
            "  --tokens  token counts per rank, comma-separated (default 1,16,256,4096)\n"
            "  --iters   timed iterations per token count (default 20)\n"
            "  --warmup  untimed iterations first (default 3)\n"
            "  --json    one JSON document instead of the table\n"
            "  --peak-tbps, --peak-tflops  the roofline's ceilings per GPU (default 3.0 TB/s, 750 TFLOP/s: H100;\n"
            "               with R ranks the roofline has R times both)\n"
            "  --rebalance  (eplb.mode online) then a placement from the measured loads, and the sizes again\n"
            "  --settle-ms  idle this long before the first size (default 2000 after the CUDA backend's\n"
            "               autotuner, moe.gemm auto, whose load leaves the GPU at its power cap for ~1 s; else 0)\n");
}

static int parse_int(const char *text, int min, int max, int *out) {
    char *end = NULL;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < min || v > max) return -1;
    *out = (int)v;
    return 0;
}

static int parse_args(int argc, char **argv, bench_args_t *args) {
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'}, {"tokens", required_argument, NULL, 't'},
        {"iters", required_argument, NULL, 'i'},  {"warmup", required_argument, NULL, 'w'},
        {"json", no_argument, NULL, 'j'},         {"help", no_argument, NULL, 'h'},
        {"peak-tbps", required_argument, NULL, 'b'}, {"peak-tflops", required_argument, NULL, 'f'},
        {"rebalance", no_argument, NULL, 'r'}, {"settle-ms", required_argument, NULL, 's'}, {NULL, 0, NULL, 0}};
    *args = (bench_args_t){NULL, {1, 16, 256, 4096}, 4, 20, 3, 0, 3.0, 750.0, 0, -1};
    int opt;
    while ((opt = getopt_long(argc, argv, "c:t:i:w:jhb:f:rs:", options, NULL)) != -1) {
        switch (opt) {
        case 'c': args->config = optarg; break;
        case 't': {
            args->n_sizes = 0;
            char *copy = strdup(optarg), *save = NULL;
            for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (args->n_sizes == MAX_SIZES || parse_int(tok, 1, 1 << 24, &args->sizes[args->n_sizes]) != 0) {
                    fprintf(stderr, "moe-bench: --tokens: '%s' is not a token count in [1, %d] (at most %d counts)\n",
                            tok, 1 << 24, MAX_SIZES);
                    free(copy);
                    return -1;
                }
                args->n_sizes++;
            }
            free(copy);
            if (args->n_sizes == 0) return -1;
            break;
        }
        case 'i':
            if (parse_int(optarg, 1, 1000000, &args->iters) != 0) {
                fprintf(stderr, "moe-bench: --iters must be in [1, 1000000]\n");
                return -1;
            }
            break;
        case 'w':
            if (parse_int(optarg, 0, 1000000, &args->warmup) != 0) {
                fprintf(stderr, "moe-bench: --warmup must be in [0, 1000000]\n");
                return -1;
            }
            break;
        case 's':
            if (parse_int(optarg, 0, 600000, &args->settle_ms) != 0) {
                fprintf(stderr, "moe-bench: --settle-ms must be in [0, 600000]\n");
                return -1;
            }
            break;
        case 'j': args->json = 1; break;
        case 'r': args->rebalance = 1; break;
        case 'b':
        case 'f': {
            char *end = NULL;
            double v = strtod(optarg, &end);
            if (end == optarg || *end != '\0' || !(v > 0)) {
                fprintf(stderr, "moe-bench: --%s must be a positive number\n", opt == 'b' ? "peak-tbps" : "peak-tflops");
                return -1;
            }
            if (opt == 'b') args->peak_tbps = v;
            else args->peak_tflops = v;
            break;
        }
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); return -1;
        }
    }
    if (args->config == NULL) {
        usage(stderr);
        return -1;
    }
    return 0;
}

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    int tokens_per_rank;
    long long tokens_total;
    double ms_median, ms_min;
    double tokens_per_s, tflops;
    double weight_bytes, weight_gbps, roofline_ms, roofline_fraction;
    double imbalance;   /* max / mean rank load of one step of this size */
    double comm_bytes;  /* bytes one GPU sent to the others per step (mean over ranks); NAN: not measured */
    double comm_gbps;   /* ... per second of the step */
    int rebalanced;     /* timed after --rebalance's migration */
} bench_row_t;

/* Bytes of expert weights a step must read: the experts its tokens reach
 * (expected count for random routing: E·(1 − (1 − k/E)^T)), each 3·H·I
 * values, plus the shared expert and the router. */
static double step_weight_bytes(const moe_config_t *cfg, long long tokens) {
    const moe_model_config_t *m = &cfg->model;
    double bytes_per = cfg->moe.backend == MOE_BACKEND_CUDA ? 2.0 : 4.0;
    double used = m->experts * (1.0 - pow(1.0 - (double)m->top_k / m->experts, (double)tokens));
    double values = used * 3.0 * m->hidden * m->moe_intermediate + 3.0 * m->hidden * m->shared_intermediate +
                    (double)m->experts * m->hidden;
    return values * bytes_per;
}

/* Times one token count; every rank returns the same row. */
static moe_err_t bench_size(moe_backend_t *backend, const moe_config_t *cfg, moe_ep_t ep,
                            int n_tokens, const bench_args_t *args, bench_row_t *row, double *expert_load,
                            char *msg, size_t msg_size) {
    const size_t H = (size_t)cfg->model.hidden, k = (size_t)cfg->model.top_k;
    moe_err_t ret = MOE_OK;
    float *x = malloc(sizeof(float) * n_tokens * H), *out = malloc(sizeof(float) * n_tokens * H);
    int32_t *ids = malloc(sizeof(int32_t) * n_tokens * k);
    float *weights = malloc(sizeof(float) * n_tokens * k);
    double *times = malloc(sizeof(double) * (size_t)args->iters);
    if (!x || !out || !ids || !weights || !times) {
        ret = moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "moe-bench: out of memory for %d tokens", n_tokens);
        goto done;
    }
    uint64_t s = 0x1234567ull + (uint64_t)ep.rank;
    for (size_t i = 0; i < (size_t)n_tokens * H; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    }
    /* client routing: spread ids, equal weights */
    for (size_t t = 0; t < (size_t)n_tokens; t++)
        for (size_t i = 0; i < k; i++) {
            ids[t * k + i] = (int32_t)((t * 7 + i) % (size_t)cfg->model.experts);
            weights[t * k + i] = 1.0f / (float)k;
        }
    const int client = cfg->model.routing.method == MOE_ROUTE_CLIENT;
    double comm_bytes = NAN;
    if (backend->ops->bench != NULL) {
        /* device-timed, on the first served layer; times come back in ms */
        MOE_CHECK_GOTO(backend->ops->bench(backend->state, cfg->model.layer_ids[0], n_tokens, args->warmup,
                                           args->iters, times, &comm_bytes, msg, msg_size),
                       ret, done);
        for (int it = 0; it < args->iters; it++) times[it] /= 1e3;
        if (ep.size > 1 && MPI_Allreduce(MPI_IN_PLACE, &comm_bytes, 1, MPI_DOUBLE, MPI_SUM, ep.comm) != MPI_SUCCESS) {
            ret = moe_err_fmt(msg, msg_size, MOE_ERR_MPI, "moe-bench: comm bytes (MPI_Allreduce) failed");
            goto done;
        }
        comm_bytes /= ep.size;
    } else {
        for (int it = 0; it < args->warmup + args->iters; it++) {
            int layer = cfg->model.layer_ids[it % cfg->model.n_layers];
            if (ep.size > 1) MPI_Barrier(ep.comm);
            double start = moe_bench_now();
            MOE_CHECK_GOTO(backend->ops->forward(backend->state, layer, x, n_tokens, client ? ids : NULL,
                                                 client ? weights : NULL, out, NULL, msg, msg_size),
                           ret, done);
            double elapsed = moe_bench_now() - start;
            if (ep.size > 1) MPI_Allreduce(MPI_IN_PLACE, &elapsed, 1, MPI_DOUBLE, MPI_MAX, ep.comm);
            if (it >= args->warmup) times[it - args->warmup] = elapsed;
        }
    }
    qsort(times, (size_t)args->iters, sizeof(double), compare_double);
    row->tokens_per_rank = n_tokens;
    row->tokens_total = (long long)n_tokens * ep.size;
    row->ms_median = times[args->iters / 2] * 1e3;
    row->ms_min = times[0] * 1e3;
    double median = times[args->iters / 2], flops = moe_cpu_flops(cfg, row->tokens_total);
    row->tokens_per_s = row->tokens_total / median;
    row->tflops = flops / median / 1e12;
    row->weight_bytes = step_weight_bytes(cfg, row->tokens_total);
    row->weight_gbps = row->weight_bytes / median / 1e9;
    /* the peaks are per GPU: R ranks bring R times of both */
    double bytes_s = row->weight_bytes / (args->peak_tbps * 1e12 * ep.size);
    double flops_s = flops / (args->peak_tflops * 1e12 * ep.size);
    row->roofline_ms = (bytes_s > flops_s ? bytes_s : flops_s) * 1e3;
    row->roofline_fraction = row->roofline_ms / row->ms_median;
    row->comm_bytes = comm_bytes;
    row->comm_gbps = comm_bytes / median / 1e9;
    /* the rank loads of one more step of this size (the first served layer) */
    MOE_CHECK_GOTO(moe_bench_step_loads(backend, ep, cfg->model.layer_ids[0], x, n_tokens, client ? ids : NULL,
                                        client ? weights : NULL, out, expert_load, &row->imbalance, msg, msg_size),
                   ret, done);
done:
    free(x), free(out), free(ids), free(weights), free(times);
    return ret;
}

static void add_number_or_null(cJSON *object, const char *name, double value) {
    if (isfinite(value)) cJSON_AddNumberToObject(object, name, value);
    else cJSON_AddNullToObject(object, name);
}

static void print_json(const moe_config_t *cfg, moe_ep_t ep, const moe_backend_t *backend,
                       const bench_args_t *args, const bench_row_t *rows, int n_rows,
                       const moe_bench_rebalance_t *rebalance) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "backend", moe_backend_name(cfg->moe.backend));
    cJSON_AddStringToObject(root, "device", backend->ops->device(backend->state));
    if (backend->ops->gemm != NULL) cJSON_AddStringToObject(root, "gemm", backend->ops->gemm(backend->state));
    cJSON_AddNumberToObject(root, "peak_tbps", args->peak_tbps);
    cJSON_AddNumberToObject(root, "peak_tflops", args->peak_tflops);
    cJSON_AddNumberToObject(root, "ranks", ep.size);
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddNumberToObject(model, "hidden", cfg->model.hidden);
    cJSON_AddNumberToObject(model, "moe_intermediate", cfg->model.moe_intermediate);
    cJSON_AddNumberToObject(model, "experts", cfg->model.experts);
    cJSON_AddNumberToObject(model, "top_k", cfg->model.top_k);
    cJSON_AddNumberToObject(model, "shared_intermediate", cfg->model.shared_intermediate);
    cJSON_AddStringToObject(model, "routing", moe_route_method_name(cfg->model.routing.method));
    cJSON_AddNumberToObject(model, "layers", cfg->model.n_layers);
    cJSON_AddStringToObject(root, "eplb", moe_eplb_mode_name(cfg->eplb.mode));
    cJSON_AddNumberToObject(root, "slots", backend->ops->slot_count(backend->state));
    if (rebalance != NULL) {
        cJSON *r = cJSON_AddObjectToObject(root, "rebalance");
        cJSON_AddBoolToObject(r, "migrated", rebalance->migrated);
        cJSON_AddNumberToObject(r, "predicted_imbalance_before", rebalance->predicted_before);
        cJSON_AddNumberToObject(r, "predicted_imbalance_after", rebalance->predicted_after);
        cJSON_AddNumberToObject(r, "bytes", (double)rebalance->bytes);
        cJSON_AddNumberToObject(r, "ms", rebalance->ms);
    }
    cJSON *results = cJSON_AddArrayToObject(root, "results");
    for (int i = 0; i < n_rows; i++) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddNumberToObject(r, "tokens_per_rank", rows[i].tokens_per_rank);
        cJSON_AddNumberToObject(r, "tokens_total", (double)rows[i].tokens_total);
        cJSON_AddNumberToObject(r, "ms_per_layer", rows[i].ms_median);
        cJSON_AddNumberToObject(r, "ms_per_layer_min", rows[i].ms_min);
        cJSON_AddNumberToObject(r, "tokens_per_s", rows[i].tokens_per_s);
        cJSON_AddNumberToObject(r, "tflop_per_s", rows[i].tflops);
        cJSON_AddNumberToObject(r, "weight_bytes", rows[i].weight_bytes);
        cJSON_AddNumberToObject(r, "weight_gb_per_s", rows[i].weight_gbps);
        cJSON_AddNumberToObject(r, "roofline_ms", rows[i].roofline_ms);
        cJSON_AddNumberToObject(r, "roofline_fraction", rows[i].roofline_fraction);
        cJSON_AddNumberToObject(r, "imbalance", rows[i].imbalance);
        add_number_or_null(r, "comm_bytes_per_gpu", rows[i].comm_bytes);
        add_number_or_null(r, "comm_gb_per_s_per_gpu", rows[i].comm_gbps);
        cJSON_AddStringToObject(r, "placement", rows[i].rebalanced ? "rebalanced" : "initial");
        cJSON_AddItemToArray(results, r);
    }
    char *text = cJSON_Print(root);
    if (text != NULL) printf("%s\n", text);
    free(text);
    cJSON_Delete(root);
}

int main(int argc, char **argv) {
    bench_args_t args;
    char msg[1024] = "";
    moe_ep_t ep;
    if (parse_args(argc, argv, &args) != 0) return 2;
    if (moe_mpi_boot(&argc, &argv, &ep, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "moe-bench: %s\n", msg);
        return 1;
    }
    moe_log_set_rank(ep.rank);
    moe_config_t cfg;
    moe_config_errors_t errs;
    if (moe_config_load(args.config, &cfg, &errs) != MOE_OK) {
        if (ep.rank == 0)
            for (int i = 0; i < errs.count; i++) fprintf(stderr, "%s\n", errs.messages[i]);
        moe_mpi_shutdown();
        return 1;
    }
    moe_log_set_level((moe_log_level_t)cfg.log.level);
    if (args.rebalance && cfg.model.n_layers != 1) {
        /* the loads are measured on, and the placement moved for, one layer */
        if (ep.rank == 0)
            fprintf(stderr, "moe-bench: --rebalance measures and moves one layer: %s has %d (use model.layers: 1)\n",
                    args.config, cfg.model.n_layers);
        moe_mpi_shutdown();
        return 2;
    }
    if (args.rebalance && cfg.eplb.mode != MOE_EPLB_ONLINE) {
        if (ep.rank == 0)
            fprintf(stderr, "moe-bench: --rebalance needs eplb.mode: online in %s (it is '%s')\n", args.config,
                    moe_eplb_mode_name(cfg.eplb.mode));
        moe_mpi_shutdown();
        return 2;
    }
    moe_backend_t backend;
    moe_err_t err = moe_backend_create(&cfg, ep, &backend, msg, sizeof msg);
    /* creation can fail on one rank only (memory): agree before any step */
    int failed = err != MOE_OK;
    if (ep.size > 1) MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, ep.comm);
    if (failed) {
        if (err != MOE_OK) fprintf(stderr, "moe-bench: rank %d: %s\n", ep.rank, msg);
        moe_backend_destroy(&backend);
        moe_mpi_shutdown();
        return 1;
    }
    bench_row_t rows[2 * MAX_SIZES];
    double *expert_load = calloc((size_t)cfg.model.experts, sizeof(double));
    moe_bench_rebalance_t rebalance = {0};
    if (expert_load == NULL) {
        fprintf(stderr, "moe-bench: rank %d: out of memory\n", ep.rank);
        moe_backend_destroy(&backend);
        moe_mpi_shutdown();
        return 1;
    }
    if (!args.json && ep.rank == 0) {
        printf("moe-bench: backend %s (%s), %d rank%s, H=%d I=%d E=%d k=%d shared=%d, routing %s, "
               "%d layer%s, %d iters\n",
               moe_backend_name(cfg.moe.backend), backend.ops->device(backend.state), ep.size, ep.size == 1 ? "" : "s",
               cfg.model.hidden, cfg.model.moe_intermediate, cfg.model.experts, cfg.model.top_k,
               cfg.model.shared_intermediate, moe_route_method_name(cfg.model.routing.method),
               cfg.model.n_layers, cfg.model.n_layers == 1 ? "" : "s", args.iters);
        if (backend.ops->gemm != NULL) printf("expert GEMM %s\n", backend.ops->gemm(backend.state));
    }
    /* The autotuner's large buckets run the GPU at its power cap (an H200:
     * ~690 W, 1425-1740 MHz), and its clocks take about a second to come
     * back: the first small sizes timed right after it read high. */
    const int settle_ms = args.settle_ms >= 0 ? args.settle_ms
                          : cfg.moe.backend == MOE_BACKEND_CUDA && cfg.moe.gemm == MOE_GEMM_AUTO ? 2000
                                                                                                  : 0;
    if (settle_ms > 0) {
        if (!args.json && ep.rank == 0) {
            printf("settling %d ms before timing (--settle-ms)\n", settle_ms);
            fflush(stdout);
        }
        struct timespec wait = {settle_ms / 1000, (long)(settle_ms % 1000) * 1000000L};
        while (nanosleep(&wait, &wait) != 0 && errno == EINTR) {
        }
    }
    if (!args.json && ep.rank == 0)
        printf("%12s %10s %10s %12s %9s %10s %10s %9s %9s %10s\n", "tokens/rank", "tokens", "ms/layer", "tokens/s",
               "TFLOP/s", "weight GB/s", "roofline ms", "of roof", "imbalance", "a2a GB/s");
    int status = 0, n_rows = 0;
    for (int pass = 0; status == 0 && pass < (args.rebalance ? 2 : 1); pass++) {
        if (pass == 1) { /* the placement the first pass's loads ask for */
            moe_err_t err = moe_bench_rebalance(&backend, &cfg, ep, cfg.model.layer_ids[0], expert_load, &rebalance,
                                                msg, sizeof msg);
            if (err != MOE_OK) {
                fprintf(stderr, "moe-bench: rank %d: rebalance: %s\n", ep.rank, msg);
                status = 1;
                moe_mpi_abort_job(1);
                break;
            }
            if (!args.json && ep.rank == 0)
                printf("rebalance: predicted imbalance %.3f -> %.3f, %lld bytes loaded, %.1f ms%s\n",
                       rebalance.predicted_before, rebalance.predicted_after, rebalance.bytes, rebalance.ms,
                       rebalance.migrated ? "" : " (not adopted: no placement better by eplb.min_improvement)");
        }
        for (int i = 0; i < args.n_sizes; i++, n_rows++) {
            bench_row_t *row = &rows[n_rows];
            if (bench_size(&backend, &cfg, ep, args.sizes[i], &args, row, pass == 0 ? expert_load : NULL, msg,
                           sizeof msg) != MOE_OK) {
                fprintf(stderr, "moe-bench: rank %d: %s\n", ep.rank, msg);
                status = 1;
                moe_mpi_abort_job(1);
                break;
            }
            row->rebalanced = pass == 1 && rebalance.migrated;
            if (!args.json && ep.rank == 0) {
                char comm[32] = "-";
                if (isfinite(row->comm_gbps)) snprintf(comm, sizeof comm, "%.2f", row->comm_gbps);
                printf("%12d %10lld %10.3f %12.0f %9.3f %10.1f %10.3f %8.1f%% %9.3f %10s\n", row->tokens_per_rank,
                       row->tokens_total, row->ms_median, row->tokens_per_s, row->tflops, row->weight_gbps,
                       row->roofline_ms, 100.0 * row->roofline_fraction, row->imbalance, comm);
                fflush(stdout);
            }
        }
    }
    if (status == 0 && args.json && ep.rank == 0)
        print_json(&cfg, ep, &backend, &args, rows, n_rows, args.rebalance ? &rebalance : NULL);
    free(expert_load);
    moe_backend_destroy(&backend);
    moe_mpi_shutdown();
    return status;
}
