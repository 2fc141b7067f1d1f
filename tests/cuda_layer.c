/* The CUDA layer against the CPU side, on a GPU host (scripts/gpu-test.sh;
 * not part of `make test`, which runs where there is no GPU). For every case
 * of layer_check.c, on fresh random inputs (seed printed):
 *   1. the CUDA output, every element poisoned first, against the dense
 *      double reference fed with the GPU's own routing decision (ids and
 *      weights): max|out - ref| / max|ref| <= 2e-2, and ‖out - ref‖₂ / ‖ref‖₂
 *      <= 1e-2 on outputs of at least 2048 values (bf16 weights and
 *      activations);
 *   2. the routing decision against the host routing code run on the
 *      GPU's own router logits (methods without logits: on nothing): the
 *      same experts and weights (the logits themselves come from a bf16 GEMM,
 *      so the CPU engine's own choice may differ on near-ties);
 *   3. slot statistics: every (token, expert) counted once.
 * Each with every expert-GEMM path: cuBLAS per slot, cuBLAS's grouped call,
 * moed's grouped kernels (moe.gemm: grouped: its own choice, the mma.sync
 * kernel, and wgmma at each tile width on sm_90) and the autotuner's mix
 * (auto),
 * and with moe.comm allgather (its kernels; the NCCL calls need 2 ranks);
 * then the autotuner's cache file: written, read back to the same table,
 * and ignored (tuned again) when its key does not match.
 * Runs alone or under mpirun (one rank per GPU). Exit status 0 on success. */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../kernels/cpu/moe_cpu.h"
#include "../kernels/cuda/moe_cuda.h"
#include "../kernels/moe_routing.h"
#include "../kernels/moe_slots.h"
#include "../kernels/moe_task.h"
#include "../kernels/moe_synth.h"
#include "../protocol/moe_frame.h"
#include "support/dense_ref.h"
#include "support/layer_check.h"

static moe_gemm_kind_t gemm_kind = MOE_GEMM_CUBLAS;
#define L2_MIN_VALUES 2048
static double worst_l2; /* the largest ‖out − ref‖₂ / ‖ref‖₂ of any check with >= L2_MIN_VALUES values */
static char worst_l2_case[200];
/* expert stages run by each form of the grouped GEMM since the last
 * check_forms (moe_cuda_grouped_forms), and whether wgmma can run here */
static struct {
    long long wgmma, ws, mma, decode;
    bool wgmma_ok;
    long long shared_cublas, shared_small; /* chunks' shared experts by each form (moe_cuda_shared_forms) */
} forms;
static moe_comm_kind_t comm_kind = MOE_COMM_AUTO;
static moe_combine_kind_t combine_kind = MOE_COMBINE_PARTIAL;
static int n_ranks = 1;       /* the EP size this test runs at */
static const char *tiles_now; /* the last force_tiles argument */
/* a shape other than layer_check.c's (0: keep), for the wide checks */
static struct {
    int hidden, inter, experts, top_k;
} shape;

#define ZERO_TOKEN_EVERY 13 /* tokens 5, 18, 31, ... are all zeros */

