/* server_start: the I/O thread's life — listeners (TCP or unix, with the
 * control socket's mode and the loopback rule), signals, the control token,
 * the thread itself, and the orderly close of every handle at the end. The
 * connections and the data plane are server.c's. */
#include <errno.h>
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

/* libuv calls of the start-up: a failure is returned with file:line and
 * libuv's message (STYLE 3). */
#define MOE_UV_TRY(call)                                                                                 \
    do {                                                                                                 \
        int moe_uv_rc_ = (call);                                                                         \
        if (moe_uv_rc_ != 0)                                                                             \
            return moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s:%d: %s: %s", __FILE__, __LINE__, #call,    \
                               uv_strerror(moe_uv_rc_));                                                 \
    } while (0)

void moe_server_stop(moe_daemon_t *daemon) {
    moe_event_t *stop = calloc(1, sizeof *stop);
    if (stop == NULL) return; /* then the STOP of moe_server_join's fallback below */
    stop->kind = MOE_EVENT_STOP;
    moe_daemon_post(daemon, stop);
}

void moe_server_request_drain(moe_daemon_t *daemon, bool then_exit) {
    if (then_exit) atomic_store(&daemon->shutdown, 1);
    if (!atomic_exchange(&daemon->draining, 1))
        moe_log(MOE_LOG_INFO, "server", "%s: new requests get shutting_down; %d queued requests finish",
                then_exit ? "shutting down" : "draining", atomic_load(&daemon->queued_requests));
}

static void on_signal(uv_signal_t *handle, int signum) {
    moe_server_t *server = handle->data;
    if (signum == SIGHUP) {
        cJSON *error = moe_control_start_reload(server, "", 0, NULL);
        if (error != NULL) cJSON_Delete(error); /* logged by the reload itself */
        return;
    }
    if (signum == SIGINT && ++server->sigint_count > 1) {
        moe_log(MOE_LOG_ERROR, "server", "second SIGINT: stopping now without draining");
        moe_mpi_abort_job(130);
        _exit(130);
    }
    moe_log(MOE_LOG_INFO, "server", "%s: draining, then exiting", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    moe_server_request_drain(server->daemon, true);
}

/* Parses "unix:PATH" (with %r → rank) or "HOST:PORT" (+rank when add_rank). */
static moe_err_t listen_on(moe_server_t *server, const char *address, int rank, bool add_rank,
                           moe_stream_handle_t *handle, char *unix_path, mode_t mode, bool loopback_only,
                           const char *field, char *msg, size_t msg_size) {
    int rc;
    if (strncmp(address, "unix:", 5) == 0) {
        char path[MOE_PATH_MAX];
        size_t n = 0;
        for (const char *p = address + 5; *p && n + 12 < sizeof path; p++) {
            if (p[0] == '%' && p[1] == 'r') {
                n += (size_t)snprintf(path + n, sizeof path - n, "%d", rank);
                p++;
            } else {
                path[n++] = *p;
            }
        }
        path[n] = '\0';
        struct stat st;
        if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path); /* a stale socket */
        uv_pipe_init(server->loop, &handle->pipe, 0);
        if ((rc = uv_pipe_bind(&handle->pipe, path)) != 0)
            return moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: cannot bind %s: %s", field, path, uv_strerror(rc));
        if (chmod(path, mode) != 0)
            return moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: chmod %s: %s", field, path, strerror(errno));
        snprintf(unix_path, MOE_PATH_MAX, "%s", path);
    } else {
        const char *colon = strrchr(address, ':');
        if (colon == NULL)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG, "%s: '%s' is neither HOST:PORT nor unix:PATH", field, address);
        char host[256];
        snprintf(host, sizeof host, "%.*s", (int)(colon - address), address);
        if (host[0] == '[' && host[strlen(host) - 1] == ']') memmove(host, host + 1, strlen(host)), host[strlen(host) - 1] = '\0';
        long port = strtol(colon + 1, NULL, 10) + (add_rank ? rank : 0);
        if (port <= 0 || port > 65535)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG, "%s: port out of range in '%s'", field, address);
        struct addrinfo hints = {0}, *ai = NULL;
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_PASSIVE;
        char port_text[16];
        snprintf(port_text, sizeof port_text, "%ld", port);
        if ((rc = getaddrinfo(host, port_text, &hints, &ai)) != 0)
            return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG, "%s: cannot resolve '%s': %s", field, host, gai_strerror(rc));
        if (loopback_only) {
            bool loop = ai->ai_family == AF_INET
                            ? (ntohl(((struct sockaddr_in *)ai->ai_addr)->sin_addr.s_addr) >> 24) == 127
                            : IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr);
            if (!loop) {
                freeaddrinfo(ai);
                return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG,
                                   "%s: TCP control on a non-loopback address needs serve.token_file", field);
            }
        }
        uv_tcp_init(server->loop, &handle->tcp);
        rc = uv_tcp_bind(&handle->tcp, ai->ai_addr, 0);
        freeaddrinfo(ai);
        if (rc != 0)
            return moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: cannot bind %s port %ld: %s", field, host, port, uv_strerror(rc));
    }
    handle->handle.data = server;
    if ((rc = uv_listen(&handle->stream, 511, moe_server_on_connection)) != 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_IO, "%s: cannot listen on %s: %s", field, address, uv_strerror(rc));
    return MOE_OK;
}

