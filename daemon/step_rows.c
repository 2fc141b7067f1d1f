/* step_rows: see moe_step_rows.h. The payloads are malloc'd, so their
 * float32 values are aligned; the conversions are frame.c's (round to
 * nearest even, NaN stays NaN). */
#include "moe_step_rows.h"

#include <string.h>

#include "../protocol/moe_frame.h"

#define BLOCK ((size_t)1 << 18) /* values per OpenMP block: a step is tens of MB, a ms or more on one core */
#define PIECE 4096              /* f16 <-> bf16 goes through float32 this many values at a time */

size_t moe_step_value_size(bool bf16_step) { return bf16_step ? 2 : 4; }

static void block_in(uint8_t dtype, const uint8_t *wire, bool bf16_step, uint8_t *step, size_t n) {
    if (!bf16_step) {
        moe_dtype_to_f32(dtype, wire, (float *)step, n);
    } else if (dtype == MOE_DTYPE_BF16) {
        memcpy(step, wire, 2 * n);
    } else if (dtype == MOE_DTYPE_F32) {
        moe_dtype_from_f32(MOE_DTYPE_BF16, (const float *)wire, step, n);
    } else {
        float f32[PIECE];
        const size_t esize = moe_dtype_size(dtype);
        for (size_t off = 0; off < n; off += PIECE) {
            const size_t len = n - off < PIECE ? n - off : PIECE;
            moe_dtype_to_f32(dtype, wire + off * esize, f32, len);
            moe_dtype_from_f32(MOE_DTYPE_BF16, f32, step + off * 2, len);
        }
    }
}

static void block_out(uint8_t dtype, uint8_t *wire, bool bf16_step, const uint8_t *step, size_t n) {
    if (!bf16_step) {
        moe_dtype_from_f32(dtype, (const float *)step, wire, n);
    } else if (dtype == MOE_DTYPE_BF16) {
        memcpy(wire, step, 2 * n);
    } else if (dtype == MOE_DTYPE_F32) {
        moe_dtype_to_f32(MOE_DTYPE_BF16, step, (float *)wire, n);
    } else {
        float f32[PIECE];
        const size_t esize = moe_dtype_size(dtype);
        for (size_t off = 0; off < n; off += PIECE) {
            const size_t len = n - off < PIECE ? n - off : PIECE;
            moe_dtype_to_f32(MOE_DTYPE_BF16, step + off * 2, f32, len);
            moe_dtype_from_f32(dtype, f32, wire + off * esize, len);
        }
    }
}

void moe_step_rows_in(uint8_t wire_dtype, const uint8_t *wire, bool bf16_step, void *step, size_t values) {
    const size_t esize = moe_dtype_size(wire_dtype), ssize = moe_step_value_size(bf16_step);
    const long n = (long)((values + BLOCK - 1) / BLOCK);
#pragma omp parallel for schedule(static) if (n > 1)
    for (long i = 0; i < n; i++) {
        const size_t off = (size_t)i * BLOCK, len = values - off < BLOCK ? values - off : BLOCK;
        block_in(wire_dtype, wire + off * esize, bf16_step, (uint8_t *)step + off * ssize, len);
    }
}

void moe_step_rows_out(uint8_t wire_dtype, uint8_t *wire, bool bf16_step, const void *step, size_t values) {
    const size_t esize = moe_dtype_size(wire_dtype), ssize = moe_step_value_size(bf16_step);
    const long n = (long)((values + BLOCK - 1) / BLOCK);
#pragma omp parallel for schedule(static) if (n > 1)
    for (long i = 0; i < n; i++) {
        const size_t off = (size_t)i * BLOCK, len = values - off < BLOCK ? values - off : BLOCK;
        block_out(wire_dtype, wire + off * esize, bf16_step, (const uint8_t *)step + off * ssize, len);
    }
}
