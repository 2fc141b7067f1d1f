/* server: the I/O thread's connections and the data plane (DESIGN §2, §8,
 * §10); server_start.c starts and ends the thread, its listeners and signals. Frames are parsed incrementally; every FORWARD is
 * checked against the config and the limits before anything is queued, and
 * every rejection is an ERROR frame, a counter and (at debug) a log line.
 * A connection is freed only when its handle is closed AND none of its
 * requests is still with the compute thread. */
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../config/moe_log.h"
#include "moe_mpi_boot.h"
#include "server_internal.h"

typedef struct {
    uv_write_t req;
    moe_conn_t *conn;
    size_t bytes;
    uint8_t prefix[MOE_FRAME_HEADER_SIZE];
    void *owned;
} write_req_t;

static void reserve_tokens(moe_conn_t *conn, long long n_tokens);


static void conn_maybe_free(moe_conn_t *conn) {
    if (!conn->handle_closed || conn->in_flight > 0 || conn->timer_started) return;
    moe_frame_parser_reset(&conn->parser);
    free(conn->text);
    free(conn);
}

static void on_subscribe_timer_closed(uv_handle_t *handle) {
    moe_conn_t *conn = handle->data;
    conn->timer_started = false;
    conn_maybe_free(conn);
}

static void on_conn_closed(uv_handle_t *handle) {
    moe_conn_t *conn = (moe_conn_t *)handle;
    moe_server_t *server = conn->server;
    if (conn->prev != NULL) conn->prev->next = conn->next;
    else server->conns = conn->next;
    if (conn->next != NULL) conn->next->prev = conn->prev;
    if (conn->kind == MOE_CONN_DATA) server->n_data_conns--;
    else server->n_other_conns--;
    conn->handle_closed = true;
    if (conn->timer_started) {
        uv_close((uv_handle_t *)&conn->subscribe_timer, on_subscribe_timer_closed);
        return;
    }
    conn_maybe_free(conn);
}

void moe_conn_close(moe_conn_t *conn) {
    if (conn->closing) return;
    conn->closing = true;
    atomic_store(&conn->gone, true);
    if (conn->receiving_tokens > 0) { /* a FORWARD that will never finish arriving */
        reserve_tokens(conn, -conn->receiving_tokens);
        conn->receiving_tokens = 0;
    }
    if (conn->timer_started) uv_timer_stop(&conn->subscribe_timer);
    uv_close(&conn->h.handle, on_conn_closed);
}

moe_conn_t *moe_server_find_conn(moe_server_t *server, uint64_t id) {
    for (moe_conn_t *c = server->conns; c != NULL; c = c->next)
        if (c->id == id && !c->closing) return c;
    return NULL;
}

/* A client that does not read is disconnected, not buffered without bound:
 * over serve.max_output_bytes of unsent results AND no write finished for a
 * second. (A reading client may briefly hold more when one step answers
 * many of its requests at once; its writes keep completing.) */
static void check_output(moe_conn_t *conn, double now) {
    if (conn->closing || (long long)conn->unsent_bytes <= conn->server->daemon->io_cfg.serve.max_output_bytes ||
        now - conn->write_progress < 1.0)
        return;
    moe_log(MOE_LOG_WARN, "server",
            "connection %llu: %zu unsent bytes exceed serve.max_output_bytes and none were read for %.1f s; "
            "the client does not read, disconnecting it",
            (unsigned long long)conn->id, conn->unsent_bytes, now - conn->write_progress);
    moe_conn_close(conn);
}

static void on_write(uv_write_t *req, int status) {
    write_req_t *w = (write_req_t *)req;
    moe_conn_t *conn = w->conn;
    conn->unsent_bytes -= w->bytes;
    conn->write_progress = moe_now();
    free(w->owned);
    free(w);
    if (status < 0 && !conn->closing) {
        moe_log(MOE_LOG_DEBUG, "server", "connection %llu: write failed: %s",
                (unsigned long long)conn->id, uv_strerror(status));
        moe_conn_close(conn);
    } else if (conn->close_after_write && conn->unsent_bytes == 0) {
        moe_conn_close(conn);
    }
}

