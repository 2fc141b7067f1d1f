/* server_internal: the I/O thread's connection and server types, shared by
 * server.c (listeners, data plane, lifetime), control.c (the JSON control
 * channel) and metrics.c (Prometheus). Everything here runs on the libuv
 * thread only. */
#ifndef MOE_SERVER_INTERNAL_H
#define MOE_SERVER_INTERNAL_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <uv.h>

#include "../protocol/moe_frame.h"
#include "moe_daemon.h"

#define MOE_SERVER_CONTROL_MAX_LINE (64 * 1024)
#define MOE_SERVER_MAX_CONTROL_CONNS 64 /* control + metrics connections on rank 0 */
#define MOE_HTTP_MAX_REQUEST 8192

typedef enum { MOE_CONN_DATA, MOE_CONN_CONTROL, MOE_CONN_METRICS } moe_conn_kind_t;

typedef union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
} moe_stream_handle_t;

typedef struct moe_conn {
    moe_stream_handle_t h;      /* first: the close callback finds the conn from the handle */
    struct moe_server *server;
    struct moe_conn *prev, *next;
    moe_conn_kind_t kind;
    uint64_t id;
    bool closing;               /* uv_close called */
    atomic_bool gone;           /* the same, read by the compute thread to drop queued work */
    bool handle_closed;         /* close callback ran */
    bool close_after_write;     /* close once unsent_bytes reaches 0 */
    size_t unsent_bytes;
    /* data plane */
    moe_frame_parser_t parser;
    int in_flight;              /* requests with the compute thread */
    long long queued_tokens;    /* admitted and reserved (incl. a frame arriving) */
    long long receiving_tokens; /* reserved for the FORWARD still arriving */
    double partial_since;       /* a frame or control line started arriving at; 0 = none */
    double since;               /* accepted at */
    double write_progress;      /* the last write finished (or the queue became non-empty) at */
    /* control channel and metrics: the bytes of an unfinished line/request */
    char *text;
    size_t text_len, text_cap;
    int subscribe_ms;
    uv_timer_t subscribe_timer;
    bool timer_started;
} moe_conn_t;

typedef struct {
    uint64_t conn_id;
    cJSON *id;                  /* the command's id, echoed */
    int epoch;
} moe_pending_reload_t;

#define MOE_MAX_PENDING_RELOADS 16

typedef struct moe_server {
    moe_daemon_t *daemon;
    uv_loop_t *loop;
    moe_stream_handle_t data_listener, control_listener, metrics_listener;
    bool data_listening, control_listening, metrics_listening;
    uv_signal_t sighup, sigterm, sigint;
    uv_timer_t sweep_timer, stop_timer;
    moe_conn_t *conns;
    int n_data_conns;
    int n_other_conns;          /* control and metrics */
    uint64_t next_id;
    int sigint_count;
    bool stopping;
    bool started;               /* the I/O thread runs */
    int applied_epoch;          /* latest config epoch applied on every rank */
    int next_epoch;             /* the epoch the next reload will get */
    char token[256];            /* control token ("" = none) */
    char data_path[MOE_PATH_MAX], control_path[MOE_PATH_MAX]; /* unix sockets to unlink */
    moe_pending_reload_t reloads[MOE_MAX_PENDING_RELOADS];
    int n_reloads;
    char last_reload[512];
    bool last_reload_ok;
    int last_reload_epoch;
    long long last_reload_step;
    char read_buffer[65536];
} moe_server_t;

/* Writes bytes (takes ownership of `owned`, freed after the write) to a
 * connection; a connection whose unsent bytes exceed serve.max_output_bytes
 * is closed. */
void moe_conn_write(moe_conn_t *conn, const void *prefix, size_t prefix_len, void *owned, size_t owned_len);
/* Writes a cJSON value as one line and deletes it. */
void moe_conn_write_json(moe_conn_t *conn, cJSON *value);
void moe_conn_close(moe_conn_t *conn);
moe_conn_t *moe_server_find_conn(moe_server_t *server, uint64_t id);

/* server.c: the libuv callbacks server_start.c installs */
void moe_server_on_connection(uv_stream_t *listener, int status);
void moe_server_on_outbound(uv_async_t *async);
void moe_server_on_sweep(uv_timer_t *timer);
/* server_start.c: reads serve.token_file (a failed read keeps the old token) */
moe_err_t moe_server_read_token(moe_server_t *server, const char *path, char *msg, size_t msg_size);

/* control.c */
void moe_control_on_line(moe_conn_t *conn, char *line);
void moe_control_reload_done(moe_server_t *server, const moe_event_t *event);
/* Starts a reload from the given path ("" = the daemon's config file);
 * returns NULL when accepted (the caller is told later), else an error
 * object {code, message} (the caller owns it). */
cJSON *moe_control_start_reload(moe_server_t *server, const char *path, uint64_t conn_id, cJSON *id);
/* The `stats` result object (also pushed to subscribers). */
cJSON *moe_control_stats(moe_server_t *server, int layer);

/* metrics.c */
void moe_metrics_on_data(moe_conn_t *conn, const char *data, size_t len);

#endif
