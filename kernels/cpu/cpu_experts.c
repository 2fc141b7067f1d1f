/* cpu_experts: the SwiGLU expert in float32, one token row at a time.
 *   h_gate[i] = W1[i,:]·x,  h_up[i] = W3[i,:]·x            (W1, W3: [I, H])
 *   a[i] = silu(h_gate[i]) · h_up[i],  silu(z) = z / (1 + e^-z)
 *   y[h] = W2[h,:]·a                                         (W2: [H, I])
 * Row-major weights make every dot product contiguous. Sums run in a fixed
 * order (see dot), so results are reproducible. */
#include <math.h>

#include "cpu_internal.h"

/* Eight interleaved partial sums, combined in a fixed order: the compiler
 * can keep them in vector registers (a plain sequential sum cannot be
 * vectorised without reassociation), and the result still does not depend
 * on threads or on how rows were grouped. */
static float dot(const float *a, const float *b, int n) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) lane[l] += a[j + l] * b[j + l];
    float sum = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
    for (; j < n; j++) sum += a[j] * b[j];
    return sum;
}

void moe_cpu_swiglu_rows(const float *x, int n_rows, int H, int I, const float *w1,
                         const float *w3, const float *w2, float *hidden, float *y) {
    for (int r = 0; r < n_rows; r++) {
        const float *row = x + (size_t)r * H;
        for (int i = 0; i < I; i++) {
            float gate = dot(w1 + (size_t)i * H, row, H);
            float up = dot(w3 + (size_t)i * H, row, H);
            hidden[i] = gate / (1.0f + expf(-gate)) * up;
        }
        float *out = y + (size_t)r * H;
        for (int h = 0; h < H; h++) out[h] = dot(w2 + (size_t)h * I, hidden, I);
    }
}
