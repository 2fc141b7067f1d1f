/* moectl: the command line over both planes (DESIGN §8). This file holds
 * the global options, the control commands (health, version, config, stats,
 * watch, reload, rebalance, drain, shutdown) and the command table;
 * forward and bench live in moectl_data.c. Exit status: 0 ok, 1 the server
 * answered ok:false (or requests failed), 2 usage or connection errors. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../config/moe_config.h"
#include "../config/moe_heap.h"
#include "moe_control_client.h"
#include "moe_frame.h"
#include "moectl.h"

#define CONTROL_TIMEOUT_MS 30000

double moectl_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int moectl_parse_args(int argc, char **argv, const moectl_arg_t *table, const char *command) {
    for (int i = 0; i < argc; i++) {
        const moectl_arg_t *hit = NULL;
        for (const moectl_arg_t *a = table; a && a->name; a++)
            if (strcmp(argv[i], a->name) == 0) hit = a;
        if (hit == NULL) {
            fprintf(stderr, "moectl %s: unknown option \"%s\"\n", command, argv[i]);
            return -1;
        }
        if (!hit->takes_value) {
            *hit->value = "1";
        } else if (i + 1 >= argc) {
            fprintf(stderr, "moectl %s: %s needs a value\n", command, argv[i]);
            return -1;
        } else {
            *hit->value = argv[++i];
        }
    }
    return 0;
}

int moectl_int(const char *text, const char *name, long min, long max, long *out) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || *end != '\0' || end == text || v < min || v > max) {
        fprintf(stderr, "moectl: %s must be an integer in [%ld, %ld], not \"%s\"\n", name, min, max,
                text);
        return -1;
    }
    *out = v;
    return 0;
}

uint8_t moectl_dtype(const char *name) {
    if (strcmp(name, "f32") == 0 || strcmp(name, "float32") == 0) return MOE_DTYPE_F32;
    if (strcmp(name, "bf16") == 0 || strcmp(name, "bfloat16") == 0) return MOE_DTYPE_BF16;
    if (strcmp(name, "f16") == 0 || strcmp(name, "float16") == 0) return MOE_DTYPE_F16;
    return 0;
}

static moe_control_client_t *control_open(const moectl_opts_t *opts, int quiet) {
    char msg[512];
    moe_control_client_t *cc;
    if (moe_control_connect(opts->control, &cc, msg, sizeof msg) != MOE_OK) {
        if (!quiet) fprintf(stderr, "moectl: control %s: %s\n", opts->control, msg);
        return NULL;
    }
    return cc;
}

static cJSON *call_on(moe_control_client_t *cc, const moectl_opts_t *opts, const char *cmd,
                      cJSON *args, int quiet) {
    char msg[512];
    cJSON *reply;
    if (moe_control_call(cc, cmd, args, opts->token, &reply, CONTROL_TIMEOUT_MS, msg, sizeof msg) !=
        MOE_OK) {
        if (!quiet) fprintf(stderr, "moectl: %s: %s\n", cmd, msg);
        return NULL;
    }
    return reply;
}

cJSON *moectl_control_call(const moectl_opts_t *opts, const char *cmd, cJSON *args) {
    moe_control_client_t *cc = control_open(opts, 0);
    if (cc == NULL) {
        cJSON_Delete(args);
        return NULL;
    }
    cJSON *reply = call_on(cc, opts, cmd, args, 0);
    moe_control_close(cc);
    return reply;
}

int moectl_hidden_from_control(const moectl_opts_t *opts) {
    moe_control_client_t *cc = control_open(opts, 1);
    if (cc == NULL) return 0;
    cJSON *reply = call_on(cc, opts, "config", NULL, 1);
    moe_control_close(cc);
    const cJSON *result = cJSON_GetObjectItemCaseSensitive(reply, "result");
    const cJSON *config = cJSON_GetObjectItemCaseSensitive(result, "config");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(config, "model");
    const cJSON *hidden = cJSON_GetObjectItemCaseSensitive(model, "hidden");
    int value = cJSON_IsNumber(hidden) ? hidden->valueint : 0;
    cJSON_Delete(reply);
    return value;
}

/* Prints the reply's result (stdout) or error (stderr); returns the exit status. */
static int report(cJSON *reply) {
    if (reply == NULL) return MOECTL_EXIT_USAGE;
    int status;
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(reply, "ok"))) {
        char *text = cJSON_Print(cJSON_GetObjectItemCaseSensitive(reply, "result"));
        printf("%s\n", text ? text : "null");
        free(text);
        status = MOECTL_EXIT_OK;
    } else {
        const cJSON *error = cJSON_GetObjectItemCaseSensitive(reply, "error");
        const cJSON *code = cJSON_GetObjectItemCaseSensitive(error, "code");
        const cJSON *message = cJSON_GetObjectItemCaseSensitive(error, "message");
        fprintf(stderr, "moectl: error %s: %s\n", cJSON_IsString(code) ? code->valuestring : "?",
                cJSON_IsString(message) ? message->valuestring : "(no message)");
        status = MOECTL_EXIT_FAILED;
    }
    cJSON_Delete(reply);
    return status;
}

