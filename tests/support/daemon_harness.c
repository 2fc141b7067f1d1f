/* daemon_harness: see daemon_harness.h. The job runs in a session of its
 * own (setsid), because mpirun puts each rank in its own process group:
 * killing the session's members is the one way to reach the whole tree. */
#include "daemon_harness.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "st_writer.h"

#define HARNESS_MAX_DAEMONS 8

static moe_test_daemon_t *live_daemons[HARNESS_MAX_DAEMONS];
static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void pause_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int remaining_ms(double deadline) {
    double left = (deadline - now_s()) * 1e3;
    return left <= 0 ? 0 : (int)left + 1;
}

/* ------------------------------------------------------------------ config */

char *moe_test_daemon_yaml(const moe_test_daemon_opts_t *o, const char *dir) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (f == NULL) return NULL;
    fprintf(f,
            "model:\n"
            "  weights: {format: synthetic, seed: %llu}\n"
            "  layers: [0, 1, 2]\n"
            "  hidden: 64\n"
            "  moe_intermediate: 32\n"
            "  experts: 8\n"
            "  top_k: 2\n"
            "  shared_intermediate: %d\n"
            "  routing: {method: %s, n_group: %d, topk_group: %d}\n",
            (unsigned long long)(o->weights_seed ? o->weights_seed : 7), o->shared_intermediate,
            o->routing ? o->routing : "softmax_topk", o->n_group ? o->n_group : 1,
            o->topk_group ? o->topk_group : 1);
    if (o->max_tokens_per_chunk || o->max_tokens_per_step) {
        fprintf(f, "moe:\n");
        if (o->max_tokens_per_step) fprintf(f, "  max_tokens_per_step: %d\n", o->max_tokens_per_step);
        if (o->max_tokens_per_chunk) fprintf(f, "  chunking: {max_tokens_per_chunk: %d}\n", o->max_tokens_per_chunk);
    }
    if (o->eplb_mode) {
        fprintf(f, "eplb:\n  mode: %s\n", o->eplb_mode);
        if (o->num_slots) fprintf(f, "  num_slots: %d\n", o->num_slots);
        if (o->rebalance_every_steps) fprintf(f, "  rebalance_every_steps: %d\n", o->rebalance_every_steps);
        if (o->window_steps) fprintf(f, "  window_steps: %d\n", o->window_steps);
    }
    fprintf(f, "scheduler:\n  stall_timeout_ms: %d\n", o->stall_timeout_ms ? o->stall_timeout_ms : 30000);
    fprintf(f, "serve:\n  data: unix:%s/data-%%r.sock\n  control: unix:%s/control.sock\n", dir, dir);
    if (o->metrics_port) fprintf(f, "  metrics: 127.0.0.1:%d\n", o->metrics_port);
    if (o->token) fprintf(f, "  token_file: %s/token\n", dir);
    fprintf(f, "  request_timeout_ms: %d\n", o->request_timeout_ms ? o->request_timeout_ms : 30000);
    if (o->max_output_bytes) fprintf(f, "  max_output_bytes: %lld\n", o->max_output_bytes);
    if (o->max_request_tokens) fprintf(f, "  max_request_tokens: %d\n", o->max_request_tokens);
    if (o->max_queue_tokens) fprintf(f, "  max_queue_tokens: %lld\n", o->max_queue_tokens);
    if (o->max_connections) fprintf(f, "  max_connections: %d\n", o->max_connections);
    if (o->max_frame_bytes) fprintf(f, "  max_frame_bytes: %lld\n", o->max_frame_bytes);
    fprintf(f, "log:\n  level: %s\n", o->log_level ? o->log_level : "warn");
    fclose(f);
    return text;
}

/* ------------------------------------------------------------- processes */

/* Session id of a process from /proc/PID/stat, -1 if gone or a zombie. */
static pid_t session_of(pid_t pid, pid_t *parent) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *close_paren = strrchr(buf, ')');
    if (close_paren == NULL) return -1;
    char state;
    int ppid, pgrp, session;
    if (sscanf(close_paren + 1, " %c %d %d %d", &state, &ppid, &pgrp, &session) != 4) return -1;
    if (parent != NULL) *parent = ppid;
    return state == 'Z' ? -1 : session;
}

