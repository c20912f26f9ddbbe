/* qforge CPU kernels for 4-bit blockwise quantisation, compiled at first use (see cpu.py).
 *
 * Bit-exact with kernels/reference.py. Built with -ffp-contract=off so that no multiply is fused
 * into an add: every float result must round exactly as the reference rounds it.
 * dtype codes: 0 = float32, 1 = bfloat16, 2 = float16.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QF_AVX512 1
#endif

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

/* fmaxf / fminf as comparisons, so that they inline and vectorise (without -ffinite-math-only
   GCC calls libm for them): the same results, NaN included (a NaN x gives the other operand). */
static inline float max_of(float a, float x) { return x > a ? x : a; }
static inline float clamp_unit(float s) { s = s > -1.0f ? s : -1.0f; return s < 1.0f ? s : 1.0f; }

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
        for (int64_t i = 0; i < len; i++) m = max_of(m, fabsf(load_value(x, dtype, start + i)));
        absmax[b] = m;
        float safe = fmaxf(m, 1e-38f);
        int partial = len < blocksize;
        float inv = 1.0f / safe;
        for (int64_t i = 0; i < len; i += 2) {
            float v0 = load_value(x, dtype, start + i);
            float v1 = (i + 1 < len) ? load_value(x, dtype, start + i + 1) : 0.0f;
            float s0 = partial ? v0 / safe : v0 * inv;
            float s1 = (i + 1 < len) ? (partial ? v1 / safe : v1 * inv) : 0.0f;
            s0 = clamp_unit(s0);
            s1 = clamp_unit(s1);
            packed[(start + i) >> 1] = (uint8_t)((code_of(s0, bounds, order) << 4) | code_of(s1, bounds, order));
        }
    }
}

#ifdef QF_AVX512
/* 16 packed bytes -> 32 nibble indices in output order (high nibble first), as 16-bit lanes. */
static inline __m512i nibbles_to_u16(const uint8_t *p) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    __m128i lo = _mm_and_si128(raw, mask);
    __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
    return _mm512_cvtepu8_epi16(idx);
}

/* Expand `bytes` (a multiple of 16) packed bytes through a 16-entry table of 16-bit values. */
static inline void expand16(const uint8_t *p, int64_t bytes, const uint16_t *table, uint16_t *o) {
    __m512i lut = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)table));
    for (int64_t i = 0; i < bytes; i += 16)
        _mm512_storeu_si512((void *)(o + 2 * i), _mm512_permutexvar_epi16(nibbles_to_u16(p + i), lut));
}

/* Expand through a 16-entry float table: two permutes per 16 bytes. */
static inline void expand32(const uint8_t *p, int64_t bytes, const float *table, float *o) {
    __m512 lut = _mm512_loadu_ps(table);
    for (int64_t i = 0; i < bytes; i += 16) {
        __m512i idx = nibbles_to_u16(p + i);
        __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx));
        __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1));
        _mm512_storeu_ps(o + 2 * i, _mm512_permutexvar_ps(lo, lut));
        _mm512_storeu_ps(o + 2 * i + 16, _mm512_permutexvar_ps(hi, lut));
    }
}
#endif

/* Each block has one scale, so its 16 possible outputs (level * absmax in float32, rounded once to
 * the output type) form a table; the block is then pure table lookup: exact, and vectorisable. */
void qf_dequantize_4bit(const uint8_t *packed, const float *absmax, const float *levels,
                        int64_t n, int64_t blocksize, int dtype, void *out) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * blocksize;
        int64_t len = (n - start < blocksize) ? n - start : blocksize;
        float s = absmax[b];
        float lut[16];
        uint16_t l16[16];
        for (int k = 0; k < 16; k++) lut[k] = levels[k] * s;
        if (dtype == 1) for (int k = 0; k < 16; k++) l16[k] = to_bf16(lut[k]);
        if (dtype == 2) for (int k = 0; k < 16; k++) { _Float16 h = (_Float16)lut[k]; memcpy(&l16[k], &h, 2); }
        const uint8_t *p = packed + (start >> 1);
        int64_t pairs = len >> 1, i = 0;
#ifdef QF_AVX512
        int64_t vec_bytes = pairs & ~(int64_t)15;
        if (dtype == 0) expand32(p, vec_bytes, lut, (float *)out + start);
        else expand16(p, vec_bytes, l16, (uint16_t *)out + start);
        i = vec_bytes;
#endif
        if (dtype == 0) {
            float *o = (float *)out + start;
            for (; i < pairs; i++) { o[2*i] = lut[p[i] >> 4]; o[2*i+1] = lut[p[i] & 15]; }
            if (len & 1) o[len - 1] = lut[p[pairs] >> 4];
        } else {
            uint16_t *o = (uint16_t *)out + start;
            for (; i < pairs; i++) { o[2*i] = l16[p[i] >> 4]; o[2*i+1] = l16[p[i] & 15]; }
            if (len & 1) o[len - 1] = l16[p[pairs] >> 4];
        }
    }
}

