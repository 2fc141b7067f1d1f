/* The CPU layer on the ranks of a real `mpirun -np N` against the dense
 * reference, every case of layer_check.c; each rank gets a different,
 * random token count from a fresh seed, with each moe.comm (round 0
 * alltoall and 1 allgather, each with one rank holding no tokens; 2 auto
 * with the allgather threshold fixed at 5 tokens, so that the chunked
 * case mixes both exchanges in one step); then a step one rank cannot
 * start (refused on every rank, the next one served) and, on two ranks,
 * EPLB migration. Exit status 0 when every rank matched within 1e-5; run
 * by test_mpi.c. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/cpu/moe_cpu.h"
#include "../kernels/moe_synth.h"
#include "support/dense_ref.h"
#include "support/layer_check.h"

/* EPLB migration on every rank at once: the layer against the reference
 * before and after a placement that moves experts across ranks, and the
 * outputs before and after bit-identical (each (token, expert) result is
 * summed on the token's rank in entry order, wherever it was computed). */
static int check_migration(moe_ep_t ep, uint64_t seed, moe_comm_kind_t comm) {
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[2], ep.size, &cfg); /* softmax_topk, 12 slots */
    cfg.moe.comm = comm;
    const int H = cfg.model.hidden, T = 40 + ep.rank * 17;
    char msg[512] = "";
    int failures = 0;
    moe_cpu_engine_t *engine = NULL;
    moe_test_ref_t *ref = moe_test_ref_create(&cfg, msg, sizeof msg);
    float *x = malloc(sizeof(float) * (size_t)T * H), *out = malloc(sizeof(float) * (size_t)T * H);
    float *first = malloc(sizeof(float) * (size_t)T * H);
    double *want = malloc(sizeof(double) * (size_t)T * H);
    if (ref == NULL || !x || !out || !first || !want || moe_cpu_create(&cfg, ep, &engine, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "FAIL rank %d migration setup: %s\n", ep.rank, msg);
        failures = 1;
        goto done;
    }
    moe_test_fill_random(x, (size_t)T * H, seed);
    int layer = cfg.model.layer_ids[0];
    /* every expert moves to the other rank; replicas of 3 and 6 */
    int next[12] = {4, 5, 6, 7, 3, 6, 0, 1, 2, 3, 6, 0};
    for (int round = 0; round < 2 && !failures; round++) {
        if (round == 1) {
            int64_t bytes = 0;
            if (moe_cpu_migrate(engine, layer, next, &bytes, msg, sizeof msg) != MOE_OK || bytes <= 0) {
                fprintf(stderr, "FAIL rank %d migration: %s (bytes %lld)\n", ep.rank, msg, (long long)bytes);
                failures = 1;
                break;
            }
        }
        for (int i = 0; i < T * H; i++) out[i] = NAN;
        if (moe_cpu_forward(engine, layer, x, T, NULL, NULL, out, NULL, msg, sizeof msg) != MOE_OK) {
            fprintf(stderr, "FAIL rank %d forward after migration: %s\n", ep.rank, msg);
            failures = 1;
            break;
        }
        moe_test_ref_forward(ref, layer, x, T, ep.rank, ep.size, NULL, NULL, want, NULL);
        double err = moe_test_rel_error(out, want, (size_t)T * H);
        if (!(err <= 1e-5)) {
            fprintf(stderr, "FAIL rank %d migration round %d (comm %s, seed %llu): error %g\n", ep.rank, round,
                    moe_comm_name(comm), (unsigned long long)seed, err);
            failures = 1;
        }
        if (round == 0) memcpy(first, out, sizeof(float) * (size_t)T * H);
        if (round == 1 && memcmp(first, out, sizeof(float) * (size_t)T * H) != 0) {
            int differing = 0;
            for (int i = 0; i < T * H; i++) differing += memcmp(&first[i], &out[i], sizeof(float)) != 0;
            fprintf(stderr, "FAIL rank %d migration (comm %s, seed %llu): %d of %d outputs differ after the swap\n",
                    ep.rank, moe_comm_name(comm), (unsigned long long)seed, differing, T * H);
            failures = 1;
        }
    }
done:
    moe_cpu_destroy(engine);
    moe_test_ref_destroy(ref);
    free(x), free(out), free(first), free(want);
    return failures;
}

/* A step that one rank cannot start (here: its client routing names an
 * expert that does not exist) is refused on every rank with MOE_ERR_INVAL,
 * the step loop's "go on" (moe_backend.h), the bad rank's message naming
 * its own reason; the next step, valid everywhere, then matches the
 * reference on every rank (no rank was left in a collective). */
