/* st_writer: a tiny safetensors writer for tests (DESIGN §11). Builds a file
 * from tensors added in memory, or writes raw bytes so that tests can forge
 * malformed files. Test-only; every export is moe_test_*. */
#ifndef MOE_TEST_ST_WRITER_H
#define MOE_TEST_ST_WRITER_H

#include <stddef.h>
#include <stdint.h>

typedef struct moe_test_st moe_test_st_t;

/* A new empty file description; NULL on allocation failure. */
moe_test_st_t *moe_test_st_new(void);
void moe_test_st_free(moe_test_st_t *st);

/* Adds a tensor with raw bytes (copied; need not match dtype and shape, so
 * tests can write inconsistent files). Returns 0, or -1 on failure. */
int moe_test_st_add_raw(moe_test_st_t *st, const char *name, const char *dtype, int n_dims,
                        const int64_t *shape, const void *data, size_t n_bytes);
/* Adds a tensor from float32 values, rounded (to nearest even) to dtype
 * "F32", "F16" or "BF16". Returns 0, or -1 on failure. */
int moe_test_st_add_f32(moe_test_st_t *st, const char *name, const char *dtype, int n_dims,
                        const int64_t *shape, const float *values);
/* Writes [u64 header length][JSON header][data] to path; 0 or -1. */
int moe_test_st_save(const moe_test_st_t *st, const char *path);

/* Writes bytes to path (creating or truncating); 0 or -1. */
int moe_test_write_bytes(const char *path, const void *data, size_t n_bytes);
/* Writes a file holding [u64 len(header)][header][data]; 0 or -1. */
int moe_test_st_write_raw(const char *path, const char *header, const void *data,
                          size_t n_bytes);

/* float32 -> half / bfloat16 bits, round to nearest even; NaN stays NaN. */
uint16_t moe_test_f32_to_f16(float value);
uint16_t moe_test_f32_to_bf16(float value);

/* Creates a fresh directory under $TMPDIR (or /tmp) into buf; 0 or -1. */
int moe_test_mkdtemp(char *buf, size_t size);
/* Removes a directory and the plain files directly inside it. */
void moe_test_rmdir(const char *dir);

#endif