void moe_conn_write(moe_conn_t *conn, const void *prefix, size_t prefix_len, void *owned, size_t owned_len) {
    if (conn->closing) {
        free(owned);
        return;
    }
    write_req_t *w = calloc(1, sizeof *w);
    if (w == NULL || prefix_len > sizeof w->prefix) {
        free(w);
        free(owned);
        moe_conn_close(conn);
        return;
    }
    if (prefix_len > 0) memcpy(w->prefix, prefix, prefix_len);
    w->conn = conn;
    w->owned = owned;
    w->bytes = prefix_len + owned_len;
    uv_buf_t bufs[2] = {uv_buf_init((char *)w->prefix, (unsigned)prefix_len),
                        uv_buf_init(owned, (unsigned)owned_len)};
    int rc = uv_write(&w->req, &conn->h.stream, prefix_len > 0 ? bufs : bufs + 1,
                      prefix_len > 0 ? 2 : 1, on_write);
    if (rc < 0) {
        free(owned);
        free(w);
        moe_conn_close(conn);
        return;
    }
    if (conn->unsent_bytes == 0) conn->write_progress = moe_now();
    conn->unsent_bytes += w->bytes;
    check_output(conn, moe_now());
}

void moe_conn_write_json(moe_conn_t *conn, cJSON *value) {
    char *text = cJSON_PrintUnformatted(value);
    cJSON_Delete(value);
    if (text == NULL) return;
    size_t len = strlen(text);
    text[len] = '\0';
    char *line = realloc(text, len + 2);
    if (line == NULL) {
        free(text);
        return;
    }
    line[len] = '\n';
    moe_conn_write(conn, NULL, 0, line, len + 1);
}

/* An ERROR frame for a request (or the connection, with request_id 0). */
static void send_error(moe_conn_t *conn, uint64_t request_id, uint32_t layer, uint32_t status,
                       const char *text) {
    moe_frame_header_t h = {MOE_FRAME_VERSION, MOE_FRAME_ERROR, request_id, layer, 0, 0, 0, 0, 0, status, 0};
    size_t len = strlen(text);
    char *copy = malloc(len + 1);
    if (copy == NULL) return;
    memcpy(copy, text, len + 1);
    h.payload_len = len;
    uint8_t header[MOE_FRAME_HEADER_SIZE];
    moe_frame_encode_header(&h, header);
    moe_conn_write(conn, header, sizeof header, copy, len);
    moe_stats_rejected(&conn->server->daemon->stats, status);
    moe_log(MOE_LOG_DEBUG, "server", "connection %llu request %llu: %s: %s", (unsigned long long)conn->id,
            (unsigned long long)request_id, moe_status_name(status), text);
}

static bool layer_served(const moe_config_t *cfg, uint32_t layer) {
    for (int i = 0; i < cfg->model.n_layers; i++)
        if ((uint32_t)cfg->model.layer_ids[i] == layer) return true;
    return false;
}

/* Reserves (or gives back) a FORWARD's tokens in the connection's and the
 * rank's queue accounting: reserved when the header is accepted, before a
 * byte of payload is stored, so the queue caps also bound the memory held
 * by frames still arriving. */
static void reserve_tokens(moe_conn_t *conn, long long n_tokens) {
    conn->queued_tokens += n_tokens;
    atomic_fetch_add(&conn->server->daemon->queued_tokens, n_tokens);
}

/* Admission of a FORWARD from its header alone (the parser's accept hook):
 * 0 = receive the payload (its tokens are then reserved), else the status
 * to answer, with the payload skipped unread. */