static int check_case(const moe_test_case_t *c, moe_ep_t ep, uint64_t seed, int n_tokens, double *worst_out) {
    moe_config_t cfg, ref_cfg;
    moe_test_case_config(c, ep.size, &cfg);
    cfg.moe.gemm = gemm_kind;
    cfg.moe.comm = comm_kind;
    cfg.moe.combine = combine_kind;
    if (shape.hidden > 0) {
        cfg.model.hidden = shape.hidden, cfg.model.moe_intermediate = shape.inter;
        cfg.model.experts = shape.experts, cfg.model.top_k = shape.top_k;
    }
    cfg.moe.autotune.max_tokens = 32; /* a quick tune; larger chunks use the 32-row choice */
    const int H = cfg.model.hidden, k = cfg.model.top_k, E = cfg.model.experts;
    char msg[512] = "";
    int failed = 0;
    moe_cuda_engine_t *gpu = NULL;
    moe_test_ref_t *ref = NULL;
    size_t rows = (size_t)n_tokens + 1;
    float *x = malloc(sizeof(float) * rows * H), *out = malloc(sizeof(float) * rows * H);
    float *w = malloc(sizeof(float) * rows * k);
    float *cpu_w = malloc(sizeof(float) * rows * k), *client_w = malloc(sizeof(float) * rows * k);
    float *logits = malloc(sizeof(float) * rows * (size_t)E);
    int32_t *ids = malloc(sizeof(int32_t) * rows * k), *cpu_ids = malloc(sizeof(int32_t) * rows * k);
    int32_t *client_ids = malloc(sizeof(int32_t) * rows * k);
    double *want = malloc(sizeof(double) * rows * H);
    int64_t slot_counts[MOE_MAX_SLOTS];
    if (moe_cuda_create(&cfg, ep, &gpu, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "FAIL %s: cuda create: %s\n", c->name, msg);
        failed = 1;
        goto done;
    }
    ref_cfg = cfg;
    ref_cfg.model.routing.method = MOE_ROUTE_CLIENT; /* the reference takes the GPU's decision */
    if ((ref = moe_test_ref_create(&ref_cfg, msg, sizeof msg)) == NULL) {
        fprintf(stderr, "FAIL %s: reference: %s\n", c->name, msg);
        failed = 1;
        goto done;
    }
    /* with more ranks every rank runs every layer (the forwards are
     * collective) whatever its own checks found */
    for (int l = 0; l < cfg.model.n_layers && (ep.size > 1 || !failed); l++) {
        int layer = cfg.model.layer_ids[l];
        moe_test_fill_random(x, (size_t)n_tokens * H, seed + (uint64_t)l * 7919);
        /* every 13th token all zeros: its logits are all +0 or -0, a
         * complete tie that the routing must break to experts 0..k-1 as
         * the host does */
        for (int t = 5; t < n_tokens; t += ZERO_TOKEN_EVERY) memset(x + (size_t)t * H, 0, sizeof(float) * H);
        moe_test_client_routing(seed, n_tokens, k, E, client_ids, client_w);
        int client = cfg.model.routing.method == MOE_ROUTE_CLIENT;
        for (size_t i = 0; i < (size_t)n_tokens * H; i++) out[i] = NAN; /* poison */
        memset(slot_counts, 0, sizeof slot_counts);
        moe_route_trace_t trace = {ids, w, slot_counts, logits, false};
        if (moe_cuda_forward(gpu, layer, x, n_tokens, client ? client_ids : NULL, client ? client_w : NULL, out,
                             &trace, msg, sizeof msg) != MOE_OK) {
            fprintf(stderr, "FAIL %s layer %d: forward: %s\n", c->name, layer, msg);
            failed = 1;
            break;
        }
        int64_t counted = 0, want_counted = (int64_t)n_tokens * k;
        for (int s = 0; s < moe_cuda_slot_count(gpu); s++) counted += slot_counts[s];
        if (trace.slot_counts_global) /* summed over the ranks on the balancer communicator */
            MPI_Allreduce(MPI_IN_PLACE, &want_counted, 1, MPI_INT64_T, MPI_SUM, ep.comm);
        if (counted != want_counted) {
            fprintf(stderr, "FAIL %s layer %d: slot statistics count %lld entries, want %lld\n", c->name, layer,
                    (long long)counted, (long long)want_counted);
            failed = 1;
        }
        if (!trace.slot_counts_global && !failed) { /* slot by slot, from the traced experts */
            static moe_slot_table_t table;
            static int64_t want_slot[MOE_MAX_SLOTS];
            if (moe_slots_build(&cfg.eplb, E, ep.size, &table, msg, sizeof msg) != MOE_OK) {
                fprintf(stderr, "FAIL %s: slot table: %s\n", c->name, msg);
                failed = 1;
            }
            memset(want_slot, 0, sizeof want_slot);
            for (int t = 0; t < n_tokens && !failed; t++)
                for (int i = 0; i < k; i++) want_slot[moe_slots_pick(&table, ids[t * k + i], ep.rank, t)]++;
            for (int s = 0; s < moe_cuda_slot_count(gpu) && !failed; s++)
                if (slot_counts[s] != want_slot[s]) {
                    fprintf(stderr, "FAIL %s layer %d: slot %d counted %lld entries, want %lld\n", c->name, layer, s,
                            (long long)slot_counts[s], (long long)want_slot[s]);
                    failed = 1;
                }
        }
        /* the routing decision: the host routing code on the GPU's own logits
         * (methods without logits: on nothing) must make the GPU's choice */
        bool needs_logits = cfg.model.routing.method == MOE_ROUTE_SOFTMAX_TOPK ||
                            cfg.model.routing.method == MOE_ROUTE_RENORMALIZE ||
                            cfg.model.routing.method == MOE_ROUTE_SIGMOID_GROUP_TOPK;
        if (n_tokens > 0 && cfg.model.routing.method != MOE_ROUTE_CLIENT) {
            moe_route_params_t params;
            moe_route_params_init(&params, &cfg.model, NULL, layer, ep.rank, ep.size);
            float *bias = NULL;
            if (cfg.model.routing.method == MOE_ROUTE_SIGMOID_GROUP_TOPK) {
                bias = malloc(sizeof(float) * E);
                for (int e = 0; e < E; e++)
                    bias[e] = moe_synth_value(cfg.model.weights.seed, layer, MOE_SYNTH_BIAS, -1, (uint64_t)e, 1);
                params.bias = bias;
            }
            moe_route_tokens(&params, needs_logits ? logits : NULL, NULL, NULL, n_tokens, 0, 0, cpu_ids, cpu_w, msg,
                             sizeof msg);
            free(bias);
            int same = 0, tie_differs = -1;
            double worst_w = 0;
            const bool softmax = cfg.model.routing.method == MOE_ROUTE_SOFTMAX_TOPK ||
                                 cfg.model.routing.method == MOE_ROUTE_RENORMALIZE;
            for (int t = 0; t < n_tokens; t++) {
                bool equal = memcmp(ids + t * k, cpu_ids + t * k, sizeof(int32_t) * k) == 0;
                same += equal;
                if (!equal && softmax && t % ZERO_TOKEN_EVERY == 5 && tie_differs < 0) tie_differs = t;
                for (int i = 0; equal && i < k; i++)
                    worst_w = fmax(worst_w, fabs(w[t * k + i] - cpu_w[t * k + i]) / fmax(fabs(cpu_w[t * k + i]), 1e-6));
            }
            /* device and host expf may differ in the last bit: a decision may
             * differ only on an exact near-tie, about never */
            if (tie_differs >= 0) {
                fprintf(stderr, "FAIL %s layer %d: token %d (all zeros, every logit tied) routed to expert %d first, "
                        "the host to %d\n", c->name, layer, tie_differs, ids[tie_differs * k], cpu_ids[tie_differs * k]);
                failed = 1;
            }
            if (n_tokens - same > n_tokens / 1000 || worst_w > 1e-5) {
                fprintf(stderr, "FAIL %s layer %d: routing on the GPU's logits differs from the host routing for "
                        "%d of %d tokens (weights within %g)\n", c->name, layer, n_tokens - same, n_tokens, worst_w);
                failed = 1;
            }
        }
        moe_test_ref_forward(ref, layer, x, n_tokens, ep.rank, ep.size, ids, w, want, NULL);
        double err = moe_test_rel_error(out, want, (size_t)n_tokens * H);
        /* the l2 bound on outputs of at least L2_MIN_VALUES values: on a
         * single token of H=48 it is a handful of bf16 roundings (1.05e-2
         * seen once on an H200), not a statistic */
        double err_l2 = (size_t)n_tokens * H >= L2_MIN_VALUES ? moe_test_rel_error_l2(out, want, (size_t)n_tokens * H) : 0;
        if (!(err <= 2e-2) || !(err_l2 <= 1e-2)) {
            fprintf(stderr, "FAIL %s layer %d (%d tokens, seed %llu): relative error %g (max), %g (l2)\n", c->name,
                    layer, n_tokens, (unsigned long long)seed, err, err_l2);
            failed = 1;
        }
        if (err > *worst_out || isnan(err)) *worst_out = err;
        if (err_l2 > worst_l2 || isnan(err_l2)) {
            worst_l2 = err_l2;
            snprintf(worst_l2_case, sizeof worst_l2_case, "%s, layer %d, %d tokens of H=%d, moe.gemm %s, tiles %s%s",
                     c->name, layer, n_tokens, H, moe_gemm_name(gemm_kind),
                     tiles_now != NULL ? tiles_now : "default", combine_kind == MOE_COMBINE_EXACT ? ", exact" : "");
        }
    }
    if (!failed && n_tokens == 300 && ep.rank == 0 && c == &moe_test_cases[0])
        printf("cuda_layer: moe.gemm %s, moe.comm %s -> %s\n", moe_gemm_name(gemm_kind), moe_comm_name(comm_kind),
               moe_cuda_gemm_table(gpu));
done:
    if (gpu != NULL) {
        long long wgmma = 0, ws = 0, mma = 0, decode = 0;
        moe_cuda_grouped_forms(gpu, &wgmma, &ws, &mma, &decode, &forms.wgmma_ok);
        forms.wgmma += wgmma, forms.ws += ws, forms.mma += mma, forms.decode += decode;
        long long shared_cublas = 0, shared_small = 0;
        moe_cuda_shared_forms(gpu, &shared_cublas, &shared_small);
        forms.shared_cublas += shared_cublas, forms.shared_small += shared_small;
    }
    moe_cuda_destroy(gpu);
    moe_test_ref_destroy(ref);
    free(x), free(out), free(w), free(cpu_w), free(client_w), free(ids), free(cpu_ids);
    free(client_ids), free(want), free(logits);
    return failed;
}

/* ok on every rank (MPI_MIN; no MPI on one rank). */
static bool all_ranks(moe_ep_t ep, bool ok) {
    int v = ok;
    if (ep.size > 1) MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MIN, ep.comm);
    return v != 0;
}

