/* qdistill's own low-bit kernels for the CPU (AVX2 and FMA): y = x W^T with W held as 2-, 4- or 8-bit codes,
   LSTM and GRU recurrences on such weights, and decoding them (rows, or whole).

   W[n, k] = level(code[n, k]) * scale[n, g] + offset[n, g], g = k / group (the last group of a row may be
   shorter), where level(c) is c itself
   (uniform levels) or points[c] (learned points, at 2 and 4 bits: a table of 16 floats, read by one lane
   permute for 2-bit codes, two and a blend for 4-bit ones). Output rows go in panels of 8, one per float32
   lane: for each k, a panel's 8 codes take `bits` bytes, lane l in byte l * bits / 8 from bit
   (l * bits) % 8 up. One 32-bit broadcast, a per-lane shift and a mask widen them to a vector (2-bit codes:
   two k at once; 8-bit codes: one zero-extending load). Scales and offsets are [panel, group, 8].

   A few input rows (B < BATCH_ROWS): per row and group, the sums of level * x are accumulated, multiplied
   by the scale, and offset * sum(x) is added; no weight is written out. More rows: two panels' weights
   are decoded to float32 a block of k at a time in a small buffer, then multiplied with up to 6 input
   rows at once from registers. Panels are shared among `threads` OpenMP threads. Compiled at first use
   by qdistill.runtime.lowbit. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BATCH_ROWS 4 /* from this many input rows on, weights are decoded to a buffer first */
#define PANELS 4     /* panels read at once for a few rows */
#define BLOCK 256    /* k per decoded block */
#define TILE 6       /* input rows per register tile */

static inline __m256i broadcast32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* The levels of 8 codes (`bits` 2 or 4); `table` (lut) holds points[0..7] and points[8..15]. */
static inline __attribute__((always_inline)) __m256 widen(__m256i c, __m256i shifts, const int bits, const int lut, const __m256 *table) {
    __m256i q = _mm256_and_si256(_mm256_srlv_epi32(c, shifts), _mm256_set1_epi32((1 << bits) - 1));
    if (!lut) return _mm256_cvtepi32_ps(q);
    __m256 low = _mm256_permutevar8x32_ps(table[0], q);
    if (bits == 2) return low;
    return _mm256_blendv_ps(low, _mm256_permutevar8x32_ps(table[1], q), _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
}

/* The levels of one panel's codes at k and k + 1; `c` points at k's. 8-bit codes are uniform levels only. */
static inline __attribute__((always_inline)) void levels_at(const uint8_t *c, const int bits, const int lut, const __m256 *table, __m256 *q0, __m256 *q1) {
    if (bits == 8) {
        *q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)c)));
        *q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + 8))));
    } else if (bits == 4) {
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        *q0 = widen(broadcast32(c), shifts, 4, lut, table);
        *q1 = widen(broadcast32(c + 4), shifts, 4, lut, table);
    } else {
        const __m256i both = broadcast32(c), shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        *q0 = widen(both, shifts, 2, lut, table);
        *q1 = widen(both, _mm256_add_epi32(shifts, _mm256_set1_epi32(16)), 2, lut, table);
    }
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* Lanes 0 .. valid - 1 of 8 floats at p (the others 0, not read), and the same for a store. */
static inline __m256i lanes_below(int valid) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
static inline __m256 load8(const float *p, int valid) { return valid >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes_below(valid)); }
static inline void store8(float *p, __m256 v, int valid) {
    if (valid >= 8) _mm256_storeu_ps(p, v);
    else if (valid > 0) _mm256_maskstore_ps(p, lanes_below(valid), v);
}
static inline __m256 bias8(const float *bias, int valid) { return bias ? load8(bias, valid) : _mm256_setzero_ps(); }

/* One input row against P panels starting at `codes` (panel stride K * bits bytes): 8 * P outputs, of which
   the first `valid` are written to y, each with its bias (NULL: none). */
