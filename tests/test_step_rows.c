/* test_step_rows: a request's activations into a step's rows and back
 * (daemon/step_rows.c): float32 rows from every wire dtype against the
 * scalar conversions value by value, on random bit patterns (NaN,
 * infinities, subnormals and rounding ties among them), at sizes that
 * take one OpenMP block and several with a short last one; bf16 rows from
 * a bf16 payload bit for bit. */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../daemon/moe_step_rows.h"
#include "../protocol/moe_frame.h"

static uint32_t next_bits(uint64_t *state) {
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*state >> 32);
}

/* n random values of dtype in wire form (little-endian) */
static uint8_t *random_wire(uint8_t dtype, size_t n, uint64_t *state) {
    const size_t esize = moe_dtype_size(dtype);
    uint8_t *wire = malloc(esize * n);
    cr_assert(wire != NULL);
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = next_bits(state);
        if (dtype == MOE_DTYPE_F32 && i % 5 == 0) bits = (bits & 0xFFFF0000u) | 0x8000u; /* a bf16 rounding tie */
        if (i % 13 == 0) bits = dtype == MOE_DTYPE_F32 ? 0x7F800000u ^ (i % 2u << 31) : 0x7C00u; /* infinities */
        memcpy(wire + i * esize, &bits, esize);
    }
    return wire;
}

static float wire_value(uint8_t dtype, const uint8_t *wire, size_t i) {
    float f;
    moe_dtype_to_f32(dtype, wire + i * moe_dtype_size(dtype), &f, 1);
    return f;
}

static bool same_bits_or_both_nan(float a, float b) {
    return memcmp(&a, &b, 4) == 0 || (a != a && b != b);
}

static void check(uint8_t dtype, size_t n, unsigned seed) {
    uint64_t state = seed * 2654435761ull + dtype * 97;
    uint8_t *wire = random_wire(dtype, n, &state);
    float *step = malloc(sizeof(float) * n);
    cr_assert(step != NULL);
    moe_step_rows_in(dtype, wire, false, step, n);
    for (size_t i = 0; i < n; i++) {
        const float want = wire_value(dtype, wire, i);
        cr_assert(same_bits_or_both_nan(step[i], want), "seed %u, dtype %d: value %zu in: %a, want %a", seed, dtype,
                  i, (double)step[i], (double)want);
    }
    /* the output written back over the payload: the step's value in the wire's dtype */
    uint8_t *out = malloc(moe_dtype_size(dtype) * n);
    cr_assert(out != NULL);
    for (size_t i = 0; i < n; i++) { /* a fresh step output: other random values */
        const uint32_t bits = next_bits(&state);
        memcpy(&step[i], &bits, 4);
    }
    moe_step_rows_out(dtype, out, false, step, n);
    for (size_t i = 0; i < n; i++) {
        uint8_t want_wire[4];
        moe_dtype_from_f32(dtype, &step[i], want_wire, 1);
        const bool same = memcmp(out + i * moe_dtype_size(dtype), want_wire, moe_dtype_size(dtype)) == 0;
        cr_assert(same || (step[i] != step[i] && wire_value(dtype, out, i) != wire_value(dtype, out, i)),
                  "seed %u, dtype %d: value %zu out differs", seed, dtype, i);
    }
    free(wire);
    free(step);
    free(out);
}

Test(step_rows, float32_rows_from_every_dtype, .timeout = 30) {
    const unsigned seed = (unsigned)time(NULL);
    const uint8_t dtypes[] = {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16};
    const size_t sizes[] = {1, 4097, ((size_t)1 << 18) * 2 + 12345}; /* 1, one block, 3 OpenMP blocks */
    for (size_t d = 0; d < 3; d++)
        for (size_t s = 0; s < 3; s++) check(dtypes[d], sizes[s], seed + (unsigned)s);
}

Test(step_rows, bf16_payload_is_copied_bit_for_bit, .timeout = 5) {
    /* every bf16 bit pattern, NaN payloads included, goes in and out as it is */
    const size_t n = 65536;
    uint8_t *wire = malloc(2 * n), *back = malloc(2 * n);
    uint16_t *step = malloc(2 * n);
    cr_assert(wire && back && step);
    for (size_t i = 0; i < n; i++) wire[2 * i] = (uint8_t)i, wire[2 * i + 1] = (uint8_t)(i >> 8);
    moe_step_rows_in(MOE_DTYPE_BF16, wire, true, step, n);
    moe_step_rows_out(MOE_DTYPE_BF16, back, true, step, n);
    cr_assert(memcmp(wire, back, 2 * n) == 0);
    for (size_t i = 0; i < n; i++) cr_assert_eq(step[i], (uint16_t)i);
    free(wire);
    free(back);
    free(step);
}
