/* dense_ref: the independent reference of the MoE layer for tests — a plain
 * per-token loop over ALL experts of the model, in double precision, written
 * apart from kernels/cpu. It shares only the weight source (moe_weights,
 * tested on its own) and, for the routing DECISION, float32 logits computed
 * as a plain sequential dot product: a top-k choice is discontinuous, so a
 * reference in another precision would pick a different expert on a
 * near-tie and fail spuriously. Weights and expert math are double. */
#ifndef MOE_TEST_DENSE_REF_H
#define MOE_TEST_DENSE_REF_H

#include <stdint.h>

#include "../../config/moe_config.h"

typedef struct moe_test_ref moe_test_ref_t;

/* Loads every layer's full weights (all E experts). NULL on failure, with
 * the reason in msg. */
moe_test_ref_t *moe_test_ref_create(const moe_config_t *cfg, char *msg, size_t msg_size);
void moe_test_ref_destroy(moe_test_ref_t *ref);

/* out[t] for tokens of EP rank `rank` of n_ranks (the perfect router depends
 * on it). given_ids/given_weights [T,k]: used for methods client, uniform and
 * zipf (whose random choices the reference does not replay); ignored for the
 * others, which the reference routes itself. ids_out (optional) receives the
 * reference's choice. Returns 0, or -1 for an unknown layer. */
int moe_test_ref_forward(const moe_test_ref_t *ref, int layer, const float *x, int n_tokens,
                         int rank, int n_ranks, const int32_t *given_ids,
                         const float *given_weights, double *out, int32_t *ids_out);

/* Worst relative error max|got - want| / max(max|want|, tiny) over n values. */
double moe_test_rel_error(const float *got, const double *want, size_t n);
/* ‖got − want‖₂ / ‖want‖₂ (the norm of the difference when want is all
 * zeros); a NaN in got gives infinity. */
double moe_test_rel_error_l2(const float *got, const double *want, size_t n);

/* Fills x with uniform values in [-1, 1) from a seeded generator. */
void moe_test_fill_random(float *x, size_t n, uint64_t seed);

/* A fresh seed (time and pid), so each run tests new inputs; print it. */
uint64_t moe_test_fresh_seed(void);

#endif
