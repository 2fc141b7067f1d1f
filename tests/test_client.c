/* test_client: libmoeclient (protocol/client.c) against a fake server
 * thread that speaks protocol v1 with the codec: FORWARD -> RESULT of 2*x
 * (times the sum of the routed weights when ROUTED), layer 99 -> ERROR
 * bad_layer, layer 7 -> held and answered in reverse order once 4 are held,
 * PING -> PONG. The daemon is tested elsewhere; this pins the client. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "../protocol/moe_client.h"

typedef struct {
    int listen_fd;
    pthread_t thread;
    int frames_seen;
} fake_server_t;

static void write_full(int fd, const void *data, size_t len) {
    const uint8_t *p = data;
    while (len > 0) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        p += w;
        len -= (size_t)w;
    }
}

static void send_frame(int fd, moe_frame_header_t *h, const void *payload) {
    uint8_t head[MOE_FRAME_HEADER_SIZE];
    h->version = MOE_FRAME_VERSION;
    moe_frame_encode_header(h, head);
    write_full(fd, head, sizeof head);
    if (h->payload_len) write_full(fd, payload, (size_t)h->payload_len);
}

typedef struct {
    moe_frame_header_t h;
    uint8_t *payload;
} held_t;

static void answer_forward(int fd, const moe_frame_header_t *req, const uint8_t *payload) {
    moe_frame_header_t h = {.type = MOE_FRAME_RESULT, .request_id = req->request_id,
                            .layer = req->layer, .n_tokens = req->n_tokens, .hidden = req->hidden,
                            .dtype = req->dtype};
    size_t values = (size_t)req->n_tokens * req->hidden, esize = moe_dtype_size(req->dtype);
    float scale = 2.0f;
    if (req->flags & MOE_FRAME_FLAG_ROUTED) {
        size_t routed = (size_t)req->n_tokens * req->top_k;
        float sum = 0;
        const uint8_t *w = payload + values * esize + routed * 4;
        for (size_t i = 0; i < routed; i++) {
            float v;
            memcpy(&v, w + 4 * i, 4);
            sum += v;
        }
        scale *= sum;
    }
    float *x = malloc(values * sizeof(float) + 1);
    uint8_t *out = malloc(values * esize + 1);
    moe_dtype_to_f32(req->dtype, payload, x, values);
    for (size_t i = 0; i < values; i++) x[i] *= scale;
    moe_dtype_from_f32(req->dtype, x, out, values);
    h.payload_len = values * esize;
    send_frame(fd, &h, out);
    free(x);
    free(out);
}

static void *serve(void *arg) {
    fake_server_t *s = arg;
    int fd = accept(s->listen_fd, NULL, NULL);
    if (fd < 0) return NULL;
    moe_frame_parser_t parser;
    moe_frame_parser_init(&parser, 1u << 28);
    held_t held[4];
    int n_held = 0;
    uint8_t buf[4096];
    ssize_t got;
    while ((got = read(fd, buf, sizeof buf)) > 0) {
        size_t off = 0;
        while (off < (size_t)got) {
            size_t consumed;
            moe_frame_header_t h;
            uint8_t *payload = NULL;
            moe_parse_result_t r =
                moe_frame_parse(&parser, buf + off, (size_t)got - off, &consumed, &h, &payload);
            off += consumed;
            if (r == MOE_PARSE_ERROR) {
                moe_frame_header_t e = {.type = MOE_FRAME_ERROR, .status = MOE_STATUS_BAD_FRAME,
                                        .payload_len = strlen(parser.error_msg)};
                send_frame(fd, &e, parser.error_msg);
                goto done;
            }
            if (r != MOE_PARSE_FRAME) continue;
            s->frames_seen++;
            if (h.type == MOE_FRAME_PING) {
                moe_frame_header_t p = {.type = MOE_FRAME_PONG, .request_id = h.request_id,
                                        .payload_len = h.payload_len};
                send_frame(fd, &p, payload);
            } else if (h.type == MOE_FRAME_FORWARD && h.layer == 99) {
                const char *text = "layer 99 is not served";
                moe_frame_header_t e = {.type = MOE_FRAME_ERROR, .request_id = h.request_id,
                                        .layer = 99, .status = MOE_STATUS_BAD_LAYER,
                                        .payload_len = strlen(text)};
                send_frame(fd, &e, text);
            } else if (h.type == MOE_FRAME_FORWARD && h.layer == 7) {
                held[n_held++] = (held_t){h, payload};
                payload = NULL;
                if (n_held == 4) {
                    for (int i = 3; i >= 0; i--) {
                        answer_forward(fd, &held[i].h, held[i].payload);
                        free(held[i].payload);
                    }
                    n_held = 0;
                }
            } else if (h.type == MOE_FRAME_FORWARD) {
                answer_forward(fd, &h, payload);
            }
            free(payload);
        }
    }
done:
    for (int i = 0; i < n_held; i++) free(held[i].payload);
    moe_frame_parser_reset(&parser);
    close(fd);
    return NULL;
}

/* Listens on 127.0.0.1 (ephemeral port, returned) or a unix path. */
static int start_tcp(fake_server_t *s, int family) {
    memset(s, 0, sizeof *s);
    s->listen_fd = socket(family, SOCK_STREAM, 0);
    cr_assert_geq(s->listen_fd, 0);
    int one = 1;
    setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage ss = {0};
    socklen_t len;
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        len = sizeof *a;
    }
    if (bind(s->listen_fd, (struct sockaddr *)&ss, len) != 0) return -1;
    cr_assert_eq(listen(s->listen_fd, 4), 0);
    cr_assert_eq(getsockname(s->listen_fd, (struct sockaddr *)&ss, &len), 0);
    int port = ntohs(family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                        : ((struct sockaddr_in *)&ss)->sin_port);
    pthread_create(&s->thread, NULL, serve, s);
    return port;
}

