/* client: libmoeclient (see moe_client.h). The socket is non-blocking so that
 * one poll() loop can both write a request and drain responses: a pipelined
 * client that only wrote would fill the server's output cap and be
 * disconnected (DESIGN §10), so every wait also reads. */
#include "moe_client.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

typedef struct moe_client_pending {
    moe_client_response_t resp;
    struct moe_client_pending *next;
} moe_client_pending_t;

struct moe_client {
    int fd;
    moe_frame_parser_t parser;
    uint8_t rbuf[65536];
    size_t rbuf_start, rbuf_end;
    moe_client_pending_t *head, *tail; /* responses read but not yet returned */
    uint64_t next_auto_id;
    bool broken; /* a transport/protocol error: every later call fails */
};

static moe_err_t fail_io(moe_client_t *c, char *msg, size_t n, const char *what) {
    if (c) c->broken = true;
    return moe_err_fmt(msg, n, MOE_ERR_IO, "%s", what);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int remaining_ms(int64_t deadline) {
    if (deadline < 0) return -1;
    int64_t left = deadline - now_ms();
    return left < 0 ? 0 : (int)left;
}

/* ---- addresses ---- */

static moe_err_t dial_unix(const char *path_template, int rank, int *fd_out, char *msg, size_t n) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char path[sizeof sa.sun_path + 32];
    size_t len = 0;
    for (const char *p = path_template; *p; p++) {
        int w;
        if (p[0] == '%' && p[1] == 'r' && rank >= 0) {
            w = snprintf(path + len, sizeof path - len, "%d", rank);
            p++;
        } else {
            w = snprintf(path + len, sizeof path - len, "%c", *p);
        }
        if (w < 0 || (size_t)w >= sizeof path - len) goto too_long;
        len += (size_t)w;
    }
    if (len == 0) return moe_err_fmt(msg, n, MOE_ERR_INVAL, "empty unix socket path");
    if (len >= sizeof sa.sun_path) goto too_long;
    memcpy(sa.sun_path, path, len + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return moe_err_fmt(msg, n, MOE_ERR_IO, "socket: %s", strerror(errno));
    int rc;
    do rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        int e = errno;
        close(fd);
        return moe_err_fmt(msg, n, MOE_ERR_IO, "connect unix:%s: %s", path, strerror(e));
    }
    *fd_out = fd;
    return MOE_OK;
too_long:
    return moe_err_fmt(msg, n, MOE_ERR_INVAL, "unix socket path too long: %s", path_template);
}

static moe_err_t dial_tcp(const char *address, int rank, int *fd_out, char *msg, size_t n) {
    char host[256];
    const char *colon = strrchr(address, ':');
    if (colon == NULL || colon == address || colon[1] == '\0')
        return moe_err_fmt(msg, n, MOE_ERR_INVAL, "address \"%s\" is not HOST:PORT or unix:PATH",
                           address);
    const char *h = address;
    size_t hlen = (size_t)(colon - address);
    if (h[0] == '[' && hlen >= 2 && h[hlen - 1] == ']') h++, hlen -= 2; /* [v6]:port */
    if (hlen == 0 || hlen >= sizeof host)
        return moe_err_fmt(msg, n, MOE_ERR_INVAL, "bad host in \"%s\"", address);
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    char *end;
    errno = 0;
    long port = strtol(colon + 1, &end, 10);
    if (errno || *end != '\0' || port < 1 || port > 65535)
        return moe_err_fmt(msg, n, MOE_ERR_INVAL, "bad port in \"%s\"", address);
    if (rank > 0) port += rank;
    if (port > 65535)
        return moe_err_fmt(msg, n, MOE_ERR_INVAL, "port %ld (base + rank %d) out of range", port,
                           rank);
    char service[16];
    snprintf(service, sizeof service, "%ld", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *list = NULL;
    int gai = getaddrinfo(host, service, &hints, &list);
    if (gai != 0)
        return moe_err_fmt(msg, n, MOE_ERR_IO, "resolve %s: %s", host, gai_strerror(gai));
    int last_errno = 0;
    for (struct addrinfo *ai = list; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            last_errno = errno;
            continue;
        }
        int rc;
        do rc = connect(fd, ai->ai_addr, ai->ai_addrlen);
        while (rc < 0 && errno == EINTR);
        if (rc == 0) {
            /* requests are latency-bound: never wait for Nagle */
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            freeaddrinfo(list);
            *fd_out = fd;
            return MOE_OK;
        }
        last_errno = errno;
        close(fd);
    }
    freeaddrinfo(list);
    return moe_err_fmt(msg, n, MOE_ERR_IO, "connect %s:%ld: %s", host, port,
                       strerror(last_errno ? last_errno : ECONNREFUSED));
}

