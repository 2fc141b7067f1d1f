/* moectl_data: the data-plane commands of moectl — `forward` (one request,
 * from random values or a .npy) and `bench` (N connections, P requests in
 * flight each, for D seconds). */
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_client.h"
#include "moectl.h"

/* splitmix64: a seeded, portable generator so --seed reproduces inputs */
static uint64_t next_random(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void fill_uniform(float *x, size_t n, uint64_t seed) {
    uint64_t state = seed;
    for (size_t i = 0; i < n; i++) x[i] = (float)((next_random(&state) >> 40) * 0x1p-23 - 1.0);
}

/* --hidden, else model.hidden from the control channel; 0 with a message. */
static uint32_t resolve_hidden(const moectl_opts_t *opts, const char *hidden_arg,
                               const char *command) {
    long value;
    if (hidden_arg) return moectl_int(hidden_arg, "--hidden", 1, 1 << 24, &value) ? 0 : (uint32_t)value;
    int hidden = moectl_hidden_from_control(opts);
    if (hidden <= 0)
        fprintf(stderr, "moectl %s: control %s not reachable to read model.hidden; give --hidden\n",
                command, opts->control);
    return hidden > 0 ? (uint32_t)hidden : 0;
}

int moectl_cmd_forward(const moectl_opts_t *opts, int argc, char **argv) {
    const char *layer = NULL, *tokens = NULL, *hidden_arg = NULL, *dtype_name = "f32",
               *input = NULL, *output = NULL, *seed_arg = NULL;
    moectl_arg_t table[] = {{"--layer", 1, &layer},   {"--tokens", 1, &tokens},
                            {"--hidden", 1, &hidden_arg}, {"--dtype", 1, &dtype_name},
                            {"--input", 1, &input},   {"--output", 1, &output},
                            {"--seed", 1, &seed_arg}, {NULL, 0, NULL}};
    if (moectl_parse_args(argc, argv, table, "forward") != 0) return MOECTL_EXIT_USAGE;
    long layer_value, token_count = 0, seed = 1;
    uint8_t dtype = moectl_dtype(dtype_name);
    if (layer == NULL || (tokens == NULL && input == NULL)) {
        fprintf(stderr, "moectl forward: --layer and --tokens (or --input) are required\n");
        return MOECTL_EXIT_USAGE;
    }
    if (dtype == 0) {
        fprintf(stderr, "moectl forward: --dtype must be f32, bf16 or f16\n");
        return MOECTL_EXIT_USAGE;
    }
    if (moectl_int(layer, "--layer", 0, UINT32_MAX, &layer_value) ||
        (tokens && moectl_int(tokens, "--tokens", 1, 1 << 24, &token_count)) ||
        (seed_arg && moectl_int(seed_arg, "--seed", 0, (long)(~0ul >> 1), &seed)))
        return MOECTL_EXIT_USAGE;
    float *x = NULL, *out = NULL;
    uint32_t n_tokens, hidden;
    char msg[512];
    if (input) {
        if (moectl_npy_read(input, &x, &n_tokens, &hidden, msg, sizeof msg) != 0) {
            fprintf(stderr, "moectl forward: %s\n", msg);
            return MOECTL_EXIT_USAGE;
        }
        if (tokens && (uint32_t)token_count != n_tokens) {
            fprintf(stderr, "moectl forward: --tokens %ld but %s holds %u\n", token_count, input,
                    n_tokens);
            free(x);
            return MOECTL_EXIT_USAGE;
        }
    } else {
        n_tokens = (uint32_t)token_count;
        hidden = resolve_hidden(opts, hidden_arg, "forward");
        if (hidden == 0) return MOECTL_EXIT_USAGE;
        x = malloc((size_t)n_tokens * hidden * sizeof(float));
        if (x == NULL) return MOECTL_EXIT_USAGE;
        fill_uniform(x, (size_t)n_tokens * hidden, (uint64_t)seed);
    }
    size_t values = (size_t)n_tokens * hidden;
    out = malloc(values * sizeof(float));
    moe_client_t *c = NULL;
    int status = MOECTL_EXIT_USAGE;
    if (out == NULL) goto done;
    if (moe_client_connect(opts->data, opts->rank, &c, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "moectl forward: %s\n", msg);
        goto done;
    }
    uint32_t server_status;
    double start = moectl_now_ms();
    moe_err_t err = moe_client_forward(c, (uint32_t)layer_value, x, n_tokens, hidden, dtype, NULL,
                                       NULL, 0, out, &server_status, msg, sizeof msg);
    double elapsed = moectl_now_ms() - start;
    if (err != MOE_OK) {
        fprintf(stderr, "moectl forward: %s\n", msg);
        status = server_status ? MOECTL_EXIT_FAILED : MOECTL_EXIT_USAGE;
        goto done;
    }
    double sum = 0, absmax = 0;
    for (size_t i = 0; i < values; i++) {
        sum += out[i];
        if (fabs(out[i]) > absmax || isnan(out[i])) absmax = fabs(out[i]);
    }
    printf("layer %ld: %u tokens x %u hidden (%s) in %.3f ms; output mean %.6g absmax %.6g\n",
           layer_value, n_tokens, hidden, dtype_name, elapsed, sum / (double)values, absmax);
    status = MOECTL_EXIT_OK;
    if (output && moectl_npy_write(output, out, n_tokens, hidden, msg, sizeof msg) != 0) {
        fprintf(stderr, "moectl forward: %s\n", msg);
        status = MOECTL_EXIT_USAGE;
    }
done:
    moe_client_close(c);
    free(x);
    free(out);
    return status;
}

/* ---- bench ---- */

typedef struct {
    const moectl_opts_t *opts;
    int rank;
    uint32_t layer, n_tokens, hidden, pipeline;
    uint8_t dtype;
    double deadline_ms;
    const float *x;
    /* results */
    double *latencies; /* ms, one per completed request */
    size_t n_latencies, cap_latencies;
    uint64_t errors_by_status[MOE_STATUS_COUNT + 1]; /* last slot: unknown codes */
    uint64_t io_errors;
    char io_message[256];
} bench_worker_t;

static void record_latency(bench_worker_t *w, double ms) {
    if (w->n_latencies == w->cap_latencies) {
        size_t cap = w->cap_latencies ? w->cap_latencies * 2 : 4096;
        double *grown = realloc(w->latencies, cap * sizeof *grown);
        if (grown == NULL) return;
        w->latencies = grown;
        w->cap_latencies = cap;
    }
    w->latencies[w->n_latencies++] = ms;
}

static void *bench_thread(void *arg) {
    bench_worker_t *w = arg;
    moe_client_t *c;
    char msg[256];
    if (moe_client_connect(w->opts->data, w->rank, &c, msg, sizeof msg) != MOE_OK) {
        w->io_errors++;
        snprintf(w->io_message, sizeof w->io_message, "%s", msg);
        return NULL;
    }
    /* sent_at[id % pipeline]: ids are issued in order, so slot reuse is safe
     * once the previous occupant's response arrived */
    double *sent_at = calloc(w->pipeline, sizeof *sent_at);
    uint64_t next_id = 0, in_flight = 0;
    while (sent_at) {
        bool sending = moectl_now_ms() < w->deadline_ms;
        while (sending && in_flight < w->pipeline) {
            sent_at[next_id % w->pipeline] = moectl_now_ms();
            if (moe_client_send(c, next_id, w->layer, w->x, w->n_tokens, w->hidden, w->dtype, NULL,
                                NULL, 0, msg, sizeof msg) != MOE_OK)
                goto io_fail;
            next_id++, in_flight++;
        }
        if (in_flight == 0) break;
        moe_client_response_t resp;
        moe_err_t err = moe_client_recv(c, &resp, 30000, msg, sizeof msg);
        if (err != MOE_OK) goto io_fail;
        in_flight--;
        if (resp.type == MOE_FRAME_RESULT) {
            record_latency(w, moectl_now_ms() - sent_at[resp.request_id % w->pipeline]);
        } else {
            w->errors_by_status[resp.status < MOE_STATUS_COUNT ? resp.status : MOE_STATUS_COUNT]++;
        }
        moe_client_response_free(&resp);
    }
    free(sent_at);
    moe_client_close(c);
    return NULL;
io_fail:
    w->io_errors++;
    snprintf(w->io_message, sizeof w->io_message, "%s", msg);
    free(sent_at);
    moe_client_close(c);
    return NULL;
}

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(const double *sorted, size_t n, double p) {
    if (n == 0) return 0;
    size_t i = (size_t)ceil(p / 100.0 * (double)n);
    return sorted[i == 0 ? 0 : i - 1]; /* nearest rank */
}

int moectl_cmd_bench(const moectl_opts_t *opts, int argc, char **argv) {
    const char *connections = "1", *tokens = "16", *seconds = "5", *layer = NULL,
               *dtype_name = "f32", *pipeline = "1", *ranks = "1", *hidden_arg = NULL,
               *json = NULL;
    moectl_arg_t table[] = {{"--connections", 1, &connections}, {"--tokens", 1, &tokens},
                            {"--seconds", 1, &seconds},         {"--layer", 1, &layer},
                            {"--dtype", 1, &dtype_name},        {"--pipeline", 1, &pipeline},
                            {"--ranks", 1, &ranks},             {"--hidden", 1, &hidden_arg},
                            {"--json", 0, &json},               {NULL, 0, NULL}};
    if (moectl_parse_args(argc, argv, table, "bench") != 0) return MOECTL_EXIT_USAGE;
    long n_conn, n_tokens, n_seconds, layer_value = 0, depth, n_ranks;
    uint8_t dtype = moectl_dtype(dtype_name);
    if (moectl_int(connections, "--connections", 1, 4096, &n_conn) ||
        moectl_int(tokens, "--tokens", 1, 1 << 24, &n_tokens) ||
        moectl_int(seconds, "--seconds", 1, 86400, &n_seconds) ||
        (layer && moectl_int(layer, "--layer", 0, UINT32_MAX, &layer_value)) ||
        moectl_int(pipeline, "--pipeline", 1, 4096, &depth) ||
        moectl_int(ranks, "--ranks", 1, 65536, &n_ranks))
        return MOECTL_EXIT_USAGE;
    if (dtype == 0) {
        fprintf(stderr, "moectl bench: --dtype must be f32, bf16 or f16\n");
        return MOECTL_EXIT_USAGE;
    }
    uint32_t hidden = resolve_hidden(opts, hidden_arg, "bench");
    if (hidden == 0) return MOECTL_EXIT_USAGE;
    size_t values = (size_t)n_tokens * hidden;
    float *x = malloc(values * sizeof(float));
    bench_worker_t *workers = calloc((size_t)n_conn, sizeof *workers);
    pthread_t *threads = calloc((size_t)n_conn, sizeof *threads);
    if (!x || !workers || !threads) {
        fprintf(stderr, "moectl bench: out of memory\n");
        free(x), free(workers), free(threads);
        return MOECTL_EXIT_USAGE;
    }
    fill_uniform(x, values, 1);
    double start = moectl_now_ms();
    for (long i = 0; i < n_conn; i++) {
        workers[i] = (bench_worker_t){.opts = opts, .rank = (int)(i % n_ranks),
                                      .layer = (uint32_t)layer_value, .n_tokens = (uint32_t)n_tokens,
                                      .hidden = hidden, .pipeline = (uint32_t)depth, .dtype = dtype,
                                      .deadline_ms = start + 1000.0 * (double)n_seconds, .x = x};
        pthread_create(&threads[i], NULL, bench_thread, &workers[i]);
    }
    size_t total = 0;
    uint64_t errors[MOE_STATUS_COUNT + 1] = {0}, io_errors = 0;
    for (long i = 0; i < n_conn; i++) {
        pthread_join(threads[i], NULL);
        total += workers[i].n_latencies;
        io_errors += workers[i].io_errors;
        for (int s = 0; s <= MOE_STATUS_COUNT; s++) errors[s] += workers[i].errors_by_status[s];
        if (workers[i].io_errors && !json)
            fprintf(stderr, "moectl bench: connection %ld (rank %d): %s\n", i, workers[i].rank,
                    workers[i].io_message);
    }
    double elapsed_s = (moectl_now_ms() - start) / 1000.0;
    double *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    for (long i = 0; i < n_conn; i++) {
        if (all) memcpy(all + k, workers[i].latencies, workers[i].n_latencies * sizeof *all);
        k += workers[i].n_latencies;
        free(workers[i].latencies);
    }
    if (all) qsort(all, total, sizeof *all, compare_double);
    double req_s = (double)total / elapsed_s, tok_s = req_s * (double)n_tokens;
    double p50 = all ? percentile(all, total, 50) : 0, p99 = all ? percentile(all, total, 99) : 0;
    uint64_t failed = io_errors;
    for (int s = 0; s <= MOE_STATUS_COUNT; s++) failed += errors[s];
    if (json) {
        printf("{\"connections\": %ld, \"tokens\": %ld, \"hidden\": %u, \"dtype\": \"%s\", "
               "\"pipeline\": %ld, \"seconds\": %.3f, \"requests\": %zu, \"requests_per_s\": %.3f, "
               "\"tokens_per_s\": %.3f, \"p50_ms\": %.4f, \"p99_ms\": %.4f, \"errors\": {",
               n_conn, n_tokens, hidden, dtype_name, depth, elapsed_s, total, req_s, tok_s, p50, p99);
        const char *sep = "";
        for (int s = 1; s <= MOE_STATUS_COUNT; s++)
            if (errors[s]) {
                printf("%s\"%s\": %" PRIu64, sep, moe_status_name((uint32_t)s), errors[s]);
                sep = ", ";
            }
        if (io_errors) printf("%s\"io\": %" PRIu64, sep, io_errors);
        printf("}}\n");
    } else {
        printf("%ld connections x %ld in flight, %ld tokens x %u hidden (%s), %.1f s\n", n_conn,
               depth, n_tokens, hidden, dtype_name, elapsed_s);
        printf("requests/s %.1f  tokens/s %.1f  latency ms p50 %.3f  p99 %.3f  (%zu requests)\n",
               req_s, tok_s, p50, p99, total);
        if (failed) {
            printf("errors:");
            for (int s = 1; s <= MOE_STATUS_COUNT; s++)
                if (errors[s])
                    printf(" %s %" PRIu64, moe_status_name((uint32_t)s), errors[s]);
            if (io_errors) printf(" io %" PRIu64, io_errors);
            printf("\n");
        }
    }
    free(all);
    free(x);
    free(workers);
    free(threads);
    return failed ? MOECTL_EXIT_FAILED : MOECTL_EXIT_OK;
}
