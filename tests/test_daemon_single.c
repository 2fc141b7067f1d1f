/* moed as a plain 1-rank process, without mpirun (DESIGN §2: a valid
 * 1-rank job): it answers pipelined requests correctly against the dense
 * reference and exits 0 on shutdown. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>

#include "../protocol/moe_client.h"
#include "../protocol/moe_frame.h"
#include "support/daemon_harness.h"
#include "support/dense_ref.h"

static moe_test_daemon_t daemon_;
static moe_test_ref_t *ref_;

static void fini(void) {
    moe_test_daemon_cleanup_all();
    moe_test_ref_destroy(ref_);
    ref_ = NULL;
}

static void serve_and_check(const moe_test_daemon_opts_t *opts) {
    char msg[4096], tail[2048];
    uint64_t seed = moe_test_fresh_seed();
    cr_assert_eq(moe_test_daemon_start(&daemon_, opts, 1, false, msg, sizeof msg), 0, "seed %llu: %s",
                 (unsigned long long)seed, msg);
    ref_ = moe_test_ref_create(&daemon_.cfg, msg, sizeof msg);
    cr_assert_not_null(ref_, "reference: %s", msg);
    cJSON *reply = moe_test_control(&daemon_, "{\"id\":1,\"cmd\":\"health\"}");
    cr_assert_eq(moe_test_json_number(moe_test_reply_result(reply), "ranks", -1), 1);
    cJSON_Delete(reply);
    moe_test_client_t clients[2];
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) {
        memset(&clients[i], 0, sizeof clients[i]);
        clients[i].daemon = &daemon_;
        clients[i].ref = ref_;
        clients[i].rank = 0;
        clients[i].depth = 6;
        clients[i].n_requests = 20;
        clients[i].max_tokens = 96;
        clients[i].random_dtype = true;
        clients[i].seed = seed + (uint64_t)i;
        cr_assert_eq(pthread_create(&threads[i], NULL, moe_test_client_thread, &clients[i]), 0);
    }
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < 2; i++) {
        cr_assert(!clients[i].failed, "%s; log:\n%s", clients[i].failure,
                  moe_test_daemon_log_tail(&daemon_, tail, sizeof tail));
        cr_assert_eq(clients[i].results, 20, "seed %llu: %d results of 20", (unsigned long long)seed,
                     clients[i].results);
    }
    cr_assert_eq(moe_test_daemon_stop(&daemon_, 20000, msg, sizeof msg), 0, "shutdown: %s", msg);
    moe_test_daemon_destroy(&daemon_);
}

Test(single_rank, softmax_topk_serves_and_exits_0, .timeout = 120, .fini = fini) {
    moe_test_daemon_opts_t opts = {0};
    serve_and_check(&opts);
}

Test(single_rank, sigmoid_group_topk_shared_serves_and_exits_0, .timeout = 120, .fini = fini) {
    moe_test_daemon_opts_t opts = {.routing = "sigmoid_group_topk", .n_group = 4, .topk_group = 2,
                                   .shared_intermediate = 32};
    serve_and_check(&opts);
}

/* SIGTERM drains and exits 0 as well (DESIGN §10: systemd stops it so). */
Test(single_rank, sigterm_exits_0, .timeout = 120, .fini = fini) {
    moe_test_daemon_opts_t opts = {0};
    char msg[4096];
    cr_assert_eq(moe_test_daemon_start(&daemon_, &opts, 1, false, msg, sizeof msg), 0, "%s", msg);
    pid_t pid = moe_test_daemon_rank_pid(&daemon_, 0);
    cr_assert(pid > 0);
    cr_assert_eq(kill(pid, SIGTERM), 0);
    cr_assert_eq(moe_test_daemon_wait_exit(&daemon_, 20000, msg, sizeof msg), 0, "after SIGTERM: %s", msg);
    moe_test_daemon_destroy(&daemon_);
}

/* A step of bf16 requests runs on bf16 rows (the backend's forward_bf16),
 * a step with a float32 request on float32 rows: the same input, widened,
 * must come back from a bf16 request as the float32 answer rounded to
 * bf16, bit for bit, however the requests share steps. First each request
 * alone (its own step), then five pipelined bf16 requests of different
 * sizes (steps of several: rows at offsets), then the same interleaved
 * with float32 ones (mixed steps: float32 rows for all). */