static uint32_t accept_forward(void *ctx, const moe_frame_header_t *h, char *msg, size_t msg_size) {
    moe_conn_t *conn = ctx;
    moe_daemon_t *daemon = conn->server->daemon;
    const moe_config_t *cfg = &daemon->io_cfg;
    const moe_model_config_t *m = &cfg->model;
    if (atomic_load(&daemon->draining)) {
        snprintf(msg, msg_size, "the daemon is draining; no new requests");
        return MOE_STATUS_SHUTTING_DOWN;
    }
    if (!layer_served(cfg, h->layer)) {
        snprintf(msg, msg_size, "layer %u is not served (%d layers from %d)", h->layer, m->n_layers, m->layer_ids[0]);
        return MOE_STATUS_BAD_LAYER;
    }
    if (moe_dtype_size(h->dtype) == 0) {
        snprintf(msg, msg_size, "dtype %u unknown (1 f32, 2 bf16, 3 f16)", h->dtype);
        return MOE_STATUS_BAD_DTYPE;
    }
    if (h->hidden != (uint32_t)m->hidden || h->n_tokens == 0) {
        snprintf(msg, msg_size, "shape [%u, %u]: need n_tokens >= 1 and hidden = %d", h->n_tokens, h->hidden, m->hidden);
        return MOE_STATUS_BAD_SHAPE;
    }
    if (h->n_tokens > (uint32_t)cfg->serve.max_request_tokens) {
        snprintf(msg, msg_size, "%u tokens exceed serve.max_request_tokens (%d)", h->n_tokens,
                 cfg->serve.max_request_tokens);
        return MOE_STATUS_TOO_LARGE;
    }
    bool routed = (h->flags & MOE_FRAME_FLAG_ROUTED) != 0, client = m->routing.method == MOE_ROUTE_CLIENT;
    if (routed != client) {
        snprintf(msg, msg_size, client ? "routing method is 'client': the request must carry expert ids (ROUTED)"
                                       : "ROUTED requests need model.routing.method 'client' (it is '%s')",
                 moe_route_method_name(m->routing.method));
        return MOE_STATUS_BAD_ROUTING;
    }
    if (routed && h->top_k != (uint32_t)m->top_k) {
        snprintf(msg, msg_size, "top_k %u, the model routes %d experts per token", h->top_k, m->top_k);
        return MOE_STATUS_BAD_SHAPE;
    }
    long long per_conn = cfg->serve.max_queue_tokens / 4 > cfg->serve.max_request_tokens
                             ? cfg->serve.max_queue_tokens / 4 : cfg->serve.max_request_tokens;
    if (conn->queued_tokens + h->n_tokens > per_conn) {
        snprintf(msg, msg_size, "this connection has %lld tokens queued; at most %lld per connection",
                 conn->queued_tokens, per_conn);
        return MOE_STATUS_OVERLOADED;
    }
    if (atomic_load(&daemon->queued_tokens) + h->n_tokens > cfg->serve.max_queue_tokens) {
        snprintf(msg, msg_size, "queue full: %lld tokens queued, serve.max_queue_tokens %lld",
                 (long long)atomic_load(&daemon->queued_tokens), (long long)cfg->serve.max_queue_tokens);
        return MOE_STATUS_OVERLOADED;
    }
    reserve_tokens(conn, h->n_tokens);
    conn->receiving_tokens = h->n_tokens;
    return MOE_STATUS_OK;
}

/* The routing part of a ROUTED payload: ids in range and distinct, weights finite. */
static uint32_t check_routing(const moe_config_t *cfg, const moe_frame_header_t *h, const uint8_t *payload,
                              char *msg, size_t msg_size) {
    size_t k = h->top_k;
    const uint8_t *ids = payload + (size_t)h->n_tokens * h->hidden * moe_dtype_size(h->dtype);
    const uint8_t *weights = ids + (size_t)h->n_tokens * k * 4;
    for (size_t t = 0; t < h->n_tokens; t++)
        for (size_t i = 0; i < k; i++) {
            int32_t id;
            float w;
            memcpy(&id, ids + (t * k + i) * 4, 4);
            memcpy(&w, weights + (t * k + i) * 4, 4);
            if (id < 0 || id >= cfg->model.experts || !isfinite(w)) {
                snprintf(msg, msg_size, "token %zu: expert id %d out of [0, %d) or weight not finite", t, id,
                         cfg->model.experts);
                return MOE_STATUS_BAD_ROUTING;
            }
            for (size_t j = 0; j < i; j++) {
                int32_t other;
                memcpy(&other, ids + (t * k + j) * 4, 4);
                if (other == id) {
                    snprintf(msg, msg_size, "token %zu: expert id %d given twice", t, id);
                    return MOE_STATUS_BAD_ROUTING;
                }
            }
        }
    return MOE_STATUS_OK;
}