/* 8-bit blockwise quantisation against a sorted 256-entry map, bitsandbytes' CPU rule: scale by
 * 1/absmax, clamp to [-1, 1], round onto a 65536-point grid and look the nearest map entry up in
 * `table`. Each step is its own float32 rounding (see kernels/reference.py: quantize_8bit). */
void qf_quantize_8bit(const float *x, int64_t n, int64_t blocksize, const uint8_t *table,
                      uint8_t *codes, float *absmax) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel for schedule(static) if (n > 262144)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * blocksize;
        int64_t len = (n - start < blocksize) ? n - start : blocksize;
        float m = 0.0f;
        for (int64_t i = 0; i < len; i++) m = max_of(m, fabsf(x[start + i]));
        absmax[b] = m;
        if (m == 0.0f) { memset(codes + start, 0, (size_t)len); continue; }
        float inv = 1.0f / m;
        for (int64_t i = 0; i < len; i++) {
            float s = x[start + i] * inv;
            s = clamp_unit(s);
            float t = (s + 1.0f) * 0.5f;
            t = t * 65535.0f;
            t = t + 0.5f;
            codes[start + i] = table[(int32_t)t];
        }
    }
}

void qf_dequantize_8bit(const uint8_t *codes, const float *absmax, const float *levels,
                        int64_t n, int64_t blocksize, float *out) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel for schedule(static) if (n > 262144)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * blocksize;
        int64_t len = (n - start < blocksize) ? n - start : blocksize;
        float s = absmax[b];
        for (int64_t i = 0; i < len; i++) out[start + i] = levels[codes[start + i]] * s;
    }
}

/* Counter-based dropout: element i is kept when the 32-bit hash of (i, seed) >> 8 is at least
   `threshold` (= ceil(p * 2^24)); kept values are multiplied by `scale` (1 / (1 - p)) in float32
   and rounded to the tensor's dtype as torch rounds (bf16: nearest-even). The mask is a pure
   function of (seed, i), so backward recomputes it from the seed instead of keeping it. The hash
   is Wellons' "lowbias32" of (i mod 2^32) ^ seed_lo, added to seed_hi: qforge.kernels.reference
   computes the same bits in torch. dtype 0: float32, 1: bfloat16. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU;
    x ^= x >> 15; x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

void qf_dropout(const void *x, int dtype, int64_t n, uint32_t threshold, float scale,
                uint32_t seed_lo, uint32_t seed_hi, void *out) {
    #pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        uint32_t h = mix32(mix32((uint32_t)i ^ seed_lo) + seed_hi);
        int keep = (h >> 8) >= threshold;
        if (dtype == 0) {
            float v = ((const float *)x)[i] * scale;
            ((float *)out)[i] = keep ? v : 0.0f;
        } else {
            uint32_t bits = (uint32_t)((const uint16_t *)x)[i] << 16;
            float f;
            memcpy(&f, &bits, 4);
            f *= scale;
            uint32_t u;
            memcpy(&u, &f, 4);
            uint16_t b = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? (uint16_t)((u >> 16) | 0x40u) : to_bf16(f);
            ((uint16_t *)out)[i] = keep ? b : 0;
        }
    }
}

/* One AdamW update of a parameter with blockwise 8-bit moments (qforge.optim.adamw8bit) in two
   passes around torch's own sqrt (whose float32 results are not always the correctly rounded
   ones that sqrtf gives, so the square root is left to torch to keep the torch path's bits):
     qf_adamw_8bit_moments: decode both moments, update them -> float32 m, v
     (torch: s = v.sqrt())
     qf_adamw_8bit_apply:   update the parameter from m and s, re-encode m and v blockwise.
   The arithmetic is the torch path's, rounding for rounding: torch's add_(g, alpha) is a fused
   multiply-add fma(g, alpha, m), addcmul_(g, g, value) is fma(value*g, g, v), addcdiv_(m, d,
   value) is p + (value*m)/d, a division by a scalar is a true division; so fmaf appears exactly
   there and nowhere else (-ffp-contract=off). param/grad dtype: 0 float32, 1 bfloat16 (the
   parameter is updated in float32 and rounded once, nearest-even). */
static inline uint8_t encode_8bit(float x, float inv, const uint8_t *table) {
    float s = x * inv;
    s = clamp_unit(s);
    float t = (s + 1.0f) * 0.5f;
    t = t * 65535.0f;
    t = t + 0.5f;
    return table[(int32_t)t];
}

/* A NaN becomes 0xFFFF, as torch's float32 -> bfloat16 copy_ writes it. */
static inline void store_value(void *x, int dtype, int64_t i, float f) {
    if (dtype == 0) { ((float *)x)[i] = f; return; }
    uint32_t u; memcpy(&u, &f, 4);
    ((uint16_t *)x)[i] = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? (uint16_t)0xFFFFu : to_bf16(f);
}