/* The bf16 form the daemon's steps use (moe_cuda_forward_bf16): from x
 * rounded to bf16 on the host, its output must be, bit for bit, the
 * float32 forward's output (on the same values widened) rounded to
 * nearest even — from malloc'd buffers (the staging path) and from pinned
 * ones (DMA). Every case whose routing depends on the tokens alone (the
 * benchmark routers draw anew at every step), at 37 and 300 tokens (the
 * decode form's and the tiles' sizes), one rank. */
static int check_bf16_io(moe_ep_t ep, uint64_t seed, int *runs) {
    int failed = 0;
    for (int i = 0; i < moe_test_case_count && !failed; i++) {
        const moe_test_case_t *c = &moe_test_cases[i];
        moe_config_t cfg;
        moe_test_case_config(c, ep.size, &cfg);
        const moe_route_method_t method = cfg.model.routing.method;
        if (method != MOE_ROUTE_SOFTMAX_TOPK && method != MOE_ROUTE_RENORMALIZE &&
            method != MOE_ROUTE_SIGMOID_GROUP_TOPK && method != MOE_ROUTE_CLIENT)
            continue;
        cfg.moe.gemm = MOE_GEMM_GROUPED;
        const int H = cfg.model.hidden, k = cfg.model.top_k, T_max = 300, layer = cfg.model.layer_ids[0];
        const size_t n_max = (size_t)T_max * H;
        char msg[512] = "";
        moe_cuda_engine_t *gpu = NULL;
        float *x = malloc(sizeof(float) * n_max), *out = malloc(sizeof(float) * n_max);
        uint16_t *xb = malloc(2 * n_max), *outb = malloc(2 * n_max), *xp = NULL, *outp = NULL;
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)T_max * k);
        float *w = malloc(sizeof(float) * (size_t)T_max * k);
        if (!x || !out || !xb || !outb || !ids || !w || moe_cuda_create(&cfg, ep, &gpu, msg, sizeof msg) != MOE_OK ||
            moe_cuda_host_alloc(gpu, 2 * n_max, (void **)&xp, msg, sizeof msg) != MOE_OK ||
            moe_cuda_host_alloc(gpu, 2 * n_max, (void **)&outp, msg, sizeof msg) != MOE_OK) {
            fprintf(stderr, "FAIL bf16 io %s setup: %s\n", c->name, msg);
            failed = 1;
        }
        const int sizes[] = {37, 300};
        for (int si = 0; si < 2 && !failed; si++) {
            const int T = sizes[si];
            const size_t n = (size_t)T * H;
            moe_test_fill_random(x, n, seed + (uint64_t)i * 31 + (uint64_t)si);
            moe_test_client_routing(seed + (uint64_t)i, T, k, cfg.model.experts, ids, w);
            const bool client = cfg.model.routing.method == MOE_ROUTE_CLIENT;
            for (size_t v = 0; v < n; v++) {
                xb[v] = xp[v] = moe_f32_to_bf16(x[v]);
                x[v] = moe_bf16_to_f32(xb[v]);
                outb[v] = outp[v] = 0xFFFF; /* NaN: an element nothing writes shows */
            }
            if (moe_cuda_forward(gpu, layer, x, T, client ? ids : NULL, client ? w : NULL, out, NULL, msg,
                                 sizeof msg) != MOE_OK ||
                moe_cuda_forward_bf16(gpu, layer, xb, T, client ? ids : NULL, client ? w : NULL, outb, NULL, msg,
                                      sizeof msg) != MOE_OK ||
                moe_cuda_forward_bf16(gpu, layer, xp, T, client ? ids : NULL, client ? w : NULL, outp, NULL, msg,
                                      sizeof msg) != MOE_OK) {
                fprintf(stderr, "FAIL bf16 io %s, %d tokens: %s\n", c->name, T, msg);
                failed = 1;
                break;
            }
            for (size_t v = 0; v < n; v++) {
                const uint16_t want = moe_f32_to_bf16(out[v]);
                if (outb[v] != want || outp[v] != want) {
                    fprintf(stderr, "FAIL bf16 io %s, %d tokens: value %zu is %04x (pinned %04x), the float32 "
                            "forward's %a rounds to %04x\n", c->name, T, v, outb[v], outp[v], (double)out[v], want);
                    failed = 1;
                    break;
                }
            }
            (*runs)++;
        }
        if (gpu != NULL) {
            moe_cuda_host_free(gpu, xp);
            moe_cuda_host_free(gpu, outp);
            moe_cuda_destroy(gpu);
        }
        free(x), free(out), free(xb), free(outb), free(ids), free(w);
    }
    return failed;
}

/* Small steps as CUDA graphs (one rank, cuda_graph.cu): a step of 1, 3
 * or 16 tokens (1 or 2 with a shared expert: its small-T kernels) with the
 * daemon's trace (slot counts alone) may run as a graph — the second step of a size at an epoch is captured, later ones
 * launch it. Every such step is checked bit for bit, with its slot counts,
 * against the same input through the usual path (a full trace keeps a step
 * out of graphs), which is checked against the reference; 16 rounds of
 * fresh inputs per case, and before rounds 4, 7, 10 and 13 what makes
 * every graph stale: a 300-token step (the workspace grows), a reload
 * (moe_cuda_reconfigure), an EPLB migration (new weight buffers and slot
 * table), and steps without the slot counting (another graph: rounds 13-15
 * pass no trace). Each of the five stretches captures every size once and
 * launches it at least twice: a size's first step in a stretch runs
 * uncaptured, and in round 0 the larger sizes' first steps grow buffers,
 * so the first capture is in round 2. The cases with replicas exchange by
 * moe.comm allgather; the chunked cases run in one chunk. */
