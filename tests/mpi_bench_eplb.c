/* moe-bench --rebalance's EPLB half (bench/bench_eplb.c) on the ranks of a
 * real `mpirun -np 2`, CPU backend, eplb online without extra slots (so
 * that a rank's load is exactly what the placement predicts: no replica
 * choice), client routing drawn by the test from a skewed distribution
 * (the low, hot experts live on rank 0 at first), fresh random inputs:
 *   - the expert loads moe_bench_step_loads derives from the slot counts
 *     equal a histogram of the test's ids summed over the ranks, and its
 *     imbalance equals max/mean of the rank loads the test counts from the
 *     slot counts of a traced forward of the same step;
 *   - moe_bench_rebalance adopts the placement moe_eplb_place gives for
 *     those loads; the imbalance it predicts before and after equals the
 *     one measured on the same step before and after, and is lower;
 *   - the outputs before and after are bit-identical (the CPU backend sums
 *     each token's results in entry order wherever they were computed).
 * Exit status 0 on success; run by test_mpi.c. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../bench/bench_eplb.h"
#include "../kernels/moe_eplb.h"
#include "../kernels/moe_synth.h"
#include "support/dense_ref.h"
#include "support/layer_check.h"

#define FAIL(...) (fprintf(stderr, "FAIL rank %d: ", ep.rank), fprintf(stderr, __VA_ARGS__), failures++)

enum { E = 8, K = 2, SLOTS = 8 };

/* k distinct experts per token, expert e with probability ~ 1/(e+1)^2 */
static void skewed_routing(uint64_t seed, int T, int32_t *ids, float *w) {
    double cdf[E], sum = 0;
    for (int e = 0; e < E; e++) sum += 1.0 / ((e + 1.0) * (e + 1.0)), cdf[e] = sum;
    uint64_t s = seed;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < K; i++) {
            int e;
            do {
                s = moe_synth_mix(s + 1);
                const double u = (double)(s >> 11) / 9007199254740992.0 * sum;
                for (e = 0; e < E - 1 && cdf[e] < u; e++) {}
            } while (i > 0 && e == ids[t * K]);
            ids[t * K + i] = e;
            w[t * K + i] = 1.0f / K;
        }
}

/* true when the call failed on any rank: every rank then stops together
 * instead of waiting alone in the next collective */
static bool failed_anywhere(moe_ep_t ep, bool failed_here) {
    int v = failed_here;
    MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MAX, ep.comm);
    return v != 0;
}

/* What the test counts itself: the expert histogram of every rank's ids,
 * and max/mean of the rank loads from a traced forward's slot counts. */
static double counted_imbalance(moe_ep_t ep, const int64_t *slot_counts) {
    double rank_load[2] = {0, 0};
    for (int s = 0; s < SLOTS; s++) rank_load[s / (SLOTS / 2)] += (double)slot_counts[s];
    MPI_Allreduce(MPI_IN_PLACE, rank_load, 2, MPI_DOUBLE, MPI_SUM, ep.comm);
    return (rank_load[0] > rank_load[1] ? rank_load[0] : rank_load[1]) / ((rank_load[0] + rank_load[1]) / 2);
}