static inline __attribute__((always_inline)) void row_panels(const float *restrict x, int K, const uint8_t *restrict codes, const int bits, const int lut,
                                                             const float *restrict points, int group, const int P, const float *restrict scale, const float *restrict offset,
                                                             const float *restrict bias, float *restrict y, int valid) {
    const int groups = (K + group - 1) / group;
    __m256 table[2];
    if (lut) table[0] = _mm256_loadu_ps(points), table[1] = _mm256_loadu_ps(points + 8);
    __m256 total[PANELS];
    for (int p = 0; p < P; p++) total[p] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256 even[PANELS], odd[PANELS];
        for (int p = 0; p < P; p++) even[p] = odd[p] = _mm256_setzero_ps();
        const int start = g * group, end = start + group < K ? start + group : K;
        for (int k = start; k < end; k += 2) {
            __m256 x0 = _mm256_set1_ps(x[k]), x1 = _mm256_set1_ps(x[k + 1]);
            for (int p = 0; p < P; p++) {
                __m256 q0, q1;
                levels_at(codes + ((long)p * K + k) * bits, bits, lut, table, &q0, &q1);
                even[p] = _mm256_fmadd_ps(q0, x0, even[p]);
                odd[p] = _mm256_fmadd_ps(q1, x1, odd[p]);
            }
        }
        __m256 sum = _mm256_setzero_ps();
        int k = start;
        for (; k + 8 <= end; k += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(x + k));
        float xsum = hsum(sum);
        for (; k < end; k++) xsum += x[k];
        __m256 xs = _mm256_set1_ps(xsum);
        for (int p = 0; p < P; p++) {
            const long at = ((long)p * groups + g) * 8;
            total[p] = _mm256_fmadd_ps(_mm256_loadu_ps(scale + at), _mm256_add_ps(even[p], odd[p]), total[p]);
            total[p] = _mm256_fmadd_ps(_mm256_loadu_ps(offset + at), xs, total[p]);
        }
    }
    for (int p = 0; p < P; p++) store8(y + 8 * p, _mm256_add_ps(total[p], bias8(bias ? bias + 8 * p : 0, valid - 8 * p)), valid - 8 * p);
}

/* Two panels' weights for k in [k0, k0 + n) as float32, [k][16], into `w`. */
static inline __attribute__((always_inline)) void decode_pair(const uint8_t *restrict codes, int K, const int bits, const int lut, const float *restrict points,
                                                              int group, const float *restrict scale, const float *restrict offset, int k0, int n,
                                                              float *restrict w) {
    const int groups = (K + group - 1) / group;
    __m256 table[2];
    if (lut) table[0] = _mm256_loadu_ps(points), table[1] = _mm256_loadu_ps(points + 8);
    for (int p = 0; p < 2; p++) {
        const uint8_t *c = codes + (long)p * K * bits;
        for (int k = k0; k < k0 + n; k += 2) {
            const long at = ((long)p * groups + k / group) * 8;
            __m256 s = _mm256_loadu_ps(scale + at), o = _mm256_loadu_ps(offset + at);
            __m256 q0, q1;
            levels_at(c + (long)k * bits, bits, lut, table, &q0, &q1);
            _mm256_store_ps(w + (k - k0) * 16 + 8 * p, _mm256_fmadd_ps(q0, s, o));
            _mm256_store_ps(w + (k + 1 - k0) * 16 + 8 * p, _mm256_fmadd_ps(q1, s, o));
        }
    }
}

/* R (<= TILE) input rows times decoded weights w [n][16], added to y's first `valid` of 16 columns (row
   stride ldy), or, `first`, written there with the bias added (NULL: none). A few rows take U steps of k at
   once into separate sums, so that enough independent multiply-adds are in flight. */