moe_err_t moe_client_dial(const char *address, int rank, int *fd_out, char *msg, size_t n) {
    if (address == NULL || *address == '\0')
        return moe_err_fmt(msg, n, MOE_ERR_INVAL, "empty address");
    if (strncmp(address, "unix:", 5) == 0) return dial_unix(address + 5, rank, fd_out, msg, n);
    return dial_tcp(address, rank, fd_out, msg, n);
}

moe_err_t moe_client_connect(const char *address, int rank, moe_client_t **out, char *msg,
                             size_t n) {
    *out = NULL;
    if (rank < 0) return moe_err_fmt(msg, n, MOE_ERR_INVAL, "negative rank %d", rank);
    int fd;
    MOE_CHECK(moe_client_dial(address, rank, &fd, msg, n));
    moe_client_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        close(fd);
        return moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory");
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
        int e = errno;
        close(fd);
        free(c);
        return moe_err_fmt(msg, n, MOE_ERR_IO, "fcntl: %s", strerror(e));
    }
    c->fd = fd;
    c->next_auto_id = MOE_CLIENT_AUTO_ID_BASE;
    moe_frame_parser_init(&c->parser, MOE_CLIENT_MAX_FRAME_BYTES);
    *out = c;
    return MOE_OK;
}

void moe_client_response_free(moe_client_response_t *resp) {
    if (resp == NULL) return;
    free(resp->out);
    free(resp->error_text);
    free(resp->payload);
    memset(resp, 0, sizeof *resp);
}

void moe_client_close(moe_client_t *c) {
    if (c == NULL) return;
    while (c->head) {
        moe_client_pending_t *p = c->head;
        c->head = p->next;
        moe_client_response_free(&p->resp);
        free(p);
    }
    moe_frame_parser_reset(&c->parser);
    close(c->fd);
    free(c);
}

int moe_client_fd(const moe_client_t *c) { return c->fd; }

/* ---- reading ---- */

/* Turns a parsed frame into a response; takes ownership of payload. */
static moe_err_t make_response(const moe_frame_header_t *h, uint8_t *payload,
                               moe_client_response_t *resp, char *msg, size_t n) {
    memset(resp, 0, sizeof *resp);
    resp->type = h->type;
    resp->request_id = h->request_id;
    resp->layer = h->layer;
    resp->n_tokens = h->n_tokens;
    resp->hidden = h->hidden;
    resp->dtype = h->dtype;
    resp->status = h->status;
    moe_err_t ret = MOE_OK;
    switch (h->type) {
    case MOE_FRAME_RESULT: {
        size_t values = (size_t)h->n_tokens * h->hidden;
        if (moe_dtype_size(h->dtype) == 0) {
            ret = moe_err_fmt(msg, n, MOE_ERR_IO, "RESULT with unknown dtype %u", h->dtype);
            break;
        }
        resp->out = malloc(values ? values * sizeof(float) : 1);
        if (resp->out == NULL) {
            ret = moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory for %zu floats", values);
            break;
        }
        moe_dtype_to_f32(h->dtype, payload, resp->out, values);
        break;
    }
    case MOE_FRAME_ERROR:
        resp->error_text = malloc((size_t)h->payload_len + 1);
        if (resp->error_text == NULL) {
            ret = moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory");
            break;
        }
        if (h->payload_len) memcpy(resp->error_text, payload, (size_t)h->payload_len);
        resp->error_text[h->payload_len] = '\0';
        break;
    case MOE_FRAME_PONG:
        resp->payload = payload;
        resp->payload_len = (size_t)h->payload_len;
        payload = NULL;
        break;
    default:
        ret = moe_err_fmt(msg, n, MOE_ERR_IO, "server sent a frame of type %u", h->type);
    }
    free(payload);
    if (ret != MOE_OK) moe_client_response_free(resp);
    return ret;
}