/* A FORWARD whose header was accepted (tokens reserved) and whose payload
 * is in; the payload is this function's (kept in the request, or freed). */
static void handle_forward(moe_conn_t *conn, const moe_frame_header_t *h, uint8_t *payload) {
    moe_daemon_t *daemon = conn->server->daemon;
    char msg[200];
    conn->receiving_tokens = 0; /* the reservation now belongs to the request */
    uint32_t status = MOE_STATUS_OK;
    if (h->flags & MOE_FRAME_FLAG_ROUTED) status = check_routing(&daemon->io_cfg, h, payload, msg, sizeof msg);
    size_t values = (size_t)h->n_tokens * h->hidden, k = h->top_k;
    moe_request_t *r = NULL;
    if (status == MOE_STATUS_OK) {
        r = calloc(1, sizeof *r);
        if (r != NULL && (h->flags & MOE_FRAME_FLAG_ROUTED)) {
            r->routed_ids = malloc(sizeof(int32_t) * h->n_tokens * k);
            r->routed_weights = malloc(sizeof(float) * h->n_tokens * k);
        }
        if (r == NULL || ((h->flags & MOE_FRAME_FLAG_ROUTED) && (!r->routed_ids || !r->routed_weights))) {
            status = MOE_STATUS_OVERLOADED;
            snprintf(msg, sizeof msg, "out of memory for this request");
        }
    }
    if (status != MOE_STATUS_OK) {
        moe_request_free(r);
        free(payload);
        reserve_tokens(conn, -(long long)h->n_tokens);
        send_error(conn, h->request_id, h->layer, status, msg);
        return;
    }
    /* the activations stay as they came: the step loop converts them into
     * its float32 rows, and the output back over them, on its threads */
    r->x = payload;
    if (h->flags & MOE_FRAME_FLAG_ROUTED) {
        const uint8_t *ids = payload + values * moe_dtype_size(h->dtype);
        memcpy(r->routed_ids, ids, sizeof(int32_t) * h->n_tokens * k);
        memcpy(r->routed_weights, ids + sizeof(int32_t) * h->n_tokens * k, sizeof(float) * h->n_tokens * k);
    }
    r->conn = conn;
    r->cancelled = &conn->gone; /* conn outlives its requests (conn_maybe_free) */
    r->request_id = h->request_id;
    r->layer = (int)h->layer;
    r->n_tokens = (int)h->n_tokens;
    r->dtype = h->dtype;
    r->arrival = moe_now();
    atomic_fetch_add(&daemon->queued_requests, 1);
    if (!moe_queue_push(&daemon->inbound, r)) {
        /* the step loop has stopped taking work (shutdown): answer, never drop */
        atomic_fetch_sub(&daemon->queued_requests, 1);
        reserve_tokens(conn, -(long long)r->n_tokens);
        moe_request_free(r);
        send_error(conn, h->request_id, h->layer, MOE_STATUS_SHUTTING_DOWN, "the daemon is shutting down");
        return;
    }
    conn->in_flight++;
}

static void handle_frame(moe_conn_t *conn, const moe_frame_header_t *h, uint8_t *payload) {
    if (conn->parser.rejected_status != 0) { /* refused from its header; payload skipped */
        send_error(conn, h->request_id, h->layer, conn->parser.rejected_status, conn->parser.rejected_msg);
        free(payload);
        return;
    }
    switch (h->type) {
    case MOE_FRAME_FORWARD: handle_forward(conn, h, payload); return; /* payload handed over */
    case MOE_FRAME_PING: {
        moe_frame_header_t pong = *h;
        pong.type = MOE_FRAME_PONG;
        uint8_t header[MOE_FRAME_HEADER_SIZE];
        moe_frame_encode_header(&pong, header);
        moe_conn_write(conn, header, sizeof header, payload, h->payload_len);
        return; /* payload handed over */
    }
    default: /* RESULT, ERROR, PONG: a confused peer; bad_frame closes, as for any framing error */
        send_error(conn, h->request_id, h->layer, MOE_STATUS_BAD_FRAME, "clients send only FORWARD and PING frames");
        conn->close_after_write = true;
        uv_read_stop(&conn->h.stream);
        break;
    }
    free(payload);
}

