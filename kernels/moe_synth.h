/* moe_synth: synthetic weights, reproducible per (seed, layer, expert)
 * (DESIGN §9). A counter-based hash, so any element can be generated on its
 * own, in any order, on the CPU or the GPU, with the same bits: element i of
 * tensor `kind` of expert e in layer L is
 *     u = hash(seed, L, kind, e, i) in [-1, 1),   value = u * scale(kind)
 * with scale = 1/sqrt(fan_in) so activations stay O(1).
 * Header-only so kernels/cuda can include it (MOE_SYNTH_HD). */
#ifndef MOE_SYNTH_H
#define MOE_SYNTH_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define MOE_SYNTH_HD __host__ __device__ __forceinline__
#else
#define MOE_SYNTH_HD static inline
#endif

typedef enum {
    MOE_SYNTH_ROUTER = 1, /* Wg[E,H], expert = -1 */
    MOE_SYNTH_W1 = 2,     /* gate [I,H] */
    MOE_SYNTH_W3 = 3,     /* up   [I,H] */
    MOE_SYNTH_W2 = 4,     /* down [H,I] */
    MOE_SYNTH_BIAS = 5,   /* e_score_correction_bias [E], expert = -1 */
    MOE_SYNTH_SHARED_GATE = 6, /* shared_expert_gate [1,H], expert = -1 */
} moe_synth_kind_t;

/* Expert index used for the shared expert's W1/W3/W2. */
#define MOE_SYNTH_SHARED_EXPERT (-2)

MOE_SYNTH_HD uint64_t moe_synth_mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1), exactly representable (24 random bits). */
MOE_SYNTH_HD float moe_synth_unit(uint64_t seed, int layer, int kind, int expert, uint64_t index) {
    uint64_t h = moe_synth_mix(seed);
    h = moe_synth_mix(h ^ (uint64_t)(uint32_t)layer);
    h = moe_synth_mix(h ^ ((uint64_t)(uint32_t)kind << 32) ^ (uint64_t)(uint32_t)expert);
    h = moe_synth_mix(h ^ index);
    return (float)((int32_t)(h >> 40) - (1 << 23)) * (1.0f / (float)(1 << 23));
}

/* Value of element `index` of a synthetic tensor whose rows have fan_in
 * inputs. The router is scaled up (x4) so that routing is decisive. */
MOE_SYNTH_HD float moe_synth_value(uint64_t seed, int layer, int kind, int expert,
                                   uint64_t index, int fan_in) {
    float scale = 1.0f / sqrtf((float)fan_in);
    if (kind == MOE_SYNTH_ROUTER) scale *= 4.0f;
    if (kind == MOE_SYNTH_BIAS) scale = 0.05f;
    return moe_synth_unit(seed, layer, kind, expert, index) * scale;
}

#endif
