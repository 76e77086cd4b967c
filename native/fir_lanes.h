/* The resampler's multiply-accumulate kernel.
 *
 * y[k] = sum_{i<K} h[i] * src[i][k]  for k < n
 *
 * Each output is one lane: its sum is taken in order i = 0..K-1 with a
 * separate multiply and add (setup.py builds with -ffp-contract=off), so the
 * vector body and the scalar tail compute bit-identical values, and an
 * output never depends on how the input was chunked.  Vectorising across
 * outputs instead of across taps needs no horizontal sums and no padding.
 */
#ifndef MEDIASERVER_FIR_LANES_H
#define MEDIASERVER_FIR_LANES_H

#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
typedef float ms_v4f __attribute__((vector_size(16)));
#define MS_HAVE_VECTORS 1
#endif

static inline void ms_fir_lanes(const float* h, int K, const float* const* src, int n, float* y)
{
    int k = 0;
#ifdef MS_HAVE_VECTORS
    /* 16 outputs in four independent accumulators hide the add latency */
    for (; k + 16 <= n; k += 16) {
        ms_v4f a0 = {0, 0, 0, 0}, a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < K; i++) {
            const float* s = src[i] + k;
            ms_v4f x0, x1, x2, x3;
            ms_v4f hv = {h[i], h[i], h[i], h[i]};
            memcpy(&x0, s, 16);
            memcpy(&x1, s + 4, 16);
            memcpy(&x2, s + 8, 16);
            memcpy(&x3, s + 12, 16);
            a0 = a0 + x0 * hv;
            a1 = a1 + x1 * hv;
            a2 = a2 + x2 * hv;
            a3 = a3 + x3 * hv;
        }
        memcpy(y + k, &a0, 16);
        memcpy(y + k + 4, &a1, 16);
        memcpy(y + k + 8, &a2, 16);
        memcpy(y + k + 12, &a3, 16);
    }
    for (; k + 4 <= n; k += 4) {
        ms_v4f a = {0, 0, 0, 0};
        for (int i = 0; i < K; i++) {
            ms_v4f x;
            ms_v4f hv = {h[i], h[i], h[i], h[i]};
            memcpy(&x, src[i] + k, 16);
            a = a + x * hv;
        }
        memcpy(y + k, &a, 16);
    }
#endif
    for (; k < n; k++) {
        float a = 0;
        for (int i = 0; i < K; i++)
            a = a + src[i][k] * h[i];
        y[k] = a;
    }
}

#endif