/* SIGKILL to every live member of the session; returns how many. */
static int kill_session(pid_t session) {
    DIR *proc = opendir("/proc");
    if (proc == NULL) return 0;
    int count = 0;
    struct dirent *ent;
    while ((ent = readdir(proc)) != NULL) {
        char *end;
        long pid = strtol(ent->d_name, &end, 10);
        if (*end != '\0' || pid <= 0) continue;
        if (session_of((pid_t)pid, NULL) == session) {
            kill((pid_t)pid, SIGKILL);
            count++;
        }
    }
    closedir(proc);
    return count;
}

static void reap(moe_test_daemon_t *d, int status) {
    d->running = false;
    d->exit_status = status;
}

/* Kills the job's session until nothing of it is left (bounded). */
static void kill_job(moe_test_daemon_t *d) {
    if (d->pid <= 0) return;
    double deadline = now_s() + 10;
    for (;;) {
        int status;
        if (d->running && waitpid(d->pid, &status, WNOHANG) == d->pid) reap(d, status);
        int alive = kill_session(d->pid);
        if (d->running) {
            kill(d->pid, SIGKILL);
            alive++;
        }
        if (alive == 0 || now_s() > deadline) break;
        pause_ms(20);
    }
}

static void register_daemon(moe_test_daemon_t *d, bool add) {
    pthread_mutex_lock(&live_lock);
    for (int i = 0; i < HARNESS_MAX_DAEMONS; i++) {
        if (add && live_daemons[i] == NULL) {
            live_daemons[i] = d;
            break;
        }
        if (!add && live_daemons[i] == d) live_daemons[i] = NULL;
    }
    pthread_mutex_unlock(&live_lock);
}

void moe_test_daemon_destroy(moe_test_daemon_t *d) {
    if (d == NULL) return;
    kill_job(d);
    d->pid = 0;
    if (d->dir[0] != '\0') {
        moe_test_rmdir(d->dir);
        d->dir[0] = '\0';
    }
    register_daemon(d, false);
}

void moe_test_daemon_cleanup_all(void) {
    for (int i = 0; i < HARNESS_MAX_DAEMONS; i++) {
        pthread_mutex_lock(&live_lock);
        moe_test_daemon_t *d = live_daemons[i];
        pthread_mutex_unlock(&live_lock);
        if (d != NULL) moe_test_daemon_destroy(d);
    }
}