/* Parses what is buffered; MOE_OK with *got set when a frame came out. */
static moe_err_t parse_buffered(moe_client_t *c, moe_client_response_t *resp, bool *got, char *msg,
                                size_t n) {
    *got = false;
    while (c->rbuf_start < c->rbuf_end) {
        size_t consumed;
        moe_frame_header_t h;
        uint8_t *payload = NULL;
        moe_parse_result_t r = moe_frame_parse(&c->parser, c->rbuf + c->rbuf_start,
                                               c->rbuf_end - c->rbuf_start, &consumed, &h, &payload);
        c->rbuf_start += consumed;
        if (r == MOE_PARSE_ERROR) {
            c->broken = true;
            return moe_err_fmt(msg, n, MOE_ERR_IO, "bad frame from server: %s",
                               c->parser.error_msg);
        }
        if (r == MOE_PARSE_FRAME) {
            moe_err_t ret = make_response(&h, payload, resp, msg, n);
            if (ret != MOE_OK) c->broken = true;
            else *got = true;
            return ret;
        }
    }
    c->rbuf_start = c->rbuf_end = 0;
    return MOE_OK;
}

/* Reads what the socket has now (never blocks). */
static moe_err_t read_some(moe_client_t *c, char *msg, size_t n) {
    if (c->rbuf_start == c->rbuf_end) c->rbuf_start = c->rbuf_end = 0;
    if (c->rbuf_end == sizeof c->rbuf) return MOE_OK; /* parse first */
    for (;;) {
        ssize_t got = read(c->fd, c->rbuf + c->rbuf_end, sizeof c->rbuf - c->rbuf_end);
        if (got > 0) {
            c->rbuf_end += (size_t)got;
            return MOE_OK;
        }
        if (got == 0) return fail_io(c, msg, n, "connection closed by server");
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return MOE_OK;
        char what[128];
        snprintf(what, sizeof what, "read: %s", strerror(errno));
        return fail_io(c, msg, n, what);
    }
}

static moe_err_t wait_fd(moe_client_t *c, short events, int timeout_ms, short *revents, char *msg,
                         size_t n) {
    struct pollfd pfd = {.fd = c->fd, .events = events};
    int rc;
    do rc = poll(&pfd, 1, timeout_ms);
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        char what[128];
        snprintf(what, sizeof what, "poll: %s", strerror(errno));
        return fail_io(c, msg, n, what);
    }
    *revents = rc == 0 ? 0 : pfd.revents;
    return MOE_OK;
}

/* The next frame off the wire (not the pending list) before the deadline
 * (-1: none). MOE_ERR_NOT_FOUND on timeout. */
static moe_err_t read_frame(moe_client_t *c, moe_client_response_t *resp, int64_t deadline,
                            char *msg, size_t n) {
    for (;;) {
        bool got;
        MOE_CHECK(parse_buffered(c, resp, &got, msg, n));
        if (got) return MOE_OK;
        short revents;
        MOE_CHECK(wait_fd(c, POLLIN, remaining_ms(deadline), &revents, msg, n));
        if (revents == 0)
            return moe_err_fmt(msg, n, MOE_ERR_NOT_FOUND, "no response within the timeout");
        MOE_CHECK(read_some(c, msg, n));
    }
}

static moe_err_t push_pending(moe_client_t *c, moe_client_response_t *resp, char *msg, size_t n) {
    moe_client_pending_t *p = malloc(sizeof *p);
    if (p == NULL) {
        moe_client_response_free(resp);
        return moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory");
    }
    p->resp = *resp;
    p->next = NULL;
    if (c->tail) c->tail->next = p;
    else c->head = p;
    c->tail = p;
    return MOE_OK;
}

/* Takes the buffered response with this id (any id when match_any). */
static bool take_pending(moe_client_t *c, bool match_any, uint64_t id,
                         moe_client_response_t *resp) {
    moe_client_pending_t *prev = NULL;
    for (moe_client_pending_t *p = c->head; p; prev = p, p = p->next) {
        if (!match_any && p->resp.request_id != id) continue;
        if (prev) prev->next = p->next;
        else c->head = p->next;
        if (c->tail == p) c->tail = prev;
        *resp = p->resp;
        free(p);
        return true;
    }
    return false;
}

/* Waits for the response to id, buffering the others. */
static moe_err_t wait_for(moe_client_t *c, uint64_t id, moe_client_response_t *resp,
                          int timeout_ms, char *msg, size_t n) {
    if (take_pending(c, false, id, resp)) return MOE_OK;
    int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    for (;;) {
        MOE_CHECK(read_frame(c, resp, deadline, msg, n));
        if (resp->request_id == id) return MOE_OK;
        MOE_CHECK(push_pending(c, resp, msg, n));
    }
}