int main(int argc, char **argv) {
    unsigned long long seed;
    moe_ep_t ep = moe_test_mpi_start(&argc, &argv, &seed);
    int failures = 0;
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[0], ep.size, &cfg);
    cfg.model.routing.method = MOE_ROUTE_CLIENT;
    cfg.eplb.mode = MOE_EPLB_ONLINE;
    cfg.eplb.num_slots = SLOTS;
    const int H = cfg.model.hidden, layer = cfg.model.layer_ids[0], T = 300 + 37 * ep.rank;
    char msg[512] = "";
    moe_backend_t backend = {NULL, NULL};
    float *x = malloc(sizeof(float) * (size_t)T * H), *out = malloc(sizeof(float) * (size_t)T * H);
    float *first = malloc(sizeof(float) * (size_t)T * H), *w = malloc(sizeof(float) * (size_t)T * K);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)T * K);
    int64_t counts[SLOTS];
    double histogram[E] = {0}, loads[E], imbalance[2] = {0, 0}, predicted_after = 0;
    bool setup_failed = !x || !out || !first || !w || !ids || ep.size != 2 || cfg.model.experts != E || cfg.model.top_k != K ||
               moe_backend_create(&cfg, ep, &backend, msg, sizeof msg) != MOE_OK;
    if (setup_failed) FAIL("setup (needs 2 ranks): %s\n", msg);
    if (failed_anywhere(ep, setup_failed)) goto done;
    moe_test_fill_random(x, (size_t)T * H, seed + (uint64_t)ep.rank);
    skewed_routing(seed * 31 + (uint64_t)ep.rank, T, ids, w);
    for (int p = 0; p < T * K; p++) histogram[ids[p]] += 1;
    MPI_Allreduce(MPI_IN_PLACE, histogram, E, MPI_DOUBLE, MPI_SUM, ep.comm);
    for (int round = 0; round < 2; round++) {
        moe_route_trace_t trace = {NULL, NULL, counts, NULL, false};
        memset(counts, 0, sizeof counts);
        bool bad = backend.ops->forward(backend.state, layer, x, T, ids, w, out, &trace, msg, sizeof msg) != MOE_OK;
        if (bad) FAIL("forward: %s\n", msg);
        if (failed_anywhere(ep, bad)) break;
        const double want = counted_imbalance(ep, counts);
        if (round == 0) memcpy(first, out, sizeof(float) * (size_t)T * H);
        else if (memcmp(first, out, sizeof(float) * (size_t)T * H) != 0)
            FAIL("outputs before and after the rebalance differ (seed %llu)\n", seed);
        memset(loads, 0, sizeof loads);
        bad = moe_bench_step_loads(&backend, ep, layer, x, T, ids, w, out, loads, &imbalance[round], msg, sizeof msg) !=
              MOE_OK;
        if (bad) FAIL("moe_bench_step_loads: %s\n", msg);
        if (failed_anywhere(ep, bad)) break;
        if (memcmp(loads, histogram, sizeof loads) != 0)
            FAIL("round %d: expert loads from the slot counts are not the histogram of the routed ids\n", round);
        if (fabs(imbalance[round] - want) > 1e-12)
            FAIL("round %d: imbalance %.6f, the test counts %.6f (seed %llu)\n", round, imbalance[round], want, seed);
        if (round == 1) break;
        moe_bench_rebalance_t result;
        bad = moe_bench_rebalance(&backend, &cfg, ep, layer, loads, &result, msg, sizeof msg) != MOE_OK;
        if (bad) FAIL("moe_bench_rebalance: %s\n", msg);
        if (failed_anywhere(ep, bad)) break;
        int expect[SLOTS];
        if (moe_eplb_place(loads, E, SLOTS, 2, cfg.eplb.ranks_per_node, expect, NULL, msg, sizeof msg) != MOE_OK ||
            memcmp(expect, backend.ops->placement(backend.state, layer), sizeof expect) != 0)
            FAIL("the backend's placement is not moe_eplb_place's for the measured loads\n");
        if (!result.migrated || !(result.predicted_after < result.predicted_before) || result.bytes < 0 ||
            fabs(result.predicted_before - imbalance[0]) > 1e-12)
            FAIL("rebalance: migrated %d, predicted %g -> %g (measured %g before), %lld bytes\n", result.migrated,
                 result.predicted_before, result.predicted_after, imbalance[0], result.bytes);
        predicted_after = result.predicted_after;
    }
    if (failures == 0 && !(imbalance[0] > 1.2 && fabs(imbalance[1] - predicted_after) <= 1e-12))
        FAIL("imbalance %g before and %g after the rebalance, %g predicted (seed %llu)\n", imbalance[0], imbalance[1],
             predicted_after, seed);
done:
    moe_backend_destroy(&backend);
    free(x), free(out), free(first), free(w), free(ids);
    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (ep.rank == 0)
        printf("mpi_bench_eplb: seed %llu, imbalance %.3f -> %.3f: %s\n", seed, imbalance[0], imbalance[1],
               total == 0 ? "ok" : "FAILED");
    MPI_Finalize();
    return total == 0 ? 0 : 1;
}
