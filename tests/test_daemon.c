/* Integration tests of moed under a real `mpirun -np 2` (DESIGN §11): every
 * test starts its own daemon in a fresh temp dir (unix sockets there), talks
 * to it over its real sockets, checks every RESULT against the dense
 * reference on fresh random inputs (the seed is in every failure message),
 * and stops it with `shutdown`, requiring exit 0. The .fini kills whatever
 * is left of the job when an assertion fails, so no test leaves orphans. */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "support/daemon_harness.h"
#include "support/dense_ref.h"
#include "support/st_writer.h"

static moe_test_daemon_t daemon_;
static moe_test_ref_t *ref_;
static uint64_t seed_;
static char tail_[3000];

static void fini(void) {
    moe_test_daemon_cleanup_all();
    moe_test_ref_destroy(ref_);
    ref_ = NULL;
}

#define LOG_TAIL() moe_test_daemon_log_tail(&daemon_, tail_, sizeof tail_)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The interval of a poll for a condition that has nothing to wait on. */
static void poll_interval(void) {
    struct timespec ts = {0, 50 * 1000000L};
    nanosleep(&ts, NULL);
}

static void start(const moe_test_daemon_opts_t *opts) {
    char msg[4096];
    seed_ = moe_test_fresh_seed();
    int rc = moe_test_daemon_start(&daemon_, opts, 2, true, msg, sizeof msg);
    cr_assert_eq(rc, 0, "seed %llu: cannot start the daemon: %s", (unsigned long long)seed_, msg);
    ref_ = moe_test_ref_create(&daemon_.cfg, msg, sizeof msg);
    cr_assert_not_null(ref_, "reference: %s", msg);
}

static void stop(void) {
    char msg[4096];
    int rc = moe_test_daemon_stop(&daemon_, 20000, msg, sizeof msg);
    cr_assert_eq(rc, 0, "seed %llu: shutdown: %s", (unsigned long long)seed_, msg);
    moe_test_daemon_destroy(&daemon_);
}

/* A control request that must succeed; returns the reply (caller frees). */
static cJSON *control_ok(const char *line) {
    cJSON *reply = moe_test_control(&daemon_, line);
    cr_assert_not_null(moe_test_reply_result(reply), "%s -> %s; log:\n%s", line,
                       reply ? cJSON_PrintUnformatted(reply) : "(no reply)", LOG_TAIL());
    return reply;
}

/* A control request that must fail with code; returns the reply. */
static cJSON *control_fails(const char *line, const char *code) {
    cJSON *reply = moe_test_control(&daemon_, line);
    const char *got = moe_test_reply_error_code(reply);
    cr_assert(got != NULL && strcmp(got, code) == 0, "%s: want error %s, got %s", line, code,
              reply ? cJSON_PrintUnformatted(reply) : "(no reply)");
    return reply;
}

static void client_init(moe_test_client_t *c, int rank, int depth, int n_requests, int max_tokens,
                        bool random_dtype, uint64_t seed) {
    memset(c, 0, sizeof *c);
    c->daemon = &daemon_;
    c->ref = ref_;
    c->rank = rank;
    c->depth = depth;
    c->n_requests = n_requests;
    c->max_tokens = max_tokens;
    c->random_dtype = random_dtype;
    c->seed = seed;
}

/* Runs n clients to completion and asserts none failed. */
static void run_clients(moe_test_client_t *clients, int n) {
    pthread_t threads[16];
    for (int i = 0; i < n; i++)
        cr_assert_eq(pthread_create(&threads[i], NULL, moe_test_client_thread, &clients[i]), 0);
    for (int i = 0; i < n; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < n; i++)
        cr_assert(!clients[i].failed, "%s; log:\n%s", clients[i].failure, LOG_TAIL());
}

/* ------------------------------------------------------------------ a. */

Test(daemon, correctness_many_clients_pipelined, .timeout = 180, .fini = fini) {
    moe_test_daemon_opts_t opts = {0};
    start(&opts);
    moe_test_client_t clients[8];
    for (int i = 0; i < 8; i++) client_init(&clients[i], i % 2, 8, 24, 96, true, seed_ + 1000 * (uint64_t)i);
    run_clients(clients, 8);
    int answered = 0;
    double worst[4] = {0};
    for (int i = 0; i < 8; i++) {
        cr_assert_eq(clients[i].results, clients[i].sent, "seed %llu: client %d: %d sent, %d results, %d errors",
                     (unsigned long long)seed_, i, clients[i].sent, clients[i].results, clients[i].errors);
        answered += clients[i].results;
        for (int t = 0; t < 4; t++) worst[t] = fmax(worst[t], clients[i].worst[t]);
    }
    cr_assert_eq(answered, 8 * 24);
    cr_log_info("seed %llu: %d requests; worst relative error f32 %.2e bf16 %.2e f16 %.2e",
                (unsigned long long)seed_, answered, worst[1], worst[2], worst[3]);
    stop();
}

/* ------------------------------------------------------------------ b. */

static void routing_case(const char *method, int n_group, int topk_group, int shared, int depth) {
    moe_test_daemon_opts_t opts = {.routing = method, .n_group = n_group, .topk_group = topk_group,
                                   .shared_intermediate = shared};
    start(&opts);
    moe_test_client_t clients[2];
    for (int r = 0; r < 2; r++) client_init(&clients[r], r, depth, 6, 32, true, seed_ + 77 * (uint64_t)r);
    run_clients(clients, 2);
    for (int r = 0; r < 2; r++)
        cr_assert_eq(clients[r].results, 6, "%s seed %llu rank %d: %d results", method, (unsigned long long)seed_, r,
                     clients[r].results);
}

Test(routing, softmax_topk, .timeout = 90, .fini = fini) {
    routing_case("softmax_topk", 1, 1, 0, 3);
    stop();
}

Test(routing, renormalize, .timeout = 90, .fini = fini) {
    routing_case("renormalize", 1, 1, 0, 3);
    stop();
}

Test(routing, sigmoid_group_topk_with_shared_expert, .timeout = 90, .fini = fini) {
    routing_case("sigmoid_group_topk", 4, 2, 32, 3);
    stop();
}

/* The perfect router numbers a step's tokens; one request per rank in
 * flight keeps each request alone in its rank's share of a step. */
Test(routing, perfect, .timeout = 90, .fini = fini) {
    routing_case("perfect", 1, 1, 0, 1);
    stop();
}

Test(routing, uniform_answers_finite, .timeout = 90, .fini = fini) {
    routing_case("uniform", 1, 1, 0, 3);
    stop();
}

Test(routing, zipf_answers_finite, .timeout = 90, .fini = fini) {
    routing_case("zipf", 1, 1, 0, 3);
    stop();
}

/* Expects the next frame on c to be an ERROR with status for request_id. */
static void expect_error(moe_test_conn_t *c, uint64_t request_id, uint32_t status, const char *what) {
    moe_test_frame_t f;
    int rc = moe_test_conn_read(c, &f, 20000);
    cr_assert_eq(rc, 1, "%s: no answer (rc %d); log:\n%s", what, rc, LOG_TAIL());
    char text[256];
    cr_assert(f.h.type == MOE_FRAME_ERROR && f.h.status == status && f.h.request_id == request_id,
              "%s: want ERROR %s for request %llu, got type %u status %s (%u) request %llu: %s", what,
              moe_status_name(status), (unsigned long long)request_id, f.h.type, moe_status_name(f.h.status),
              f.h.status, (unsigned long long)f.h.request_id, moe_test_frame_text(&f, text, sizeof text));
    moe_test_frame_free(&f);
}