static int check_graphs(moe_ep_t ep, uint64_t seed, int *runs) {
    if (ep.size != 1) return 0;
    int failed = 0;
    long long captured_all = 0, launched_all = 0;
    /* each case, and sigmoid_group_topk once more without its shared
     * expert (its routing in graphs of 3 and 16 tokens too) */
    for (int iv = 0; iv < 2 * moe_test_case_count && !failed; iv++) {
        const int i = iv / 2;
        const moe_test_case_t *c = &moe_test_cases[i];
        moe_config_t cfg, ref_cfg;
        moe_test_case_config(c, ep.size, &cfg);
        const moe_route_method_t method = cfg.model.routing.method;
        const bool group = method == MOE_ROUTE_SIGMOID_GROUP_TOPK && !c->replicas;
        if ((method != MOE_ROUTE_SOFTMAX_TOPK && method != MOE_ROUTE_RENORMALIZE && method != MOE_ROUTE_PERFECT &&
             !group) ||
            (iv % 2 == 1 && !group))
            continue;
        if (iv % 2 == 1) cfg.model.shared_intermediate = 0;
        const bool shared = cfg.model.shared_intermediate > 0;
        /* one chunk: graphs take single-chunk steps (the chunked cases are
         * the softmax and renormalize ones with a shared expert and its
         * gate, whose small-T kernels a graph captures) */
        cfg.moe.chunking.max_tokens_per_chunk = 4096;
        cfg.moe.gemm = MOE_GEMM_GROUPED;
        if (c->replicas) cfg.moe.comm = MOE_COMM_ALLGATHER; /* its copies and padding on one rank, captured too */
        ref_cfg = cfg;
        ref_cfg.model.routing.method = MOE_ROUTE_CLIENT; /* the reference takes the GPU's decision */
        const int H = cfg.model.hidden, k = cfg.model.top_k, E = cfg.model.experts, layer = cfg.model.layer_ids[0];
        /* with a shared expert, graphs up to MOE_CUDA_SHARED_SMALL_TOKENS
         * (2); its 3-token steps (cuBLAS) stay out of them */
        const int sizes[] = {1, shared ? 2 : 3, shared ? 3 : 16}, n_graphed = shared ? 2 : 3, T_big = 300;
        char msg[512] = "";
        moe_cuda_engine_t *gpu = NULL;
        moe_test_ref_t *ref = moe_test_ref_create(&ref_cfg, msg, sizeof msg);
        float *x = malloc(sizeof(float) * (size_t)T_big * H), *out_g = malloc(sizeof(float) * (size_t)T_big * H);
        float *out_n = malloc(sizeof(float) * (size_t)T_big * H), *w = malloc(sizeof(float) * (size_t)T_big * k);
        float *logits = malloc(sizeof(float) * (size_t)T_big * E);
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)T_big * k);
        double *want = malloc(sizeof(double) * (size_t)T_big * H);
        static int64_t counts_g[MOE_MAX_SLOTS], counts_n[MOE_MAX_SLOTS];
        if (ref == NULL || !x || !out_g || !out_n || !w || !logits || !ids || !want ||
            moe_cuda_create(&cfg, ep, &gpu, msg, sizeof msg) != MOE_OK) {
            fprintf(stderr, "FAIL graphs %s setup: %s\n", c->name, msg);
            failed = 1;
        }
        const int n_slots = gpu != NULL ? moe_cuda_slot_count(gpu) : 0;
        for (int round = 0; round < 16 && !failed; round++) {
            if (round == 4) { /* the workspace grows */
                moe_test_fill_random(x, (size_t)T_big * H, seed + 99);
                if (moe_cuda_forward(gpu, layer, x, T_big, NULL, NULL, out_n, NULL, msg, sizeof msg) != MOE_OK) {
                    fprintf(stderr, "FAIL graphs %s: %d tokens: %s\n", c->name, T_big, msg);
                    failed = 1;
                }
            }
            if (round == 7) moe_cuda_reconfigure(gpu, &cfg);
            if (round == 10 && !failed) { /* a new placement: slots permuted */
                int next[MOE_MAX_SLOTS];
                for (int sl = 0; sl < n_slots; sl++) next[sl] = sl < E ? (sl * 3 + 1) % E : E - 1 - (sl - E) % E;
                if (moe_cuda_migrate(gpu, layer, next, NULL, msg, sizeof msg) != MOE_OK) {
                    fprintf(stderr, "FAIL graphs %s: migration: %s\n", c->name, msg);
                    failed = 1;
                }
            }
            for (int si = 0; si < 3 && !failed; si++) {
                const int T = sizes[si];
                const size_t n = (size_t)T * H;
                moe_test_fill_random(x, n, seed + (uint64_t)i * 1000 + (uint64_t)round * 10 + (uint64_t)si);
                for (size_t v = 0; v < n; v++) out_g[v] = out_n[v] = NAN;
                memset(counts_g, 0, sizeof counts_g);
                memset(counts_n, 0, sizeof counts_n);
                moe_route_trace_t daemon_trace = {NULL, NULL, counts_g, NULL, false};
                moe_route_trace_t full_trace = {ids, w, counts_n, logits, false};
                const bool counting = round < 13;
                if (moe_cuda_forward(gpu, layer, x, T, NULL, NULL, out_g, counting ? &daemon_trace : NULL, msg,
                                     sizeof msg) != MOE_OK ||
                    moe_cuda_forward(gpu, layer, x, T, NULL, NULL, out_n, &full_trace, msg, sizeof msg) != MOE_OK) {
                    fprintf(stderr, "FAIL graphs %s, round %d, %d tokens: %s\n", c->name, round, T, msg);
                    failed = 1;
                    break;
                }
                (*runs)++;
                moe_test_ref_forward(ref, layer, x, T, ep.rank, ep.size, ids, w, want, NULL);
                const double err = moe_test_rel_error(out_n, want, n);
                if (!(err <= 2e-2)) {
                    fprintf(stderr, "FAIL graphs %s, round %d, %d tokens (seed %llu): relative error %g\n", c->name,
                            round, T, (unsigned long long)seed, err);
                    failed = 1;
                }
                if (memcmp(out_g, out_n, sizeof(float) * n) != 0 ||
                    (counting && memcmp(counts_g, counts_n, sizeof(int64_t) * (size_t)n_slots) != 0)) {
                    fprintf(stderr, "FAIL graphs %s, round %d, %d tokens: the step with slot counts alone (a graph "
                            "from round 1 on) differs from the usual path's, outputs or counts\n", c->name, round, T);
                    failed = 1;
                }
            }
        }
        if (gpu != NULL) {
            long long captured = 0, launched = 0;
            moe_cuda_graph_counts(gpu, &captured, &launched);
            captured_all += captured, launched_all += launched;
            /* five stretches: one capture per graphed size in each */
            if (!failed && (captured < n_graphed * 5 || launched < n_graphed * 10 || (shared && captured > 2 * 5))) {
                fprintf(stderr, "FAIL graphs %s%s: %lld graphs captured and %lld launched over 16 rounds of %d sizes "
                        "that run as graphs (want 5 and 10 per size%s)\n",
                        c->name, shared ? "" : c->shared ? " without its shared expert" : "", captured, launched,
                        n_graphed, shared ? "; 3-token steps with a shared expert not captured" : "");
                failed = 1;
            }
        }
        moe_cuda_destroy(gpu);
        moe_test_ref_destroy(ref);
        free(x), free(out_g), free(out_n), free(w), free(logits), free(ids), free(want);
    }
    if (!failed)
        printf("cuda_layer: graphs: %lld captured, %lld launched, every step bit-identical to the usual path\n",
               captured_all, launched_all);
    return failed;
}

/* EPLB migration: a forward, a new placement (slots permuted, and the extra
 * slots now replicate the highest experts instead of the lowest: copied on
 * the device, and with more ranks regenerated), the same forward again: on
 * one rank with moe.gemm grouped, and with moe.combine exact on any rank
 * count, bit-identical to the first; with the partial combine on more
 * ranks within the bound of the reference. */