#define PIPELINED 5
Test(single_rank, bf16_rows_give_the_float32_answer_rounded, .timeout = 120, .fini = fini) {
    moe_test_daemon_opts_t opts = {0};
    char msg[4096], address[400];
    uint64_t seed = moe_test_fresh_seed();
    cr_assert_eq(moe_test_daemon_start(&daemon_, &opts, 1, false, msg, sizeof msg), 0, "%s", msg);
    const int H = daemon_.cfg.model.hidden;
    const int tokens[PIPELINED] = {37, 5, 64, 1, 23};
    float *x[PIPELINED], *want[PIPELINED];
    snprintf(address, sizeof address, "unix:%s", daemon_.data_path[0]);
    moe_client_t *c = NULL;
    cr_assert_eq(moe_client_connect(address, 0, &c, msg, sizeof msg), MOE_OK, "%s", msg);
    uint32_t status = 0;
    for (int r = 0; r < PIPELINED; r++) { /* each alone: the float32 answer, rounded, and the bf16 one */
        const size_t n = (size_t)tokens[r] * H;
        x[r] = malloc(sizeof(float) * n), want[r] = malloc(sizeof(float) * n);
        float *got = malloc(sizeof(float) * n);
        cr_assert(x[r] && want[r] && got);
        moe_test_fill_random(x[r], n, seed + (uint64_t)r);
        for (size_t i = 0; i < n; i++) x[r][i] = moe_bf16_to_f32(moe_f32_to_bf16(x[r][i])); /* exact in bf16 */
        cr_assert_eq(moe_client_forward(c, 0, x[r], tokens[r], H, MOE_DTYPE_F32, NULL, NULL, 0, want[r], &status,
                                        msg, sizeof msg),
                     MOE_OK, "%s", msg);
        for (size_t i = 0; i < n; i++) want[r][i] = moe_bf16_to_f32(moe_f32_to_bf16(want[r][i]));
        cr_assert_eq(moe_client_forward(c, 0, x[r], tokens[r], H, MOE_DTYPE_BF16, NULL, NULL, 0, got, &status, msg,
                                        sizeof msg),
                     MOE_OK, "%s", msg);
        cr_assert(memcmp(got, want[r], sizeof(float) * n) == 0, "seed %llu: request %d alone differs",
                  (unsigned long long)seed, r);
        free(got);
    }
    for (int mixed = 0; mixed < 2; mixed++) {
        for (int r = 0; r < PIPELINED; r++) {
            const uint8_t dtype = mixed && r % 2 == 1 ? MOE_DTYPE_F32 : MOE_DTYPE_BF16;
            cr_assert_eq(moe_client_send(c, (uint64_t)r, 0, x[r], tokens[r], H, dtype, NULL, NULL, 0, msg, sizeof msg),
                         MOE_OK, "%s", msg);
        }
        for (int got_n = 0; got_n < PIPELINED; got_n++) {
            moe_client_response_t resp = {0};
            cr_assert_eq(moe_client_recv(c, &resp, 30000, msg, sizeof msg), MOE_OK, "%s", msg);
            cr_assert_eq(resp.type, MOE_FRAME_RESULT, "seed %llu: %s", (unsigned long long)seed,
                         resp.error_text != NULL ? resp.error_text : "not a result");
            const int r = (int)resp.request_id;
            cr_assert(r >= 0 && r < PIPELINED);
            const size_t n = (size_t)tokens[r] * H;
            if (resp.dtype == MOE_DTYPE_BF16) /* a float32 request's answer is unrounded: rounded here */
                cr_assert(memcmp(resp.out, want[r], sizeof(float) * n) == 0, "seed %llu: %s batch, request %d "
                          "(bf16) differs", (unsigned long long)seed, mixed ? "mixed" : "bf16", r);
            else
                for (size_t i = 0; i < n; i++)
                    cr_assert(moe_bf16_to_f32(moe_f32_to_bf16(resp.out[i])) == want[r][i],
                              "seed %llu: mixed batch, request %d (f32), value %zu differs", (unsigned long long)seed,
                              r, i);
            moe_client_response_free(&resp);
        }
    }
    moe_client_close(c);
    for (int r = 0; r < PIPELINED; r++) free(x[r]), free(want[r]);
    cr_assert_eq(moe_test_daemon_stop(&daemon_, 20000, msg, sizeof msg), 0, "shutdown: %s", msg);
    moe_test_daemon_destroy(&daemon_);
}