const char *moe_test_daemon_log_tail(const moe_test_daemon_t *d, char *buf, size_t size) {
    buf[0] = '\0';
    FILE *f = fopen(d->log_path, "r");
    if (f == NULL) {
        snprintf(buf, size, "(no log at %s)", d->log_path);
        return buf;
    }
    fseek(f, 0, SEEK_END);
    long end = ftell(f);
    long start = end > (long)size - 1 ? end - ((long)size - 1) : 0;
    fseek(f, start, SEEK_SET);
    size_t n = fread(buf, 1, size - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

pid_t moe_test_daemon_rank_pid(const moe_test_daemon_t *d, int rank) {
    if (!d->running) return -1;
    if (d->solo) return rank == 0 ? d->pid : -1;
    DIR *proc = opendir("/proc");
    if (proc == NULL) return -1;
    pid_t found = -1;
    char want[64];
    snprintf(want, sizeof want, "OMPI_COMM_WORLD_RANK=%d", rank);
    struct dirent *ent;
    while (found < 0 && (ent = readdir(proc)) != NULL) {
        char *end;
        long pid = strtol(ent->d_name, &end, 10);
        if (*end != '\0' || pid <= 0) continue;
        pid_t parent = 0;
        if (session_of((pid_t)pid, &parent) != d->pid || (pid_t)pid == d->pid) continue;
        if (parent != d->pid) continue;
        char path[64];
        snprintf(path, sizeof path, "/proc/%ld/environ", pid);
        FILE *f = fopen(path, "r");
        if (f == NULL) continue;
        char entry[4096];
        size_t n = 0;
        int c;
        while ((c = fgetc(f)) != EOF) {
            if (c != '\0' && n + 1 < sizeof entry) {
                entry[n++] = (char)c;
                continue;
            }
            entry[n] = '\0';
            n = 0;
            if (strcmp(entry, want) == 0) {
                found = (pid_t)pid;
                break;
            }
        }
        fclose(f);
    }
    closedir(proc);
    return found;
}

static int write_text(const char *path, const char *text) {
    return moe_test_write_bytes(path, text, strlen(text));
}

int moe_test_daemon_start(moe_test_daemon_t *d, const moe_test_daemon_opts_t *opts, int ranks,
                          bool use_mpirun, char *msg, size_t msg_size) {
    memset(d, 0, sizeof *d);
    d->opts = *opts;
    d->ranks = ranks;
    d->solo = !use_mpirun;
    char tail[2048];
    if (moe_test_mkdtemp(d->dir, sizeof d->dir) != 0) {
        snprintf(msg, msg_size, "mkdtemp: %s", strerror(errno));
        return -1;
    }
    register_daemon(d, true);
    char dir[sizeof d->dir]; /* a copy: snprintf must not read what it writes into */
    memcpy(dir, d->dir, sizeof dir);
    snprintf(d->config_path, sizeof d->config_path, "%s/moed.yaml", dir);
    snprintf(d->log_path, sizeof d->log_path, "%s/moed.log", dir);
    snprintf(d->control_path, sizeof d->control_path, "%s/control.sock", dir);
    snprintf(d->control_addr, sizeof d->control_addr, "unix:%s/control.sock", dir);
    snprintf(d->token_path, sizeof d->token_path, "%s/token", dir);
    for (int r = 0; r < 2; r++) snprintf(d->data_path[r], sizeof d->data_path[r], "%s/data-%d.sock", dir, r);
    char *yaml = moe_test_daemon_yaml(opts, d->dir);
    if (yaml == NULL || write_text(d->config_path, yaml) != 0 ||
        (opts->token != NULL && write_text(d->token_path, opts->token) != 0)) {
        free(yaml);
        snprintf(msg, msg_size, "cannot write the config in %s", d->dir);
        moe_test_daemon_destroy(d);
        return -1;
    }
    free(yaml);
    moe_config_errors_t errs;
    if (moe_config_load(d->config_path, &d->cfg, &errs) != MOE_OK) {
        snprintf(msg, msg_size, "the test's own config does not load: %s", errs.count ? errs.messages[0] : "?");
        moe_test_daemon_destroy(d);
        return -1;
    }
    /* the daemon: build/tests/test_daemon -> build/bin/moed */
    char self[PATH_MAX] = "", moed[PATH_MAX + 32];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0) {
        snprintf(msg, msg_size, "cannot read /proc/self/exe");
        moe_test_daemon_destroy(d);
        return -1;
    }
    self[len] = '\0';
    snprintf(moed, sizeof moed, "%s/../bin/moed", dirname(self));
    if (access(moed, X_OK) != 0) {
        snprintf(msg, msg_size, "%s: not built (make build/bin/moed)", moed);
        moe_test_daemon_destroy(d);
        return -1;
    }
    char np[16];
    snprintf(np, sizeof np, "%d", ranks);
    char fail_rank[64] = "";
    if (d->opts.fail_migration_rank > 0)
        snprintf(fail_rank, sizeof fail_rank, "MOE_TEST_FAIL_MIGRATION_RANK=%d", d->opts.fail_migration_rank - 1);
    char *mpi_argv[20];
    int a = 0;
    char *fixed[] = {"mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", np,
                     "-x", "OMP_NUM_THREADS=1", "-x", "ASAN_OPTIONS=detect_leaks=0"};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) mpi_argv[a++] = fixed[i];
    if (fail_rank[0] != '\0') mpi_argv[a++] = "-x", mpi_argv[a++] = fail_rank;
    mpi_argv[a++] = moed, mpi_argv[a++] = "--config", mpi_argv[a++] = d->config_path, mpi_argv[a] = NULL;
    char *solo_argv[] = {moed, "--config", d->config_path, NULL};
    pid_t parent = getpid();
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(msg, msg_size, "fork: %s", strerror(errno));
        moe_test_daemon_destroy(d);
        return -1;
    }
    if (pid == 0) {
        setsid();
        /* if the test process dies (a Criterion timeout kills it), the job
         * goes too; mpirun's death takes its ranks down */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(127);
        int log = open(d->log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        int null = open("/dev/null", O_RDONLY);
        if (log < 0 || null < 0) _exit(127);
        dup2(null, 0);
        dup2(log, 1);
        dup2(log, 2);
        setenv("OMP_NUM_THREADS", "1", 1);
        setenv("ASAN_OPTIONS", "detect_leaks=0", 1);
        if (use_mpirun) execvp("mpirun", mpi_argv);
        else execv(moed, solo_argv);
        _exit(127);
    }
    d->pid = pid;
    d->running = true;
    /* ready = the control socket answers health */
    double deadline = now_s() + 20;
    while (now_s() < deadline) {
        int status;
        if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
            reap(d, status);
            snprintf(msg, msg_size, "the daemon exited during startup (status 0x%x); log:\n%s", status,
                     moe_test_daemon_log_tail(d, tail, sizeof tail));
            moe_test_daemon_destroy(d);
            return -1;
        }
        if (access(d->control_path, F_OK) == 0) {
            cJSON *reply = moe_test_control(d, "{\"id\":0,\"cmd\":\"health\"}");
            bool ok = moe_test_reply_result(reply) != NULL;
            cJSON_Delete(reply);
            /* every rank's data socket exists too before the first client */
            for (int r = 0; ok && r < ranks; r++) ok = access(d->data_path[r], F_OK) == 0;
            if (ok) return 0;
        }
        pause_ms(50); /* polling for readiness: nothing to wait on */
    }
    snprintf(msg, msg_size, "the daemon did not answer health within 20 s; log:\n%s",
             moe_test_daemon_log_tail(d, tail, sizeof tail));
    moe_test_daemon_destroy(d);
    return -1;
}