void qf_adamw_8bit_moments(const void *grad, int grad_dtype, int64_t n, int64_t blocksize,
                           const uint8_t *m_codes, const float *m_absmax, const uint8_t *v_codes, const float *v_absmax,
                           const float *m_levels, const float *v_levels,
                           float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                           float *m, float *v) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel for schedule(static) if (n > 262144)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * blocksize;
        int64_t end = (n - start < blocksize) ? n : start + blocksize;
        float am = m_absmax[b], av = v_absmax[b];
        for (int64_t i = start; i < end; i++) {
            float g = load_value(grad, grad_dtype, i);
            float mi = m_levels[m_codes[i]] * am;
            float vi = v_levels[v_codes[i]] * av;
            mi = mi * beta1;
            m[i] = fmaf(g, one_minus_beta1, mi);
            vi = vi * beta2;
            v[i] = fmaf(one_minus_beta2 * g, g, vi);
        }
    }
}

void qf_adamw_8bit_apply(void *param, int param_dtype, int64_t n, int64_t blocksize,
                         const float *m, const float *v, const float *v_sqrt,
                         uint8_t *m_codes, float *m_absmax, uint8_t *v_codes, float *v_absmax,
                         const uint8_t *m_table, const uint8_t *v_table,
                         float bias_correction2_sqrt, float eps, float decay, float step_size) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel for schedule(static) if (n > 262144)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * blocksize;
        int64_t end = (n - start < blocksize) ? n : start + blocksize;
        float mmax = 0.0f, vmax = 0.0f;
        for (int64_t i = start; i < end; i++) {
            float denom = v_sqrt[i] / bias_correction2_sqrt;
            denom = denom + eps;
            float p = load_value(param, param_dtype, i);
            p = p * decay;
            p = p + (step_size * m[i]) / denom;
            store_value(param, param_dtype, i, p);
            mmax = max_of(mmax, fabsf(m[i]));
            vmax = max_of(vmax, fabsf(v[i]));
        }
        m_absmax[b] = mmax;
        v_absmax[b] = vmax;
        if (mmax == 0.0f) memset(m_codes + start, 0, (size_t)(end - start));
        else { float inv = 1.0f / mmax; for (int64_t i = start; i < end; i++) m_codes[i] = encode_8bit(m[i], inv, m_table); }
        if (vmax == 0.0f) memset(v_codes + start, 0, (size_t)(end - start));
        else { float inv = 1.0f / vmax; for (int64_t i = start; i < end; i++) v_codes[i] = encode_8bit(v[i], inv, v_table); }
    }
}

/* Gathered (BGMV-style) per-row LoRA of a mixed serving batch, reading each row's own slot in
 * place: no gathered copies of A and B, no work on other slots' factors. For row b (of `rows`,
 * each `tokens` positions of x [rows, tokens, n_in]) with slot k = slots[b] in 0..K-1:
 *     h = round(x A[k]^T) ; h = round(h * s[k]) ; delta = round(h B[k]^T)     (round: to x's dtype)
 * as reference.gathered_lora rounds (h in x's dtype before B); the sums are float32 in another
 * order than torch's GEMMs, so equal to the reference up to float accumulation order, not bit-exact.
 * A [K, r, n_in], B [K, n_out, r] contiguous, in x's dtype; scalings float32 [K]; slots int64.
 * Rows whose slot is outside 0..K-1 get a zero delta. Parallel over rows x tokens. */
static inline float dot_f32(const float *x, const void *w, int dtype, int64_t off, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};   /* eight partial sums: the loop vectorises */
    int64_t i = 0;
    if (dtype == 1) {
        const uint16_t *p = (const uint16_t *)w + off;
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; l++) {
                uint32_t u = (uint32_t)p[i + l] << 16; float f; memcpy(&f, &u, 4);
                acc[l] += x[i + l] * f;
            }
    } else if (dtype == 0) {
        const float *p = (const float *)w + off;
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; l++) acc[l] += x[i + l] * p[i + l];
    }
    float tail = 0.0f;
    for (; i < n; i++) tail += x[i] * load_value(w, dtype, off + i);
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

static inline float round_to(float f, int dtype) {
    if (dtype == 1) { uint32_t u = (uint32_t)to_bf16(f) << 16; memcpy(&f, &u, 4); return f; }
    if (dtype == 2) return (float)(_Float16)f;
    return f;
}

void qf_gathered_lora(const void *x, int dtype, int64_t rows, int64_t tokens, int64_t n_in,
                      const void *A, const void *B, int64_t K, int64_t r, int64_t n_out,
                      const int64_t *slots, const float *scalings, void *out) {
    #pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < rows * tokens; bt++) {
        int64_t k = slots[bt / tokens];
        if (k < 0 || k >= K) {
            for (int64_t o = 0; o < n_out; o++) store_value(out, dtype, bt * n_out + o, 0.0f);
            continue;
        }
        float xf[n_in], h[r];
        for (int64_t i = 0; i < n_in; i++) xf[i] = load_value(x, dtype, bt * n_in + i);
        for (int64_t j = 0; j < r; j++)
            h[j] = round_to(round_to(dot_f32(xf, A, dtype, (k * r + j) * n_in, n_in), dtype) * scalings[k], dtype);
        for (int64_t o = 0; o < n_out; o++)
            store_value(out, dtype, bt * n_out + o, dot_f32(h, B, dtype, (k * n_out + o) * r, r));
    }
}