/* health, version, config, drain, shutdown, and reload/rebalance with
 * their one optional argument. */

/* `--layer L` (optional) into a control command's arguments; -1 on a bad value. */
static int add_layer_arg(cJSON *args, const char *layer) {
    long value;
    if (layer == NULL) return 0;
    if (moectl_int(layer, "--layer", 0, 1 << 30, &value) != 0) return -1;
    cJSON_AddNumberToObject(args, "layer", (double)value);
    return 0;
}

static int cmd_simple(const moectl_opts_t *opts, const char *cmd, int argc, char **argv) {
    const char *path = NULL, *layer = NULL;
    moectl_arg_t reload_args[] = {{"--path", 1, &path}, {NULL, 0, NULL}};
    moectl_arg_t rebalance_args[] = {{"--layer", 1, &layer}, {NULL, 0, NULL}};
    moectl_arg_t none[] = {{NULL, 0, NULL}};
    const moectl_arg_t *table = strcmp(cmd, "reload") == 0      ? reload_args
                                : strcmp(cmd, "rebalance") == 0 ? rebalance_args
                                                                : none;
    if (moectl_parse_args(argc, argv, table, cmd) != 0) return MOECTL_EXIT_USAGE;
    cJSON *args = cJSON_CreateObject();
    if (path) {
        /* the daemon resolves paths in its own cwd: send an absolute one */
        char *abs = realpath(path, NULL);
        cJSON_AddStringToObject(args, "path", abs ? abs : path);
        free(abs);
    }
    if (add_layer_arg(args, layer) != 0) {
        cJSON_Delete(args);
        return MOECTL_EXIT_USAGE;
    }
    return report(moectl_control_call(opts, cmd, args));
}

static double num(const cJSON *obj, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNumber(v) ? v->valuedouble : 0.0;
}

/* The human view of one stats result: totals, latency, then per layer the
 * imbalance and the five busiest experts. */
static void print_stats(const cJSON *r, FILE *out) {
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(r, "requests");
    const cJSON *lat = cJSON_GetObjectItemCaseSensitive(r, "latency_ms");
    fprintf(out, "step %.0f  uptime %.1fs  epoch %.0f%s\n", num(r, "step"), num(r, "uptime_s"),
            num(r, "config_epoch"),
            cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "draining")) ? "  DRAINING" : "");
    fprintf(out, "requests  completed %.0f  rejected %.0f  queued %.0f  tokens/s %.1f\n",
            num(req, "completed"), num(req, "rejected"), num(req, "queued"),
            num(req, "tokens_per_s"));
    const cJSON *by_code = cJSON_GetObjectItemCaseSensitive(req, "rejected_by_code");
    const cJSON *item;
    if (cJSON_GetArraySize(by_code) > 0) {
        fprintf(out, "rejected ");
        cJSON_ArrayForEach(item, by_code) fprintf(out, " %s %.0f", item->string, item->valuedouble);
        fprintf(out, "\n");
    }
    fprintf(out, "latency ms  p50 %.3f  p90 %.3f  p99 %.3f  (%.0f samples)\n", num(lat, "p50"),
            num(lat, "p90"), num(lat, "p99"), num(lat, "samples"));
    const cJSON *layer;
    cJSON_ArrayForEach(layer, cJSON_GetObjectItemCaseSensitive(r, "layers")) {
        const cJSON *loads = cJSON_GetObjectItemCaseSensitive(layer, "expert_loads");
        int n = cJSON_GetArraySize(loads);
        double total = 0;
        cJSON_ArrayForEach(item, loads) total += item->valuedouble;
        /* null: no load in the window yet, nothing to compare */
        char imbalance[32] = "-";
        if (cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(layer, "imbalance")))
            snprintf(imbalance, sizeof imbalance, "%.3f", num(layer, "imbalance"));
        fprintf(out, "layer %3.0f  steps %.0f  imbalance %s  rebalances %.0f  migrated %.0f B%s\n",
                num(layer, "layer"), num(layer, "steps"), imbalance,
                num(layer, "rebalances"), num(layer, "migration_bytes"),
                cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(layer, "loading")) ? "  (new placement loading)" : "");
        fprintf(out, "           top experts:");
        int taken[5] = {-1, -1, -1, -1, -1};
        for (int k = 0; k < 5 && k < n; k++) { /* 5 passes over E: simple and E is small */
            int best = -1;
            double best_load = -1;
            for (int e = 0; e < n; e++) {
                int used = 0;
                for (int j = 0; j < k; j++) used |= taken[j] == e;
                double load = cJSON_GetArrayItem(loads, e)->valuedouble;
                if (!used && load > best_load) best = e, best_load = load;
            }
            taken[k] = best;
            fprintf(out, "  #%d %.0f (%.1f%%)", best, best_load,
                    total > 0 ? 100.0 * best_load / total : 0.0);
        }
        fprintf(out, "\n");
    }
}