/* One good request on c, checked against the reference. */
static void expect_good_forward(moe_test_conn_t *c, int rank, uint64_t request_id, uint64_t seed) {
    const int H = 64, n = 5;
    float x[5 * 64], got[5 * 64];
    double want[5 * 64];
    moe_test_fill_random(x, (size_t)n * H, seed);
    int32_t ids[10];
    float weights[10];
    bool routed = daemon_.cfg.model.routing.method == MOE_ROUTE_CLIENT;
    uint64_t state = seed;
    if (routed) moe_test_random_routing(&state, n, 8, 2, ids, weights);
    cr_assert_eq(moe_test_send_forward(c->fd, request_id, 1, x, n, H, MOE_DTYPE_F32, routed ? ids : NULL,
                                       routed ? weights : NULL, 2), 0);
    moe_test_frame_t f;
    cr_assert_eq(moe_test_conn_read(c, &f, 20000), 1, "no answer to a good request; log:\n%s", LOG_TAIL());
    cr_assert(f.h.type == MOE_FRAME_RESULT && f.h.request_id == request_id && f.h.n_tokens == (uint32_t)n,
              "want RESULT for %llu, got type %u status %s", (unsigned long long)request_id, f.h.type,
              moe_status_name(f.h.status));
    moe_dtype_to_f32(MOE_DTYPE_F32, f.payload, got, (size_t)n * H);
    moe_test_frame_free(&f);
    moe_test_ref_forward(ref_, 1, x, n, rank, 2, routed ? ids : NULL, routed ? weights : NULL, want, NULL);
    double err = moe_test_rel_error(got, want, (size_t)n * H);
    cr_assert(err <= 1e-5, "seed %llu: relative error %g", (unsigned long long)seed, err);
}

/* Client routing: ROUTED requests checked against the reference given the
 * same ids and weights; a request without ROUTED and one with an expert id
 * out of range or repeated get bad_routing and the connection stays. */
Test(routing, client_routed_requests, .timeout = 90, .fini = fini) {
    routing_case("client", 1, 1, 0, 3);
    moe_test_conn_t c;
    cr_assert_eq(moe_test_conn_open(&c, &daemon_, 1), 0);
    float x[2 * 64];
    moe_test_fill_random(x, 2 * 64, seed_);
    int32_t out_of_range[4] = {0, 1, 8, 2};
    int32_t repeated[4] = {3, 3, 1, 2};
    int32_t negative[4] = {-1, 1, 4, 2};
    float weights[4] = {0.5f, 0.5f, 0.5f, 0.5f};
    cr_assert_eq(moe_test_send_forward(c.fd, 1, 0, x, 2, 64, MOE_DTYPE_F32, NULL, NULL, 0), 0);
    expect_error(&c, 1, MOE_STATUS_BAD_ROUTING, "client routing without ROUTED");
    cr_assert_eq(moe_test_send_forward(c.fd, 2, 0, x, 2, 64, MOE_DTYPE_F32, out_of_range, weights, 2), 0);
    expect_error(&c, 2, MOE_STATUS_BAD_ROUTING, "expert id 8 of 8");
    cr_assert_eq(moe_test_send_forward(c.fd, 3, 0, x, 2, 64, MOE_DTYPE_F32, repeated, weights, 2), 0);
    expect_error(&c, 3, MOE_STATUS_BAD_ROUTING, "expert id repeated");
    cr_assert_eq(moe_test_send_forward(c.fd, 4, 0, x, 2, 64, MOE_DTYPE_F32, negative, weights, 2), 0);
    expect_error(&c, 4, MOE_STATUS_BAD_ROUTING, "expert id -1");
    float nan_weights[4] = {0.5f, NAN, 0.5f, 0.5f};
    int32_t fine[4] = {0, 1, 2, 3};
    cr_assert_eq(moe_test_send_forward(c.fd, 5, 0, x, 2, 64, MOE_DTYPE_F32, fine, nan_weights, 2), 0);
    expect_error(&c, 5, MOE_STATUS_BAD_ROUTING, "weight NaN");
    expect_good_forward(&c, 1, 6, seed_ + 6);
    moe_test_conn_close(&c);
    stop();
}

/* ------------------------------------------------------------------ c. */

static void encode(moe_frame_header_t h, uint8_t out[MOE_FRAME_HEADER_SIZE]) { moe_frame_encode_header(&h, out); }

static moe_frame_header_t forward_header(uint64_t id, uint32_t layer, uint32_t n_tokens, uint32_t hidden, uint8_t dtype) {
    moe_frame_header_t h = {MOE_FRAME_VERSION, MOE_FRAME_FORWARD, id, layer, n_tokens, hidden, dtype, 0, 0, 0, 0};
    h.payload_len = moe_frame_payload_size(MOE_FRAME_FORWARD, n_tokens, hidden, dtype, 0, 0);
    return h;
}

/* Sends raw bytes on a fresh connection to rank and expects ERROR bad_frame
 * (request_id 0), then the connection closed. */
static void expect_bad_frame(int rank, const uint8_t *bytes, size_t len, uint64_t request_id, const char *what) {
    moe_test_conn_t c;
    cr_assert_eq(moe_test_conn_open(&c, &daemon_, rank), 0, "%s: connect", what);
    cr_assert_eq(moe_test_send_all(c.fd, bytes, len), 0, "%s: send", what);
    expect_error(&c, request_id, MOE_STATUS_BAD_FRAME, what);
    cr_assert(moe_test_conn_wait_eof(&c, 5000), "%s: the connection stayed open after bad_frame", what);
    moe_test_conn_close(&c);
}

/* Sends one FORWARD frame with this header and a payload of payload_len
 * bytes (random values) on c. */
static void send_frame(moe_test_conn_t *c, moe_frame_header_t h, uint64_t seed) {
    size_t len = (size_t)h.payload_len;
    uint8_t *frame = calloc(1, MOE_FRAME_HEADER_SIZE + len);
    cr_assert_not_null(frame);
    encode(h, frame);
    if (h.dtype == MOE_DTYPE_F32 && len % 4 == 0) moe_test_fill_random((float *)(void *)(frame + MOE_FRAME_HEADER_SIZE), len / 4, seed);
    cr_assert_eq(moe_test_send_all(c->fd, frame, MOE_FRAME_HEADER_SIZE + len), 0);
    free(frame);
}

/* A slow-drip client: one byte of a valid FORWARD every 200 ms. Returns the
 * seconds until the daemon answered ERROR timeout and closed. */
static double slow_drip(int rank) {
    moe_test_conn_t c;
    cr_assert_eq(moe_test_conn_open(&c, &daemon_, rank), 0);
    moe_frame_header_t h = forward_header(42, 0, 4, 64, MOE_DTYPE_F32);
    uint8_t header[MOE_FRAME_HEADER_SIZE];
    encode(h, header);
    double start = now_s();
    size_t at = 0;
    moe_test_frame_t f;
    int rc = 0;
    /* pacing: wait 200 ms for the daemon's answer, else drip the next byte */
    while (now_s() - start < 15) {
        if (at < sizeof header) cr_assert_eq(moe_test_send_all(c.fd, header + at++, 1), 0, "drip send");
        rc = moe_test_conn_read(&c, &f, 200);
        if (rc != 0) break;
    }
    cr_assert_eq(rc, 1, "slow drip: no ERROR within 15 s (rc %d); log:\n%s", rc, LOG_TAIL());
    char text[256];
    cr_assert(f.h.type == MOE_FRAME_ERROR && f.h.status == MOE_STATUS_TIMEOUT,
              "slow drip: want ERROR timeout, got type %u status %s: %s", f.h.type, moe_status_name(f.h.status),
              moe_test_frame_text(&f, text, sizeof text));
    moe_test_frame_free(&f);
    cr_assert(moe_test_conn_wait_eof(&c, 5000), "slow drip: still open after the timeout ERROR");
    double elapsed = now_s() - start;
    moe_test_conn_close(&c);
    return elapsed;
}

/* A client that sends and never reads: the daemon must drop it once its
 * unsent output passes serve.max_output_bytes and nothing was read for a
 * second. Returns true when the connection was closed by the daemon. */
