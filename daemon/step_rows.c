/* step_rows: see moe_step_rows.h. The conversions are frame.c's (round to
 * nearest even, NaN stays NaN). */
#include "moe_step_rows.h"

#include <string.h>

#include "../protocol/moe_frame.h"

#define BLOCK ((size_t)1 << 18) /* values per OpenMP block: a step is tens of MB, a ms or more on one core */

size_t moe_step_value_size(bool bf16_step) { return bf16_step ? 2 : 4; }

/* wire -> step (to_step) or step -> wire */
static void move_rows(uint8_t wire_dtype, uint8_t *wire, bool bf16_step, uint8_t *step, size_t values,
                      bool to_step) {
    if (bf16_step) { /* bf16 payloads only: as they are */
        if (to_step) memcpy(step, wire, 2 * values);
        else memcpy(wire, step, 2 * values);
        return;
    }
    const size_t esize = moe_dtype_size(wire_dtype);
    const long n = (long)((values + BLOCK - 1) / BLOCK);
#pragma omp parallel for schedule(static) if (n > 1)
    for (long i = 0; i < n; i++) {
        const size_t off = (size_t)i * BLOCK, len = values - off < BLOCK ? values - off : BLOCK;
        float *rows = (float *)step + off;
        if (to_step) moe_dtype_to_f32(wire_dtype, wire + off * esize, rows, len);
        else moe_dtype_from_f32(wire_dtype, rows, wire + off * esize, len);
    }
}

void moe_step_rows_in(uint8_t wire_dtype, const uint8_t *wire, bool bf16_step, void *step, size_t values) {
    move_rows(wire_dtype, (uint8_t *)wire, bf16_step, step, values, true); /* wire is only read */
}

void moe_step_rows_out(uint8_t wire_dtype, uint8_t *wire, bool bf16_step, const void *step, size_t values) {
    move_rows(wire_dtype, wire, bf16_step, (uint8_t *)step, values, false); /* step is only read */
}