static int cmd_stats(const moectl_opts_t *opts, int argc, char **argv) {
    const char *layer = NULL, *json = NULL;
    moectl_arg_t table[] = {{"--layer", 1, &layer}, {"--json", 0, &json}, {NULL, 0, NULL}};
    if (moectl_parse_args(argc, argv, table, "stats") != 0) return MOECTL_EXIT_USAGE;
    cJSON *args = cJSON_CreateObject();
    if (add_layer_arg(args, layer) != 0) {
        cJSON_Delete(args);
        return MOECTL_EXIT_USAGE;
    }
    cJSON *reply = moectl_control_call(opts, "stats", args);
    if (json || reply == NULL || !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(reply, "ok")))
        return report(reply);
    print_stats(cJSON_GetObjectItemCaseSensitive(reply, "result"), stdout);
    cJSON_Delete(reply);
    return MOECTL_EXIT_OK;
}

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

static int cmd_watch(const moectl_opts_t *opts, int argc, char **argv) {
    const char *interval = "1000", *count = NULL;
    moectl_arg_t table[] = {{"--interval", 1, &interval}, {"--count", 1, &count}, {NULL, 0, NULL}};
    if (moectl_parse_args(argc, argv, table, "watch") != 0) return MOECTL_EXIT_USAGE;
    long interval_ms, max_events = -1;
    if (moectl_int(interval, "--interval", 100, 60000, &interval_ms) != 0 ||
        (count && moectl_int(count, "--count", 1, 1L << 40, &max_events) != 0))
        return MOECTL_EXIT_USAGE;
    moe_control_client_t *cc = control_open(opts, 0);
    if (cc == NULL) return MOECTL_EXIT_USAGE;
    cJSON *args = cJSON_CreateObject();
    cJSON_AddNumberToObject(args, "interval_ms", (double)interval_ms);
    cJSON *reply = call_on(cc, opts, "subscribe", args, 0);
    if (reply == NULL || !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(reply, "ok"))) {
        moe_control_close(cc);
        return report(reply);
    }
    cJSON_Delete(reply);
    struct sigaction sa = {.sa_handler = on_sigint};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    int tty = isatty(STDOUT_FILENO), status = MOECTL_EXIT_OK;
    long seen = 0;
    while (!interrupted && (max_events < 0 || seen < max_events)) {
        cJSON *event;
        char msg[512];
        moe_err_t err = moe_control_read_event(cc, &event, 250, msg, sizeof msg);
        if (err == MOE_ERR_NOT_FOUND) continue; /* wake up to check for Ctrl-C */
        if (err != MOE_OK) {
            fprintf(stderr, "moectl watch: %s\n", msg);
            status = MOECTL_EXIT_USAGE;
            break;
        }
        seen++;
        if (tty) printf("\033[H\033[2J"); /* home + clear: redraw in place */
        char when[32];
        time_t now = time(NULL);
        strftime(when, sizeof when, "%H:%M:%S", localtime(&now));
        printf("moed %s  (%s, every %ld ms, Ctrl-C to quit)\n", opts->control, when, interval_ms);
        print_stats(cJSON_GetObjectItemCaseSensitive(event, "result"), stdout);
        if (!tty) printf("\n");
        fflush(stdout);
        cJSON_Delete(event);
    }
    moe_control_close(cc); /* closing unsubscribes: the server drops the connection's state */
    return status;
}