static int check_migration(moe_ep_t ep, uint64_t seed, moe_combine_kind_t combine) {
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[2], ep.size, &cfg); /* softmax_topk with replicas */
    cfg.moe.gemm = MOE_GEMM_GROUPED;
    cfg.moe.combine = combine;
    const bool exact = ep.size == 1 || combine == MOE_COMBINE_EXACT; /* outputs independent of the placement */
    const char *name = combine == MOE_COMBINE_EXACT ? "migration (exact combine)" : "migration";
    const int H = cfg.model.hidden, E = cfg.model.experts, T = 77 + 5 * ep.rank, layer = cfg.model.layer_ids[0];
    char msg[512] = "";
    int failed = 0;
    moe_cuda_engine_t *gpu = NULL;
    moe_config_t ref_cfg = cfg;
    ref_cfg.model.routing.method = MOE_ROUTE_CLIENT; /* the reference takes the GPU's decision (bf16 logits) */
    moe_test_ref_t *ref = moe_test_ref_create(&ref_cfg, msg, sizeof msg);
    const int k = cfg.model.top_k;
    float *x = malloc(sizeof(float) * (size_t)T * H), *before = malloc(sizeof(float) * (size_t)T * H);
    float *after = malloc(sizeof(float) * (size_t)T * H), *w = malloc(sizeof(float) * (size_t)T * k);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)T * k);
    double *want = malloc(sizeof(double) * (size_t)T * H);
    moe_route_trace_t trace = {ids, w, NULL, NULL, false};
    if (ref == NULL || !x || !before || !after || !want || !w || !ids ||
        moe_cuda_create(&cfg, ep, &gpu, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "FAIL %s setup: %s\n", name, msg);
        failed = 1;
        goto done;
    }
    const int n_slots = moe_cuda_slot_count(gpu);
    int next[MOE_MAX_SLOTS];
    for (int s = 0; s < n_slots; s++) next[s] = s < E ? (s * 3 + 1) % E : E - 1 - (s - E) % E;
    moe_test_fill_random(x, (size_t)T * H, seed);
    int64_t bytes = 0;
    /* in two halves, with a forward while the shadow slots fill (it still
     * serves the current placement); the ranks agree before each collective
     * step, so that a failure on one rank ends the check on all of them
     * instead of leaving the others in a collective */
    float *during = malloc(sizeof(float) * (size_t)T * H), *one = malloc(sizeof(float) * (size_t)H);
    bool ok = all_ranks(ep, during != NULL && one != NULL) &&
              moe_cuda_forward(gpu, layer, x, T, NULL, NULL, before, NULL, msg, sizeof msg) == MOE_OK;
    const bool begun = all_ranks(ep, ok) && moe_cuda_migrate_begin(gpu, layer, next, msg, sizeof msg) == MOE_OK;
    ok = all_ranks(ep, begun) && moe_cuda_forward(gpu, layer, x, T, NULL, NULL, during, NULL, msg, sizeof msg) == MOE_OK;
    while (begun && moe_cuda_migrate_poll(gpu) == MOE_TASK_RUNNING) usleep(1000);
    ok = all_ranks(ep, ok && begun && moe_cuda_migrate_poll(gpu) == MOE_TASK_DONE);
    /* commit only when every rank loaded, as the daemon does */
    if (begun && moe_cuda_migrate_end(gpu, ok, &bytes, msg, sizeof msg) != MOE_OK) ok = false;
    ok = all_ranks(ep, ok) && moe_cuda_forward(gpu, layer, x, T, NULL, NULL, after, &trace, msg, sizeof msg) == MOE_OK;
    /* the exact combine runs one GEMM form at every row count: a token's
     * row from a one-token step (every rank 1 row, here several hundred
     * times fewer) is the same bits as in the full step (this case has no
     * shared expert, whose kernels depend on the token count) */
    const bool check_one = combine == MOE_COMBINE_EXACT && ep.size > 1;
    if (check_one)
        ok = all_ranks(ep, ok) && moe_cuda_forward(gpu, layer, x, 1, NULL, NULL, one, NULL, msg, sizeof msg) == MOE_OK;
    if (ok && exact && memcmp(before, during, sizeof(float) * (size_t)T * H) != 0) {
        fprintf(stderr, "FAIL %s: a forward while loading differs from the one before\n", name);
        failed = 1;
    }
    if (ok && check_one && memcmp(one, after, sizeof(float) * (size_t)H) != 0) {
        fprintf(stderr, "FAIL %s: token 0 alone differs from token 0 in a step of %d tokens\n", name, T);
        failed = 1;
    }
    free(during);
    free(one);
    if (!ok) {
        fprintf(stderr, "FAIL %s: %s\n", name, msg[0] ? msg : "another rank failed");
        failed = 1;
        goto done;
    }
    /* one rank holds every expert already: all copied on the device, none
     * loaded; with more ranks experts arrive that a rank did not hold */
    if (memcmp(moe_cuda_placement(gpu, layer), next, sizeof(int) * n_slots) != 0 ||
        (ep.size == 1 ? bytes != 0 : bytes <= 0)) {
        fprintf(stderr, "FAIL %s: placement not adopted, or %lld bytes loaded\n", name, (long long)bytes);
        failed = 1;
    }
    moe_test_ref_forward(ref, layer, x, T, ep.rank, ep.size, ids, w, want, NULL);
    double err = moe_test_rel_error(after, want, (size_t)T * H);
    if (!(err <= 2e-2)) {
        fprintf(stderr, "FAIL %s (seed %llu): after it, relative error %g against the reference\n", name,
                (unsigned long long)seed, err);
        failed = 1;
    }
    if (exact && memcmp(before, after, sizeof(float) * (size_t)T * H) != 0) {
        fprintf(stderr, "FAIL %s: outputs before and after the swap differ (%d rank(s))\n", name, ep.size);
        failed = 1;
    }
    if (!failed && ep.rank == 0)
        printf("cuda_layer: %s: %lld bytes regenerated on rank 0, error %.3g, outputs before/after %s\n", name,
               (long long)bytes, err, exact ? "bit-identical" : "within the bound");
done:
    moe_cuda_destroy(gpu);
    moe_test_ref_destroy(ref);
    free(x), free(before), free(after), free(want), free(w), free(ids);
    return failed;
}

/* The autotuner's cache: the first engine tunes and writes it, the second
 * reads the same table back, a third with another key tunes again. */