static inline __attribute__((always_inline)) void tile(const float *restrict x, int K, const int R, const float *restrict w, int n, const float *restrict bias,
                                                       float *restrict y, int ldy, int valid, int first) {
    const int U = R == 1 ? 4 : R <= 3 ? 2 : 1;
    __m256 acc[4][TILE][2];
    const __m256 b0 = first ? bias8(bias, valid) : _mm256_setzero_ps(), b1 = first ? bias8(bias ? bias + 8 : 0, valid - 8) : _mm256_setzero_ps();
    for (int u = 0; u < U; u++)
        for (int r = 0; r < R; r++) acc[u][r][0] = u ? _mm256_setzero_ps() : b0, acc[u][r][1] = u ? _mm256_setzero_ps() : b1;
    int k = 0;
    for (; k + U <= n; k += U) {
        for (int u = 0; u < U; u++) {
            __m256 w0 = _mm256_load_ps(w + 16 * (k + u)), w1 = _mm256_load_ps(w + 16 * (k + u) + 8);
            for (int r = 0; r < R; r++) {
                __m256 xb = _mm256_broadcast_ss(x + (long)r * K + k + u);
                acc[u][r][0] = _mm256_fmadd_ps(w0, xb, acc[u][r][0]);
                acc[u][r][1] = _mm256_fmadd_ps(w1, xb, acc[u][r][1]);
            }
        }
    }
    for (; k < n; k++) {
        __m256 w0 = _mm256_load_ps(w + 16 * k), w1 = _mm256_load_ps(w + 16 * k + 8);
        for (int r = 0; r < R; r++) {
            __m256 xb = _mm256_broadcast_ss(x + (long)r * K + k);
            acc[0][r][0] = _mm256_fmadd_ps(w0, xb, acc[0][r][0]);
            acc[0][r][1] = _mm256_fmadd_ps(w1, xb, acc[0][r][1]);
        }
    }
    for (int u = 1; u < U; u++)
        for (int r = 0; r < R; r++) acc[0][r][0] = _mm256_add_ps(acc[0][r][0], acc[u][r][0]), acc[0][r][1] = _mm256_add_ps(acc[0][r][1], acc[u][r][1]);
    for (int r = 0; r < R; r++) {
        float *yr = y + (long)r * ldy;
        if (!first) {
            acc[0][r][0] = _mm256_add_ps(acc[0][r][0], load8(yr, valid));
            acc[0][r][1] = _mm256_add_ps(acc[0][r][1], load8(yr + 8, valid - 8));
        }
        store8(yr, acc[0][r][0], valid);
        store8(yr + 8, acc[0][r][1], valid - 8);
    }
}

/* All B input rows (row stride K) times decoded weights w [n][16], TILE rows at a time, then the rest: `tile`. */
static inline __attribute__((always_inline)) void tiles(const float *restrict x, int B, int K, const float *restrict w, int n, const float *restrict bias,
                                                        float *restrict y, int ldy, int valid, int first) {
    int b = 0;
    for (; b + TILE <= B; b += TILE) tile(x + (long)b * K, K, TILE, w, n, bias, y + (long)b * ldy, ldy, valid, first);
    switch (B - b) {
#define REST(r) \
    case r: tile(x + (long)b * K, K, r, w, n, bias, y + (long)b * ldy, ldy, valid, first); break;
        REST(1) REST(2) REST(3) REST(4) REST(5)
    }
}

static inline __attribute__((always_inline)) void batch_pair(const float *restrict x, int B, int K, const uint8_t *restrict codes, const int bits, const int lut,
                                                             const float *restrict points, int group, const float *restrict scale,
                                                             const float *restrict offset, const float *restrict bias, float *restrict y, int ldy, int valid) {
    float w[BLOCK * 16] __attribute__((aligned(32)));
    for (int k0 = 0; k0 < K; k0 += BLOCK) {
        int n = K - k0 < BLOCK ? K - k0 : BLOCK;
        decode_pair(codes, K, bits, lut, points, group, scale, offset, k0, n, w);
        tiles(x + k0, B, K, w, n, bias, y, ldy, valid, k0 == 0);
    }
}