static int usage(FILE *out) {
    fprintf(out,
            "usage: moectl [--control ADDR] [--data ADDR] [--rank R] [--token-file F]\n"
            "              [--config moed.yaml] COMMAND [options]\n"
            "  forward --layer L --tokens T [--hidden H] [--dtype f32|bf16|f16]\n"
            "          [--input x.npy] [--output y.npy] [--seed S]\n"
            "  stats [--layer L] [--json]\n"
            "  watch [--interval MS] [--count N]\n"
            "  health | version | config | drain | shutdown\n"
            "  reload [--path F]\n"
            "  rebalance [--layer L]\n"
            "  bench --connections N --tokens T --seconds D [--layer L] [--dtype D]\n"
            "        [--pipeline P] [--ranks R] [--hidden H] [--json]\n"
            "defaults: --control unix:/tmp/moed-control.sock --data 127.0.0.1:7600 --rank 0\n"
            "exit status: 0 ok, 1 the server said no, 2 usage or connection error\n");
    return MOECTL_EXIT_USAGE;
}

/* Addresses and token from a moed YAML (the same file the daemon reads). */
static int load_config(const char *path, moectl_opts_t *opts, const char **token_file) {
    static moe_config_t cfg; /* big: keep it off the stack */
    moe_config_errors_t errs;
    if (moe_config_load(path, &cfg, &errs) != MOE_OK) {
        for (int i = 0; i < errs.count; i++) fprintf(stderr, "%s\n", errs.messages[i]);
        return -1;
    }
    snprintf(opts->control, sizeof opts->control, "%s", cfg.serve.control);
    snprintf(opts->data, sizeof opts->data, "%s", cfg.serve.data);
    if (cfg.serve.token_file[0] && *token_file == NULL) *token_file = cfg.serve.token_file;
    return 0;
}

int main(int argc, char **argv) {
    moe_heap_keep_large_buffers(); /* bench's requests and answers, as in moed */
    moectl_opts_t opts = {.control = "unix:/tmp/moed-control.sock", .data = "127.0.0.1:7600"};
    const char *control = NULL, *data = NULL, *rank = NULL, *token_file = NULL, *config = NULL;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        if (strcmp(argv[i], "--help") == 0) return usage(stdout), MOECTL_EXIT_OK;
        const char **slot = strcmp(argv[i], "--control") == 0      ? &control
                            : strcmp(argv[i], "--data") == 0       ? &data
                            : strcmp(argv[i], "--rank") == 0       ? &rank
                            : strcmp(argv[i], "--token-file") == 0 ? &token_file
                            : strcmp(argv[i], "--config") == 0     ? &config
                                                                   : NULL;
        if (slot == NULL || i + 1 >= argc) {
            fprintf(stderr, "moectl: %s %s\n", slot ? "missing value for" : "unknown option",
                    argv[i]);
            return usage(stderr);
        }
        *slot = argv[i + 1];
    }
    if (i >= argc) return usage(stderr);
    /* --config first so that explicit flags override the file */
    if (config && load_config(config, &opts, &token_file) != 0) return MOECTL_EXIT_USAGE;
    if (control) snprintf(opts.control, sizeof opts.control, "%s", control);
    if (data) snprintf(opts.data, sizeof opts.data, "%s", data);
    long rank_value = 0;
    if (rank && moectl_int(rank, "--rank", 0, 65535, &rank_value) != 0) return MOECTL_EXIT_USAGE;
    opts.rank = (int)rank_value;
    if (token_file) {
        char msg[512];
        if (moe_control_read_token(token_file, opts.token, sizeof opts.token, msg, sizeof msg) !=
            MOE_OK) {
            fprintf(stderr, "moectl: %s\n", msg);
            return MOECTL_EXIT_USAGE;
        }
    }
    const char *cmd = argv[i];
    int sub_argc = argc - i - 1;
    char **sub_argv = argv + i + 1;
    static const char *simple[] = {"health", "version", "config", "reload",
                                   "rebalance", "drain", "shutdown"};
    for (size_t k = 0; k < sizeof simple / sizeof *simple; k++)
        if (strcmp(cmd, simple[k]) == 0) return cmd_simple(&opts, cmd, sub_argc, sub_argv);
    if (strcmp(cmd, "stats") == 0) return cmd_stats(&opts, sub_argc, sub_argv);
    if (strcmp(cmd, "watch") == 0 || strcmp(cmd, "top") == 0)
        return cmd_watch(&opts, sub_argc, sub_argv);
    if (strcmp(cmd, "forward") == 0) return moectl_cmd_forward(&opts, sub_argc, sub_argv);
    if (strcmp(cmd, "bench") == 0) return moectl_cmd_bench(&opts, sub_argc, sub_argv);
    if (strcmp(cmd, "help") == 0) return usage(stdout), MOECTL_EXIT_OK;
    fprintf(stderr, "moectl: unknown command \"%s\"\n", cmd);
    return usage(stderr);
}