static int check_cache(moe_ep_t ep) {
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[0], ep.size, &cfg);
    cfg.moe.gemm = MOE_GEMM_AUTO;
    cfg.moe.autotune.max_tokens = 64;
    snprintf(cfg.moe.autotune.cache, sizeof cfg.moe.autotune.cache, "/tmp/moed-cuda-layer-%d-%d.tune", (int)getpid(),
             ep.rank);
    remove(cfg.moe.autotune.cache);
    char msg[512], first[1024] = "", second[1024] = "", third[1024] = "";
    int failed = 0;
    for (int pass = 0; pass < 3 && !failed; pass++) {
        if (pass == 2) cfg.moe.autotune.max_tokens = 32; /* part of the key */
        moe_cuda_engine_t *gpu = NULL;
        if (moe_cuda_create(&cfg, ep, &gpu, msg, sizeof msg) != MOE_OK) {
            fprintf(stderr, "FAIL autotune cache pass %d: %s\n", pass, msg);
            failed = 1;
            break;
        }
        snprintf(pass == 0 ? first : pass == 1 ? second : third, sizeof first, "%s", moe_cuda_gemm_table(gpu));
        if (pass == 1) { /* a reload of moe.gemm: grouped everywhere, then auto again (from the cache) */
            moe_config_t next = cfg;
            next.moe.gemm = MOE_GEMM_GROUPED;
            moe_cuda_reconfigure(gpu, &next);
            bool grouped = strncmp(moe_cuda_gemm_table(gpu), "grouped:", 8) == 0;
            moe_cuda_reconfigure(gpu, &cfg);
            if (!grouped || strcmp(moe_cuda_gemm_table(gpu), second) != 0) {
                fprintf(stderr, "FAIL moe.gemm reload: '%s' after auto -> grouped -> auto\n", moe_cuda_gemm_table(gpu));
                failed = 1;
            }
        }
        moe_cuda_destroy(gpu);
    }
    const char *tuned = "auto (tuned):", *cached = "auto (from the cache):";
    if (!failed && (strncmp(first, tuned, strlen(tuned)) != 0 || strncmp(second, cached, strlen(cached)) != 0 ||
                    strcmp(first + strlen(tuned), second + strlen(cached)) != 0 ||
                    strncmp(third, tuned, strlen(tuned)) != 0)) {
        fprintf(stderr, "FAIL autotune cache: first '%s', second '%s', third '%s'\n", first, second, third);
        failed = 1;
    }
    if (!failed && ep.rank == 0) printf("cuda_layer: autotune cache written, read back and re-keyed: %s\n", second);
    remove(cfg.moe.autotune.cache);
    return failed;
}

/* moe.gemm grouped's tiles: NULL its own choice (decode for a few rows,
 * launched with programmatic dependent launch on sm_90; "nopdl" the same
 * without it; "sharedblas" the same with the shared expert by cuBLAS at
 * every size, MOE_CUDA_SHARED_SMALL=0),
 * then wgmma on sm_90, widths by size), "mma" the mma.sync kernel alone
 * (what other GPUs run beyond decode sizes), "decode" the decode form at
 * every size (several tiles per slot), "nodecode" the tiles from one row
 * on, "64", "128", "256": wgmma's classic form with that many weight rows
 * per work item (and no decode form), "ws64", "ws128", "ws256": the same
 * in its warp-specialised form, "wsweight": that form at its own widths
 * with each slot's items by weight tile (the order it picks for many column
 * blocks; these shapes have few), or "exact": the engine's own choice
 * under moe.combine exact (with more than one rank: tiles at every size). */
static void force_tiles(const char *how) {
    tiles_now = how;
    unsetenv("MOE_CUDA_NO_WGMMA");
    unsetenv("MOE_CUDA_WGMMA_BN");
    unsetenv("MOE_CUDA_WGMMA_WS");
    unsetenv("MOE_CUDA_WGMMA_ORDER");
    unsetenv("MOE_CUDA_WGMMA_MIN_ROWS");
    unsetenv("MOE_CUDA_DECODE_ROWS");
    unsetenv("MOE_CUDA_NO_PDL");
    unsetenv("MOE_CUDA_SHARED_SMALL");
    combine_kind = how != NULL && strcmp(how, "exact") == 0 ? MOE_COMBINE_EXACT : MOE_COMBINE_PARTIAL;
    if (how != NULL && strcmp(how, "nopdl") == 0) setenv("MOE_CUDA_NO_PDL", "1", 1);
    else if (how != NULL && strcmp(how, "sharedblas") == 0) setenv("MOE_CUDA_SHARED_SMALL", "0", 1);
    else if (how != NULL && strcmp(how, "mma") == 0) setenv("MOE_CUDA_NO_WGMMA", "1", 1);
    else if (how != NULL && strcmp(how, "decode") == 0) setenv("MOE_CUDA_DECODE_ROWS", "1000000", 1);
    else if (how != NULL && strcmp(how, "nodecode") == 0) setenv("MOE_CUDA_DECODE_ROWS", "0", 1);
    else if (how != NULL && strcmp(how, "wsweight") == 0) {
        setenv("MOE_CUDA_WGMMA_WS", "1", 1), setenv("MOE_CUDA_WGMMA_ORDER", "weight", 1);
        setenv("MOE_CUDA_DECODE_ROWS", "0", 1);
    } else if (how != NULL && combine_kind != MOE_COMBINE_EXACT) {
        const bool ws = strncmp(how, "ws", 2) == 0;
        setenv("MOE_CUDA_WGMMA_BN", ws ? how + 2 : how, 1), setenv("MOE_CUDA_DECODE_ROWS", "0", 1);
        setenv("MOE_CUDA_WGMMA_WS", ws ? "1" : "0", 1);
    }
    memset(&forms, 0, sizeof forms);
}

/* The grouped runs since force_tiles(how) used the form it asks for:
 * "decode" only decode; "mma" mma.sync and no wgmma; "nodecode" and the
 * widths no decode; the default some decode (the 1-token size) and, where
 * wgmma can run, some wgmma; the widths and "nodecode" there some wgmma
 * (fewer entries than slots stay on mma.sync), in the warp-specialised
 * form for "wsNN" and for the default choice, in the classic form for
 * the bare widths. */
static int check_forms(const char *how, const char *what) {
    /* the exact combine: the tiles at every size with more than one rank,
     * the default choice on one (nothing to combine there) */
    const bool exact = how != NULL && strcmp(how, "exact") == 0 && n_ranks > 1;
    if (how != NULL && strcmp(how, "exact") == 0) how = n_ranks > 1 ? "nodecode" : NULL;
    const bool want_decode_only = how != NULL && strcmp(how, "decode") == 0;
    const bool want_mma = how != NULL && strcmp(how, "mma") == 0;
    const bool nopdl = how != NULL && strcmp(how, "nopdl") == 0;
    const bool sharedblas = how != NULL && strcmp(how, "sharedblas") == 0;
    /* the default choice, launched without programmatic dependent launch,
     * or with the shared expert by cuBLAS at every size */
    if (nopdl || sharedblas) how = NULL;
    /* the layer cases' shared experts (1-token steps and the chunked
     * cases' last chunks by the small-T kernels, 3 tokens and more by
     * cuBLAS), or by cuBLAS alone for sharedblas */
    if (strcmp(what, "layer cases") == 0 &&
        (forms.shared_cublas == 0 || (sharedblas ? forms.shared_small != 0 : forms.shared_small == 0))) {
        fprintf(stderr, "FAIL %s (tiles %s): the shared expert ran %lld times by cuBLAS and %lld times by the "
                "small-T kernels\n", what, sharedblas ? "sharedblas" : how != NULL ? how : "default",
                forms.shared_cublas, forms.shared_small);
        return 1;
    }
    const bool want_decode = how == NULL || want_decode_only || want_mma;
    const bool want_wgmma = !want_decode_only && !want_mma && forms.wgmma_ok;
    bool bad = want_decode ? forms.decode == 0 : forms.decode != 0;
    if (want_decode_only) bad = bad || forms.wgmma != 0 || forms.mma != 0;
    if (want_mma) bad = bad || forms.wgmma != 0 || forms.mma == 0;
    if (want_wgmma) bad = bad || forms.wgmma == 0;
    /* the form: warp-specialised by default and for "wsNN", classic for a bare width */
    const bool bare_width =
        how != NULL && (strcmp(how, "64") == 0 || strcmp(how, "128") == 0 || strcmp(how, "256") == 0);
    if (want_wgmma && bare_width) bad = bad || forms.ws != 0;
    else if (want_wgmma) bad = bad || forms.ws == 0;
    /* the exact combine: one form at every row count, so no mma.sync where wgmma runs */
    if (exact && forms.wgmma_ok) bad = bad || forms.mma != 0;
    if (bad) {
        fprintf(stderr,
                "FAIL %s (tiles %s): grouped GEMM ran wgmma %lld (warp-specialised %lld), mma.sync %lld and decode %lld "
                "times (wgmma %s here)\n",
                what, how != NULL ? how : "default", forms.wgmma, forms.ws, forms.mma, forms.decode,
                forms.wgmma_ok ? "available" : "unavailable");
        return 1;
    }
    return 0;
}