static void start_unix(fake_server_t *s, const char *path) {
    memset(s, 0, sizeof *s);
    s->listen_fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    cr_assert_lt(strlen(path), sizeof a.sun_path);
    memcpy(a.sun_path, path, strlen(path) + 1);
    unlink(path);
    cr_assert_eq(bind(s->listen_fd, (struct sockaddr *)&a, sizeof a), 0, "%s", strerror(errno));
    cr_assert_eq(listen(s->listen_fd, 4), 0);
    pthread_create(&s->thread, NULL, serve, s);
}

static void stop(fake_server_t *s) {
    pthread_join(s->thread, NULL);
    close(s->listen_fd);
}

static moe_client_t *connect_tcp(fake_server_t *s) {
    int port = start_tcp(s, AF_INET);
    char addr[64], msg[256];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    moe_client_t *c;
    cr_assert_eq(moe_client_connect(addr, 0, &c, msg, sizeof msg), MOE_OK, "%s", msg);
    return c;
}

static void fill(float *x, size_t n, unsigned seed) {
    srand(seed);
    for (size_t i = 0; i < n; i++) x[i] = (float)rand() / RAND_MAX * 4.0f - 2.0f;
}

Test(client, forward_in_every_dtype, .timeout = 10) {
    fake_server_t s;
    moe_client_t *c = connect_tcp(&s);
    unsigned seed = (unsigned)time(NULL);
    enum { T = 5, H = 33 };
    float x[T * H], out[T * H];
    fill(x, T * H, seed);
    const uint8_t dtypes[3] = {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16};
    for (int d = 0; d < 3; d++) {
        for (int i = 0; i < T * H; i++) out[i] = NAN; /* poison */
        uint32_t status = 77;
        char msg[256];
        cr_assert_eq(moe_client_forward(c, 0, x, T, H, dtypes[d], NULL, NULL, 0, out, &status, msg,
                                        sizeof msg),
                     MOE_OK, "%s", msg);
        cr_assert_eq(status, 0);
        for (int i = 0; i < T * H; i++) {
            /* expected: x rounded to the dtype, doubled (exact), rounded again */
            float want = dtypes[d] == MOE_DTYPE_F32 ? 2 * x[i]
                         : dtypes[d] == MOE_DTYPE_BF16
                             ? moe_bf16_to_f32(moe_f32_to_bf16(2 * moe_bf16_to_f32(moe_f32_to_bf16(x[i]))))
                             : moe_f16_to_f32(moe_f32_to_f16(2 * moe_f16_to_f32(moe_f32_to_f16(x[i]))));
            cr_assert_eq(out[i], want, "dtype %u i %d seed %u: %g vs %g", dtypes[d], i, seed,
                         out[i], want);
            float tol = dtypes[d] == MOE_DTYPE_F32 ? 0 : dtypes[d] == MOE_DTYPE_BF16 ? 0.032f : 0.004f;
            cr_assert(fabsf(out[i] - 2 * x[i]) <= tol * fabsf(2 * x[i]) + 1e-6f);
        }
    }
    moe_client_close(c);
    stop(&s);
}

