/* daemon_harness: runs the real moed under `mpirun -np N` (or alone, as a
 * 1-rank job) for integration tests (DESIGN §11), and talks to it over its
 * real sockets with raw protocol/moe_frame.h frames and JSON control lines.
 *
 * Owns: the temp directory of one daemon (config, log, sockets, token file),
 * the mpirun process and everything it started (kept in a session of their
 * own so that cleanup can kill the whole tree), raw data-plane connections,
 * control connections, and a pipelining client thread that checks every
 * answer against the dense reference (dense_ref.h). Test-only; every export
 * is moe_test_*. Nothing here sleeps to synchronise: every wait polls a real
 * condition with a deadline. */
#ifndef MOE_TEST_DAEMON_HARNESS_H
#define MOE_TEST_DAEMON_HARNESS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <cjson/cJSON.h>

#include "../../config/moe_config.h"
#include "../../protocol/moe_frame.h"
#include "dense_ref.h"

/* The knobs of a test daemon's YAML; zero/NULL fields take the defaults
 * noted. The model is hidden 64, moe_intermediate 32, experts 8, top_k 2,
 * layers [0, 1, 2], synthetic weights. */
typedef struct {
    const char *routing;          /* model.routing.method; NULL = softmax_topk */
    int n_group, topk_group;      /* 0 = 1 */
    int shared_intermediate;      /* 0 = none */
    int request_timeout_ms;       /* 0 = 30000 */
    long long max_output_bytes;   /* 0 = default */
    int max_request_tokens;       /* 0 = default */
    long long max_queue_tokens;   /* 0 = default */
    int max_connections;          /* 0 = default */
    long long max_frame_bytes;    /* 0 = default */
    int stall_timeout_ms;         /* 0 = 30000 */
    int max_tokens_per_chunk;     /* 0 = default */
    int max_tokens_per_step;      /* 0 = default */
    int metrics_port;             /* 0 = metrics off */
    const char *token;            /* non-NULL: serve.token_file holds it */
    const char *log_level;        /* NULL = warn */
    uint64_t weights_seed;        /* 0 = 7 */
    const char *eplb_mode;        /* NULL = off */
    int num_slots;                /* eplb.num_slots (0 = experts) */
    int rebalance_every_steps;    /* 0 = default */
    int window_steps;             /* 0 = default */
    int fail_migration_rank;      /* 0 = none; r + 1: rank r's EPLB weight loads fail (test hook) */
} moe_test_daemon_opts_t;

typedef struct {
    char dir[256];
    char config_path[320], log_path[320], control_path[320], token_path[320];
    char data_path[2][320];
    char control_addr[340];
    int ranks;
    bool solo;     /* moed without mpirun: pid is rank 0 itself */
    pid_t pid;     /* mpirun (or moed alone), leader of its own session */
    bool running;  /* started and not yet reaped */
    int exit_status; /* after a stop: the wait status */
    moe_test_daemon_opts_t opts;
    moe_config_t cfg; /* the written YAML, loaded back with moe_config_load */
} moe_test_daemon_t;

/* The YAML text for opts with sockets under dir (malloc'd; caller frees). */
char *moe_test_daemon_yaml(const moe_test_daemon_opts_t *opts, const char *dir);

/* Creates a temp dir, writes the config (and token file), starts
 * `mpirun -np ranks moed --config F` (ranks == 1 with use_mpirun false:
 * moed alone), and waits up to 20 s until the control socket answers
 * health. Returns 0, or -1 with the reason and the log's tail in msg; on
 * failure everything started is already cleaned up. */
int moe_test_daemon_start(moe_test_daemon_t *d, const moe_test_daemon_opts_t *opts, int ranks,
                          bool use_mpirun, char *msg, size_t msg_size);

/* Sends `shutdown` and waits up to timeout_ms for the job to exit. Returns
 * 0 when it exited with status 0; else -1 with why in msg (the job is then
 * killed). Idempotent on a stopped daemon. */
int moe_test_daemon_stop(moe_test_daemon_t *d, int timeout_ms, char *msg, size_t msg_size);

/* Waits up to timeout_ms for the job to exit by itself (after a shutdown
 * sent elsewhere); 0 = exited 0, -1 otherwise (then killed), why in msg. */
int moe_test_daemon_wait_exit(moe_test_daemon_t *d, int timeout_ms, char *msg, size_t msg_size);

/* Kills the job's whole session (mpirun and every rank), reaps it, and
 * removes the temp dir. Safe to call twice, and on a zeroed struct. */
void moe_test_daemon_destroy(moe_test_daemon_t *d);

/* Every daemon started by this process and not yet destroyed is killed and
 * removed; for a Criterion .fini, so a failed assertion leaves no orphans. */
void moe_test_daemon_cleanup_all(void);

/* The last bytes of the daemon's log into buf (always NUL-terminated). */
const char *moe_test_daemon_log_tail(const moe_test_daemon_t *d, char *buf, size_t size);

/* The pid of rank `rank` (a child of mpirun whose environment has
 * OMPI_COMM_WORLD_RANK=rank; moed itself when solo), or -1. */
pid_t moe_test_daemon_rank_pid(const moe_test_daemon_t *d, int rank);

/* ---- control channel ---- */

typedef struct {
    int fd;
    char *buf;
    size_t have, cap;
} moe_test_ctl_t;