/* y [B, M] = x [B, K] W^T + bias (NULL: none), W [M, K] in panels of 8 rows. */
static inline __attribute__((always_inline)) void linear(const float *restrict x, int B, int K, const uint8_t *restrict codes, const int bits,
                                                         const int lut, const float *restrict points, int group, const float *restrict scale,
                                                         const float *restrict offset, const float *restrict bias, float *restrict y, int M, int threads) {
    const int groups = (K + group - 1) / group, panels = (M + 7) / 8;
    const long panel_bytes = (long)K * bits, panel_params = (long)groups * 8;
    if (B < BATCH_ROWS) {
        const int sets = (panels + PANELS - 1) / PANELS;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int s = 0; s < sets; s++) {
            for (int b = 0; b < B; b++) {
                const float *xb = x + (long)b * K;
                float *yb = y + (long)b * M;
                for (int p = s * PANELS; p < (s + 1) * PANELS && p < panels;) {
                    const uint8_t *c = codes + p * panel_bytes;
                    const float *sc = scale + p * panel_params, *of = offset + p * panel_params, *bi = bias ? bias + 8 * p : 0;
                    if (p + PANELS <= panels) {
                        row_panels(xb, K, c, bits, lut, points, group, PANELS, sc, of, bi, yb + 8 * p, M - 8 * p);
                        p += PANELS;
                    } else {
                        row_panels(xb, K, c, bits, lut, points, group, 1, sc, of, bi, yb + 8 * p, M - 8 * p);
                        p += 1;
                    }
                }
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int p = 0; p < panels; p += 2)
        batch_pair(x, B, K, codes + p * panel_bytes, bits, lut, points, group, scale + p * panel_params, offset + p * panel_params, bias ? bias + 8 * p : 0,
                   y + 8 * p, M, M - 8 * p);
}

/* Calls F(bits, lut) with both as compile-time constants: 8 (uniform only), 4 or 2 bits, levels or points. */
#define DISPATCH(F)                              \
    if (points == 0 && bits == 8) F(8, 0);       \
    else if (points == 0 && bits == 4) F(4, 0);  \
    else if (points == 0) F(2, 0);               \
    else if (bits == 4) F(4, 1);                 \
    else F(2, 1);

/* y [B, M] = x [B, K] W^T + bias, W [M, K]: x float32, codes [N / 8, K, bits] bytes and scale and offset
   [N / 8, ceil(K / group), 8] float32 with N = M rounded up to a multiple of 16, points NULL (uniform levels)
   or 16 floats, bias NULL or M floats. Needs bits 2, 4 or 8 (8: points NULL), K and group even. */
void lowbit_linear(const float *restrict x, int B, int K, const uint8_t *restrict codes, int bits, int group, const float *restrict scale,
                   const float *restrict offset, const float *restrict points, const float *restrict bias, float *restrict y, int M, int threads) {
#define LINEAR(b, l) linear(x, B, K, codes, b, l, points, group, scale, offset, bias, y, M, threads)
    DISPATCH(LINEAR)
}

static inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* exp of 8 floats (Cephes' expf: a degree-5 polynomial on the reduced argument, about 1 ulp), inputs clamped
   to +-88.38 (the clamp's operands in this order pass a NaN through). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x)); /* NaN stays NaN */
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
static inline __m256 sigmoid8(__m256 v) { return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v)))); }
static inline __m256 tanh8(__m256 v) { return _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), sigmoid8(_mm256_add_ps(v, v))), _mm256_set1_ps(1.0f)); }

/* One recurrent layer (LSTM: gates i, f, g, o; GRU: r, z, n, PyTorch's orders) over T steps: gx [B, T, G·H]
   the input projections (LSTM: with both biases; GRU: with the input bias), the recurrent weights W_hh
   [G·H, H] as lowbit_linear holds them, decoded once to float32 into w [N / 16, H, 16] (N = G·H rounded up to
   a multiple of 16; 32-byte aligned) for all steps, bias_hh the recurrent bias (GRU: it goes inside r * (...);
   LSTM: NULL), h (and for an LSTM c) [B, H] the initial state, overwritten with the last; y [B, T, H] the
   outputs; gates [B, G·H] scratch. Needs H even and what lowbit_linear needs. */