int moe_test_daemon_wait_exit(moe_test_daemon_t *d, int timeout_ms, char *msg, size_t msg_size) {
    char tail[2048];
    double deadline = now_s() + timeout_ms / 1e3;
    while (d->running) {
        int status;
        pid_t got = waitpid(d->pid, &status, WNOHANG);
        if (got == d->pid) {
            reap(d, status);
            break;
        }
        if (now_s() > deadline) {
            snprintf(msg, msg_size, "the job did not exit within %d ms; killed it; log:\n%s", timeout_ms,
                     moe_test_daemon_log_tail(d, tail, sizeof tail));
            kill_job(d);
            return -1;
        }
        pause_ms(20);
    }
    /* whatever is left of the session (a rank that outlived mpirun) is a bug */
    int stray = kill_session(d->pid);
    if (!WIFEXITED(d->exit_status) || WEXITSTATUS(d->exit_status) != 0 || stray > 0) {
        snprintf(msg, msg_size, "the job exited with status 0x%x (%d stray processes); log:\n%s", d->exit_status,
                 stray, moe_test_daemon_log_tail(d, tail, sizeof tail));
        kill_job(d);
        return -1;
    }
    return 0;
}

int moe_test_daemon_stop(moe_test_daemon_t *d, int timeout_ms, char *msg, size_t msg_size) {
    if (!d->running) return WIFEXITED(d->exit_status) && WEXITSTATUS(d->exit_status) == 0 ? 0 : -1;
    char line[256];
    if (d->opts.token)
        snprintf(line, sizeof line, "{\"id\":99,\"cmd\":\"shutdown\",\"token\":\"%s\"}", d->opts.token);
    else
        snprintf(line, sizeof line, "{\"id\":99,\"cmd\":\"shutdown\"}");
    cJSON *reply = moe_test_control(d, line);
    bool ok = moe_test_reply_result(reply) != NULL;
    cJSON_Delete(reply);
    if (!ok && d->running) {
        /* maybe already shutting down (the socket is gone): just wait */
    }
    return moe_test_daemon_wait_exit(d, timeout_ms, msg, msg_size);
}

/* --------------------------------------------------------------- control */

int moe_test_unix_connect(const char *path) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path) return -1;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int moe_test_send_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int moe_test_ctl_open(moe_test_ctl_t *c, const char *path) {
    memset(c, 0, sizeof *c);
    c->fd = moe_test_unix_connect(path);
    return c->fd >= 0 ? 0 : -1;
}

void moe_test_ctl_close(moe_test_ctl_t *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    free(c->buf);
    c->buf = NULL;
    c->have = c->cap = 0;
}

int moe_test_ctl_send(moe_test_ctl_t *c, const char *line) {
    if (moe_test_send_all(c->fd, line, strlen(line)) != 0) return -1;
    return moe_test_send_all(c->fd, "\n", 1);
}

