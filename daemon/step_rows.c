/* step_rows: see moe_step_rows.h. The conversions are frame.c's (round to
 * nearest even, NaN stays NaN). */
#include "moe_step_rows.h"

#include <string.h>

#include "../protocol/moe_frame.h"

#define BLOCK ((size_t)1 << 18) /* values per OpenMP block: a step is tens of MB, a ms or more on one core */

size_t moe_step_value_size(bool bf16_step) { return bf16_step ? 2 : 4; }

void moe_step_rows_in(uint8_t wire_dtype, const uint8_t *wire, bool bf16_step, void *step, size_t values) {
    if (bf16_step) {
        memcpy(step, wire, 2 * values);
        return;
    }
    const size_t esize = moe_dtype_size(wire_dtype);
    const long n = (long)((values + BLOCK - 1) / BLOCK);
#pragma omp parallel for schedule(static) if (n > 1)
    for (long i = 0; i < n; i++) {
        const size_t off = (size_t)i * BLOCK, len = values - off < BLOCK ? values - off : BLOCK;
        moe_dtype_to_f32(wire_dtype, wire + off * esize, (float *)step + off, len);
    }
}

void moe_step_rows_out(uint8_t wire_dtype, uint8_t *wire, bool bf16_step, const void *step, size_t values) {
    if (bf16_step) {
        memcpy(wire, step, 2 * values);
        return;
    }
    const size_t esize = moe_dtype_size(wire_dtype);
    const long n = (long)((values + BLOCK - 1) / BLOCK);
#pragma omp parallel for schedule(static) if (n > 1)
    for (long i = 0; i < n; i++) {
        const size_t off = (size_t)i * BLOCK, len = values - off < BLOCK ? values - off : BLOCK;
        moe_dtype_from_f32(wire_dtype, (const float *)step + off, wire + off * esize, len);
    }
}