Test(client, routed_forward_sends_ids_and_weights, .timeout = 10) {
    fake_server_t s;
    moe_client_t *c = connect_tcp(&s);
    float x[2 * 4] = {1, 2, 3, 4, 5, 6, 7, 8}, out[8];
    int32_t ids[2 * 2] = {0, 1, 2, 3};
    float weights[2 * 2] = {0.25f, 0.5f, 0.75f, 1.0f}; /* sum 2.5: out = 5 x */
    uint32_t status;
    char msg[256];
    cr_assert_eq(moe_client_forward(c, 1, x, 2, 4, MOE_DTYPE_F32, ids, weights, 2, out, &status,
                                    msg, sizeof msg),
                 MOE_OK, "%s", msg);
    for (int i = 0; i < 8; i++) cr_assert_eq(out[i], 5 * x[i]);
    /* ids without weights is a caller error, nothing is sent */
    cr_assert_eq(moe_client_forward(c, 1, x, 2, 4, MOE_DTYPE_F32, ids, NULL, 2, out, &status, msg,
                                    sizeof msg),
                 MOE_ERR_INVAL);
    cr_assert_eq(moe_client_forward(c, 1, x, 2, 4, 9, NULL, NULL, 0, out, &status, msg, sizeof msg),
                 MOE_ERR_INVAL);
    moe_client_close(c);
    stop(&s);
    cr_assert_eq(s.frames_seen, 1);
}

