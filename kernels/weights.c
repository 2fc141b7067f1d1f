/* weights: the moe_weights front door — synthetic weights generated from
 * moe_synth.h, or safetensors tensors looked up by naming scheme
 * (weights_safetensors.c). Every getter writes float32 into the caller's
 * buffer; shapes come from the model config, so a checkpoint that disagrees
 * with it is an error here rather than a wrong answer later. */
#include "moe_weights.h"

#include <stdlib.h>
#include <string.h>

#include "moe_synth.h"
#include "weights_internal.h"

moe_err_t moe_weights_open(const moe_model_config_t *model, moe_weights_t **out, char *msg,
                           size_t msg_size) {
    *out = NULL;
    if (model->hidden <= 0 || model->moe_intermediate <= 0 || model->experts <= 0 ||
        model->shared_intermediate < 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "weights: model shape not set (hidden %d, moe_intermediate %d, "
                           "experts %d, shared_intermediate %d)",
                           model->hidden, model->moe_intermediate, model->experts,
                           model->shared_intermediate);
    moe_weights_t *weights = calloc(1, sizeof *weights);
    if (weights == NULL) return moe_err_fmt(msg, msg_size, MOE_ERR_NOMEM, "weights: out of memory");
    weights->model = *model;
    if (model->weights.format == MOE_WEIGHTS_SAFETENSORS) {
        moe_err_t ret = moe_weights_st_open(weights, msg, msg_size);
        if (ret != MOE_OK) {
            moe_weights_close(weights);
            return ret;
        }
    }
    *out = weights;
    return MOE_OK;
}

void moe_weights_close(moe_weights_t *weights) {
    if (weights == NULL) return;
    moe_weights_st_close(weights);
    free(weights);
}

/* Fills n elements of one synthetic tensor; index = row * fan_in + column
 * for matrices, so any element (and any expert) is reproducible alone. */
static void synth_fill(const moe_weights_t *weights, int layer, int kind, int expert, float *dst,
                       size_t n, int fan_in) {
    uint64_t seed = weights->model.weights.seed;
    for (size_t i = 0; i < n; i++)
        dst[i] = moe_synth_value(seed, layer, kind, expert, (uint64_t)i, fan_in);
}

static bool is_synthetic(const moe_weights_t *weights) {
    return weights->model.weights.format != MOE_WEIGHTS_SAFETENSORS;
}

moe_err_t moe_weights_router(moe_weights_t *weights, int layer, float *wg, char *msg,
                             size_t msg_size) {
    const moe_model_config_t *m = &weights->model;
    if (layer < 0) return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "weights: bad layer %d", layer);
    if (is_synthetic(weights)) {
        synth_fill(weights, layer, MOE_SYNTH_ROUTER, -1, wg, (size_t)m->experts * m->hidden,
                   m->hidden);
        return MOE_OK;
    }
    return moe_weights_st_router(weights, layer, wg, msg, msg_size);
}

moe_err_t moe_weights_expert(moe_weights_t *weights, int layer, int expert, float *w1,
                             float *w3, float *w2, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &weights->model;
    if (layer < 0 || expert < 0 || expert >= m->experts)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "weights: bad layer %d or expert %d (model has %d experts)", layer,
                           expert, m->experts);
    if (is_synthetic(weights)) {
        size_t n = (size_t)m->moe_intermediate * m->hidden;
        synth_fill(weights, layer, MOE_SYNTH_W1, expert, w1, n, m->hidden);
        synth_fill(weights, layer, MOE_SYNTH_W3, expert, w3, n, m->hidden);
        synth_fill(weights, layer, MOE_SYNTH_W2, expert, w2, n, m->moe_intermediate);
        return MOE_OK;
    }
    return moe_weights_st_expert(weights, layer, expert, w1, w3, w2, msg, msg_size);
}

moe_err_t moe_weights_shared(moe_weights_t *weights, int layer, float *w1, float *w3,
                             float *w2, float *gate, char *msg, size_t msg_size) {
    const moe_model_config_t *m = &weights->model;
    if (layer < 0) return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "weights: bad layer %d", layer);
    if (m->shared_intermediate <= 0)
        return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL,
                           "weights: the model has no shared expert (shared_intermediate 0)");
    if (is_synthetic(weights)) {
        size_t n = (size_t)m->shared_intermediate * m->hidden;
        synth_fill(weights, layer, MOE_SYNTH_W1, MOE_SYNTH_SHARED_EXPERT, w1, n, m->hidden);
        synth_fill(weights, layer, MOE_SYNTH_W3, MOE_SYNTH_SHARED_EXPERT, w3, n, m->hidden);
        synth_fill(weights, layer, MOE_SYNTH_W2, MOE_SYNTH_SHARED_EXPERT, w2, n,
                   m->shared_intermediate);
        if (m->shared_expert_gate && gate != NULL)
            synth_fill(weights, layer, MOE_SYNTH_SHARED_GATE, -1, gate, (size_t)m->hidden,
                       m->hidden);
        return MOE_OK;
    }
    return moe_weights_st_shared(weights, layer, w1, w3, w2, gate, msg, msg_size);
}

moe_err_t moe_weights_bias(moe_weights_t *weights, int layer, float *bias, char *msg,
                           size_t msg_size) {
    const moe_model_config_t *m = &weights->model;
    if (layer < 0) return moe_err_fmt(msg, msg_size, MOE_ERR_INVAL, "weights: bad layer %d", layer);
    if (is_synthetic(weights)) {
        synth_fill(weights, layer, MOE_SYNTH_BIAS, -1, bias, (size_t)m->experts, 1);
        return MOE_OK;
    }
    return moe_weights_st_bias(weights, layer, bias, msg, msg_size);
}
