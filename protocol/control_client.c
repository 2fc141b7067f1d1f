/* control_client: the control channel's client (see moe_control_client.h).
 * Replies and pushed events share one stream, so every read sorts lines:
 * the awaited id is returned, events are queued, stale replies (to a call
 * that timed out earlier) are dropped. */
#include "moe_control_client.h"

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "moe_client.h"

typedef struct moe_control_event {
    cJSON *event;
    struct moe_control_event *next;
} moe_control_event_t;

struct moe_control_client {
    int fd;
    char *buf; /* unconsumed bytes [start, end) */
    size_t start, end, cap;
    moe_control_event_t *head, *tail;
    int next_id;
};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

moe_err_t moe_control_connect(const char *address, moe_control_client_t **out, char *msg,
                              size_t n) {
    *out = NULL;
    int fd;
    MOE_CHECK(moe_client_dial(address, -1, &fd, msg, n));
    moe_control_client_t *cc = calloc(1, sizeof *cc);
    if (cc == NULL) {
        close(fd);
        return moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory");
    }
    cc->fd = fd;
    cc->next_id = 1;
    *out = cc;
    return MOE_OK;
}

void moe_control_close(moe_control_client_t *cc) {
    if (cc == NULL) return;
    while (cc->head) {
        moe_control_event_t *e = cc->head;
        cc->head = e->next;
        cJSON_Delete(e->event);
        free(e);
    }
    close(cc->fd);
    free(cc->buf);
    free(cc);
}

static moe_err_t send_all(int fd, const char *data, size_t len, char *msg, size_t n) {
    while (len > 0) {
        ssize_t w = send(fd, data, len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return moe_err_fmt(msg, n, MOE_ERR_IO, "control write: %s", strerror(errno));
        }
        data += w;
        len -= (size_t)w;
    }
    return MOE_OK;
}

/* One line (without '\n', NUL-terminated, pointing into cc->buf and valid
 * until the next read) before the deadline (-1: none). */
static moe_err_t read_line(moe_control_client_t *cc, int64_t deadline, char **line, char *msg,
                           size_t n) {
    for (;;) {
        char *nl = cc->start < cc->end ? memchr(cc->buf + cc->start, '\n', cc->end - cc->start)
                                       : NULL;
        if (nl) {
            *nl = '\0';
            *line = cc->buf + cc->start;
            cc->start = (size_t)(nl - cc->buf) + 1;
            return MOE_OK;
        }
        if (cc->end - cc->start >= MOE_CONTROL_MAX_LINE)
            return moe_err_fmt(msg, n, MOE_ERR_FORMAT, "control line longer than %u bytes",
                               MOE_CONTROL_MAX_LINE);
        if (cc->start > 0) { /* compact before growing */
            memmove(cc->buf, cc->buf + cc->start, cc->end - cc->start);
            cc->end -= cc->start;
            cc->start = 0;
        }
        if (cc->cap - cc->end < 4096) {
            size_t cap = cc->cap ? cc->cap * 2 : 65536;
            char *grown = realloc(cc->buf, cap);
            if (grown == NULL) return moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory");
            cc->buf = grown;
            cc->cap = cap;
        }
        struct pollfd pfd = {.fd = cc->fd, .events = POLLIN};
        int timeout = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            timeout = left < 0 ? 0 : (int)left;
        }
        int rc = poll(&pfd, 1, timeout);
        if (rc < 0 && errno == EINTR) continue;
        if (rc < 0) return moe_err_fmt(msg, n, MOE_ERR_IO, "poll: %s", strerror(errno));
        if (rc == 0) return moe_err_fmt(msg, n, MOE_ERR_NOT_FOUND, "no reply within the timeout");
        ssize_t got = read(cc->fd, cc->buf + cc->end, cc->cap - cc->end - 1);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return moe_err_fmt(msg, n, MOE_ERR_IO, "control read: %s", strerror(errno));
        if (got == 0) return moe_err_fmt(msg, n, MOE_ERR_IO, "control connection closed");
        cc->end += (size_t)got;
    }
}

static moe_err_t queue_event(moe_control_client_t *cc, cJSON *event, char *msg, size_t n) {
    moe_control_event_t *e = malloc(sizeof *e);
    if (e == NULL) {
        cJSON_Delete(event);
        return moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory");
    }
    e->event = event;
    e->next = NULL;
    if (cc->tail) cc->tail->next = e;
    else cc->head = e;
    cc->tail = e;
    return MOE_OK;
}

