/* moe_step_rows: a request's activations between its wire payload (f32,
 * bf16 or f16, as the client sent them) and the rows of a step: float32
 * rows (converted, in blocks on OpenMP's threads) or, for a step of bf16
 * requests on a backend with forward_bf16, bf16 rows (copied as they are). */
#ifndef MOE_STEP_ROWS_H
#define MOE_STEP_ROWS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Bytes of one step value: 2 (bf16 rows) or 4 (float32). */
size_t moe_step_value_size(bool bf16_step);

/* wire (values of wire_dtype) -> step. bf16_step: wire_dtype must be bf16. */
void moe_step_rows_in(uint8_t wire_dtype, const uint8_t *wire, bool bf16_step, void *step, size_t values);

/* step -> wire, over the request's own payload (the answer goes out in
 * the dtype it came in). bf16_step: wire_dtype must be bf16. */
void moe_step_rows_out(uint8_t wire_dtype, uint8_t *wire, bool bf16_step, const void *step, size_t values);

#endif
