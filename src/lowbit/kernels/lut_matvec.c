/* Batch-1 (small batch) matrix-vector products straight from codebook codes: y = x·Ŵᵀ without ever
 * building Ŵ. Compiled on first use by lowbit.kernels.lut_native (cc -O3 -march=native -fopenmp).
 *
 * Per-column tables (CLAQ, k-means per input column): ŵ[r, c] = T[c, q[r, c]].
 *   y_r = Σ_c x_c·T[c, q[r, c]] = Σ_c P[c, q[r, c]],  P[c, k] = x_c·T[c, k]  (K×16 products, once per call)
 *   so the inner loop is a 16-entry table look-up and an add per weight. Codes are stored in blocks of 16
 *   output rows, [N/16][K][16] bytes: for one column c, the codes of 16 rows sit in one 16-byte vector,
 *   and one permute (AVX-512 vpermps on 16 lanes, or two 8-lane permutes and a blend on AVX2) looks up
 *   P[c, ·] for all 16 rows at once; four blocks share each load of P[c, ·].
 * Per-row tables (SqueezeLLM): ŵ[r, c] = T[r, q[r, c]]. Codes row-major [N][K]; for row r the table sits
 *   in registers, 16 consecutive columns' codes are looked up at once and multiplied into x (FMA).
 *
 * Tables are padded to 16 float32 entries (codes < 16). Products are exact float32 products; only the
 * order of the float32 sum differs from dequantize-then-matmul.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define TAB 16

static void col_blocks(const float *P, int64_t K, const uint8_t *codes, int64_t nblk, float *y) {
    /* `nblk` (≤ 4) consecutive blocks of 16 output rows for one activation row: y[16b + i] =
     * Σ_c P[c, codes_b[c][i]]. The blocks share each load of P[c, ·], so P (K·64 bytes, an L2 resident)
     * is streamed once per 4 blocks instead of once per block. */
#if defined(__AVX512F__)
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < K; c++) {
        const __m512 p = _mm512_loadu_ps(P + TAB * c);
        for (int b = 0; b < nblk; b++) {
            __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + b * K * 16 + 16 * c)));
            acc[b] = _mm512_add_ps(acc[b], _mm512_permutexvar_ps(i, p));
        }
    }
    for (int b = 0; b < nblk; b++) _mm512_storeu_ps(y + 16 * b, acc[b]);
#elif defined(__AVX2__)
    for (int b = 0; b < nblk; b++) {
        const uint8_t *cb = codes + b * K * 16;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t c = 0; c < K; c++) {
            __m256 lo = _mm256_loadu_ps(P + TAB * c), hi = _mm256_loadu_ps(P + TAB * c + 8);
            __m128i q = _mm_loadu_si128((const __m128i *)(cb + 16 * c));
            __m256i i0 = _mm256_cvtepu8_epi32(q), i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(q, 8));
            /* entries 0-7 from lo, 8-15 from hi: bit 3 of the code, shifted to the sign bit, picks */
            a0 = _mm256_add_ps(a0, _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i0), _mm256_permutevar8x32_ps(hi, i0),
                                                    _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28))));
            a1 = _mm256_add_ps(a1, _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i1), _mm256_permutevar8x32_ps(hi, i1),
                                                    _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28))));
        }
        _mm256_storeu_ps(y + 16 * b, a0);
        _mm256_storeu_ps(y + 16 * b + 8, a1);
    }
#else
    for (int b = 0; b < nblk; b++) {
        float acc[16] = {0};
        const uint8_t *cb = codes + b * K * 16;
        for (int64_t c = 0; c < K; c++)
            for (int j = 0; j < 16; j++) acc[j] += P[TAB * c + cb[16 * c + j]];
        memcpy(y + 16 * b, acc, sizeof acc);
    }
#endif
}

/* x [M, K], table [K, 16], codes [NB, K, 16], P scratch [M, K, 16], y [M, NB·16] */
void lut_col_matvec(const float *x, int64_t M, int64_t K, const float *table, const uint8_t *codes, int64_t NB,
                    float *P, float *y, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < M * K; i++) {
            const float xc = x[i];
            const float *t = table + TAB * (i % K);
            for (int k = 0; k < TAB; k++) P[TAB * i + k] = xc * t[k];
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < NB; b += 4)
            for (int64_t m = 0; m < M; m++)
                col_blocks(P + m * K * TAB, K, codes + b * K * 16, NB - b < 4 ? NB - b : 4, y + m * NB * 16 + b * 16);
    }
}

