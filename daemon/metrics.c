/* metrics: Prometheus text exposition at GET /metrics on rank 0
 * (serve.metrics). A deliberately small HTTP/1.0 server: one request per
 * connection, a bounded request head, the answer, then close. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server_internal.h"

static void respond(moe_conn_t *conn, const char *status, const char *type, char *body, size_t body_len) {
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                     status, type, body_len);
    size_t total = (size_t)n + body_len;
    char *all = malloc(total);
    if (all == NULL) {
        free(body);
        moe_conn_close(conn);
        return;
    }
    memcpy(all, head, (size_t)n);
    if (body_len > 0) memcpy(all + n, body, body_len);
    free(body);
    conn->close_after_write = true;
    uv_read_stop(&conn->h.stream);
    moe_conn_write(conn, NULL, 0, all, total);
}

static void respond_text(moe_conn_t *conn, const char *status, const char *text) {
    size_t len = strlen(text);
    char *copy = malloc(len + 1);
    if (copy == NULL) {
        moe_conn_close(conn);
        return;
    }
    memcpy(copy, text, len + 1);
    respond(conn, status, "text/plain", copy, len);
}

void moe_metrics_on_data(moe_conn_t *conn, const char *data, size_t len) {
    if (conn->close_after_write) return;
    if (conn->text_len + len + 1 > MOE_HTTP_MAX_REQUEST) {
        respond_text(conn, "431 Request Header Fields Too Large", "request too large\n");
        return;
    }
    if (conn->text_cap < MOE_HTTP_MAX_REQUEST) {
        char *text = realloc(conn->text, MOE_HTTP_MAX_REQUEST);
        if (text == NULL) {
            moe_conn_close(conn);
            return;
        }
        conn->text = text;
        conn->text_cap = MOE_HTTP_MAX_REQUEST;
    }
    memcpy(conn->text + conn->text_len, data, len);
    conn->text_len += len;
    conn->text[conn->text_len] = '\0';
    if (strstr(conn->text, "\r\n\r\n") == NULL && strstr(conn->text, "\n\n") == NULL) return;
    if (strncmp(conn->text, "GET /metrics ", 13) == 0 || strncmp(conn->text, "GET /metrics?", 13) == 0) {
        char *body = NULL;
        size_t body_len = 0;
        FILE *out = open_memstream(&body, &body_len);
        if (out == NULL) {
            moe_conn_close(conn);
            return;
        }
        moe_stats_prometheus(&conn->server->daemon->stats, moe_now(), out);
        fclose(out);
        respond(conn, "200 OK", "text/plain; version=0.0.4", body, body_len);
    } else if (strncmp(conn->text, "GET ", 4) == 0) {
        respond_text(conn, "404 Not Found", "only /metrics is served here\n");
    } else {
        respond_text(conn, "405 Method Not Allowed", "only GET\n");
    }
}