static int check_refusal(moe_ep_t ep, uint64_t seed) {
    int c = 0;
    while (c + 1 < moe_test_case_count && moe_test_cases[c].method != MOE_ROUTE_CLIENT) c++;
    moe_config_t cfg;
    moe_test_case_config(&moe_test_cases[c], ep.size, &cfg);
    const int H = cfg.model.hidden, k = cfg.model.top_k, E = cfg.model.experts, T = 9 + ep.rank * 4;
    char msg[512] = "";
    int failures = 0;
    moe_cpu_engine_t *engine = NULL;
    moe_test_ref_t *ref = moe_test_ref_create(&cfg, msg, sizeof msg);
    float *x = malloc(sizeof(float) * (size_t)T * H), *out = malloc(sizeof(float) * (size_t)T * H);
    double *want = malloc(sizeof(double) * (size_t)T * H);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)T * k);
    float *w = malloc(sizeof(float) * (size_t)T * k);
    if (ref == NULL || !x || !out || !want || !ids || !w || moe_cpu_create(&cfg, ep, &engine, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "FAIL rank %d refusal setup: %s\n", ep.rank, msg);
        failures = 1;
        goto done;
    }
    const int layer = cfg.model.layer_ids[0];
    moe_test_fill_random(x, (size_t)T * H, seed);
    moe_test_client_routing(seed, T, k, E, ids, w);
    if (ep.rank == ep.size - 1) ids[k] = E + 3; /* the second token's first choice */
    msg[0] = '\0';
    moe_err_t err = moe_cpu_forward(engine, layer, x, T, ids, w, out, NULL, msg, sizeof msg);
    if (err != MOE_ERR_INVAL || msg[0] == '\0') {
        fprintf(stderr, "FAIL rank %d refusal: %s (%s), want MOE_ERR_INVAL with a reason\n", ep.rank,
                moe_err_name(err), msg);
        failures = 1;
    }
    moe_test_client_routing(seed, T, k, E, ids, w);
    if (moe_cpu_forward(engine, layer, x, T, ids, w, out, NULL, msg, sizeof msg) != MOE_OK) {
        fprintf(stderr, "FAIL rank %d step after the refusal: %s\n", ep.rank, msg);
        failures = 1;
        goto done;
    }
    moe_test_ref_forward(ref, layer, x, T, ep.rank, ep.size, ids, w, want, NULL);
    const double e = moe_test_rel_error(out, want, (size_t)T * H);
    if (!(e <= 1e-5)) {
        fprintf(stderr, "FAIL rank %d step after the refusal: error %g\n", ep.rank, e);
        failures = 1;
    }
done:
    moe_cpu_destroy(engine);
    moe_test_ref_destroy(ref);
    free(x), free(out), free(want), free(ids), free(w);
    return failures;
}

int main(int argc, char **argv) {
    unsigned long long seed;
    moe_ep_t ep = moe_test_mpi_start(&argc, &argv, &seed);
    setenv("MOE_COMM_ALLGATHER_MAX_TOKENS", "5", 1); /* moe.comm auto: a fixed, mixing threshold */
    int failures = 0;
    for (int i = 0; i < moe_test_case_count; i++) {
        const moe_test_case_t *c = &moe_test_cases[i];
        moe_config_t cfg;
        moe_test_case_config(c, ep.size, &cfg);
        for (int round = 0; round < 3; round++) {
            static const moe_comm_kind_t comms[3] = {MOE_COMM_ALLTOALL, MOE_COMM_ALLGATHER, MOE_COMM_AUTO};
            cfg.moe.comm = comms[round];
            uint64_t s = seed + (uint64_t)(i * 16 + round) * 1000003ull + (uint64_t)ep.rank;
            int n_tokens = round < 2 && ep.rank == (round + 1) % ep.size ? 0 : (int)(moe_synth_mix(s) % 150);
            char msg[512] = "";
            double err = moe_test_layer_check(&cfg, ep, n_tokens, s, msg, sizeof msg);
            int bad = !(err <= 1e-5);
            if (bad)
                fprintf(stderr, "FAIL rank %d case %s round %d (comm %s, %d tokens, seed %llu): error %g %s\n",
                        ep.rank, c->name, round, moe_comm_name(cfg.moe.comm), n_tokens, seed, err, msg);
            failures += bad;
        }
    }
    failures += check_refusal(ep, seed + 97);
    if (ep.size == 2) {
        failures += check_migration(ep, seed + 99, MOE_COMM_ALLTOALL);
        failures += check_migration(ep, seed + 98, MOE_COMM_ALLGATHER);
    }
    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (ep.rank == 0)
        printf("mpi_layer: %d ranks, %d cases x 3 rounds, seed %llu: %s\n", ep.size,
               moe_test_case_count, seed, total == 0 ? "all match" : "MISMATCH");
    MPI_Finalize();
    return total == 0 ? 0 : 1;
}
