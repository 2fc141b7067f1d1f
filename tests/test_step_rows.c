/* test_step_rows: a request's activations into a step's rows and back
 * (daemon/step_rows.c), for every wire dtype and both step forms, against
 * the scalar conversions value by value, on random bit patterns (NaN,
 * infinities, subnormals and rounding ties among them), at sizes that
 * take one OpenMP block and several with a short last one. */
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

/* value i of a step, as float32 (bf16 widened exactly) */
static float step_value(const void *step, bool bf16_step, size_t i) {
    if (!bf16_step) return ((const float *)step)[i];
    uint16_t v;
    memcpy(&v, (const uint8_t *)step + 2 * i, 2);
    return moe_bf16_to_f32(v);
}

static float wire_value(uint8_t dtype, const uint8_t *wire, size_t i) {
    float f;
    moe_dtype_to_f32(dtype, wire + i * moe_dtype_size(dtype), &f, 1);
    return f;
}

static bool same_bits_or_both_nan(float a, float b) {
    return memcmp(&a, &b, 4) == 0 || (a != a && b != b);
}

static void check(uint8_t dtype, bool bf16_step, size_t n, unsigned seed) {
    uint64_t state = seed * 2654435761ull + dtype * 97 + bf16_step;
    uint8_t *wire = random_wire(dtype, n, &state);
    void *step = malloc(moe_step_value_size(bf16_step) * n);
    cr_assert(step != NULL);
    moe_step_rows_in(dtype, wire, bf16_step, step, n);
    for (size_t i = 0; i < n; i++) {
        const float in = wire_value(dtype, wire, i);
        /* float32 step: the value itself; bf16 step: it rounded to nearest even */
        const float want = bf16_step ? moe_bf16_to_f32(moe_f32_to_bf16(in)) : in;
        const float got = step_value(step, bf16_step, i);
        cr_assert(same_bits_or_both_nan(got, want), "seed %u, dtype %d, bf16 step %d: value %zu in: %a, want %a", seed,
                  dtype, bf16_step, i, (double)got, (double)want);
    }
    /* the output written back over the payload: the step's value in the wire's dtype */
    uint8_t *out = malloc(moe_dtype_size(dtype) * n);
    cr_assert(out != NULL);
    for (size_t i = 0; i < n; i++) { /* a fresh step output: other random values */
        uint32_t bits = next_bits(&state);
        if (bf16_step) memcpy((uint8_t *)step + 2 * i, &bits, 2);
        else memcpy((uint8_t *)step + 4 * i, &bits, 4);
    }
    moe_step_rows_out(dtype, out, bf16_step, step, n);
    for (size_t i = 0; i < n; i++) {
        uint8_t want_wire[4];
        const float v = step_value(step, bf16_step, i);
        moe_dtype_from_f32(dtype, &v, want_wire, 1);
        const bool same = memcmp(out + i * moe_dtype_size(dtype), want_wire, moe_dtype_size(dtype)) == 0;
        /* a NaN stays a NaN (a bf16 one may keep its signalling payload) */
        cr_assert(same || (v != v && wire_value(dtype, out, i) != wire_value(dtype, out, i)),
                  "seed %u, dtype %d, bf16 step %d: value %zu out differs", seed, dtype, bf16_step, i);
    }
    free(wire);
    free(step);
    free(out);
}

Test(step_rows, every_dtype_both_step_forms, .timeout = 30) {
    const unsigned seed = (unsigned)time(NULL);
    const uint8_t dtypes[] = {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16};
    const size_t sizes[] = {1, 4097, ((size_t)1 << 18) * 2 + 12345}; /* 1, a piece and more, 3 OpenMP blocks */
    for (size_t d = 0; d < 3; d++)
        for (int bf16_step = 0; bf16_step < 2; bf16_step++)
            for (size_t s = 0; s < 3; s++) check(dtypes[d], bf16_step, sizes[s], seed + (unsigned)s);
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
