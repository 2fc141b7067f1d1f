/* weights_internal: the moe_weights object shared by weights.c (front door,
 * synthetic) and weights_safetensors.c (checkpoint lookup). Private to those
 * two files; nothing else includes it. */
#ifndef MOE_WEIGHTS_INTERNAL_H
#define MOE_WEIGHTS_INTERNAL_H

#include <cjson/cJSON.h>

#include "moe_safetensors.h"
#include "moe_weights.h"

/* weight_map row of a sharded checkpoint: tensor name -> index in files[]. */
typedef struct {
    const char *name; /* points into index_json */
    int file;
} moe_weights_index_entry_t;

struct moe_weights {
    moe_model_config_t model;
    /* What a "not found" message names: the file, or the index of a dir. */
    char source[MOE_PATH_MAX + 64];
    int n_files;
    moe_st_file_t **files;
    cJSON *index_json;
    int n_index; /* 0: single file, look tensors up in files[0] */
    moe_weights_index_entry_t *index; /* sorted by name */
};

moe_err_t moe_weights_st_open(moe_weights_t *weights, char *msg, size_t msg_size);
void moe_weights_st_close(moe_weights_t *weights);
moe_err_t moe_weights_st_router(moe_weights_t *weights, int layer, float *wg, char *msg,
                                size_t msg_size);
moe_err_t moe_weights_st_expert(moe_weights_t *weights, int layer, int expert, float *w1,
                                float *w3, float *w2, char *msg, size_t msg_size);
moe_err_t moe_weights_st_shared(moe_weights_t *weights, int layer, float *w1, float *w3,
                                float *w2, float *gate, char *msg, size_t msg_size);
moe_err_t moe_weights_st_bias(moe_weights_t *weights, int layer, float *bias, char *msg,
                              size_t msg_size);

#endif