static void on_data_read(moe_conn_t *conn, const char *data, size_t len) {
    size_t offset = 0;
    /* serve.max_frame_bytes is reloadable: the next header obeys the new limit */
    conn->parser.max_frame_bytes = (uint64_t)conn->server->daemon->io_cfg.serve.max_frame_bytes;
    while (offset < len && !conn->closing && !conn->close_after_write) {
        size_t consumed = 0;
        moe_frame_header_t h;
        uint8_t *payload = NULL;
        moe_parse_result_t r = moe_frame_parse(&conn->parser, (const uint8_t *)data + offset, len - offset,
                                               &consumed, &h, &payload);
        offset += consumed;
        if (r == MOE_PARSE_FRAME) {
            conn->partial_since = 0;
            handle_frame(conn, &h, payload);
        } else if (r == MOE_PARSE_ERROR) {
            moe_log(MOE_LOG_INFO, "server", "connection %llu: framing error: %s; closing it",
                    (unsigned long long)conn->id, conn->parser.error_msg);
            send_error(conn, 0, 0, MOE_STATUS_BAD_FRAME, conn->parser.error_msg);
            conn->close_after_write = true;
            uv_read_stop(&conn->h.stream);
            if (conn->unsent_bytes == 0) moe_conn_close(conn);
            return;
        }
    }
    if ((conn->parser.header_have > 0 || conn->parser.in_payload) && conn->partial_since == 0)
        conn->partial_since = moe_now();
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
    (void)suggested;
    moe_conn_t *conn = (moe_conn_t *)handle;
    *buf = uv_buf_init(conn->server->read_buffer, sizeof conn->server->read_buffer);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
    moe_conn_t *conn = (moe_conn_t *)stream;
    if (nread < 0) {
        if (nread != UV_EOF)
            moe_log(MOE_LOG_DEBUG, "server", "connection %llu: %s", (unsigned long long)conn->id, uv_strerror((int)nread));
        moe_conn_close(conn);
        return;
    }
    if (nread == 0 || conn->closing) return;
    switch (conn->kind) {
    case MOE_CONN_DATA: on_data_read(conn, buf->base, (size_t)nread); break;
    case MOE_CONN_CONTROL: {
        /* split into lines; a line longer than the limit is an error */
        for (ssize_t i = 0; i < nread && !conn->closing; i++) {
            char c = buf->base[i];
            if (c == '\n') {
                char *line = conn->text != NULL ? conn->text : "";
                if (conn->text != NULL) conn->text[conn->text_len] = '\0';
                moe_control_on_line(conn, line);
                conn->text_len = 0;
                conn->partial_since = 0;
                continue;
            }
            if (conn->text_len + 2 > conn->text_cap) {
                if (conn->text_cap >= MOE_SERVER_CONTROL_MAX_LINE) {
                    cJSON *reply = cJSON_CreateObject();
                    cJSON_AddNullToObject(reply, "id");
                    cJSON_AddFalseToObject(reply, "ok");
                    cJSON *error = cJSON_AddObjectToObject(reply, "error");
                    cJSON_AddStringToObject(error, "code", "bad_request");
                    cJSON_AddStringToObject(error, "message", "line longer than 64 KiB");
                    moe_conn_write_json(conn, reply);
                    conn->close_after_write = true;
                    uv_read_stop(stream);
                    return;
                }
                size_t cap = conn->text_cap ? conn->text_cap * 2 : 1024;
                char *text = realloc(conn->text, cap);
                if (text == NULL) {
                    moe_conn_close(conn);
                    return;
                }
                conn->text = text;
                conn->text_cap = cap;
            }
            if (conn->text_len == 0) conn->partial_since = moe_now();
            conn->text[conn->text_len++] = c;
        }
        break;
    }
    case MOE_CONN_METRICS: moe_metrics_on_data(conn, buf->base, (size_t)nread); break;
    }
}