/* The single-GPU set: every path, tile form and shape at every size. */
static int single_gpu_checks(moe_ep_t ep, unsigned long long seed, bool quick, int *runs_out, double *worst_out) {
    /* 1, 3, 13: the router's small-T kernel at 1, 4 and 8 tokens per warp
     * (13: two blocks of tokens), decode at 1 and 3 rows; 37/120/300: 16-,
     * 32- and 64-row tiles of the grouped kernel */
    const int sizes[] = {0, 1, 3, 13, 37, 120, 300};
    const size_t n_sizes = sizeof sizes / sizeof sizes[0] - (quick ? 1 : 0);
    int failures = 0, runs = 0;
    double worst = 0;
    /* every expert-GEMM path: one cuBLAS call per slot (what these small
     * models get from cublas), cuBLAS's grouped call (forced), moed's own
     * grouped kernel, and the autotuner's choice */
    const struct {
        moe_gemm_kind_t kind;
        bool force_cublas_grouped;
        moe_comm_kind_t comm; /* allgather: its kernels run on one rank too */
        const char *tiles; /* grouped's tiles (force_tiles) */
    } paths[] = {{MOE_GEMM_CUBLAS, false, MOE_COMM_AUTO, NULL},
                 {MOE_GEMM_CUBLAS, true, MOE_COMM_AUTO, NULL},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, NULL},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "mma"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "decode"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "nodecode"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "nopdl"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "sharedblas"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "exact"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "64"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "128"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "256"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "ws64"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "ws128"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "ws256"},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_AUTO, "wsweight"},
                 {MOE_GEMM_AUTO, false, MOE_COMM_AUTO, NULL},
                 {MOE_GEMM_GROUPED, false, MOE_COMM_ALLGATHER, NULL},
                 {MOE_GEMM_CUBLAS, false, MOE_COMM_ALLTOALL, NULL}};
    for (size_t p = 0; p < sizeof paths / sizeof paths[0]; p++) {
        gemm_kind = paths[p].kind;
        comm_kind = paths[p].comm;
        if (paths[p].force_cublas_grouped) setenv("MOE_CUDA_FORCE_GROUPED", "1", 1);
        else unsetenv("MOE_CUDA_FORCE_GROUPED");
        force_tiles(paths[p].tiles);
        for (int i = 0; i < moe_test_case_count; i++)
            for (size_t s = 0; s < n_sizes; s++) {
                int n = (int)((sizes[s] + (uint64_t)ep.rank * 13) % 400);
                if (sizes[s] == 0) n = 0;
                failures += check_case(&moe_test_cases[i], ep, seed + i * 101 + s * 7 + (uint64_t)ep.rank, n, &worst);
                runs++;
            }
        if (paths[p].kind == MOE_GEMM_GROUPED) failures += check_forms(paths[p].tiles, "layer cases");
    }
    unsetenv("MOE_CUDA_FORCE_GROUPED");
    force_tiles(NULL);
    /* wider shapes for moed's grouped kernel: K = 264 (several pipeline
     * stages and a tail), I = 136 and H = 264 (several column blocks and a
     * partial one), 320 slots (a plan scan over many slots), 16
     * experts with 600 tokens (32- and 64-row tiles) and 2000 of 2
     * entries (two row tiles per slot, in either order), 16 experts with
     * 2000 tokens of 8 entries (8 wgmma tiles per slot, more work items
     * than multiprocessors; 2100 tokens: the grouping's multi-CTA path),
     * and the multi-CTA grouping again on a small H (in the quick set);
     * k = 12: the decode form's entries in two batches; k = 1; H = 2056
     * and I = 1288 with k = 6 (the decode and router kernels' loops over
     * several rounds and a partial one, a partial batch of entries) */
    const struct {
        int hidden, inter, experts, top_k, tokens[3];
        bool quick; /* in the quick set */
    } wide[] = {{264, 136, 320, 4, {1, 37, 300}, true},
                {264, 136, 16, 2, {120, 600, 2000}, true},
                {264, 136, 16, 8, {2000, 333, 2100}, false},
                {64, 72, 16, 8, {2100, 40, 0}, true},
                {64, 72, 32, 12, {1, 5, 40}, true},
                {64, 72, 16, 1, {1, 5, 40}, true},
                {2056, 1288, 8, 6, {1, 3, 40}, false}};
    /* each with the grouped kernel's own choice of tiles, the mma.sync
     * kernel, and wgmma at each width (K tails, partial column blocks,
     * partial row tiles, several tiles per slot) */
    gemm_kind = MOE_GEMM_GROUPED, comm_kind = MOE_COMM_AUTO;
    const char *wide_bn[] = {NULL, "mma", "decode", "64", "128", "256", "ws64", "ws128", "ws256", "wsweight"};
    for (size_t v = 0; v < sizeof wide_bn / sizeof wide_bn[0]; v++) {
        force_tiles(wide_bn[v]);
        for (size_t w = 0; w < sizeof wide / sizeof wide[0]; w++) {
            if (quick && !wide[w].quick) continue;
            shape.hidden = wide[w].hidden, shape.inter = wide[w].inter;
            shape.experts = wide[w].experts, shape.top_k = wide[w].top_k;
            for (int s = 0; s < 3; s++) {
                failures += check_case(&moe_test_cases[0], ep, seed + 7777 + w * 31 + s + v * 1000,
                                       wide[w].tokens[s], &worst);
                runs++;
            }
        }
        failures += check_forms(wide_bn[v], "wide shapes");
    }
    force_tiles(NULL);
    /* 1024 experts, 2100 tokens of 8 entries: the multi-CTA grouping's
     * plan scan with two slots per thread (its 512 threads), and the
     * routing kernel's widest form (32 logits per lane) */
    if (!quick) {
        shape.hidden = 64, shape.inter = 32, shape.experts = 1024, shape.top_k = 8;
        failures += check_case(&moe_test_cases[0], ep, seed + 4242, 2100, &worst);
        runs++;
    }
    /* the group routing (DeepSeek-V3's method) at a wider shape: 256
     * experts in 4 groups of 64, 2 groups chosen, k = 8 (8 scores per lane
     * of its warp kernel), with a shared expert; the decode form at 1 and
     * 5 tokens, the tiles at 300 */
    for (int i = 0; i < moe_test_case_count; i++) {
        if (moe_test_cases[i].method != MOE_ROUTE_SIGMOID_GROUP_TOPK || moe_test_cases[i].replicas) continue;
        shape.hidden = 64, shape.inter = 72, shape.experts = 256, shape.top_k = 8;
        const int tokens[] = {1, 5, 300};
        for (int t = 0; t < 3; t++) {
            failures += check_case(&moe_test_cases[i], ep, seed + 9191 + t, tokens[t], &worst);
            runs++;
        }
    }
    /* model.hidden not a multiple of 8 (allowed with cublas): the router GEMM
     * stays on cuBLAS at every size */
    gemm_kind = MOE_GEMM_CUBLAS;
    shape.hidden = 44, shape.inter = 40, shape.experts = 8, shape.top_k = 2;
    for (int t = 0; t < 3; t++) {
        const int tokens[] = {1, 13, 37};
        failures += check_case(&moe_test_cases[0], ep, seed + 5151 + t, tokens[t], &worst);
        runs++;
    }
    memset(&shape, 0, sizeof shape);
    failures += check_cache(ep);
    failures += check_bf16_io(ep, seed + 777, &runs);
    failures += check_graphs(ep, seed + 888, &runs);
    *runs_out += runs;
    if (worst > *worst_out) *worst_out = worst;
    return failures;
}

