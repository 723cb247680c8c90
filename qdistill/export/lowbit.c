/* qdistill's own low-bit matmul for the CPU (AVX2 and FMA): y = x W^T with W held as 2- or 4-bit codes.

   W[n, k] = code[n, k] * scale[n, g] + offset[n, g], g = k / group. Each group of `group` codes takes
   group * bits / 8 bytes; byte i of a group holds code i of each of its 8 / bits planes, lowest bits
   first (plane j: the group's weights j * group * bits / 8 + i). A plane is 8 consecutive weights per 8
   bytes read, so codes widen to float32 lanes with one shift and one mask. Per group, the sum of code * x
   is accumulated in float32, multiplied by the scale, and offset * sum(x) is added: no weight is ever
   written out. Output rows are shared among `threads` OpenMP threads; input rows go 8 at a time, so
   each group's codes are widened once per 8 rows. Compiled at first use by qdistill.export.lowbit. */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* R input rows (1 or 8) against one output row; bits and R are constants once inlined. */
static inline __attribute__((always_inline)) void dot_rows(const float *restrict x, long K, const uint8_t *restrict codes, int groups, int seg,
                                                           const int bits, const int R, const float *restrict scale,
                                                           const float *restrict offset, const float *restrict xsum, float *out) {
    const int planes = 8 / bits;
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    __m256 total[8];
    float shift[8];
    for (int r = 0; r < R; r++) {
        total[r] = _mm256_setzero_ps();
        shift[r] = 0;
    }
    for (int g = 0; g < groups; g++) {
        __m256 acc[8];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *cg = codes + (long)g * seg;
        const float *xg = x + (long)g * seg * planes;
        for (int i = 0; i < seg; i += 8) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cg + i)));
            for (int j = 0; j < planes; j++) {
                __m256 w = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, bits * j), mask));
                for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + r * K + j * seg + i), acc[r]);
            }
        }
        __m256 s = _mm256_set1_ps(scale[g]);
        for (int r = 0; r < R; r++) {
            total[r] = _mm256_fmadd_ps(s, acc[r], total[r]);
            shift[r] += offset[g] * xsum[(long)r * groups + g];
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(total[r]) + shift[r];
}

/* x [B, K] float32, codes [N, K * bits / 8], scale and offset [N, K / group] float32, xsum [B, K / group]
   float32 (each group's sum of x), y [B, N] float32. Needs bits 2 or 4, K a multiple of group, and
   group * bits / 8 a multiple of 8. */
void lowbit_linear(const float *restrict x, int B, int K, const uint8_t *restrict codes, int N, int bits, int group,
                   const float *restrict scale, const float *restrict offset, const float *restrict xsum, float *restrict y, int threads) {
    int groups = K / group, seg = group * bits / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = codes + (long)n * groups * seg;
        const float *sc = scale + (long)n * groups, *of = offset + (long)n * groups;
        float out[8];
        int b = 0;
        for (; b + 8 <= B; b += 8) {
            if (bits == 4) dot_rows(x + (long)b * K, K, row, groups, seg, 4, 8, sc, of, xsum + (long)b * groups, out);
            else dot_rows(x + (long)b * K, K, row, groups, seg, 2, 8, sc, of, xsum + (long)b * groups, out);
            for (int r = 0; r < 8; r++) y[(long)(b + r) * N + n] = out[r];
        }
        for (; b < B; b++) {
            if (bits == 4) dot_rows(x + (long)b * K, K, row, groups, seg, 4, 1, sc, of, xsum + (long)b * groups, out);
            else dot_rows(x + (long)b * K, K, row, groups, seg, 2, 1, sc, of, xsum + (long)b * groups, out);
            y[(long)b * N + n] = out[0];
        }
    }
}