void moe_server_on_connection(uv_stream_t *listener, int status) {
    moe_server_t *server = listener->data;
    if (status < 0) {
        moe_log(MOE_LOG_WARN, "server", "accept: %s", uv_strerror(status));
        return;
    }
    moe_conn_t *conn = calloc(1, sizeof *conn);
    if (conn == NULL) return;
    conn->server = server;
    conn->id = ++server->next_id;
    conn->kind = listener == &server->data_listener.stream      ? MOE_CONN_DATA
                 : listener == &server->control_listener.stream ? MOE_CONN_CONTROL
                                                                : MOE_CONN_METRICS;
    if (listener->type == UV_TCP) uv_tcp_init(server->loop, &conn->h.tcp);
    else uv_pipe_init(server->loop, &conn->h.pipe, 0);
    moe_frame_parser_init(&conn->parser, (uint64_t)server->daemon->io_cfg.serve.max_frame_bytes);
    conn->parser.accept = accept_forward;
    conn->parser.accept_ctx = conn;
    conn->since = moe_now();
    conn->next = server->conns;
    if (server->conns != NULL) server->conns->prev = conn;
    server->conns = conn;
    if (conn->kind == MOE_CONN_DATA) server->n_data_conns++;
    if (uv_accept(listener, &conn->h.stream) != 0) {
        moe_conn_close(conn);
        return;
    }
    if (listener->type == UV_TCP) uv_tcp_nodelay(&conn->h.tcp, 1);
    if (conn->kind != MOE_CONN_DATA && ++server->n_other_conns > MOE_SERVER_MAX_CONTROL_CONNS) {
        moe_log(MOE_LOG_WARN, "server", "more than %d control/metrics connections: refusing one",
                MOE_SERVER_MAX_CONTROL_CONNS);
        moe_conn_close(conn);
        return;
    }
    if (conn->kind == MOE_CONN_DATA && server->n_data_conns > server->daemon->io_cfg.serve.max_connections) {
        char msg[128];
        snprintf(msg, sizeof msg, "too many connections (serve.max_connections %d)",
                 server->daemon->io_cfg.serve.max_connections);
        send_error(conn, 0, 0, MOE_STATUS_OVERLOADED, msg);
        conn->close_after_write = true;
        return;
    }
    int rc = uv_read_start(&conn->h.stream, on_alloc, on_read);
    if (rc != 0) {
        moe_log(MOE_LOG_WARN, "server", "connection %llu: uv_read_start: %s", (unsigned long long)conn->id,
                uv_strerror(rc));
        moe_conn_close(conn);
    }
}


/* Results and notices from the compute thread. */
static void deliver_result(moe_server_t *server, moe_request_t *r) {
    moe_conn_t *conn = r->conn;
    conn->in_flight--;
    conn->queued_tokens -= r->n_tokens; /* the rank's count was given back by the step loop */
    if (conn->closing) {
        moe_request_free(r);
        conn_maybe_free(conn);
        return;
    }
    if (r->status != MOE_STATUS_OK) {
        send_error(conn, r->request_id, (uint32_t)r->layer, r->status, r->error);
        moe_request_free(r);
        return;
    }
    const moe_config_t *cfg = &server->daemon->io_cfg;
    size_t values = (size_t)r->n_tokens * cfg->model.hidden, bytes = values * moe_dtype_size(r->dtype);
    void *payload = r->x; /* the output in the client's dtype, written over its input */
    r->x = NULL;          /* handed to the write */
    moe_frame_header_t h = {MOE_FRAME_VERSION, MOE_FRAME_RESULT, r->request_id, (uint32_t)r->layer,
                            (uint32_t)r->n_tokens, (uint32_t)cfg->model.hidden, r->dtype, 0, 0, 0, bytes};
    uint8_t header[MOE_FRAME_HEADER_SIZE];
    moe_frame_encode_header(&h, header);
    double now = moe_now();
    moe_stats_completed(&server->daemon->stats, now, now - r->arrival, r->n_tokens);
    moe_conn_write(conn, header, sizeof header, payload, bytes);
    moe_request_free(r);
}

static void close_handle_if_open(uv_handle_t *handle) {
    if (handle->loop != NULL && !uv_is_closing(handle)) uv_close(handle, NULL);
}