cJSON *moe_test_ctl_read(moe_test_ctl_t *c, int timeout_ms) {
    double deadline = now_s() + timeout_ms / 1e3;
    for (;;) {
        char *nl = c->have > 0 ? memchr(c->buf, '\n', c->have) : NULL;
        if (nl != NULL) {
            size_t len = (size_t)(nl - c->buf);
            cJSON *json = cJSON_ParseWithLength(c->buf, len);
            memmove(c->buf, nl + 1, c->have - len - 1);
            c->have -= len + 1;
            return json;
        }
        if (c->have + 4096 > c->cap) {
            size_t cap = c->cap ? c->cap * 2 : 65536;
            char *buf = realloc(c->buf, cap);
            if (buf == NULL) return NULL;
            c->buf = buf;
            c->cap = cap;
        }
        struct pollfd p = {c->fd, POLLIN, 0};
        int rc = poll(&p, 1, remaining_ms(deadline));
        if (rc < 0 && errno == EINTR) continue;
        if (rc <= 0) return NULL;
        ssize_t n = recv(c->fd, c->buf + c->have, c->cap - c->have, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return NULL;
        c->have += (size_t)n;
    }
}

cJSON *moe_test_ctl_call(moe_test_ctl_t *c, const char *line, int timeout_ms) {
    if (moe_test_ctl_send(c, line) != 0) return NULL;
    double deadline = now_s() + timeout_ms / 1e3;
    for (;;) {
        cJSON *reply = moe_test_ctl_read(c, remaining_ms(deadline));
        if (reply == NULL || cJSON_GetObjectItem(reply, "event") == NULL) return reply;
        cJSON_Delete(reply);
    }
}

cJSON *moe_test_control(const moe_test_daemon_t *d, const char *line) {
    moe_test_ctl_t c;
    if (moe_test_ctl_open(&c, d->control_path) != 0) return NULL;
    cJSON *reply = moe_test_ctl_call(&c, line, 20000);
    moe_test_ctl_close(&c);
    return reply;
}

cJSON *moe_test_reply_result(const cJSON *reply) {
    if (reply == NULL || !cJSON_IsTrue(cJSON_GetObjectItem(reply, "ok"))) return NULL;
    return cJSON_GetObjectItem(reply, "result");
}

const char *moe_test_reply_error_code(const cJSON *reply) {
    if (reply == NULL || !cJSON_IsFalse(cJSON_GetObjectItem(reply, "ok"))) return NULL;
    const cJSON *code = cJSON_GetObjectItem(cJSON_GetObjectItem(reply, "error"), "code");
    return cJSON_IsString(code) ? code->valuestring : NULL;
}

const char *moe_test_reply_error_message(const cJSON *reply) {
    const cJSON *message = cJSON_GetObjectItem(cJSON_GetObjectItem(reply, "error"), "message");
    return cJSON_IsString(message) ? message->valuestring : "";
}

double moe_test_json_number(const cJSON *obj, const char *path, double fallback) {
    char key[128];
    const char *p = path;
    while (obj != NULL && *p != '\0') {
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        if (n >= sizeof key) return fallback;
        memcpy(key, p, n);
        key[n] = '\0';
        obj = cJSON_GetObjectItem(obj, key);
        p += n + (dot ? 1 : 0);
    }
    return cJSON_IsNumber(obj) ? obj->valuedouble : fallback;
}

/* ------------------------------------------------------------ data plane */

int moe_test_conn_open(moe_test_conn_t *c, const moe_test_daemon_t *d, int rank) {
    memset(c, 0, sizeof *c);
    moe_frame_parser_init(&c->parser, 1ull << 30);
    c->fd = moe_test_unix_connect(d->data_path[rank]);
    return c->fd >= 0 ? 0 : -1;
}

void moe_test_conn_close(moe_test_conn_t *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    moe_frame_parser_reset(&c->parser);
}

int moe_test_send_forward(int fd, uint64_t request_id, uint32_t layer, const float *x, uint32_t n_tokens,
                          uint32_t hidden, uint8_t dtype, const int32_t *ids, const float *weights,
                          uint16_t top_k) {
    size_t values = (size_t)n_tokens * hidden, value_bytes = values * moe_dtype_size(dtype);
    size_t routed_bytes = ids != NULL ? (size_t)n_tokens * top_k * 8 : 0;
    moe_frame_header_t h = {MOE_FRAME_VERSION, MOE_FRAME_FORWARD, request_id, layer, n_tokens, hidden, dtype,
                            ids != NULL ? MOE_FRAME_FLAG_ROUTED : 0, ids != NULL ? top_k : 0, 0,
                            value_bytes + routed_bytes};
    uint8_t *frame = malloc(MOE_FRAME_HEADER_SIZE + value_bytes + routed_bytes);
    if (frame == NULL) return -1;
    moe_frame_encode_header(&h, frame);
    moe_dtype_from_f32(dtype, x, frame + MOE_FRAME_HEADER_SIZE, values);
    if (ids != NULL) {
        memcpy(frame + MOE_FRAME_HEADER_SIZE + value_bytes, ids, (size_t)n_tokens * top_k * 4);
        memcpy(frame + MOE_FRAME_HEADER_SIZE + value_bytes + (size_t)n_tokens * top_k * 4, weights,
               (size_t)n_tokens * top_k * 4);
    }
    int rc = moe_test_send_all(fd, frame, MOE_FRAME_HEADER_SIZE + value_bytes + routed_bytes);
    free(frame);
    return rc;
}

int moe_test_conn_read(moe_test_conn_t *c, moe_test_frame_t *f, int timeout_ms) {
    memset(f, 0, sizeof *f);
    double deadline = now_s() + timeout_ms / 1e3;
    for (;;) {
        if (c->off < c->have) {
            size_t consumed = 0;
            moe_parse_result_t r = moe_frame_parse(&c->parser, c->buf + c->off, c->have - c->off, &consumed,
                                                   &f->h, &f->payload);
            c->off += consumed;
            if (r == MOE_PARSE_FRAME) return 1;
            if (r == MOE_PARSE_ERROR) return -2;
            continue;
        }
        if (c->eof) return -1;
        c->off = c->have = 0;
        struct pollfd p = {c->fd, POLLIN, 0};
        int rc = poll(&p, 1, remaining_ms(deadline));
        if (rc < 0 && errno == EINTR) continue;
        if (rc < 0) return -1;
        if (rc == 0) return 0;
        ssize_t n = recv(c->fd, c->buf, sizeof c->buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            /* EOF, or ECONNRESET: the server closed with our bytes unread */
            c->eof = n == 0 || errno == ECONNRESET || errno == EPIPE;
            return -1;
        }
        c->have = (size_t)n;
    }
}

void moe_test_frame_free(moe_test_frame_t *f) {
    free(f->payload);
    f->payload = NULL;
}

bool moe_test_conn_wait_eof(moe_test_conn_t *c, int timeout_ms) {
    double deadline = now_s() + timeout_ms / 1e3;
    for (;;) {
        moe_test_frame_t f;
        int rc = moe_test_conn_read(c, &f, remaining_ms(deadline));
        if (rc == 1) {
            moe_test_frame_free(&f);
            continue;
        }
        if (rc == -1) return c->eof;
        if (rc == 0) return false;
        /* a malformed frame: drop the parser's state, keep reading bytes */
        moe_frame_parser_reset(&c->parser);
        moe_frame_parser_init(&c->parser, 1ull << 30);
        c->off = c->have;
    }
}

const char *moe_test_frame_text(const moe_test_frame_t *f, char *buf, size_t size) {
    size_t n = f->h.payload_len < size - 1 ? (size_t)f->h.payload_len : size - 1;
    if (f->payload != NULL) memcpy(buf, f->payload, n);
    else n = 0;
    buf[n] = '\0';
    return buf;
}

/* --------------------------------------------------------- random inputs */

uint64_t moe_test_rand(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

bool moe_test_skew;

void moe_test_random_routing(uint64_t *state, int n_tokens, int experts, int top_k, int32_t *ids,
                             float *weights) {
    for (int t = 0; t < n_tokens; t++) {
        float sum = 0;
        for (int i = 0; i < top_k; i++) {
            int32_t id;
            bool repeated;
            do {
                /* skewed: half the picks go to the first quarter of the experts */
                uint64_t r = moe_test_rand(state);
                id = (int32_t)(moe_test_skew && (r & 1) ? (r >> 1) % (uint64_t)(experts / 4 > 0 ? experts / 4 : 1)
                                                        : (r >> 1) % (uint64_t)experts);
                repeated = false;
                for (int j = 0; j < i; j++) repeated |= ids[t * top_k + j] == id;
            } while (repeated);
            ids[t * top_k + i] = id;
            weights[t * top_k + i] = 0.1f + (float)(moe_test_rand(state) % 1000) / 1000.0f;
            sum += weights[t * top_k + i];
        }
        for (int i = 0; i < top_k; i++) weights[t * top_k + i] /= sum;
    }
}

void moe_test_round_to_dtype(uint8_t dtype, float *x, size_t n) {
    if (dtype == MOE_DTYPE_F32) return;
    uint16_t *tmp = malloc(n * sizeof *tmp);
    if (tmp == NULL) return;
    moe_dtype_from_f32(dtype, x, tmp, n);
    moe_dtype_to_f32(dtype, tmp, x, n);
    free(tmp);
}

double moe_test_tolerance(uint8_t dtype) {
    switch (dtype) {
    case MOE_DTYPE_BF16: return 2e-2;
    case MOE_DTYPE_F16: return 2e-3;
    default: return 1e-5;
    }
}

/* ------------------------------------------------------- checking client */

typedef struct {
    bool used;
    uint64_t id;
    int layer, n_tokens;
    uint8_t dtype;
    float *x;
    int32_t *ids;
    float *weights;
} in_flight_t;

static void slot_free(in_flight_t *s) {
    free(s->x);
    free(s->ids);
    free(s->weights);
    memset(s, 0, sizeof *s);
}

static void client_fail(moe_test_client_t *cl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void client_fail(moe_test_client_t *cl, const char *fmt, ...) {
    if (cl->failed) return;
    cl->failed = true;
    int n = snprintf(cl->failure, sizeof cl->failure, "client rank %d seed %llu: ", cl->rank,
                     (unsigned long long)cl->seed);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cl->failure + n, sizeof cl->failure - (size_t)n, fmt, ap);
    va_end(ap);
}

/* Checks one RESULT against the reference; false (with a failure) if wrong. */
static bool check_result(moe_test_client_t *cl, const in_flight_t *s, const moe_test_frame_t *f) {
    const moe_config_t *cfg = &cl->daemon->cfg;
    const int H = cfg->model.hidden;
    const moe_frame_header_t *h = &f->h;
    if (h->layer != (uint32_t)s->layer || h->n_tokens != (uint32_t)s->n_tokens || h->hidden != (uint32_t)H ||
        h->dtype != s->dtype) {
        client_fail(cl, "request %llu: RESULT header layer %u n %u hidden %u dtype %u, sent layer %d n %d dtype %u",
                    (unsigned long long)s->id, h->layer, h->n_tokens, h->hidden, h->dtype, s->layer, s->n_tokens,
                    s->dtype);
        return false;
    }
    size_t values = (size_t)s->n_tokens * H;
    float *got = malloc(sizeof(float) * values);
    double *want = malloc(sizeof(double) * values);
    bool ok = got != NULL && want != NULL;
    if (ok) {
        moe_dtype_to_f32(s->dtype, f->payload, got, values);
        for (size_t i = 0; ok && i < values; i++)
            if (!isfinite(got[i])) {
                client_fail(cl, "request %llu: value %zu is not finite", (unsigned long long)s->id, i);
                ok = false;
            }
    }
    if (ok && cl->ref != NULL) {
        moe_route_method_t method = cfg->model.routing.method;
        if (method == MOE_ROUTE_UNIFORM || method == MOE_ROUTE_ZIPF) goto done; /* random per step */
        if (moe_test_ref_forward(cl->ref, s->layer, s->x, s->n_tokens, cl->rank, cl->daemon->ranks, s->ids,
                                 s->weights, want, NULL) != 0) {
            client_fail(cl, "reference failed for layer %d", s->layer);
            ok = false;
            goto done;
        }
        double err = moe_test_rel_error(got, want, values);
        int slot = s->dtype < 4 ? s->dtype : 0;
        if (err > cl->worst[slot]) cl->worst[slot] = err;
        if (!(err <= moe_test_tolerance(s->dtype))) {
            client_fail(cl, "request %llu layer %d, %d tokens, dtype %u: relative error %g > %g",
                        (unsigned long long)s->id, s->layer, s->n_tokens, s->dtype, err,
                        moe_test_tolerance(s->dtype));
            ok = false;
        }
    }
done:
    free(got);
    free(want);
    return ok;
}

void *moe_test_client_thread(void *arg) {
    moe_test_client_t *cl = arg;
    const moe_config_t *cfg = &cl->daemon->cfg;
    const int H = cfg->model.hidden, k = cfg->model.top_k;
    const bool routed = cfg->model.routing.method == MOE_ROUTE_CLIENT;
    const int depth = cl->depth > 0 ? cl->depth : 1, max_tokens = cl->max_tokens > 0 ? cl->max_tokens : 16;
    const int answer_ms = cl->answer_timeout_ms > 0 ? cl->answer_timeout_ms : 30000;
    uint64_t state = cl->seed;
    in_flight_t *slots = calloc((size_t)depth, sizeof *slots);
    moe_test_conn_t *conn = malloc(sizeof *conn);
    if (slots == NULL || conn == NULL) {
        client_fail(cl, "out of memory");
        free(slots);
        free(conn);
        return NULL;
    }
    if (moe_test_conn_open(conn, cl->daemon, cl->rank) != 0) {
        client_fail(cl, "cannot connect to %s: %s", cl->daemon->data_path[cl->rank], strerror(errno));
        free(slots);
        free(conn);
        return NULL;
    }
    int in_flight = 0;
    uint64_t next_id = ((uint64_t)(cl->rank + 1) << 40) + 1;
    for (;;) {
        bool stopping = cl->n_requests > 0 ? cl->sent >= cl->n_requests
                                           : (cl->stop == NULL || atomic_load(cl->stop) != 0);
        /* fill the pipeline */
        while (!stopping && !cl->failed && in_flight < depth) {
            in_flight_t *s = NULL;
            for (int i = 0; i < depth && s == NULL; i++)
                if (!slots[i].used) s = &slots[i];
            s->used = true;
            s->id = next_id++;
            s->layer = cfg->model.layer_ids[moe_test_rand(&state) % (uint64_t)cfg->model.n_layers];
            s->n_tokens = 1 + (int)(moe_test_rand(&state) % (uint64_t)max_tokens);
            s->dtype = cl->random_dtype ? (uint8_t)(1 + moe_test_rand(&state) % 3) : MOE_DTYPE_F32;
            size_t values = (size_t)s->n_tokens * H;
            s->x = malloc(sizeof(float) * values);
            if (routed) {
                s->ids = malloc(sizeof(int32_t) * (size_t)s->n_tokens * k);
                s->weights = malloc(sizeof(float) * (size_t)s->n_tokens * k);
            }
            if (s->x == NULL || (routed && (s->ids == NULL || s->weights == NULL))) {
                client_fail(cl, "out of memory");
                break;
            }
            moe_test_fill_random(s->x, values, moe_test_rand(&state));
            moe_test_round_to_dtype(s->dtype, s->x, values);
            if (routed) moe_test_random_routing(&state, s->n_tokens, cfg->model.experts, k, s->ids, s->weights);
            if (moe_test_send_forward(conn->fd, s->id, (uint32_t)s->layer, s->x, (uint32_t)s->n_tokens,
                                      (uint32_t)H, s->dtype, s->ids, s->weights, (uint16_t)k) != 0) {
                client_fail(cl, "send of request %llu failed: %s", (unsigned long long)s->id, strerror(errno));
                break;
            }
            cl->sent++;
            in_flight++;
            stopping = cl->n_requests > 0 ? cl->sent >= cl->n_requests
                                          : (cl->stop == NULL || atomic_load(cl->stop) != 0);
        }
        if (cl->failed || in_flight == 0) break;
        /* one answer */
        moe_test_frame_t f;
        int rc = moe_test_conn_read(conn, &f, answer_ms);
        if (rc != 1) {
            client_fail(cl, "%d requests unanswered: %s after %d sent, %d answered", in_flight,
                        rc == 0 ? "no answer within the timeout" : rc == -1 ? "connection closed" : "malformed frame",
                        cl->sent, cl->results + cl->errors);
            break;
        }
        in_flight_t *s = NULL;
        for (int i = 0; i < depth && s == NULL; i++)
            if (slots[i].used && slots[i].id == f.h.request_id) s = &slots[i];
        if (s == NULL) {
            client_fail(cl, "a frame (type %u status %u) for request %llu, which is not in flight (duplicate?)",
                        f.h.type, f.h.status, (unsigned long long)f.h.request_id);
            moe_test_frame_free(&f);
            break;
        }
        if (f.h.type == MOE_FRAME_RESULT) {
            cl->results++;
            check_result(cl, s, &f);
        } else if (f.h.type == MOE_FRAME_ERROR) {
            char text[256];
            cl->errors++;
            if (f.h.status < 16) cl->by_status[f.h.status]++;
            if (f.h.status >= 32 || !(cl->allowed & (1u << f.h.status)))
                client_fail(cl, "request %llu (layer %d, %d tokens): ERROR %s: %s", (unsigned long long)s->id,
                            s->layer, s->n_tokens, moe_status_name(f.h.status), moe_test_frame_text(&f, text, sizeof text));
        } else {
            client_fail(cl, "unexpected frame type %u", f.h.type);
        }
        moe_test_frame_free(&f);
        slot_free(s);
        in_flight--;
    }
    for (int i = 0; i < depth; i++) slot_free(&slots[i]);
    free(slots);
    moe_test_conn_close(conn);
    free(conn);
    return NULL;
}