static inline __attribute__((always_inline)) void recurrent(const int gru, const float *restrict gx, int B, int T, int H, const uint8_t *restrict codes,
                                                            const int bits, const int lut, const float *restrict points, int group, const float *restrict scale,
                                                            const float *restrict offset, const float *restrict bias_hh, float *restrict h, float *restrict c,
                                                            float *restrict y, float *restrict gates, float *restrict w, int threads) {
    const int G = gru ? 3 : 4, pairs = (G * H + 15) / 16, groups = (H + group - 1) / group;
    const long pair_bytes = 2L * H * bits, pair_params = 2L * groups * 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int q = 0; q < pairs; q++) decode_pair(codes + q * pair_bytes, H, bits, lut, points, group, scale + q * pair_params, offset + q * pair_params, 0, H, w + (long)q * H * 16);
    for (int t = 0; t < T; t++) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int q = 0; q < pairs; q++)
            tiles(h, B, H, w + (long)q * H * 16, H, bias_hh ? bias_hh + 16 * q : 0, gates + 16 * q, G * H, G * H - 16 * q, 1);
        for (int b = 0; b < B; b++) {
            const float *in = gx + ((long)b * T + t) * G * H, *g = gates + (long)b * G * H;
            float *hb = h + (long)b * H, *yb = y + ((long)b * T + t) * H, *cb = gru ? 0 : c + (long)b * H;
            int j = 0;
            for (; j + 8 <= H; j += 8) {
                __m256 out;
                if (gru) {
                    __m256 r = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(in + j), _mm256_loadu_ps(g + j)));
                    __m256 z = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(in + H + j), _mm256_loadu_ps(g + H + j)));
                    __m256 n = tanh8(_mm256_fmadd_ps(r, _mm256_loadu_ps(g + 2 * H + j), _mm256_loadu_ps(in + 2 * H + j)));
                    out = _mm256_fmadd_ps(z, _mm256_sub_ps(_mm256_loadu_ps(hb + j), n), n); /* (1 - z) n + z h */
                } else {
                    __m256 i = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(in + j), _mm256_loadu_ps(g + j)));
                    __m256 f = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(in + H + j), _mm256_loadu_ps(g + H + j)));
                    __m256 u = tanh8(_mm256_add_ps(_mm256_loadu_ps(in + 2 * H + j), _mm256_loadu_ps(g + 2 * H + j)));
                    __m256 o = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(in + 3 * H + j), _mm256_loadu_ps(g + 3 * H + j)));
                    __m256 cell = _mm256_fmadd_ps(f, _mm256_loadu_ps(cb + j), _mm256_mul_ps(i, u));
                    _mm256_storeu_ps(cb + j, cell);
                    out = _mm256_mul_ps(o, tanh8(cell));
                }
                _mm256_storeu_ps(hb + j, out);
                _mm256_storeu_ps(yb + j, out);
            }
            for (; j < H; j++) {
                if (gru) {
                    float r = sigmoid(in[j] + g[j]), z = sigmoid(in[H + j] + g[H + j]), n = tanhf(in[2 * H + j] + r * g[2 * H + j]);
                    hb[j] = yb[j] = (1.0f - z) * n + z * hb[j];
                } else {
                    float i = sigmoid(in[j] + g[j]), f = sigmoid(in[H + j] + g[H + j]);
                    float u = tanhf(in[2 * H + j] + g[2 * H + j]), o = sigmoid(in[3 * H + j] + g[3 * H + j]);
                    cb[j] = f * cb[j] + i * u;
                    hb[j] = yb[j] = o * tanhf(cb[j]);
                }
            }
        }
    }
}

/* `recurrent` for an LSTM (gru 0; c its cell state, bias_hh NULL) or a GRU (gru 1; c NULL). */
void lowbit_recurrent(int gru, const float *restrict gx, int B, int T, int H, const uint8_t *restrict codes, int bits, int group, const float *restrict scale,
                      const float *restrict offset, const float *restrict points, const float *restrict bias_hh, float *restrict h, float *restrict c,
                      float *restrict y, float *restrict gates, float *restrict w, int threads) {
#define LSTM(b, l) recurrent(0, gx, B, T, H, codes, b, l, points, group, scale, offset, bias_hh, h, c, y, gates, w, threads)
#define GRU(b, l) recurrent(1, gx, B, T, H, codes, b, l, points, group, scale, offset, bias_hh, h, c, y, gates, w, threads)
    if (gru) {
        DISPATCH(GRU)
    } else {
        DISPATCH(LSTM)
    }
}

