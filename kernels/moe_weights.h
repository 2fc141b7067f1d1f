/* moe_weights: where a layer's weights come from (DESIGN §9) — synthetic
 * (moe_synth.h) or safetensors (memory-mapped; one file or a directory with
 * model.safetensors.index.json; bf16/f16/f32 tensors; naming schemes
 * mixtral, qwen_moe, deepseek_v3). Backends ask for one tensor group at a
 * time and get float32 in buffers they own; a missing or mis-shaped tensor
 * is an error naming the file and tensor. Used by kernels/cpu, kernels/cuda
 * and EPLB migration; reads only config/ structs. */
#ifndef MOE_WEIGHTS_H
#define MOE_WEIGHTS_H

#include <stdbool.h>
#include <stddef.h>

#include "../config/moe_config.h"

typedef struct moe_weights moe_weights_t;

/* Opens the source described by cfg->model (after moe_config_resolve_model).
 * For safetensors, maps the file(s) and checks every header; errors go to
 * msg. The caller owns *out and frees it with moe_weights_close. */
moe_err_t moe_weights_open(const moe_model_config_t *model, moe_weights_t **out, char *msg,
                           size_t msg_size);
void moe_weights_close(moe_weights_t *weights);

/* Router Wg[E,H] of model layer `layer` (a model layer index, not a position
 * in layer_ids) into wg (E*H floats, row-major). */
moe_err_t moe_weights_router(moe_weights_t *weights, int layer, float *wg, char *msg,
                             size_t msg_size);

/* Expert `expert` of `layer`: w1 gate [I,H], w3 up [I,H], w2 down [H,I]. */
moe_err_t moe_weights_expert(moe_weights_t *weights, int layer, int expert, float *w1,
                             float *w3, float *w2, char *msg, size_t msg_size);

/* Shared expert (model->shared_intermediate = Is > 0): w1 [Is,H], w3 [Is,H],
 * w2 [H,Is]; gate [H] filled when model->shared_expert_gate, else untouched. */
moe_err_t moe_weights_shared(moe_weights_t *weights, int layer, float *w1, float *w3,
                             float *w2, float *gate, char *msg, size_t msg_size);

/* Score-correction bias [E] (routing method sigmoid_group_topk). Synthetic:
 * small seeded values; safetensors: e_score_correction_bias, zeros when the
 * naming scheme has none. */
moe_err_t moe_weights_bias(moe_weights_t *weights, int layer, float *bias, char *msg,
                           size_t msg_size);

#endif