static bool never_reads(int rank, uint64_t seed) {
    moe_test_conn_t c;
    cr_assert_eq(moe_test_conn_open(&c, &daemon_, rank), 0);
    struct timeval tv = {10, 0};
    setsockopt(c.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    float *x = malloc(sizeof(float) * 64 * 64);
    cr_assert_not_null(x);
    moe_test_fill_random(x, 64 * 64, seed);
    bool send_failed = false;
    /* 400 requests x 16 KiB of output is far over any socket buffer */
    for (int i = 0; i < 400 && !send_failed; i++)
        send_failed = moe_test_send_forward(c.fd, (uint64_t)i + 1, 2, x, 64, 64, MOE_DTYPE_F32, NULL, NULL, 0) != 0;
    free(x);
    /* the client's behaviour under test: it reads nothing for 2.5 s (the
     * daemon gives a client whose results pile up 1 s to read some) */
    struct timespec pause = {2, 500 * 1000 * 1000};
    nanosleep(&pause, NULL);
    bool closed = moe_test_conn_wait_eof(&c, 20000);
    moe_test_conn_close(&c);
    return closed;
}

Test(daemon, bad_input_does_not_hurt_others, .timeout = 180, .fini = fini) {
    moe_test_daemon_opts_t opts = {.request_timeout_ms = 3000, .max_output_bytes = 131072,
                                   .max_request_tokens = 256, .max_frame_bytes = 1 << 20};
    start(&opts);
    /* good clients on both ranks, checking every answer throughout */
    atomic_int stop_flag = 0;
    moe_test_client_t good[2];
    pthread_t threads[2];
    for (int r = 0; r < 2; r++) {
        client_init(&good[r], r, 2, 0, 16, true, seed_ + 5 + (uint64_t)r);
        good[r].stop = &stop_flag;
        cr_assert_eq(pthread_create(&threads[r], NULL, moe_test_client_thread, &good[r]), 0);
    }
    uint8_t header[MOE_FRAME_HEADER_SIZE];
    for (int rank = 0; rank < 2; rank++) {
        /* framing errors: ERROR bad_frame, then closed */
        moe_frame_header_t h = forward_header(1, 0, 1, 64, MOE_DTYPE_F32);
        encode(h, header);
        memcpy(header, "XOED", 4);
        expect_bad_frame(rank, header, sizeof header, 0, "bad magic");
        h.version = 2;
        encode(h, header);
        expect_bad_frame(rank, header, sizeof header, 0, "version 2");
        h = forward_header(1, 0, 1, 64, MOE_DTYPE_F32);
        h.payload_len = 100;
        encode(h, header);
        expect_bad_frame(rank, header, sizeof header, 0, "payload_len 100 for 1x64 f32");
        h = forward_header(1, 0, 8192, 64, MOE_DTYPE_F32); /* 2 MiB, consistent, over 1 MiB */
        encode(h, header);
        expect_bad_frame(rank, header, sizeof header, 0, "payload_len over serve.max_frame_bytes");
        h = forward_header(1, 0, 0x7fffffffu, 65536, MOE_DTYPE_F32); /* 2^49 bytes: never allocated */
        encode(h, header);
        expect_bad_frame(rank, header, sizeof header, 0, "payload_len 2^49");
        h = forward_header(1, 0, 1, 64, MOE_DTYPE_F32);
        h.type = 9;
        encode(h, header);
        expect_bad_frame(rank, header, sizeof header, 0, "frame type 9");
        moe_frame_header_t big_ping = {MOE_FRAME_VERSION, MOE_FRAME_PING, 5, 0, 0, 0, 0, 0, 0, 0, 5000};
        encode(big_ping, header);
        expect_bad_frame(rank, header, sizeof header, 0, "PING payload 5000 > 4096");
        moe_test_conn_t c;
        moe_test_frame_t f;

        /* request errors: the connection stays usable */
        cr_assert_eq(moe_test_conn_open(&c, &daemon_, rank), 0);
        send_frame(&c, forward_header(10, 0, 3, 32, MOE_DTYPE_F32), seed_);
        expect_error(&c, 10, MOE_STATUS_BAD_SHAPE, "hidden 32");
        expect_good_forward(&c, rank, 11, seed_ + 11);
        send_frame(&c, forward_header(12, 7, 3, 64, MOE_DTYPE_F32), seed_);
        expect_error(&c, 12, MOE_STATUS_BAD_LAYER, "layer 7");
        h = forward_header(13, 0, 3, 64, MOE_DTYPE_F32);
        h.dtype = 9;
        h.payload_len = 64; /* unknown dtype: payload_len still delimits the frame */
        send_frame(&c, h, seed_);
        expect_error(&c, 13, MOE_STATUS_BAD_DTYPE, "dtype 9");
        send_frame(&c, forward_header(14, 0, 257, 64, MOE_DTYPE_BF16), seed_);
        expect_error(&c, 14, MOE_STATUS_TOO_LARGE, "257 tokens over max_request_tokens 256");
        h = forward_header(15, 0, 2, 64, MOE_DTYPE_F32);
        h.flags = MOE_FRAME_FLAG_ROUTED;
        h.top_k = 2;
        h.payload_len = moe_frame_payload_size(MOE_FRAME_FORWARD, 2, 64, MOE_DTYPE_F32, MOE_FRAME_FLAG_ROUTED, 2);
        send_frame(&c, h, seed_);
        expect_error(&c, 15, MOE_STATUS_BAD_ROUTING, "ROUTED to a softmax_topk model");
        send_frame(&c, forward_header(16, 0, 0, 64, MOE_DTYPE_F32), seed_);
        expect_error(&c, 16, MOE_STATUS_BAD_SHAPE, "0 tokens");
        expect_good_forward(&c, rank, 17, seed_ + 17);

        /* PING is answered with the same id and payload */
        moe_frame_header_t ping = {MOE_FRAME_VERSION, MOE_FRAME_PING, 77, 0, 0, 0, 0, 0, 0, 0, 5};
        uint8_t ping_frame[MOE_FRAME_HEADER_SIZE + 5];
        moe_frame_encode_header(&ping, ping_frame);
        memcpy(ping_frame + MOE_FRAME_HEADER_SIZE, "hello", 5);
        cr_assert_eq(moe_test_send_all(c.fd, ping_frame, sizeof ping_frame), 0);
        cr_assert_eq(moe_test_conn_read(&c, &f, 20000), 1);
        cr_assert(f.h.type == MOE_FRAME_PONG && f.h.request_id == 77 && f.h.payload_len == 5 &&
                      memcmp(f.payload, "hello", 5) == 0, "PING: want PONG 77 'hello'");
        moe_test_frame_free(&f);
        moe_test_conn_close(&c);

        /* half a frame, then gone */
        cr_assert_eq(moe_test_conn_open(&c, &daemon_, rank), 0);
        h = forward_header(20, 0, 4, 64, MOE_DTYPE_F32);
        encode(h, header);
        cr_assert_eq(moe_test_send_all(c.fd, header, 20), 0);
        moe_test_conn_close(&c);
        cr_assert_eq(moe_test_conn_open(&c, &daemon_, rank), 0);
        send_frame(&c, h, seed_);
        moe_test_conn_close(&c); /* a whole request, gone before its answer */
    }
    double drip_s = slow_drip(1);
    cr_assert(drip_s > 2.5 && drip_s < 9.0, "slow drip closed after %.1f s (request_timeout_ms 3000)", drip_s);
    cr_assert(never_reads(0, seed_), "a client that never reads was not disconnected; log:\n%s", LOG_TAIL());
    cr_assert(never_reads(1, seed_ + 1), "rank 1: a client that never reads was not disconnected");

    atomic_store(&stop_flag, 1);
    for (int r = 0; r < 2; r++) pthread_join(threads[r], NULL);
    for (int r = 0; r < 2; r++) {
        cr_assert(!good[r].failed, "good client: %s; log:\n%s", good[r].failure, LOG_TAIL());
        cr_assert(good[r].results > 0 && good[r].results == good[r].sent, "good client rank %d: %d sent, %d results",
                  r, good[r].sent, good[r].results);
    }
    cJSON *health = control_ok("{\"id\":1,\"cmd\":\"health\"}");
    cr_assert_str_eq(cJSON_GetObjectItem(moe_test_reply_result(health), "status")->valuestring, "ok");
    cJSON_Delete(health);
    /* counters of both ranks reach rank 0 at the next agreement */
    static const struct {
        const char *code;
        int at_least;
    } want[] = {{"bad_frame", 14}, {"bad_shape", 4}, {"bad_layer", 2}, {"bad_dtype", 2},
                {"too_large", 2},  {"bad_routing", 2}, {"timeout", 1}};
    double deadline = now_s() + 10;
    for (;;) {
        cJSON *stats = control_ok("{\"id\":2,\"cmd\":\"stats\"}");
        cJSON *by_code = cJSON_GetObjectItem(cJSON_GetObjectItem(moe_test_reply_result(stats), "requests"),
                                             "rejected_by_code");
        const char *missing = NULL;
        double have = 0;
        for (size_t i = 0; i < sizeof want / sizeof want[0] && missing == NULL; i++) {
            have = moe_test_json_number(by_code, want[i].code, 0);
            if (have < want[i].at_least) missing = want[i].code;
        }
        char *text = cJSON_PrintUnformatted(by_code);
        cJSON_Delete(stats);
        if (missing == NULL) {
            free(text);
            break;
        }
        cr_assert(now_s() < deadline, "stats rejected_by_code %s: %s is %g; log:\n%s", text, missing, have, LOG_TAIL());
        free(text);
        poll_interval();
    }
    stop();
}

/* PROTOCOL.md: bad_frame (a bad type included) closes the connection after
 * the ERROR; a client sending a RESULT frame is such a case. */
Test(daemon, client_sent_result_frame_closes_connection, .timeout = 90, .fini = fini) {
    moe_test_daemon_opts_t opts = {0};
    start(&opts);
    uint8_t header[MOE_FRAME_HEADER_SIZE];
    moe_frame_header_t h = forward_header(1, 0, 1, 64, MOE_DTYPE_F32);
    h.type = MOE_FRAME_RESULT;
    encode(h, header);
    uint8_t result_frame[MOE_FRAME_HEADER_SIZE + 256] = {0};
    memcpy(result_frame, header, sizeof header);
    expect_bad_frame(0, result_frame, sizeof result_frame, 1, "a RESULT frame from a client");
    stop();
}

/* ------------------------------------------------------------------ d. */

/* Sends PING id on c and waits for its PONG; false when the connection was
 * refused or closed instead. Other frames before it are dropped. */
static bool ping(moe_test_conn_t *c, uint64_t id, uint32_t *status_out) {
    moe_frame_header_t h = {MOE_FRAME_VERSION, MOE_FRAME_PING, id, 0, 0, 0, 0, 0, 0, 0, 0};
    uint8_t header[MOE_FRAME_HEADER_SIZE];
    moe_frame_encode_header(&h, header);
    *status_out = 0;
    if (moe_test_send_all(c->fd, header, sizeof header) != 0) return false;
    for (;;) {
        moe_test_frame_t f;
        if (moe_test_conn_read(c, &f, 20000) != 1) return false;
        bool pong = f.h.type == MOE_FRAME_PONG && f.h.request_id == id;
        if (f.h.type == MOE_FRAME_ERROR) *status_out = f.h.status;
        moe_test_frame_free(&f);
        if (pong) return true;
    }
}

Test(daemon, overload_and_limits, .timeout = 180, .fini = fini) {
    moe_test_daemon_opts_t opts = {.max_queue_tokens = 256, .max_request_tokens = 64, .max_connections = 4};
    start(&opts);
    /* 4 connections on rank 0 (its limit) with 8 requests of up to 64 tokens
     * in flight each: per-connection and queue caps answer overloaded */
    moe_test_client_t clients[4];
    for (int i = 0; i < 4; i++) {
        client_init(&clients[i], 0, 8, 40, 64, false, seed_ + (uint64_t)i);
        clients[i].allowed = 1u << MOE_STATUS_OVERLOADED;
    }
    run_clients(clients, 4);
    int overloaded = 0, results = 0;
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(clients[i].results + clients[i].errors, clients[i].sent, "client %d lost answers", i);
        overloaded += clients[i].by_status[MOE_STATUS_OVERLOADED];
        results += clients[i].results;
    }
    cr_assert(overloaded > 0, "seed %llu: no request was answered overloaded (%d results)", (unsigned long long)seed_,
              results);
    cr_assert(results > 0, "no request was served");

    /* rank 1 takes 4 data connections; the 5th gets ERROR overloaded and is closed */
    moe_test_conn_t conns[4], fifth;
    uint32_t status;
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(moe_test_conn_open(&conns[i], &daemon_, 1), 0);
        cr_assert(ping(&conns[i], (uint64_t)i + 1, &status), "connection %d of 4 refused (status %u)", i + 1, status);
    }
    cr_assert_eq(moe_test_conn_open(&fifth, &daemon_, 1), 0);
    expect_error(&fifth, 0, MOE_STATUS_OVERLOADED, "5th connection over serve.max_connections 4");
    cr_assert(moe_test_conn_wait_eof(&fifth, 10000), "the 5th connection was not closed");
    moe_test_conn_close(&fifth);
    /* a closed connection frees its place (once the daemon saw the close) */
    moe_test_conn_close(&conns[3]);
    double deadline = now_s() + 10;
    bool accepted = false;
    while (!accepted && now_s() < deadline) {
        cr_assert_eq(moe_test_conn_open(&conns[3], &daemon_, 1), 0);
        accepted = ping(&conns[3], 9, &status);
        if (!accepted) {
            moe_test_conn_close(&conns[3]);
            poll_interval();
        }
    }
    cr_assert(accepted, "a freed connection place was never given to a new client");
    expect_good_forward(&conns[3], 1, 10, seed_);
    for (int i = 0; i < 4; i++) moe_test_conn_close(&conns[i]);
    stop();
}

