/* moe_step_rows: a request's activations between its wire payload (f32,
 * bf16 or f16, as the client sent them) and the rows of a step (float32,
 * or bf16 for a backend with forward_bf16), each way in one pass, in
 * blocks on OpenMP's threads. */
#ifndef MOE_STEP_ROWS_H
#define MOE_STEP_ROWS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Bytes of one step value: 2 (bf16) or 4 (float32). */
size_t moe_step_value_size(bool bf16_step);

/* wire (values of wire_dtype) -> step (float32, or bf16 rounded to
 * nearest even: a bf16 payload is copied as it is). */
void moe_step_rows_in(uint8_t wire_dtype, const uint8_t *wire, bool bf16_step, void *step, size_t values);

/* step -> wire, over the request's own payload (the answer goes out in
 * the dtype it came in). */
void moe_step_rows_out(uint8_t wire_dtype, uint8_t *wire, bool bf16_step, const void *step, size_t values);

#endif