moe_err_t moe_client_recv(moe_client_t *c, moe_client_response_t *resp, int timeout_ms, char *msg,
                          size_t n) {
    memset(resp, 0, sizeof *resp);
    if (take_pending(c, true, 0, resp)) return MOE_OK;
    if (c->broken) return moe_err_fmt(msg, n, MOE_ERR_IO, "connection is broken");
    return read_frame(c, resp, timeout_ms < 0 ? -1 : now_ms() + timeout_ms, msg, n);
}

/* ---- writing ---- */

/* Writes every byte of iov, reading (and buffering) responses whenever the
 * socket is not writable. */
static moe_err_t write_all(moe_client_t *c, struct iovec *iov, int iovcnt, char *msg, size_t n) {
    if (c->broken) return moe_err_fmt(msg, n, MOE_ERR_IO, "connection is broken");
    while (iovcnt > 0) {
        /* sendmsg, not writev: MSG_NOSIGNAL turns a vanished server into
         * EPIPE instead of killing the caller with SIGPIPE */
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)(iovcnt > 64 ? 64 : iovcnt)};
        ssize_t wrote = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        if (wrote < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                char what[128];
                snprintf(what, sizeof what, "write: %s", strerror(errno));
                return fail_io(c, msg, n, what);
            }
            short revents;
            MOE_CHECK(wait_fd(c, POLLIN | POLLOUT, -1, &revents, msg, n));
            if (revents & (POLLIN | POLLHUP)) {
                MOE_CHECK(read_some(c, msg, n));
                for (;;) {
                    moe_client_response_t resp;
                    bool got;
                    MOE_CHECK(parse_buffered(c, &resp, &got, msg, n));
                    if (!got) break;
                    MOE_CHECK(push_pending(c, &resp, msg, n));
                }
            }
            continue;
        }
        size_t left = (size_t)wrote;
        while (iovcnt > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++, iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return MOE_OK;
}

moe_err_t moe_client_send_raw(moe_client_t *c, const void *bytes, size_t len, char *msg,
                              size_t n) {
    struct iovec iov = {.iov_base = (void *)bytes, .iov_len = len};
    return write_all(c, &iov, 1, msg, n);
}

static bool host_is_little_endian(void) {
    uint16_t one = 1;
    uint8_t first;
    memcpy(&first, &one, 1);
    return first == 1;
}

moe_err_t moe_client_send(moe_client_t *c, uint64_t request_id, uint32_t layer, const float *x,
                          uint32_t n_tokens, uint32_t hidden, uint8_t dtype, const int32_t *ids,
                          const float *weights, uint16_t top_k, char *msg, size_t n) {
    if (moe_dtype_size(dtype) == 0)
        return moe_err_fmt(msg, n, MOE_ERR_INVAL, "unknown dtype %u", dtype);
    if ((ids == NULL) != (weights == NULL) || (ids != NULL && top_k == 0))
        return moe_err_fmt(msg, n, MOE_ERR_INVAL, "routed ids and weights go together, top_k > 0");
    uint8_t flags = ids ? MOE_FRAME_FLAG_ROUTED : 0;
    uint64_t payload_len = moe_frame_payload_size(MOE_FRAME_FORWARD, n_tokens, hidden, dtype, flags,
                                                  ids ? top_k : 0);
    if (payload_len == UINT64_MAX || payload_len > SIZE_MAX / 2)
        return moe_err_fmt(msg, n, MOE_ERR_INVAL, "request too large");
    moe_frame_header_t h = {.version = MOE_FRAME_VERSION, .type = MOE_FRAME_FORWARD,
                            .request_id = request_id, .layer = layer, .n_tokens = n_tokens,
                            .hidden = hidden, .dtype = dtype, .flags = flags,
                            .top_k = ids ? top_k : 0, .payload_len = payload_len};
    uint8_t head[MOE_FRAME_HEADER_SIZE];
    moe_frame_encode_header(&h, head);
    size_t values = (size_t)n_tokens * hidden, routed = (size_t)n_tokens * (ids ? top_k : 0);
    bool le = host_is_little_endian();
    /* f32 on a little-endian host is already wire format: send it in place */
    void *converted = NULL, *routed_buf = NULL;
    const void *data = x;
    if (dtype != MOE_DTYPE_F32 || !le) {
        converted = malloc(values * moe_dtype_size(dtype) + 1);
        if (converted == NULL) return moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory");
        moe_dtype_from_f32(dtype, x, converted, values);
        data = converted;
    }
    const void *id_bytes = ids, *weight_bytes = weights;
    if (routed && !le) {
        routed_buf = malloc(routed * 8);
        if (routed_buf == NULL) {
            free(converted);
            return moe_err_fmt(msg, n, MOE_ERR_NOMEM, "out of memory");
        }
        uint8_t *p = routed_buf;
        for (size_t i = 0; i < routed; i++) {
            uint32_t id = (uint32_t)ids[i], w;
            memcpy(&w, &weights[i], 4);
            for (int b = 0; b < 4; b++) {
                p[4 * i + b] = (uint8_t)(id >> (8 * b));
                p[4 * (routed + i) + b] = (uint8_t)(w >> (8 * b));
            }
        }
        id_bytes = p;
        weight_bytes = p + 4 * routed;
    }
    struct iovec iov[4] = {
        {.iov_base = head, .iov_len = sizeof head},
        {.iov_base = (void *)data, .iov_len = values * moe_dtype_size(dtype)},
        {.iov_base = (void *)id_bytes, .iov_len = routed * 4},
        {.iov_base = (void *)weight_bytes, .iov_len = routed * 4},
    };
    moe_err_t ret = write_all(c, iov, routed ? 4 : 2, msg, n);
    free(converted);
    free(routed_buf);
    return ret;
}