/* ------------------------------------------------------------------ e. */

static char *replace(const char *text, const char *from, const char *to) {
    const char *at = strstr(text, from);
    cr_assert_not_null(at, "'%s' not in the config", from);
    size_t head = (size_t)(at - text), n = strlen(text) - strlen(from) + strlen(to) + 1;
    char *out = malloc(n);
    cr_assert_not_null(out);
    snprintf(out, n, "%.*s%s%s", (int)head, text, to, at + strlen(from));
    return out;
}

static void write_file(const char *path, const char *text) {
    cr_assert_eq(moe_test_write_bytes(path, text, strlen(text)), 0, "cannot write %s", path);
}

/* Waits until `config` shows epoch and chunk size; returns the reply. */
static cJSON *wait_config(int epoch, int chunk) {
    double deadline = now_s() + 20;
    for (;;) {
        cJSON *reply = control_ok("{\"id\":3,\"cmd\":\"config\"}");
        cJSON *result = moe_test_reply_result(reply);
        if (moe_test_json_number(result, "epoch", -1) == epoch &&
            moe_test_json_number(result, "config.moe.chunking.max_tokens_per_chunk", -1) == chunk)
            return reply;
        char *text = cJSON_PrintUnformatted(result);
        cJSON_Delete(reply);
        cr_assert(now_s() < deadline, "config never showed epoch %d with chunk %d: %s", epoch, chunk, text);
        free(text);
        poll_interval();
    }
}

