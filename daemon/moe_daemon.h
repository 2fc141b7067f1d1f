/* moe_daemon: the state the daemon's modules share (DESIGN §2-3), and their
 * entry points. Two threads per rank meet here: the libuv I/O thread
 * (server.c, control.c, metrics.c) and the compute thread (scheduler.c).
 * They exchange work only through the two queues below: requests go in
 * through `inbound` (mutex + condvar), results and notices come back through
 * `outbound` and a uv_async_t. Nothing on the I/O thread blocks on MPI. */
#ifndef MOE_DAEMON_H
#define MOE_DAEMON_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "../config/moe_config.h"
#include "../kernels/moe_backend.h"
#include "../kernels/moe_ep.h"
#include "moe_stats.h"

#define MOED_VERSION "0.1.0"

typedef enum {
    MOE_EVENT_RESULT = 1,    /* request answered (RESULT or ERROR) */
    MOE_EVENT_CONFIG,        /* a reload was applied (or failed) at a step boundary */
    MOE_EVENT_STOP,          /* the step loop ended: flush and close everything */
} moe_event_kind_t;

typedef struct moe_event {
    struct moe_event *next;
    moe_event_kind_t kind;
    struct moe_request *request; /* RESULT */
    moe_config_t *config;    /* CONFIG: the applied config (owned by the event) */
    int epoch;
    long long step;
    bool ok;
    char message[512];
} moe_event_t;

/* One FORWARD, from admission on the I/O thread to its RESULT or ERROR. */
typedef struct moe_request {
    struct moe_request *next;
    void *conn;           /* the connection (owned by the I/O thread) */
    uint64_t request_id;  /* the client's, echoed */
    int layer;            /* model layer index */
    int n_tokens;
    uint8_t dtype;        /* the client's dtype, x's */
    uint8_t *x;           /* [n_tokens, H] in dtype: the frame's payload as it came (routed ids and
                             weights after it); the step loop writes the output over it, and it goes
                             back to the client as the RESULT's payload */
    int32_t *routed_ids;  /* [n_tokens, k] or NULL */
    float *routed_weights;
    double arrival;       /* moe_now() at admission */
    const atomic_bool *cancelled; /* set when its connection closed: skip the work */
    uint32_t status;      /* MOE_STATUS_* once answered */
    char error[200];      /* text of an ERROR answer */
    moe_event_t done;     /* its MOE_EVENT_RESULT, so answering allocates nothing */
} moe_request_t;

void moe_request_free(moe_request_t *request);


typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    moe_request_t *head, *tail;
    bool closed; /* the step loop takes no more: pushes fail (and are answered) */
} moe_request_queue_t;

typedef struct moe_daemon {
    /* set before the threads start, then read-only */
    moe_ep_t ep;
    char config_path[MOE_PATH_MAX];
    double started;

    /* the compute thread's config; the I/O thread keeps its own copy
     * (io_cfg), updated by MOE_EVENT_CONFIG */
    moe_config_t cfg;
    moe_config_t io_cfg;
    int epoch;          /* applied config epoch (compute thread) */
    moe_backend_t backend;

    moe_request_queue_t inbound;

    pthread_mutex_t outbound_lock;
    moe_event_t *outbound_head, *outbound_tail;
    uv_async_t outbound_async;

    /* rank 0: a validated config waiting for a step boundary */
    pthread_mutex_t reload_lock;
    moe_config_t *pending_config;
    int pending_epoch;

    atomic_llong queued_tokens;   /* admitted and not yet answered, this rank */
    atomic_int queued_requests;
    atomic_int draining;          /* stop admitting; finish queued work */
    atomic_int shutdown;          /* drain, then every rank exits */
    atomic_llong step;            /* steps finished */
    atomic_llong cluster_pending; /* tokens pending on all ranks at the last agreement */
    _Atomic double last_step_done; /* moe_now() of the last finished step */
    _Atomic double oldest_queued;  /* arrival of the oldest queued request, 0 if none */
    _Atomic double collective_since; /* >0 while inside a step or collective with peers (watchdog) */
    atomic_int stall_timeout_ms;     /* scheduler.stall_timeout_ms, readable by the watchdog */
    atomic_int rebalance_requested;  /* rank 0: 0 none, -1 every layer, else layer + 1 (control `rebalance`) */

    moe_stats_t stats;
    uv_loop_t loop;
    pthread_t io_thread;
    struct moe_server *server;
} moe_daemon_t;

/* Monotonic seconds. */
double moe_now(void);

/* queue.c */
void moe_queue_init(moe_request_queue_t *queue);
void moe_queue_destroy(moe_request_queue_t *queue);
/* Appends a request; false (nothing queued) once the queue is closed. */
bool moe_queue_push(moe_request_queue_t *queue, moe_request_t *request);
/* No more pushes: what is queued can still be taken. */
void moe_queue_close(moe_request_queue_t *queue);
/* Takes every queued request (a list), or waits up to timeout_us for one. */
moe_request_t *moe_queue_take_all(moe_request_queue_t *queue, long timeout_us);
/* Waits up to timeout_us for a request; true when one is queued. */
bool moe_queue_wait(moe_request_queue_t *queue, long timeout_us);
/* Hands an event to the I/O thread (any thread). */
void moe_daemon_post(moe_daemon_t *daemon, moe_event_t *event);

/* server.c: the I/O thread (data plane, and on rank 0 control and metrics). */
moe_err_t moe_server_start(moe_daemon_t *daemon, char *msg, size_t msg_size);
/* Waits for the I/O thread after MOE_EVENT_STOP (or, after a failed
 * start, just cleans up); closes every handle and frees the server. */
void moe_server_join(moe_daemon_t *daemon);
/* Asks the I/O thread to start draining (from a signal or a command). */
void moe_server_request_drain(moe_daemon_t *daemon, bool then_exit);
/* Tells the I/O thread to close everything and end (MOE_EVENT_STOP). */
void moe_server_stop(moe_daemon_t *daemon);

/* scheduler.c: the step loop on the compute thread; returns at shutdown. */
moe_err_t moe_scheduler_run(moe_daemon_t *daemon);

/* watchdog.c */
moe_err_t moe_watchdog_start(moe_daemon_t *daemon);
void moe_watchdog_stop(void);
/* sd_notify without libsystemd: "READY=1", "WATCHDOG=1", "STOPPING=1"... */
void moe_notify(const char *state);
bool moe_notify_watchdog_enabled(double *interval_s);

#endif