moe_err_t moe_client_forward(moe_client_t *c, uint32_t layer, const float *x, uint32_t n_tokens,
                             uint32_t hidden, uint8_t dtype, const int32_t *routed_ids,
                             const float *routed_weights, uint16_t top_k, float *out,
                             uint32_t *status, char *msg, size_t n) {
    *status = 0;
    uint64_t id = c->next_auto_id++;
    MOE_CHECK(moe_client_send(c, id, layer, x, n_tokens, hidden, dtype, routed_ids, routed_weights,
                              top_k, msg, n));
    moe_client_response_t resp;
    MOE_CHECK(wait_for(c, id, &resp, -1, msg, n));
    moe_err_t ret = MOE_OK;
    if (resp.type == MOE_FRAME_ERROR) {
        *status = resp.status;
        ret = moe_err_fmt(msg, n, MOE_ERR_INVAL, "server: %s: %s", moe_status_name(resp.status),
                          resp.error_text);
    } else if (resp.type != MOE_FRAME_RESULT || resp.n_tokens != n_tokens ||
               resp.hidden != hidden) {
        c->broken = true;
        ret = moe_err_fmt(msg, n, MOE_ERR_IO,
                          "response to request %" PRIu64 " is type %u with %u x %u values", id,
                          resp.type, resp.n_tokens, resp.hidden);
    } else {
        memcpy(out, resp.out, (size_t)n_tokens * hidden * sizeof(float));
    }
    moe_client_response_free(&resp);
    return ret;
}

moe_err_t moe_client_ping(moe_client_t *c, int timeout_ms, char *msg, size_t n) {
    uint64_t id = c->next_auto_id++;
    static const char probe[8] = "moeping";
    moe_frame_header_t h = {.version = MOE_FRAME_VERSION, .type = MOE_FRAME_PING,
                            .request_id = id, .payload_len = sizeof probe};
    uint8_t frame[MOE_FRAME_HEADER_SIZE + sizeof probe];
    moe_frame_encode_header(&h, frame);
    memcpy(frame + MOE_FRAME_HEADER_SIZE, probe, sizeof probe);
    MOE_CHECK(moe_client_send_raw(c, frame, sizeof frame, msg, n));
    moe_client_response_t resp;
    MOE_CHECK(wait_for(c, id, &resp, timeout_ms, msg, n));
    moe_err_t ret = MOE_OK;
    if (resp.type != MOE_FRAME_PONG || resp.payload_len != sizeof probe ||
        memcmp(resp.payload, probe, sizeof probe) != 0)
        ret = moe_err_fmt(msg, n, MOE_ERR_IO, "PING answered by type %u%s%s", resp.type,
                          resp.error_text ? ": " : "", resp.error_text ? resp.error_text : "");
    moe_client_response_free(&resp);
    return ret;
}