Test(daemon, reload_while_serving, .timeout = 180, .fini = fini) {
    moe_test_daemon_opts_t opts = {0};
    start(&opts);
    atomic_int stop_flag = 0;
    moe_test_client_t clients[2];
    pthread_t threads[2];
    for (int r = 0; r < 2; r++) {
        client_init(&clients[r], r, 4, 0, 64, true, seed_ + 3 + (uint64_t)r);
        clients[r].stop = &stop_flag;
        cr_assert_eq(pthread_create(&threads[r], NULL, moe_test_client_thread, &clients[r]), 0);
    }
    char *yaml = moe_test_daemon_yaml(&opts, daemon_.dir);
    cr_assert_not_null(yaml);
    char path[400], line[600];

    /* a valid change: log level and chunk size (results stay correct with
     * steps cut into chunks of 7) */
    char *changed = replace(yaml, "level: warn", "level: error");
    char *valid = malloc(strlen(changed) + 64);
    cr_assert_not_null(valid);
    snprintf(valid, strlen(changed) + 64, "%smoe:\n  chunking: {max_tokens_per_chunk: 7}\n", changed);
    free(changed);
    snprintf(path, sizeof path, "%s/valid.yaml", daemon_.dir);
    write_file(path, valid);
    free(valid);
    snprintf(line, sizeof line, "{\"id\":10,\"cmd\":\"reload\",\"path\":\"%s\"}", path);
    cJSON *reply = control_ok(line);
    cr_assert_eq(moe_test_json_number(moe_test_reply_result(reply), "epoch", -1), 1, "reload epoch");
    cr_assert_eq(moe_test_json_number(reply, "id", -1), 10, "reload reply id");
    cJSON_Delete(reply);
    reply = wait_config(1, 7);
    cJSON *config = cJSON_GetObjectItem(moe_test_reply_result(reply), "config");
    cJSON *level = cJSON_GetObjectItem(cJSON_GetObjectItem(config, "log"), "level");
    cr_assert(cJSON_IsString(level) && strcmp(level->valuestring, "error") == 0, "log.level not reloaded");
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetObjectItem(moe_test_reply_result(reply), "last_reload"), "ok")));
    cJSON_Delete(reply);

    /* invalid: a syntax error, an unknown key -> invalid_config naming it */
    snprintf(path, sizeof path, "%s/syntax.yaml", daemon_.dir);
    write_file(path, "model:\n  hidden: [64\nserve: {\n");
    snprintf(line, sizeof line, "{\"id\":11,\"cmd\":\"reload\",\"path\":\"%s\"}", path);
    reply = control_fails(line, "invalid_config");
    cr_assert(strstr(moe_test_reply_error_message(reply), "syntax.yaml:") != NULL,
              "the message does not name the file and line: %s", moe_test_reply_error_message(reply));
    cJSON_Delete(reply);
    char *unknown = malloc(strlen(yaml) + 64);
    snprintf(unknown, strlen(yaml) + 64, "%s  bogus_knob: 3\n", yaml);
    snprintf(path, sizeof path, "%s/unknown.yaml", daemon_.dir);
    write_file(path, unknown);
    free(unknown);
    snprintf(line, sizeof line, "{\"id\":12,\"cmd\":\"reload\",\"path\":\"%s\"}", path);
    reply = control_fails(line, "invalid_config");
    cr_assert(strstr(moe_test_reply_error_message(reply), "bogus_knob") != NULL,
              "the message does not name the unknown key: %s", moe_test_reply_error_message(reply));
    cJSON_Delete(reply);
    snprintf(line, sizeof line, "{\"id\":13,\"cmd\":\"reload\",\"path\":\"%s/nonexistent.yaml\"}", daemon_.dir);
    cJSON_Delete(control_fails(line, "invalid_config"));

    /* a shape change cannot be applied live */
    char *wider = replace(yaml, "hidden: 64", "hidden: 128");
    snprintf(path, sizeof path, "%s/wider.yaml", daemon_.dir);
    write_file(path, wider);
    free(wider);
    snprintf(line, sizeof line, "{\"id\":14,\"cmd\":\"reload\",\"path\":\"%s\"}", path);
    reply = control_fails(line, "not_reloadable");
    cr_assert(strstr(moe_test_reply_error_message(reply), "model.hidden") != NULL,
              "the message does not name model.hidden: %s", moe_test_reply_error_message(reply));
    cJSON_Delete(reply);
    reply = control_ok("{\"id\":15,\"cmd\":\"config\"}");
    cr_assert_eq(moe_test_json_number(moe_test_reply_result(reply), "epoch", -1), 1, "a rejected reload changed the epoch");
    cr_assert_eq(moe_test_json_number(moe_test_reply_result(reply), "config.model.hidden", -1), 64);
    cr_assert(cJSON_IsFalse(cJSON_GetObjectItem(cJSON_GetObjectItem(moe_test_reply_result(reply), "last_reload"), "ok")));
    cJSON_Delete(reply);

    /* SIGHUP to rank 0 reloads the file it started with (now changed) */
    pid_t rank0 = moe_test_daemon_rank_pid(&daemon_, 0);
    cr_assert(rank0 > 0, "cannot find rank 0's pid");
    char *hup = malloc(strlen(yaml) + 64);
    snprintf(hup, strlen(yaml) + 64, "%smoe:\n  chunking: {max_tokens_per_chunk: 5}\n", yaml);
    write_file(daemon_.config_path, hup);
    free(hup);
    cr_assert_eq(kill(rank0, SIGHUP), 0);
    cJSON_Delete(wait_config(2, 5));
    free(yaml);

    atomic_store(&stop_flag, 1);
    for (int r = 0; r < 2; r++) pthread_join(threads[r], NULL);
    for (int r = 0; r < 2; r++) {
        cr_assert(!clients[r].failed, "%s; log:\n%s", clients[r].failure, LOG_TAIL());
        cr_assert(clients[r].results > 0 && clients[r].results == clients[r].sent, "rank %d: %d sent, %d results", r,
                  clients[r].sent, clients[r].results);
    }
    stop();
}

/* ------------------------------------------------------------------ f. */

/* Requests sent raw on one connection and their answers. */
typedef struct {
    moe_test_conn_t conn;
    int rank, n;
    uint64_t ids[64];
    int layers[64], tokens[64];
    float *x[64];
    bool answered[64];
    int results, errors;
    uint32_t last_error;
} batch_t;

static void batch_send(batch_t *b, int rank, int n, uint64_t seed) {
    memset(b, 0, sizeof *b);
    b->rank = rank;
    b->n = n;
    cr_assert_eq(moe_test_conn_open(&b->conn, &daemon_, rank), 0);
    uint64_t state = seed;
    for (int i = 0; i < n; i++) {
        b->ids[i] = 1000 + (uint64_t)i;
        b->layers[i] = (int)(moe_test_rand(&state) % 3);
        b->tokens[i] = 1 + (int)(moe_test_rand(&state) % 96);
        b->x[i] = malloc(sizeof(float) * 64 * (size_t)b->tokens[i]);
        moe_test_fill_random(b->x[i], 64 * (size_t)b->tokens[i], moe_test_rand(&state));
        cr_assert_eq(moe_test_send_forward(b->conn.fd, b->ids[i], (uint32_t)b->layers[i], b->x[i],
                                           (uint32_t)b->tokens[i], 64, MOE_DTYPE_F32, NULL, NULL, 0), 0);
    }
}

/* Handles one frame of b; returns true for a PONG with ping_id. */
static bool batch_take(batch_t *b, moe_test_frame_t *f, uint64_t ping_id) {
    if (f->h.type == MOE_FRAME_PONG) {
        cr_assert_eq(f->h.request_id, ping_id);
        return true;
    }
    int i = 0;
    while (i < b->n && b->ids[i] != f->h.request_id) i++;
    cr_assert(i < b->n && !b->answered[i], "rank %d: answer for unknown or answered request %llu", b->rank,
              (unsigned long long)f->h.request_id);
    b->answered[i] = true;
    if (f->h.type == MOE_FRAME_ERROR) {
        char text[256];
        b->errors++;
        b->last_error = f->h.status;
        cr_assert_fail("seed %llu rank %d request %llu: ERROR %s: %s", (unsigned long long)seed_, b->rank,
                       (unsigned long long)f->h.request_id, moe_status_name(f->h.status),
                       moe_test_frame_text(f, text, sizeof text));
    }
    cr_assert_eq(f->h.type, MOE_FRAME_RESULT);
    size_t values = (size_t)b->tokens[i] * 64;
    float *got = malloc(sizeof(float) * values);
    double *want = malloc(sizeof(double) * values);
    moe_dtype_to_f32(MOE_DTYPE_F32, f->payload, got, values);
    moe_test_ref_forward(ref_, b->layers[i], b->x[i], b->tokens[i], b->rank, 2, NULL, NULL, want, NULL);
    double err = moe_test_rel_error(got, want, values);
    free(got);
    free(want);
    cr_assert(err <= 1e-5, "seed %llu rank %d request %llu: relative error %g", (unsigned long long)seed_, b->rank,
              (unsigned long long)f->h.request_id, err);
    b->results++;
    return false;
}

/* PING after the batch: its PONG proves every FORWARD before it was read
 * and admitted (frames of one connection are handled in order). */
static void batch_barrier(batch_t *b, uint64_t ping_id) {
    moe_frame_header_t h = {MOE_FRAME_VERSION, MOE_FRAME_PING, ping_id, 0, 0, 0, 0, 0, 0, 0, 0};
    uint8_t header[MOE_FRAME_HEADER_SIZE];
    moe_frame_encode_header(&h, header);
    cr_assert_eq(moe_test_send_all(b->conn.fd, header, sizeof header), 0);
    for (;;) {
        moe_test_frame_t f;
        cr_assert_eq(moe_test_conn_read(&b->conn, &f, 20000), 1, "no PONG; log:\n%s", LOG_TAIL());
        bool pong = batch_take(b, &f, ping_id);
        moe_test_frame_free(&f);
        if (pong) return;
    }
}