/* x [M, K], table [N, 16], codes [N, K], y [M, N] */
void lut_row_matvec(const float *x, int64_t M, int64_t K, const float *table, const uint8_t *codes, int64_t N,
                    float *y, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < N; r++) {
        const uint8_t *q = codes + r * K;
        const float *t = table + TAB * r;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            float s = 0.0f;
            int64_t c = 0;
#if defined(__AVX512F__)
            __m512 tab = _mm512_loadu_ps(t), acc = _mm512_setzero_ps();
            for (; c + 16 <= K; c += 16) {
                __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + c)));
                acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(i, tab), _mm512_loadu_ps(xm + c), acc);
            }
            s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
            __m256 lo = _mm256_loadu_ps(t), hi = _mm256_loadu_ps(t + 8), acc = _mm256_setzero_ps();
            for (; c + 8 <= K; c += 8) {
                __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + c)));
                __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i), _mm256_permutevar8x32_ps(hi, i),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
                acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(xm + c), acc);
            }
            float part[8];
            _mm256_storeu_ps(part, acc);
            for (int j = 0; j < 8; j++) s += part[j];
#endif
            for (; c < K; c++) s += t[q[c]] * xm[c];
            y[m * N + r] = s;
        }
    }
}

/* Additive codes (AQLM): ŵ[r, j·g : (j+1)·g] = s_r · Σ_m C_m[b[r, j, m]].
 *   y_r = s_r · Σ_{j,m} P[j, m, b[r, j, m]],  P[j, m, k] = C_m[k] · x[j·g : (j+1)·g]  (J·M·K dot products per
 *   activation row, formed by the caller). The inner loop is one table look-up and an add per code, M
 *   codes per g weights. The look-ups are plain scalar loads into 8 independent sums: on the Zen 4 of
 *   bench/results/inference.md they run at ~2 loads per cycle, where a 16-lane AVX-512 gather took 40 %
 *   longer (1.73 vs 1.25 ms on a 4096² 2x8 layer). The codes are walked in chunks of CHUNK (j, m)
 *   positions, all rows per chunk, so that the chunk's slice of P (CHUNK·K floats: 128 KB for K = 256)
 *   stays in L2 instead of the whole table (1 MB for a 4096-wide 2x8 layer); 16 and 32 were slower
 *   (per-row overhead), 256 no faster.
 * P [Mx, J·M·K] (Mx activation rows), codes uint8 [N, J·M], scale [N], y [Mx, N] */
#define CHUNK 128
void additive_matvec(const float *P, int64_t Mx, int64_t JM, int64_t K, const uint8_t *codes, const float *scale,
                     int64_t N, float *y, int nthreads) {
    for (int64_t i = 0; i < Mx * N; i++) y[i] = 0.0f;
    #pragma omp parallel num_threads(nthreads)
    {
        for (int64_t i0 = 0; i0 < JM; i0 += CHUNK) {
            const int64_t i1 = i0 + CHUNK < JM ? i0 + CHUNK : JM;
            #pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < N; r++) {
                const uint8_t *q = codes + r * JM;
                for (int64_t m = 0; m < Mx; m++) {
                    const float *p = P + m * JM * K;
                    float s = 0.0f;
                    int64_t i = i0;
                    float a[8] = {0};
                    for (; i + 8 <= i1; i += 8) {
                        const float *pi = p + i * K;
                        const uint8_t *qi = q + i;
                        a[0] += pi[qi[0]];
                        a[1] += pi[K + qi[1]];
                        a[2] += pi[2 * K + qi[2]];
                        a[3] += pi[3 * K + qi[3]];
                        a[4] += pi[4 * K + qi[4]];
                        a[5] += pi[5 * K + qi[5]];
                        a[6] += pi[6 * K + qi[6]];
                        a[7] += pi[7 * K + qi[7]];
                    }
                    s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                    for (; i < i1; i++) s += p[i * K + q[i]];
                    y[m * N + r] += s;
                }
            }
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++)
            for (int64_t m = 0; m < Mx; m++) y[m * N + r] *= scale[r];
    }
}