/* Connects to a unix socket path; fd or -1. */
int moe_test_unix_connect(const char *path);

/* Opens a control connection; 0 or -1. */
int moe_test_ctl_open(moe_test_ctl_t *c, const char *path);
void moe_test_ctl_close(moe_test_ctl_t *c);
/* Sends text plus "\n"; 0 or -1. */
int moe_test_ctl_send(moe_test_ctl_t *c, const char *line);
/* The next line parsed as JSON within timeout_ms; NULL on timeout, EOF or
 * a line that is not JSON (caller cJSON_Deletes). */
cJSON *moe_test_ctl_read(moe_test_ctl_t *c, int timeout_ms);
/* Sends a line and returns the next reply that is not a pushed event. */
cJSON *moe_test_ctl_call(moe_test_ctl_t *c, const char *line, int timeout_ms);
/* One request on a fresh connection to the daemon's control socket. */
cJSON *moe_test_control(const moe_test_daemon_t *d, const char *line);

/* Reply helpers: result object of an ok:true reply, or NULL; the error code
 * of an ok:false reply, or NULL. */
cJSON *moe_test_reply_result(const cJSON *reply);
const char *moe_test_reply_error_code(const cJSON *reply);
const char *moe_test_reply_error_message(const cJSON *reply);
/* A number at a dotted path ("requests.rejected_by_code.bad_shape") of a
 * JSON object, or fallback when absent. */
double moe_test_json_number(const cJSON *obj, const char *path, double fallback);

/* ---- data plane ---- */

typedef struct {
    int fd;
    moe_frame_parser_t parser;
    uint8_t buf[65536];
    size_t have, off;
    bool eof;
} moe_test_conn_t;

typedef struct {
    moe_frame_header_t h;
    uint8_t *payload; /* malloc'd or NULL */
} moe_test_frame_t;

/* Connects to rank `rank`'s data socket; 0 or -1. */
int moe_test_conn_open(moe_test_conn_t *c, const moe_test_daemon_t *d, int rank);
void moe_test_conn_close(moe_test_conn_t *c);
/* Writes all bytes (blocking); 0 or -1. */
int moe_test_send_all(int fd, const void *data, size_t len);
/* Sends one FORWARD: x [n_tokens, hidden] float32 converted to dtype, and
 * with ids != NULL the ROUTED ids and weights [n_tokens, top_k]. 0 or -1. */
int moe_test_send_forward(int fd, uint64_t request_id, uint32_t layer, const float *x, uint32_t n_tokens,
                          uint32_t hidden, uint8_t dtype, const int32_t *ids, const float *weights,
                          uint16_t top_k);
/* The next frame within timeout_ms: 1 = frame in *f (free with
 * moe_test_frame_free), 0 = timeout, -1 = EOF or error (c->eof set on EOF),
 * -2 = the server sent a malformed frame. */
int moe_test_conn_read(moe_test_conn_t *c, moe_test_frame_t *f, int timeout_ms);
void moe_test_frame_free(moe_test_frame_t *f);
/* Waits up to timeout_ms for the server to close the connection, dropping
 * frames that come before; true when it did. */
bool moe_test_conn_wait_eof(moe_test_conn_t *c, int timeout_ms);
/* The payload of an ERROR frame as a NUL-terminated string (static-size copy). */
const char *moe_test_frame_text(const moe_test_frame_t *f, char *buf, size_t size);

/* ---- checking client ---- */

/* A client thread: connects to `rank`, keeps `depth` FORWARDs in flight,
 * sends random requests (layers of cfg, 1..max_tokens tokens, random dtype
 * when random_dtype else f32), matches answers by id and checks each RESULT
 * against the reference. Runs n_requests, or until *stop when n_requests is
 * 0. ERROR answers with a status in `allowed` (bit per status) are counted,
 * any other is a failure. */
typedef struct {
    const moe_test_daemon_t *daemon;
    const moe_test_ref_t *ref;
    int rank;
    uint64_t seed;
    int depth;
    int n_requests;
    int max_tokens;
    bool random_dtype;
    uint32_t allowed;        /* 1u << status of acceptable ERRORs */
    atomic_int *stop;        /* may be NULL with n_requests > 0 */
    int answer_timeout_ms;   /* 0 = 30000 */
    /* results */
    int sent, results, errors;
    int by_status[16];
    double worst[4];         /* worst relative error by dtype */
    bool failed;
    char failure[1024];
} moe_test_client_t;

void *moe_test_client_thread(void *arg);

/* The tolerance of a result in dtype (relative to the reference's max). */
double moe_test_tolerance(uint8_t dtype);

/* Rounds values through dtype (as the daemon's edge conversion does). */
void moe_test_round_to_dtype(uint8_t dtype, float *x, size_t n);

/* A small deterministic generator for tests (splitmix64). */
uint64_t moe_test_rand(uint64_t *state);

/* When true, moe_test_random_routing sends half of its picks to the first
 * quarter of the experts (a hot set for EPLB tests). */
extern bool moe_test_skew;

/* Valid client-routing ids/weights for n_tokens from state: top_k distinct
 * ids in [0, experts), positive weights summing to 1. */
void moe_test_random_routing(uint64_t *state, int n_tokens, int experts, int top_k, int32_t *ids,
                             float *weights);

#endif