static void batch_finish(batch_t *b) {
    while (b->results + b->errors < b->n) {
        moe_test_frame_t f;
        int rc = moe_test_conn_read(&b->conn, &f, 20000);
        cr_assert_eq(rc, 1, "seed %llu rank %d: %d of %d requests unanswered (rc %d); log:\n%s",
                     (unsigned long long)seed_, b->rank, b->n - b->results - b->errors, b->n, rc, LOG_TAIL());
        batch_take(b, &f, 0);
        moe_test_frame_free(&f);
    }
    for (int i = 0; i < b->n; i++) free(b->x[i]);
}

Test(daemon, drain_loses_nothing, .timeout = 180, .fini = fini) {
    moe_test_daemon_opts_t opts = {0};
    start(&opts);
    static batch_t batches[4];
    for (int i = 0; i < 4; i++) batch_send(&batches[i], i % 2, 48, seed_ + (uint64_t)i);
    for (int i = 0; i < 4; i++) batch_barrier(&batches[i], 5000 + (uint64_t)i);
    cJSON *reply = control_ok("{\"id\":1,\"cmd\":\"drain\"}");
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(moe_test_reply_result(reply), "draining")));
    cJSON_Delete(reply);
    for (int i = 0; i < 4; i++) batch_finish(&batches[i]);
    for (int i = 0; i < 4; i++) cr_assert_eq(batches[i].results, 48);
    reply = control_ok("{\"id\":2,\"cmd\":\"health\"}");
    cr_assert_str_eq(cJSON_GetObjectItem(moe_test_reply_result(reply), "status")->valuestring, "draining");
    cJSON_Delete(reply);
    /* new requests are refused on every rank (rank 1 learns of the drain at
     * its next agreement: poll until it refuses) */
    for (int rank = 0; rank < 2; rank++) {
        moe_test_conn_t *c = &batches[rank].conn;
        float x[64];
        moe_test_fill_random(x, 64, seed_);
        double deadline = now_s() + 10;
        for (uint64_t id = 1;; id++) {
            cr_assert_eq(moe_test_send_forward(c->fd, id, 0, x, 1, 64, MOE_DTYPE_F32, NULL, NULL, 0), 0);
            moe_test_frame_t f;
            cr_assert_eq(moe_test_conn_read(c, &f, 20000), 1, "rank %d: no answer after drain", rank);
            uint16_t type = f.h.type;
            uint32_t status = f.h.status;
            moe_test_frame_free(&f);
            if (type == MOE_FRAME_ERROR && status == MOE_STATUS_SHUTTING_DOWN) break;
            cr_assert(type == MOE_FRAME_RESULT, "rank %d after drain: want shutting_down, got status %s", rank,
                      moe_status_name(status));
            cr_assert(rank == 1 && now_s() < deadline, "rank %d still admits requests after drain", rank);
            poll_interval();
        }
    }
    for (int i = 0; i < 4; i++) moe_test_conn_close(&batches[i].conn);
    stop();
}

Test(daemon, shutdown_answers_requests_in_flight, .timeout = 180, .fini = fini) {
    moe_test_daemon_opts_t opts = {0};
    start(&opts);
    static batch_t batches[2];
    for (int i = 0; i < 2; i++) batch_send(&batches[i], i, 64, seed_ + (uint64_t)i);
    for (int i = 0; i < 2; i++) batch_barrier(&batches[i], 5000 + (uint64_t)i);
    cJSON *reply = control_ok("{\"id\":1,\"cmd\":\"shutdown\"}");
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(moe_test_reply_result(reply), "shutting_down")));
    cJSON_Delete(reply);
    for (int i = 0; i < 2; i++) batch_finish(&batches[i]);
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(batches[i].results, 64);
        cr_assert(moe_test_conn_wait_eof(&batches[i].conn, 20000), "rank %d: connection open after shutdown", i);
        moe_test_conn_close(&batches[i].conn);
    }
    char msg[4096];
    cr_assert_eq(moe_test_daemon_wait_exit(&daemon_, 20000, msg, sizeof msg), 0, "%s", msg);
    moe_test_daemon_destroy(&daemon_);
}

/* ------------------------------------------------------------------ g. */

/* Sends n_requests of n_tokens each on layer to rank and waits for them. */
static void serve_tokens(int rank, int layer, int n_requests, int n_tokens) {
    moe_test_conn_t c;
    cr_assert_eq(moe_test_conn_open(&c, &daemon_, rank), 0);
    float *x = malloc(sizeof(float) * 64 * (size_t)n_tokens);
    moe_test_fill_random(x, 64 * (size_t)n_tokens, seed_ + (uint64_t)rank);
    for (int i = 0; i < n_requests; i++)
        cr_assert_eq(moe_test_send_forward(c.fd, (uint64_t)i + 1, (uint32_t)layer, x, (uint32_t)n_tokens, 64,
                                           MOE_DTYPE_F32, NULL, NULL, 0), 0);
    for (int i = 0; i < n_requests; i++) {
        moe_test_frame_t f;
        cr_assert_eq(moe_test_conn_read(&c, &f, 20000), 1);
        cr_assert_eq(f.h.type, MOE_FRAME_RESULT);
        moe_test_frame_free(&f);
    }
    free(x);
    moe_test_conn_close(&c);
}