Test(client, error_frame_keeps_connection, .timeout = 10) {
    fake_server_t s;
    moe_client_t *c = connect_tcp(&s);
    float x[4] = {1, 2, 3, 4}, out[4] = {0};
    uint32_t status = 0;
    char msg[256];
    cr_assert_eq(moe_client_forward(c, 99, x, 1, 4, MOE_DTYPE_F32, NULL, NULL, 0, out, &status, msg,
                                    sizeof msg),
                 MOE_ERR_INVAL);
    cr_assert_eq(status, MOE_STATUS_BAD_LAYER);
    cr_assert_str_eq(msg, "server: bad_layer: layer 99 is not served");
    cr_assert_eq(out[0], 0, "out untouched on error");
    cr_assert_eq(moe_client_forward(c, 0, x, 1, 4, MOE_DTYPE_F32, NULL, NULL, 0, out, &status, msg,
                                    sizeof msg),
                 MOE_OK, "%s", msg);
    cr_assert_eq(out[3], 8.0f);
    /* pipelined: the ERROR comes back as a response with its status */
    cr_assert_eq(moe_client_send(c, 5, 99, x, 1, 4, MOE_DTYPE_F32, NULL, NULL, 0, msg, sizeof msg),
                 MOE_OK);
    moe_client_response_t r;
    cr_assert_eq(moe_client_recv(c, &r, 5000, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(r.type, MOE_FRAME_ERROR);
    cr_assert_eq(r.request_id, 5);
    cr_assert_eq(r.status, MOE_STATUS_BAD_LAYER);
    cr_assert_null(r.out);
    cr_assert_str_eq(r.error_text, "layer 99 is not served");
    moe_client_response_free(&r);
    moe_client_close(c);
    stop(&s);
}

Test(client, pipelined_out_of_order, .timeout = 10) {
    fake_server_t s;
    moe_client_t *c = connect_tcp(&s);
    enum { H = 8 };
    float x[4][H];
    char msg[256];
    for (int r = 0; r < 4; r++) {
        for (int i = 0; i < H; i++) x[r][i] = (float)(r * 100 + i);
        cr_assert_eq(moe_client_send(c, 10 + (uint64_t)r, 7, x[r], 1, H, MOE_DTYPE_F32, NULL, NULL,
                                     0, msg, sizeof msg),
                     MOE_OK, "%s", msg);
    }
    for (int k = 0; k < 4; k++) {
        moe_client_response_t resp;
        cr_assert_eq(moe_client_recv(c, &resp, 5000, msg, sizeof msg), MOE_OK, "%s", msg);
        cr_assert_eq(resp.type, MOE_FRAME_RESULT);
        cr_assert_eq(resp.request_id, 13 - (uint64_t)k, "reverse order");
        cr_assert_eq(resp.layer, 7);
        cr_assert_eq(resp.n_tokens, 1);
        cr_assert_eq(resp.hidden, H);
        int r = 3 - k;
        for (int i = 0; i < H; i++) cr_assert_eq(resp.out[i], 2 * x[r][i]);
        moe_client_response_free(&resp);
    }
    /* nothing left: recv times out and the client stays usable */
    moe_client_response_t none;
    cr_assert_eq(moe_client_recv(c, &none, 50, msg, sizeof msg), MOE_ERR_NOT_FOUND);
    cr_assert_eq(moe_client_ping(c, 5000, msg, sizeof msg), MOE_OK, "%s", msg);
    moe_client_close(c);
    stop(&s);
}

Test(client, blocking_call_buffers_other_responses, .timeout = 10) {
    fake_server_t s;
    moe_client_t *c = connect_tcp(&s);
    float x[3] = {1, 2, 3}, out[3];
    char msg[256];
    uint32_t status;
    cr_assert_eq(moe_client_send(c, 1, 0, x, 1, 3, MOE_DTYPE_F32, NULL, NULL, 0, msg, sizeof msg),
                 MOE_OK);
    cr_assert_eq(moe_client_send(c, 2, 99, x, 1, 3, MOE_DTYPE_F32, NULL, NULL, 0, msg, sizeof msg),
                 MOE_OK);
    cr_assert_eq(moe_client_ping(c, 5000, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(moe_client_forward(c, 0, x, 1, 3, MOE_DTYPE_F16, NULL, NULL, 0, out, &status, msg,
                                    sizeof msg),
                 MOE_OK, "%s", msg);
    cr_assert_eq(out[2], 6.0f);
    moe_client_response_t r;
    cr_assert_eq(moe_client_recv(c, &r, 0, msg, sizeof msg), MOE_OK, "buffered: %s", msg);
    cr_assert_eq(r.request_id, 1);
    cr_assert_eq(r.out[1], 4.0f);
    moe_client_response_free(&r);
    cr_assert_eq(moe_client_recv(c, &r, 0, msg, sizeof msg), MOE_OK, "buffered: %s", msg);
    cr_assert_eq(r.request_id, 2);
    cr_assert_eq(r.type, MOE_FRAME_ERROR);
    moe_client_response_free(&r);
    moe_client_close(c);
    stop(&s);
}

Test(client, large_pipelined_requests_do_not_deadlock, .timeout = 30) {
    fake_server_t s;
    moe_client_t *c = connect_tcp(&s);
    enum { T = 64, H = 1024, N = 24 };
    float *x = malloc(sizeof(float) * T * H);
    fill(x, (size_t)T * H, 3);
    char msg[256];
    /* 24 x 256 KiB both ways: more than socket buffers hold, so send must
     * drain responses while it writes */
    for (int r = 0; r < N; r++)
        cr_assert_eq(moe_client_send(c, (uint64_t)r, 0, x, T, H, MOE_DTYPE_F32, NULL, NULL, 0, msg,
                                     sizeof msg),
                     MOE_OK, "%s", msg);
    for (int r = 0; r < N; r++) {
        moe_client_response_t resp;
        cr_assert_eq(moe_client_recv(c, &resp, 10000, msg, sizeof msg), MOE_OK, "%s", msg);
        cr_assert_eq(resp.request_id, (uint64_t)r);
        cr_assert_eq(resp.out[T * H - 1], 2 * x[T * H - 1]);
        moe_client_response_free(&resp);
    }
    free(x);
    moe_client_close(c);
    stop(&s);
}

Test(client, bad_frame_closes_connection, .timeout = 10) {
    fake_server_t s;
    moe_client_t *c = connect_tcp(&s);
    uint8_t junk[MOE_FRAME_HEADER_SIZE];
    memset(junk, 'Z', sizeof junk);
    char msg[256];
    cr_assert_eq(moe_client_send_raw(c, junk, sizeof junk, msg, sizeof msg), MOE_OK);
    moe_client_response_t r;
    cr_assert_eq(moe_client_recv(c, &r, 5000, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(r.type, MOE_FRAME_ERROR);
    cr_assert_eq(r.status, MOE_STATUS_BAD_FRAME);
    cr_assert(strstr(r.error_text, "magic") != NULL, "%s", r.error_text);
    moe_client_response_free(&r);
    cr_assert_eq(moe_client_recv(c, &r, 5000, msg, sizeof msg), MOE_ERR_IO);
    cr_assert(strstr(msg, "closed") != NULL, "%s", msg);
    moe_client_close(c);
    stop(&s);
}

Test(client, unix_address_with_rank_substitution, .timeout = 10) {
    char tmpl[128], path[128], addr[160], msg[256];
    snprintf(tmpl, sizeof tmpl, "/tmp/moe-test-client-%d-%%r.sock", (int)getpid());
    snprintf(path, sizeof path, "/tmp/moe-test-client-%d-2.sock", (int)getpid());
    fake_server_t s;
    start_unix(&s, path);
    snprintf(addr, sizeof addr, "unix:%s", tmpl);
    moe_client_t *c;
    cr_assert_eq(moe_client_connect(addr, 2, &c, msg, sizeof msg), MOE_OK, "%s", msg);
    float x[2] = {1.5f, -3}, out[2];
    uint32_t status;
    cr_assert_eq(moe_client_forward(c, 0, x, 1, 2, MOE_DTYPE_BF16, NULL, NULL, 0, out, &status, msg,
                                    sizeof msg),
                 MOE_OK, "%s", msg);
    cr_assert_eq(out[0], 3.0f);
    cr_assert_eq(out[1], -6.0f);
    moe_client_close(c);
    stop(&s);
    unlink(path);
    /* rank 3 has no socket */
    cr_assert_eq(moe_client_connect(addr, 3, &c, msg, sizeof msg), MOE_ERR_IO);
    cr_assert(strstr(msg, "-3.sock") != NULL, "%s", msg);
}

Test(client, tcp_port_plus_rank_and_ipv6, .timeout = 10) {
    fake_server_t s;
    int port = start_tcp(&s, AF_INET);
    char addr[64], msg[256];
    snprintf(addr, sizeof addr, "localhost:%d", port - 2);
    moe_client_t *c;
    cr_assert_eq(moe_client_connect(addr, 2, &c, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(moe_client_ping(c, 5000, msg, sizeof msg), MOE_OK, "%s", msg);
    moe_client_close(c);
    stop(&s);
    int port6 = start_tcp(&s, AF_INET6);
    if (port6 < 0) {
        close(s.listen_fd);
        cr_log_warn("no IPv6 loopback here; skipped the [::1] case");
        return;
    }
    snprintf(addr, sizeof addr, "[::1]:%d", port6);
    cr_assert_eq(moe_client_connect(addr, 0, &c, msg, sizeof msg), MOE_OK, "%s", msg);
    cr_assert_eq(moe_client_ping(c, 5000, msg, sizeof msg), MOE_OK, "%s", msg);
    moe_client_close(c);
    stop(&s);
}

Test(client, bad_addresses, .timeout = 10) {
    moe_client_t *c = (moe_client_t *)0x1;
    char msg[256];
    cr_assert_eq(moe_client_connect("nocolon", 0, &c, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert_null(c);
    cr_assert_eq(moe_client_connect("127.0.0.1:notaport", 0, &c, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert_eq(moe_client_connect("127.0.0.1:65535", 1, &c, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert_eq(moe_client_connect("unix:", 0, &c, msg, sizeof msg), MOE_ERR_INVAL);
    cr_assert_eq(moe_client_connect("127.0.0.1:1", 0, &c, msg, sizeof msg), MOE_ERR_IO);
}