moe_err_t moe_server_read_token(moe_server_t *server, const char *path, char *msg, size_t msg_size) {
    char token[sizeof server->token];
    if (path[0] == '\0') {
        server->token[0] = '\0';
        return MOE_OK;
    }
    FILE *f = fopen(path, "r");
    if (f == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_IO, "serve.token_file: %s: %s", path, strerror(errno));
    size_t n = fread(token, 1, sizeof token - 1, f);
    fclose(f);
    token[n] = '\0';
    while (n > 0 && (token[n - 1] == '\n' || token[n - 1] == '\r' || token[n - 1] == ' ')) token[--n] = '\0';
    if (n == 0) return moe_err_fmt(msg, msg_size, MOE_ERR_CONFIG, "serve.token_file: %s is empty", path);
    /* replaced only when the new one is good: a failed rotation keeps the old */
    memcpy(server->token, token, sizeof token);
    return MOE_OK;
}

static void *io_thread_main(void *arg) {
    moe_daemon_t *daemon = arg;
    uv_run(&daemon->loop, UV_RUN_DEFAULT);
    return NULL;
}

moe_err_t moe_server_start(moe_daemon_t *daemon, char *msg, size_t msg_size) {
    moe_server_t *server = calloc(1, sizeof *server);
    if (server == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "server: out of memory");
    daemon->server = server;
    server->daemon = daemon;
    server->loop = &daemon->loop;
    server->last_reload_ok = true;
    MOE_UV_TRY(uv_loop_init(server->loop));
    const moe_serve_config_t *serve = &daemon->io_cfg.serve;
    const int rank = daemon->ep.rank;
    MOE_CHECK(moe_server_read_token(server, rank == 0 ? serve->token_file : "", msg, msg_size));
    MOE_UV_TRY(uv_async_init(server->loop, &daemon->outbound_async, moe_server_on_outbound));
    daemon->outbound_async.data = daemon;
    MOE_UV_TRY(uv_timer_init(server->loop, &server->sweep_timer));
    server->sweep_timer.data = server;
    MOE_UV_TRY(uv_timer_start(&server->sweep_timer, moe_server_on_sweep, 200, 200));
    MOE_UV_TRY(uv_timer_init(server->loop, &server->stop_timer));
    server->stop_timer.data = server;
    MOE_UV_TRY(uv_signal_init(server->loop, &server->sigterm));
    MOE_UV_TRY(uv_signal_init(server->loop, &server->sigint));
    MOE_UV_TRY(uv_signal_init(server->loop, &server->sighup));
    server->sigterm.data = server->sigint.data = server->sighup.data = server;
    MOE_UV_TRY(uv_signal_start(&server->sigterm, on_signal, SIGTERM));
    MOE_UV_TRY(uv_signal_start(&server->sigint, on_signal, SIGINT));
    if (rank == 0) MOE_UV_TRY(uv_signal_start(&server->sighup, on_signal, SIGHUP));
    MOE_CHECK(listen_on(server, serve->data, rank, true, &server->data_listener, server->data_path, 0666, false,
                        "serve.data", msg, msg_size));
    server->data_listening = true;
    if (rank == 0) {
        MOE_CHECK(listen_on(server, serve->control, rank, false, &server->control_listener, server->control_path,
                            0600, server->token[0] == '\0', "serve.control", msg, msg_size));
        server->control_listening = true;
        if (serve->metrics[0] != '\0') {
            char unused[MOE_PATH_MAX];
            MOE_CHECK(listen_on(server, serve->metrics, rank, false, &server->metrics_listener, unused, 0644,
                                false, "serve.metrics", msg, msg_size));
            server->metrics_listening = true;
        }
    }
    if (pthread_create(&daemon->io_thread, NULL, io_thread_main, daemon) != 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INTERNAL, "server: cannot start the I/O thread");
    server->started = true;
    return MOE_OK;
}

static void close_any(uv_handle_t *handle, void *arg) {
    (void)arg;
    if (!uv_is_closing(handle)) uv_close(handle, NULL);
}

void moe_server_join(moe_daemon_t *daemon) {
    moe_server_t *server = daemon->server;
    if (server == NULL) return;
    if (server->started) pthread_join(daemon->io_thread, NULL);
    /* what is left (the unreferenced stop timer; everything after a failed
     * start) is closed here, on this thread, once the I/O thread is gone */
    uv_walk(server->loop, close_any, NULL);
    uv_run(server->loop, UV_RUN_DEFAULT);
    for (int i = 0; i < server->n_reloads; i++) cJSON_Delete(server->reloads[i].id);
    if (server->data_path[0]) unlink(server->data_path);
    if (server->control_path[0]) unlink(server->control_path);
    int rc = uv_loop_close(server->loop);
    if (rc != 0) moe_log(MOE_LOG_WARN, "server", "uv_loop_close: %s (a handle was left open)", uv_strerror(rc));
    free(server);
    daemon->server = NULL;
}