/* Reads lines until a reply with id (want_id >= 0) or an event (want_id < 0). */
static moe_err_t read_until(moe_control_client_t *cc, int want_id, cJSON **out, int timeout_ms,
                            char *msg, size_t n) {
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    for (;;) {
        char *line = NULL;
        MOE_CHECK(read_line(cc, deadline, &line, msg, n));
        if (line[0] == '\0' || (line[0] == '\r' && line[1] == '\0')) continue;
        cJSON *obj = cJSON_Parse(line);
        if (obj == NULL || !cJSON_IsObject(obj)) {
            cJSON_Delete(obj);
            return moe_err_fmt(msg, n, MOE_ERR_FORMAT, "control reply is not a JSON object: %.80s",
                               line);
        }
        if (cJSON_GetObjectItemCaseSensitive(obj, "event")) {
            if (want_id < 0) {
                *out = obj;
                return MOE_OK;
            }
            MOE_CHECK(queue_event(cc, obj, msg, n));
            continue;
        }
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(obj, "id");
        /* a reply without an id answers a line the server could not parse;
         * with one request in flight at a time it is ours */
        if (want_id >= 0 && (id == NULL || cJSON_IsNull(id) ||
                             (cJSON_IsNumber(id) && id->valueint == want_id))) {
            *out = obj;
            return MOE_OK;
        }
        cJSON_Delete(obj); /* stale reply to a call that timed out */
    }
}

moe_err_t moe_control_call(moe_control_client_t *cc, const char *cmd, cJSON *args,
                           const char *token, cJSON **result_out, int timeout_ms, char *msg,
                           size_t n) {
    *result_out = NULL;
    cJSON *req = args ? args : cJSON_CreateObject();
    if (req == NULL || !cJSON_IsObject(req)) {
        cJSON_Delete(req);
        return moe_err_fmt(msg, n, MOE_ERR_INVAL, "control arguments must be a JSON object");
    }
    int id = cc->next_id++;
    cJSON_DeleteItemFromObjectCaseSensitive(req, "id");
    cJSON_DeleteItemFromObjectCaseSensitive(req, "cmd");
    cJSON_DeleteItemFromObjectCaseSensitive(req, "token");
    cJSON_AddNumberToObject(req, "id", id);
    cJSON_AddStringToObject(req, "cmd", cmd);
    if (token && *token) cJSON_AddStringToObject(req, "token", token);
    char *text = cJSON_PrintUnformatted(req);
    cJSON_Delete(req);
    if (text == NULL) return moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory");
    size_t len = strlen(text);
    text[len] = '\n'; /* replaces the NUL: the line is sent without it */
    moe_err_t ret = send_all(cc->fd, text, len + 1, msg, n);
    free(text);
    if (ret != MOE_OK) return ret;
    return read_until(cc, id, result_out, timeout_ms, msg, n);
}

moe_err_t moe_control_read_event(moe_control_client_t *cc, cJSON **event, int timeout_ms,
                                 char *msg, size_t n) {
    *event = NULL;
    if (cc->head) {
        moe_control_event_t *e = cc->head;
        cc->head = e->next;
        if (cc->tail == e) cc->tail = NULL;
        *event = e->event;
        free(e);
        return MOE_OK;
    }
    return read_until(cc, -1, event, timeout_ms, msg, n);
}

moe_err_t moe_control_read_token(const char *path, char *buf, size_t size, char *msg, size_t n) {
    FILE *f = fopen(path, "r");
    if (f == NULL) return moe_err_fmt(msg, n, MOE_ERR_IO, "%s: %s", path, strerror(errno));
    bool ok = fgets(buf, (int)size, f) != NULL;
    fclose(f);
    if (!ok) return moe_err_fmt(msg, n, MOE_ERR_IO, "%s: empty token file", path);
    size_t len = strlen(buf);
    if (len == size - 1 && buf[len - 1] != '\n')
        return moe_err_fmt(msg, n, MOE_ERR_RANGE, "%s: token longer than %zu bytes", path, size - 2);
    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r' || buf[len - 1] == ' ' ||
                       buf[len - 1] == '\t'))
        buf[--len] = '\0';
    return MOE_OK;
}
