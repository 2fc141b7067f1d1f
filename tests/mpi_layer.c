/* The CPU layer on the ranks of a real `mpirun -np N` against the dense
 * reference, every case of layer_check.c; each rank gets a different,
 * random token count (including none) from a fresh seed. Exit status 0 when
 * every rank matched within 1e-5; run by test_mpi.c. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#include "../kernels/moe_synth.h"
#include "support/dense_ref.h"
#include "support/layer_check.h"

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    moe_ep_t ep = {0, 1, MPI_COMM_WORLD};
    MPI_Comm_rank(MPI_COMM_WORLD, &ep.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ep.size);
    unsigned long long seed = argc > 1 ? strtoull(argv[1], NULL, 10) : moe_test_fresh_seed();
    MPI_Bcast(&seed, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
    int failures = 0;
    for (int i = 0; i < moe_test_case_count; i++) {
        const moe_test_case_t *c = &moe_test_cases[i];
        moe_config_t cfg;
        moe_test_case_config(c, ep.size, &cfg);
        for (int round = 0; round < 3; round++) {
            uint64_t s = seed + (uint64_t)(i * 16 + round) * 1000003ull + (uint64_t)ep.rank;
            int n_tokens = round == 0 && ep.rank == 1 ? 0 : (int)(moe_synth_mix(s) % 150);
            char msg[512] = "";
            double err = moe_test_layer_check(&cfg, ep, n_tokens, s, msg, sizeof msg);
            int bad = !(err <= 1e-5);
            if (bad)
                fprintf(stderr, "FAIL rank %d case %s round %d (%d tokens, seed %llu): error %g %s\n",
                        ep.rank, c->name, round, n_tokens, seed, err, msg);
            failures += bad;
        }
    }
    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (ep.rank == 0)
        printf("mpi_layer: %d ranks, %d cases x 3 rounds, seed %llu: %s\n", ep.size,
               moe_test_case_count, seed, total == 0 ? "all match" : "MISMATCH");
    MPI_Finalize();
    return total == 0 ? 0 : 1;
}