Test(daemon, control_channel, .timeout = 120, .fini = fini) {
    moe_test_daemon_opts_t opts = {.token = "s3cret-token"};
    start(&opts);
    cJSON *reply = control_ok("{\"id\":1,\"cmd\":\"health\"}");
    cJSON *r = moe_test_reply_result(reply);
    cr_assert_eq(moe_test_json_number(reply, "id", -1), 1);
    cr_assert_str_eq(cJSON_GetObjectItem(r, "status")->valuestring, "ok");
    cr_assert_eq(moe_test_json_number(r, "ranks", -1), 2);
    cr_assert(moe_test_json_number(r, "step", -1) >= 0 && moe_test_json_number(r, "uptime_s", -1) >= 0);
    cr_assert(moe_test_json_number(r, "oldest_queued_ms", -1) >= 0 && moe_test_json_number(r, "queued_requests", -1) >= 0);
    cJSON_Delete(reply);
    reply = control_ok("{\"id\":\"v\",\"cmd\":\"version\"}");
    r = moe_test_reply_result(reply);
    cr_assert_str_eq(cJSON_GetObjectItem(reply, "id")->valuestring, "v", "a string id is echoed");
    cr_assert(cJSON_IsString(cJSON_GetObjectItem(r, "version")));
    cr_assert_eq(moe_test_json_number(r, "protocol", -1), 1);
    cr_assert_str_eq(cJSON_GetObjectItem(r, "backend")->valuestring, "cpu");
    cr_assert_eq(moe_test_json_number(r, "ranks", -1), 2);
    cJSON_Delete(reply);
    reply = control_ok("{\"id\":3,\"cmd\":\"config\"}");
    r = moe_test_reply_result(reply);
    cr_assert_eq(moe_test_json_number(r, "epoch", -1), 0);
    cr_assert_str_eq(cJSON_GetObjectItem(r, "path")->valuestring, daemon_.config_path);
    cr_assert_eq(moe_test_json_number(r, "config.model.hidden", -1), 64);
    cr_assert_eq(moe_test_json_number(r, "config.model.experts", -1), 8);
    cr_assert(cJSON_IsObject(cJSON_GetObjectItem(r, "last_reload")));
    cJSON_Delete(reply);

    /* expert loads: N tokens of layer 1 over both ranks = N·top_k assignments */
    serve_tokens(0, 1, 3, 10);
    serve_tokens(1, 1, 2, 7);
    serve_tokens(1, 2, 1, 5); /* another layer: not counted for layer 1 */
    const double want_assignments = (3 * 10 + 2 * 7) * 2;
    double deadline = now_s() + 10;
    for (;;) {
        reply = control_ok("{\"id\":4,\"cmd\":\"stats\",\"layer\":1}");
        r = moe_test_reply_result(reply);
        cJSON *layers = cJSON_GetObjectItem(r, "layers"), *layer = NULL, *item;
        cJSON_ArrayForEach(item, layers) if (moe_test_json_number(item, "layer", -1) == 1) layer = item;
        cr_assert_not_null(layer, "stats has no layer 1");
        cJSON *loads = cJSON_GetObjectItem(layer, "expert_loads");
        cr_assert_eq(cJSON_GetArraySize(loads), 8, "expert_loads needs E = 8 entries");
        double sum = 0, rank_sum = 0;
        cJSON_ArrayForEach(item, loads) sum += item->valuedouble;
        cJSON *rank_loads = cJSON_GetObjectItem(layer, "rank_loads");
        cr_assert_eq(cJSON_GetArraySize(rank_loads), 2);
        cJSON_ArrayForEach(item, rank_loads) rank_sum += item->valuedouble;
        double completed = moe_test_json_number(r, "requests.completed", -1);
        bool done = sum == want_assignments && rank_sum == want_assignments && completed == 6;
        char *text = cJSON_PrintUnformatted(r);
        cJSON_Delete(reply);
        if (done) {
            free(text);
            break;
        }
        cr_assert(sum <= want_assignments && now_s() < deadline,
                  "stats: sum(expert_loads) %g, sum(rank_loads) %g, want %g; completed %g, want 6: %s", sum, rank_sum,
                  want_assignments, completed, text);
        free(text);
        poll_interval();
    }
    reply = control_ok("{\"id\":5,\"cmd\":\"stats\"}");
    r = moe_test_reply_result(reply);
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(r, "layers")), 3, "stats without layer shows every layer");
    cr_assert(cJSON_IsObject(cJSON_GetObjectItem(r, "latency_ms")) && cJSON_IsObject(cJSON_GetObjectItem(r, "step_ms")));
    cr_assert(moe_test_json_number(r, "step", -1) >= 3 && moe_test_json_number(r, "config_epoch", -1) == 0);
    cr_assert(cJSON_IsFalse(cJSON_GetObjectItem(r, "draining")));
    cJSON_Delete(reply);

    /* subscribe: stats events every 200 ms; unsubscribe stops them */
    moe_test_ctl_t ctl;
    cr_assert_eq(moe_test_ctl_open(&ctl, daemon_.control_path), 0);
    reply = moe_test_ctl_call(&ctl, "{\"id\":6,\"cmd\":\"subscribe\",\"interval_ms\":200}", 20000);
    r = moe_test_reply_result(reply);
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(r, "subscribed")) && moe_test_json_number(r, "interval_ms", -1) == 200);
    cJSON_Delete(reply);
    int events = 0;
    double start_events = now_s();
    while (events < 2) {
        int left = (int)((start_events + 1.5 - now_s()) * 1e3);
        cr_assert(left > 0, "only %d stats events within 1.5 s at interval_ms 200", events);
        cJSON *event = moe_test_ctl_read(&ctl, left);
        if (event == NULL) continue;
        cJSON *name = cJSON_GetObjectItem(event, "event");
        cr_assert(cJSON_IsString(name) && strcmp(name->valuestring, "stats") == 0, "a line that is not a stats event");
        cr_assert(cJSON_IsArray(cJSON_GetObjectItem(cJSON_GetObjectItem(event, "result"), "layers")));
        cJSON_Delete(event);
        events++;
    }
    reply = moe_test_ctl_call(&ctl, "{\"id\":7,\"cmd\":\"unsubscribe\"}", 20000);
    cr_assert(cJSON_IsFalse(cJSON_GetObjectItem(moe_test_reply_result(reply), "subscribed")));
    cJSON_Delete(reply);
    cJSON *late = moe_test_ctl_read(&ctl, 700); /* nothing comes after the unsubscribe reply */
    cr_assert_null(late, "an event after unsubscribe: %s", late ? cJSON_PrintUnformatted(late) : "");
    /* errors on the same connection, which stays usable */
    reply = moe_test_ctl_call(&ctl, "{\"id\":8,\"cmd\":\"frobnicate\"}", 20000);
    cr_assert_str_eq(moe_test_reply_error_code(reply), "unknown_command");
    cJSON_Delete(reply);
    reply = moe_test_ctl_call(&ctl, "{\"id\":9,\"cmd\":", 20000);
    cr_assert_str_eq(moe_test_reply_error_code(reply), "bad_request");
    cJSON_Delete(reply);
    reply = moe_test_ctl_call(&ctl, "[1,2]", 20000);
    cr_assert_str_eq(moe_test_reply_error_code(reply), "bad_request");
    cJSON_Delete(reply);
    reply = moe_test_ctl_call(&ctl, "{\"id\":10}", 20000);
    cr_assert_str_eq(moe_test_reply_error_code(reply), "bad_request");
    cJSON_Delete(reply);
    reply = moe_test_ctl_call(&ctl, "{\"id\":11,\"cmd\":\"stats\",\"layer\":\"x\"}", 20000);
    cr_assert_str_eq(moe_test_reply_error_code(reply), "bad_request");
    cJSON_Delete(reply);
    reply = moe_test_ctl_call(&ctl, "{\"id\":12,\"cmd\":\"subscribe\",\"interval_ms\":5}", 20000);
    cr_assert_str_eq(moe_test_reply_error_code(reply), "bad_request");
    cJSON_Delete(reply);
    reply = moe_test_ctl_call(&ctl, "{\"id\":13,\"cmd\":\"health\"}", 20000);
    cr_assert_not_null(moe_test_reply_result(reply), "the connection is still usable");
    cJSON_Delete(reply);
    /* a line over 64 KiB: bad_request, then closed */
    char *long_line = malloc(70000);
    memset(long_line, ' ', 69999);
    long_line[69999] = '\0';
    const char *head = "{\"id\":14,\"cmd\":\"health\",\"pad\":\"";
    memcpy(long_line, head, strlen(head));
    /* the daemon may close before it has read all of it: a failed send is fine */
    (void)moe_test_ctl_send(&ctl, long_line);
    free(long_line);
    reply = moe_test_ctl_read(&ctl, 20000);
    cr_assert_str_eq(moe_test_reply_error_code(reply), "bad_request", "a line over 64 KiB");
    cJSON_Delete(reply);
    struct pollfd p = {ctl.fd, POLLIN, 0};
    char byte; /* EOF, or ECONNRESET: the daemon closed with our bytes unread */
    cr_assert(ctl.have == 0 && poll(&p, 1, 10000) == 1 && recv(ctl.fd, &byte, 1, 0) <= 0,
              "the connection stays open after a line over 64 KiB");
    moe_test_ctl_close(&ctl);

    /* the token guards state-changing commands */
    cJSON_Delete(control_fails("{\"id\":20,\"cmd\":\"rebalance\",\"token\":\"s3cret-token\"}", "eplb_off"));
    cJSON_Delete(control_fails("{\"id\":21,\"cmd\":\"reload\"}", "unauthorized"));
    cJSON_Delete(control_fails("{\"id\":22,\"cmd\":\"reload\",\"token\":\"wrong\"}", "unauthorized"));
    cJSON_Delete(control_fails("{\"id\":23,\"cmd\":\"drain\"}", "unauthorized"));
    cJSON_Delete(control_fails("{\"id\":24,\"cmd\":\"shutdown\"}", "unauthorized"));
    cJSON_Delete(control_fails("{\"id\":25,\"cmd\":\"rebalance\"}", "unauthorized"));
    reply = control_ok("{\"id\":26,\"cmd\":\"reload\",\"token\":\"s3cret-token\"}");
    cr_assert_eq(moe_test_json_number(moe_test_reply_result(reply), "epoch", -1), 1);
    cJSON_Delete(reply);
    reply = control_ok("{\"id\":27,\"cmd\":\"health\"}");
    cr_assert_str_eq(cJSON_GetObjectItem(moe_test_reply_result(reply), "status")->valuestring, "ok",
                     "unauthorized commands must not have acted");
    cJSON_Delete(reply);
    reply = control_ok("{\"id\":28,\"cmd\":\"drain\",\"token\":\"s3cret-token\"}");
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(moe_test_reply_result(reply), "draining")));
    cJSON_Delete(reply);
    stop();
}

/* ------------------------------------------------------------------ h. */

