/* moe_safetensors: a memory-mapped safetensors reader. Nothing in the file is
 * trusted: the header length, JSON, dtypes, shapes and data offsets are all
 * checked against the file size before use. Used by moe_weights. */
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "../config/moe_err.h"

#define MOE_ST_MAX_DIMS 8
#define MOE_ST_MAX_HEADER (100u << 20) /* 100 MiB, as the reference reader */

typedef enum { MOE_ST_F32 = 0, MOE_ST_F16, MOE_ST_BF16, MOE_ST_OTHER } moe_st_dtype_t;

typedef struct {
    const char *name;   /* points into the file's parsed header; valid while open */
    moe_st_dtype_t dtype;
    int n_dims;
    int64_t shape[MOE_ST_MAX_DIMS];
    const void *data;   /* inside the mapping */
    size_t n_bytes;
} moe_st_tensor_t;

typedef struct moe_st_file moe_st_file_t;

/* Maps and validates a .safetensors file; errors name the file. */
moe_err_t moe_st_open(const char *path, moe_st_file_t **out, char *msg, size_t msg_size);
void moe_st_close(moe_st_file_t *file);
const char *moe_st_path(const moe_st_file_t *file);
int moe_st_count(const moe_st_file_t *file);
const moe_st_tensor_t *moe_st_at(const moe_st_file_t *file, int index);
/* Returns the tensor of that name, or NULL. */
const moe_st_tensor_t *moe_st_find(const moe_st_file_t *file, const char *name);

/* Converts n elements of a tensor to float32 (dtype F32, F16 or BF16). */
moe_err_t moe_st_to_f32(const moe_st_tensor_t *tensor, float *dst, size_t n);

#endif
