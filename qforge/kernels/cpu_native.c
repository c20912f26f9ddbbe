/* qforge CPU kernels for 4-bit blockwise quantisation, compiled at first use (see cpu.py).
 *
 * Bit-exact with kernels/reference.py. Built with -ffp-contract=off so that no multiply is fused
 * into an add: every float result must round exactly as the reference rounds it.
 * dtype codes: 0 = float32, 1 = bfloat16, 2 = float16.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float load_value(const void *x, int dtype, int64_t i) {
    if (dtype == 0) return ((const float *)x)[i];
    if (dtype == 1) {
        uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
        float f; memcpy(&f, &u, 4); return f;
    }
    return (float)((const _Float16 *)x)[i];
}

/* float -> bfloat16 with round-to-nearest-even (inputs are finite). */
static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline uint8_t code_of(float v, const float *bounds, const uint8_t *order) {
    int pos = 0;
    for (int j = 0; j < 15; j++) pos += (v > bounds[j]);
    return order[pos];
}

void qf_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize,
                      const float *bounds, const uint8_t *order,
                      uint8_t *packed, float *absmax) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * blocksize;
        int64_t len = (n - start < blocksize) ? n - start : blocksize;
        float m = 0.0f;
        for (int64_t i = 0; i < len; i++) m = fmaxf(m, fabsf(load_value(x, dtype, start + i)));
        absmax[b] = m;
        float safe = fmaxf(m, 1e-38f);
        int partial = len < blocksize;
        float inv = 1.0f / safe;
        for (int64_t i = 0; i < len; i += 2) {
            float v0 = load_value(x, dtype, start + i);
            float v1 = (i + 1 < len) ? load_value(x, dtype, start + i + 1) : 0.0f;
            float s0 = partial ? v0 / safe : v0 * inv;
            float s1 = (i + 1 < len) ? (partial ? v1 / safe : v1 * inv) : 0.0f;
            s0 = fminf(fmaxf(s0, -1.0f), 1.0f);
            s1 = fminf(fmaxf(s1, -1.0f), 1.0f);
            packed[(start + i) >> 1] = (uint8_t)((code_of(s0, bounds, order) << 4) | code_of(s1, bounds, order));
        }
    }
}

/* Each byte expands to two values; the block scale is applied in float32, then rounded once. */
void qf_dequantize_4bit(const uint8_t *packed, const float *absmax, const float *levels,
                        int64_t n, int64_t blocksize, int dtype, void *out) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * blocksize;
        int64_t len = (n - start < blocksize) ? n - start : blocksize;
        float s = absmax[b];
        float lut[16];
        for (int k = 0; k < 16; k++) lut[k] = levels[k] * s;
        const uint8_t *p = packed + (start >> 1);
        int64_t pairs = len >> 1;
        if (dtype == 0) {
            float *o = (float *)out + start;
            for (int64_t i = 0; i < pairs; i++) { o[2*i] = lut[p[i] >> 4]; o[2*i+1] = lut[p[i] & 15]; }
            if (len & 1) o[len - 1] = lut[p[pairs] >> 4];
        } else if (dtype == 1) {
            uint16_t l16[16];
            for (int k = 0; k < 16; k++) l16[k] = to_bf16(lut[k]);
            uint16_t *o = (uint16_t *)out + start;
            for (int64_t i = 0; i < pairs; i++) { o[2*i] = l16[p[i] >> 4]; o[2*i+1] = l16[p[i] & 15]; }
            if (len & 1) o[len - 1] = l16[p[pairs] >> 4];
        } else {
            _Float16 l16[16];
            for (int k = 0; k < 16; k++) l16[k] = (_Float16)lut[k];
            _Float16 *o = (_Float16 *)out + start;
            for (int64_t i = 0; i < pairs; i++) { o[2*i] = l16[p[i] >> 4]; o[2*i+1] = l16[p[i] & 15]; }
            if (len & 1) o[len - 1] = l16[p[pairs] >> 4];
        }
    }
}