/* A loopback port that binds now, chosen below the kernel's ephemeral range
 * (where mpirun's runtime takes its ports), at random so that parallel
 * tests do not pick the same one. */
static int free_tcp_port(void) {
    uint64_t state = moe_test_fresh_seed();
    for (int attempt = 0; attempt < 100; attempt++) {
        int port = 20000 + (int)(moe_test_rand(&state) % 10000);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        bool ok = fd >= 0 && bind(fd, (struct sockaddr *)&addr, sizeof addr) == 0;
        if (fd >= 0) close(fd);
        if (ok) return port;
    }
    cr_assert_fail("cannot find a free port");
    return -1;
}

/* GET path over TCP; the whole response (malloc'd). */
static char *http_get(int port, const char *path) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert(fd >= 0 && connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0, "connect to metrics: %s",
              strerror(errno));
    char request[256];
    snprintf(request, sizeof request, "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path);
    cr_assert_eq(moe_test_send_all(fd, request, strlen(request)), 0);
    size_t have = 0, cap = 1 << 16;
    char *text = malloc(cap);
    for (;;) {
        if (have + 4096 > cap) text = realloc(text, cap *= 2);
        struct pollfd p = {fd, POLLIN, 0};
        cr_assert(poll(&p, 1, 20000) == 1, "metrics: no response");
        ssize_t n = recv(fd, text + have, cap - have - 1, 0);
        if (n <= 0) break;
        have += (size_t)n;
    }
    text[have] = '\0';
    close(fd);
    return text;
}

Test(daemon, metrics, .timeout = 120, .fini = fini) {
    /* A port found free can be taken again before moed binds it (mpirun's
     * own runtime opens ephemeral ports): try a few. */
    moe_test_daemon_opts_t opts = {0};
    char msg[4096] = "";
    int rc = -1;
    for (int attempt = 0; attempt < 5 && rc != 0; attempt++) {
        opts.metrics_port = free_tcp_port();
        rc = moe_test_daemon_start(&daemon_, &opts, 2, true, msg, sizeof msg);
        if (rc != 0 && strstr(msg, "address already in use") == NULL) break;
    }
    cr_assert_eq(rc, 0, "cannot start the daemon: %s", msg);
    seed_ = moe_test_fresh_seed();
    ref_ = moe_test_ref_create(&daemon_.cfg, msg, sizeof msg);
    cr_assert_not_null(ref_, "reference: %s", msg);
    serve_tokens(0, 0, 2, 4);
    char *text = http_get(opts.metrics_port, "/metrics");
    cr_assert(strncmp(text, "HTTP/1.0 200", 12) == 0 || strncmp(text, "HTTP/1.1 200", 12) == 0, "metrics: %.200s", text);
    cr_assert_not_null(strstr(text, "\nmoed_requests_completed_total "), "no moed_requests_completed_total: %s", text);
    cr_assert_not_null(strstr(text, "\nmoed_expert_load{"), "no moed_expert_load: %s", text);
    cr_assert_not_null(strstr(text, "moed_requests_rejected_total{code=\"overloaded\"}"));
    free(text);
    text = http_get(opts.metrics_port, "/nope");
    cr_assert(strstr(text, " 404 ") != NULL, "an unknown path: %.200s", text);
    free(text);
    stop();
}

/* ------------------------------------------------------------------ EPLB */

/* A migration whose weight loads fail on one rank (test hook): every rank
 * drops it and serves on with the current placement — no hang, no request
 * lost or wrong, no rebalance counted — and the log says so. */
Test(daemon, eplb_failed_loads_keep_the_placement, .timeout = 180, .fini = fini) {
    moe_test_daemon_opts_t opts = {.routing = "client", .eplb_mode = "online", .num_slots = 8,
                                   .rebalance_every_steps = 8, .window_steps = 64, .log_level = "info",
                                   .fail_migration_rank = 2 /* rank 1 */};
    moe_test_skew = true;
    start(&opts);
    moe_test_client_t clients[4];
    for (int i = 0; i < 4; i++) client_init(&clients[i], i % 2, 4, 40, 48, false, seed_ + 77 + (uint64_t)i);
    run_clients(clients, 4);
    moe_test_skew = false;
    for (int i = 0; i < 4; i++)
        cr_assert(clients[i].results == clients[i].sent && clients[i].errors == 0,
                  "client %d: %d sent, %d results, %d errors", i, clients[i].sent, clients[i].results,
                  clients[i].errors);
    cJSON *reply = control_ok("{\"id\":1,\"cmd\":\"stats\"}");
    cJSON *layer;
    cJSON_ArrayForEach(layer, cJSON_GetObjectItem(moe_test_reply_result(reply), "layers"))
        cr_assert_eq(moe_test_json_number(layer, "rebalances", -1), 0, "a failed migration is not a rebalance");
    cJSON_Delete(reply);
    cr_assert(strstr(LOG_TAIL(), "every rank keeps the current one") != NULL, "log:\n%s", LOG_TAIL());
    cJSON_Delete(control_ok("{\"id\":2,\"cmd\":\"health\"}"));
    char msg[4096];
    cr_assert_eq(moe_test_daemon_stop(&daemon_, 20000, msg, sizeof msg), 0, "%s", msg);
    moe_test_daemon_destroy(&daemon_);
}

/* eplb.mode online: client-routed requests send half their picks to
 * experts 0-1; the step loop measures the loads and moves experts while
 * clients on both ranks keep checking every answer against the reference —
 * no request lost or wrong across the swaps — and `stats` shows the
 * rebalance with a lower predicted imbalance. */
Test(daemon, eplb_online_rebalances_while_serving, .timeout = 180, .fini = fini) {
    moe_test_daemon_opts_t opts = {.routing = "client", .eplb_mode = "online", .num_slots = 8,
                                   .rebalance_every_steps = 8, .window_steps = 64, .log_level = "info"};
    moe_test_skew = true; /* experts 0-1 hot, both on rank 0 in the first placement (slot = expert) */
    start(&opts);
    moe_test_client_t clients[4];
    for (int i = 0; i < 4; i++) client_init(&clients[i], i % 2, 4, 40, 48, false, seed_ + 31 + (uint64_t)i);
    run_clients(clients, 4);
    for (int i = 0; i < 4; i++)
        cr_assert(clients[i].results == clients[i].sent && clients[i].errors == 0,
                  "client %d: %d sent, %d results, %d errors", i, clients[i].sent, clients[i].results,
                  clients[i].errors);
    cJSON *reply = control_ok("{\"id\":1,\"cmd\":\"stats\"}");
    cJSON *layers = cJSON_GetObjectItem(moe_test_reply_result(reply), "layers");
    int rebalanced = 0;
    cJSON *layer;
    cJSON_ArrayForEach(layer, layers) {
        if (moe_test_json_number(layer, "rebalances", 0) < 1) continue;
        rebalanced++;
        double before = moe_test_json_number(layer, "imbalance_before", 0);
        double after = moe_test_json_number(layer, "imbalance_after", 99);
        cr_assert(after < before, "layer %g: predicted imbalance %g -> %g", moe_test_json_number(layer, "layer", -1),
                  before, after);
        cr_assert(moe_test_json_number(layer, "migration_bytes", 0) > 0, "a move between ranks loads weights");
        cr_assert(cJSON_IsBool(cJSON_GetObjectItem(layer, "loading")), "stats say whether a placement is loading");
        cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(layer, "placement")), 8);
    }
    cr_assert(rebalanced > 0, "no layer was rebalanced; stats %s; log:\n%s", cJSON_PrintUnformatted(reply),
              LOG_TAIL());
    cJSON_Delete(reply);
    reply = control_ok("{\"id\":2,\"cmd\":\"rebalance\",\"layer\":1}");
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(moe_test_reply_result(reply), "scheduled")));
    cJSON_Delete(reply);
    cJSON_Delete(control_fails("{\"id\":3,\"cmd\":\"rebalance\",\"layer\":9}", "bad_request"));
    moe_test_skew = false;
    char msg[4096];
    cr_assert_eq(moe_test_daemon_stop(&daemon_, 20000, msg, sizeof msg), 0, "%s", msg);
    moe_test_daemon_destroy(&daemon_);
}