static void on_stop_timer(uv_timer_t *timer) {
    moe_server_t *server = timer->data;
    for (moe_conn_t *c = server->conns; c != NULL; c = c->next) moe_conn_close(c);
    close_handle_if_open((uv_handle_t *)timer);
}

static void stop_server(moe_server_t *server) {
    server->stopping = true;
    if (server->data_listening) close_handle_if_open(&server->data_listener.handle);
    if (server->control_listening) close_handle_if_open(&server->control_listener.handle);
    if (server->metrics_listening) close_handle_if_open(&server->metrics_listener.handle);
    close_handle_if_open((uv_handle_t *)&server->sweep_timer);
    close_handle_if_open((uv_handle_t *)&server->sighup);
    close_handle_if_open((uv_handle_t *)&server->sigterm);
    close_handle_if_open((uv_handle_t *)&server->sigint);
    close_handle_if_open((uv_handle_t *)&server->daemon->outbound_async);
    for (moe_conn_t *c = server->conns; c != NULL; c = c->next) {
        if (c->unsent_bytes > 0) c->close_after_write = true;
        else moe_conn_close(c);
    }
    /* a client that never reads must not hold the exit up */
    uv_timer_start(&server->stop_timer, on_stop_timer, 2000, 0);
    uv_unref((uv_handle_t *)&server->stop_timer);
}

void moe_server_on_outbound(uv_async_t *async) {
    moe_daemon_t *daemon = async->data;
    moe_server_t *server = daemon->server;
    pthread_mutex_lock(&daemon->outbound_lock);
    moe_event_t *list = daemon->outbound_head;
    daemon->outbound_head = daemon->outbound_tail = NULL;
    pthread_mutex_unlock(&daemon->outbound_lock);
    while (list != NULL) {
        moe_event_t *event = list;
        list = list->next;
        switch (event->kind) {
        case MOE_EVENT_RESULT: deliver_result(server, event->request); break;
        case MOE_EVENT_CONFIG: {
            char msg[256];
            daemon->io_cfg = *event->config;
            /* serve.token_file is reloadable: rotate the token */
            if (daemon->ep.rank == 0 && moe_server_read_token(server, daemon->io_cfg.serve.token_file, msg, sizeof msg) != MOE_OK)
                moe_log(MOE_LOG_ERROR, "reload", "%s; the previous control token stays in force", msg);
            moe_control_reload_done(server, event);
            free(event->config);
            free(event);
            break;
        }
        case MOE_EVENT_STOP:
            free(event);
            stop_server(server);
            break;
        }
    }
}

/* Every 200 ms: slow-drip clients (a frame, a control line or an HTTP
 * request arriving for longer than serve.request_timeout_ms, or 5 s for
 * /metrics) are answered `timeout` where the protocol allows and closed;
 * clients that stopped reading are dropped (check_output). */
void moe_server_on_sweep(uv_timer_t *timer) {
    moe_server_t *server = timer->data;
    double now = moe_now(), limit = server->daemon->io_cfg.serve.request_timeout_ms / 1e3;
    for (moe_conn_t *c = server->conns; c != NULL; c = c->next) {
        if (c->closing) continue;
        check_output(c, now);
        if (c->closing) continue;
        if (c->kind == MOE_CONN_METRICS) {
            if (!c->close_after_write && now - c->since > 5.0) moe_conn_close(c);
            continue;
        }
        if (c->partial_since == 0 || now - c->partial_since <= limit) continue;
        moe_log(MOE_LOG_INFO, "server", "connection %llu: a %s incomplete for %.1f s; closing it",
                (unsigned long long)c->id, c->kind == MOE_CONN_DATA ? "frame" : "control line", now - c->partial_since);
        c->partial_since = 0;
        if (c->kind == MOE_CONN_DATA) {
            send_error(c, 0, 0, MOE_STATUS_TIMEOUT, "frame incomplete past serve.request_timeout_ms");
            c->close_after_write = true;
            uv_read_stop(&c->h.stream);
            if (c->unsent_bytes == 0) moe_conn_close(c);
        } else {
            moe_conn_close(c);
        }
    }
}

