/* layer_check: runs the CPU engine and the dense reference on the same fresh
 * random inputs and reports the worst relative error. Shared by the 1-rank
 * Criterion suite (test_layer.c) and the 2-rank MPI program (mpi_layer.c). */
#ifndef MOE_TEST_LAYER_CHECK_H
#define MOE_TEST_LAYER_CHECK_H

#include <stdint.h>

#include "../../config/moe_config.h"
#include "../../kernels/moe_ep.h"

typedef struct {
    const char *name;
    moe_route_method_t method;
    int shared;   /* shared expert (with gate) */
    int replicas; /* eplb static with redundant slots */
    int chunk;    /* moe.chunking.max_tokens_per_chunk (0 = default) */
} moe_test_case_t;

extern const moe_test_case_t moe_test_cases[];
extern const int moe_test_case_count;

/* Client-supplied routing for n_tokens tokens: k distinct expert ids per
 * token drawn from seed, weights 0.25, 0.75, 1.25, ... */
void moe_test_client_routing(uint64_t seed, int n_tokens, int k, int experts, int32_t *ids, float *weights);

/* A small synthetic model configured for the case on n_ranks ranks. */
void moe_test_case_config(const moe_test_case_t *c, int n_ranks, moe_config_t *cfg);

/* Engine vs reference for every layer, n_tokens tokens of this rank from
 * seed. Returns the worst relative error (INFINITY on any failure, with the
 * reason in msg). Collective when ep.size > 1. */
double moe_test_layer_check(const moe_config_t *cfg, moe_ep_t ep, int n_tokens, uint64_t seed,
                            char *msg, size_t msg_size);

/* The start of an MPI test program (tests/mpi_*.c): MPI_Init, the group of
 * MPI_COMM_WORLD, and the seed — argv[1], or a fresh one — as rank 0 has it. */
moe_ep_t moe_test_mpi_start(int *argc, char ***argv, unsigned long long *seed);

#endif