/* Rows `ids` (n of them, each in range) of W as lowbit_linear holds it, decoded to float32: out [n, K]. `bits`
   2, 4 or 8; points NULL (uniform levels) or 16 floats. */
void lowbit_rows(const uint8_t *restrict codes, int K, int bits, int group, const float *restrict scale, const float *restrict offset,
                 const float *restrict points, const int64_t *restrict ids, int n, float *restrict out) {
    const int groups = (K + group - 1) / group, mask = (1 << bits) - 1;
    for (int i = 0; i < n; i++) {
        const long panel = ids[i] / 8;
        const int lane = ids[i] % 8, shift = (lane * bits) % 8;
        const uint8_t *c = codes + panel * K * bits + lane * bits / 8;
        const float *sc = scale + panel * groups * 8 + lane, *of = offset + panel * groups * 8 + lane;
        float *row = out + (long)i * K;
        for (int g = 0; g < groups; g++) {
            const float s = sc[8 * g], o = of[8 * g];
            const int end = (g + 1) * group < K ? (g + 1) * group : K;
            for (int k = g * group; k < end; k++) {
                const int q = (c[(long)k * bits] >> shift) & mask;
                row[k] = (points ? points[q] : (float)q) * s + o;
            }
        }
    }
}

/* Transposes 8 vectors of 8 floats in place: r[i][j] becomes r[j][i]. */
static inline void transpose8(__m256 *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20), r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
}

static inline __attribute__((always_inline)) void decode(const uint8_t *restrict codes, int K, int M, const int bits, const int lut, const float *restrict points,
                                                         int group, const float *restrict scale, const float *restrict offset, float *restrict out, int threads) {
    const int groups = (K + group - 1) / group, panels = (M + 7) / 8, whole = K - K % 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int p = 0; p < panels; p++) {
        __m256 table[2];
        if (lut) table[0] = _mm256_loadu_ps(points), table[1] = _mm256_loadu_ps(points + 8);
        const uint8_t *c = codes + (long)p * K * bits;
        const float *sc = scale + (long)p * groups * 8, *of = offset + (long)p * groups * 8;
        const int rows = M - 8 * p < 8 ? M - 8 * p : 8;
        for (int k0 = 0; k0 < whole; k0 += 8) {
            __m256 v[8];
            for (int j = 0; j < 8; j += 2) {
                levels_at(c + (long)(k0 + j) * bits, bits, lut, table, &v[j], &v[j + 1]);
                for (int i = j; i < j + 2; i++) {
                    const long at = (long)((k0 + i) / group) * 8;
                    v[i] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(sc + at), _mm256_loadu_ps(of + at));
                }
            }
            transpose8(v);
            for (int r = 0; r < rows; r++) _mm256_storeu_ps(out + (long)(8 * p + r) * K + k0, v[r]);
        }
        for (int k = whole; k < K; k++) { /* the last K % 8 inputs, one at a time */
            const long at = (long)(k / group) * 8;
            for (int r = 0; r < rows; r++) {
                const int q = (c[(long)k * bits + r * bits / 8] >> ((r * bits) % 8)) & ((1 << bits) - 1);
                out[(long)(8 * p + r) * K + k] = (lut ? points[q] : (float)q) * sc[at + r] + of[at + r];
            }
        }
    }
}

/* The first M rows of W as lowbit_linear holds it, decoded to float32: out [M, K]. Any K and group. */
void lowbit_decode(const uint8_t *restrict codes, int K, int M, int bits, int group, const float *restrict scale, const float *restrict offset,
                   const float *restrict points, float *restrict out, int threads) {
#define DECODE(b, l) decode(codes, K, M, b, l, points, group, scale, offset, out, threads)
    DISPATCH(DECODE)
}