/* With more than one rank (under mpirun, a GPU each): every engine start
 * is an NCCL bootstrap (about a second), so a smaller set that still runs
 * the exchanges, remote entries, an empty rank 0 (size 0) and the exact
 * combine: the exact combine on every case at 120 tokens and on a third of
 * them at 0, 1 and 13; the grouped default, cuBLAS and allgather on a third
 * at 1 and 120. Quick (compute-sanitizer): the exact combine alone, on
 * three cases at 13 tokens. */
static int multi_rank_checks(moe_ep_t ep, unsigned long long seed, bool quick, int *runs, double *worst) {
    const struct {
        moe_gemm_kind_t kind;
        moe_comm_kind_t comm;
        const char *tiles;
        int sizes[3];
        int n_sizes, case_step; /* the cases i with i % case_step == 0 */
    } sets[] = {{MOE_GEMM_GROUPED, MOE_COMM_ALLTOALL, "exact", {120}, 1, 1},
                {MOE_GEMM_GROUPED, MOE_COMM_ALLTOALL, "exact", {0, 1, 13}, 3, 3},
                {MOE_GEMM_GROUPED, MOE_COMM_ALLTOALL, NULL, {1, 120}, 2, 3},
                {MOE_GEMM_CUBLAS, MOE_COMM_ALLTOALL, NULL, {1, 120}, 2, 3},
                {MOE_GEMM_GROUPED, MOE_COMM_ALLGATHER, NULL, {1, 120}, 2, 3}};
    const struct {
        int sizes[1];
        int n_sizes, case_step;
    } quick_set = {{13}, 1, 5};
    int failures = 0;
    for (size_t p = 0; p < (quick ? 1 : sizeof sets / sizeof sets[0]); p++) {
        gemm_kind = sets[p].kind;
        comm_kind = sets[p].comm;
        unsetenv("MOE_CUDA_FORCE_GROUPED");
        force_tiles(sets[p].tiles);
        const int n_sizes = quick ? quick_set.n_sizes : sets[p].n_sizes;
        const int step = quick ? quick_set.case_step : sets[p].case_step;
        for (int i = 0; i < moe_test_case_count; i += step)
            for (int s = 0; s < n_sizes; s++) {
                const int size = quick ? quick_set.sizes[s] : sets[p].sizes[s];
                /* ranks get different counts; size 0: rank 0 empty, the others 13 */
                const int n = size == 0 ? (ep.rank == 0 ? 0 : 13) : size + ep.rank * 13;
                failures += check_case(&moe_test_cases[i], ep, seed + i * 101 + s * 7 + (uint64_t)ep.rank, n, worst);
                (*runs)++;
            }
        /* which form the default picks depends on how many rows each rank
         * received; the exact combine's must be the tiles alone */
        if (sets[p].tiles != NULL) failures += check_forms(sets[p].tiles, "multi-rank cases");
    }
    force_tiles(NULL);
    comm_kind = MOE_COMM_AUTO;
    return failures;
}

int main(int argc, char **argv) {
    moe_ep_t ep = moe_ep_single();
    int under_mpi = getenv("OMPI_COMM_WORLD_SIZE") != NULL;
    if (under_mpi) {
        int provided;
        MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
        ep.comm = MPI_COMM_WORLD;
        MPI_Comm_rank(MPI_COMM_WORLD, &ep.rank);
        MPI_Comm_size(MPI_COMM_WORLD, &ep.size);
    }
    n_ranks = ep.size;
    unsigned long long seed = argc > 1 ? strtoull(argv[1], NULL, 10) : moe_test_fresh_seed();
    if (under_mpi) MPI_Bcast(&seed, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
    /* MOE_CUDA_LAYER_QUICK (gpu-test.sh's compute-sanitizer run, where
     * every kernel runs many times slower): no 300-token size and no
     * 2000-token shape; every path, kernel, tile width and both groupings
     * still run. Device outputs are poisoned (NaN) before every forward. */
    setenv("MOE_CUDA_POISON_OUTPUT", "1", 1);
    const bool quick = getenv("MOE_CUDA_LAYER_QUICK") != NULL;
    int failures = 0, runs = 0;
    double worst = 0;
    failures += ep.size > 1 ? multi_rank_checks(ep, seed, quick, &runs, &worst)
                            : single_gpu_checks(ep, seed, quick, &runs, &worst);
    failures += check_migration(ep, seed + 4242, MOE_COMBINE_PARTIAL);
    failures += check_migration(ep, seed + 4343, MOE_COMBINE_EXACT);
    int total = failures;
    if (under_mpi) {
        MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        MPI_Allreduce(MPI_IN_PLACE, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        MPI_Allreduce(MPI_IN_PLACE, &worst_l2, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    }
    if (ep.rank == 0)
        printf("cuda_layer: %d rank(s), %d cases x sizes, seed %llu, worst relative error %.3g (max|d|/max|ref|), "
               "%.3g (l2: %s): %s\n",
               ep.size, runs, seed, worst, worst_l2, worst_l2_case, total == 0 ? "all match" : "MISMATCH");
    if (under_mpi) MPI_Finalize();
    return total == 0 ? 0 : 1;
}
