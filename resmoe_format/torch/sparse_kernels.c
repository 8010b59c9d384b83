/* Sparse residual products on the CPU for resmoe's fused runtime (resmoe_format/torch/native.py).
 *
 * Both kernels compute y[t][r] = sum_c D[r][c] * x[t][c] for the rows r of a sparse matrix D (m, n),
 * T tokens x (float32, row stride ldx) and y (float32, row stride ldy), accumulating in float32.
 * Values are float32 (vkind 0) or bfloat16 (vkind 1, the upper half of a float32: widened exactly).
 *
 * bitmap: per row nw = ceil(n / 16) uint16 words, bit j of word w (LSB first) set when column 16w + j is
 *         stored; the row's values follow one another in column order from voff[r]. x must hold 16 nw
 *         columns per token (zeros past n).
 * csr:    uint16 column indices (n <= 65536) and values of row r at [voff[r], voff[r + 1]).
 *
 * Rows are split between nthreads OpenMP threads (torch's own OpenMP runtime when torch is loaded first:
 * the library names libgomp.so.1, which the loader then resolves to the copy already in the process).
 * Built with -march=native: the AVX-512 path needs AVX512F, BW, VL and VBMI2 (vpexpandw); any other CPU
 * runs the portable loop.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define RESMOE_AVX512 1
#else
#define RESMOE_AVX512 0
#endif

#define TB 8 /* tokens per pass over a row */

static inline float widen_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* bring a row's mask and values toward the core ahead of use: the rows are read once per product, from memory */
#define AHEAD 4
static inline void prefetch_row(const void *mask, int64_t mask_bytes, const void *vals, int64_t val_bytes) {
    for (int64_t i = 0; i < mask_bytes; i += 64) __builtin_prefetch((const char *)mask + i, 0, 0);
    for (int64_t i = 0; i < val_bytes; i += 64) __builtin_prefetch((const char *)vals + i, 0, 0);
}

/* masks may sit at any byte offset of a mapped file */
static inline uint32_t load32(const uint32_t *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    return u;
}

static inline float value_at(const void *vals, int vkind, int64_t k) {
    return vkind ? widen_bf16(((const uint16_t *)vals)[k]) : ((const float *)vals)[k];
}

int resmoe_kernels_avx512(void) { return RESMOE_AVX512; }

/* this thread's number and the threads' count inside a parallel region (0 and 1 without OpenMP) */
static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

#if RESMOE_AVX512
static inline __attribute__((always_inline)) void zero_sums(__m512 acc[TB][4], const int tb, const int U) {
    for (int t = 0; t < tb; t++)
        for (int u = 0; u < U; u++) acc[t][u] = _mm512_setzero_ps();
}

/* y[t * ldy] = the sum of token t's U accumulators */
static inline __attribute__((always_inline)) void store_sums(__m512 acc[TB][4], const int tb, const int U, float *y,
                                                             int64_t ldy) {
    for (int t = 0; t < tb; t++) {
        for (int u = 1; u < U; u++) acc[t][0] = _mm512_add_ps(acc[t][0], acc[t][u]);
        y[t * ldy] = _mm512_reduce_add_ps(acc[t][0]);
    }
}

static inline __attribute__((always_inline)) __m512 expand16(const void *vals, int vkind, int64_t q, uint16_t b) {
    /* the word's values (a masked load: never past the last one), widened, then spread to the mask's lanes by
       a register vexpandps (one uop; the memory and word forms of expand are microcoded on most cores) */
    const __mmask16 k = (__mmask16)((1u << __builtin_popcount(b)) - 1);
    __m512 v;
    if (vkind) {
        const __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)vals + q);
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
        v = _mm512_maskz_loadu_ps(k, (const float *)vals + q);
    }
    return _mm512_maskz_expand_ps((__mmask16)b, v);
}

/* tb tokens, U words per step with U independent accumulators per token (U * tb <= 16): no branch on empty
   words (an expand of an empty mask loads nothing) and no single chain of dependent FMAs */
static inline __attribute__((always_inline)) void bitmap_row_avx512(
    const uint16_t *mk, int64_t nw, const void *vals, int vkind, int64_t q, const float *x, int64_t ldx,
    float *y, int64_t ldy, const int tb, const int U) {
    __m512 acc[TB][4];
    zero_sums(acc, tb, U);
    int64_t w = 0;
    for (; w + U <= nw; w += U) {
        for (int u = 0; u < U; u++) {
            uint16_t b;
            memcpy(&b, mk + w + u, 2);
            const __m512 v = expand16(vals, vkind, q, b);
            q += __builtin_popcount(b);
            for (int t = 0; t < tb; t++)
                acc[t][u] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + t * ldx + 16 * (w + u)), acc[t][u]);
        }
    }
    for (; w < nw; w++) {
        uint16_t b;
        memcpy(&b, mk + w, 2);
        const __m512 v = expand16(vals, vkind, q, b);
        q += __builtin_popcount(b);
        for (int t = 0; t < tb; t++) acc[t][0] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + t * ldx + 16 * w), acc[t][0]);
    }
    store_sums(acc, tb, U, y, ldy);
}
#endif

static void bitmap_row(const uint16_t *mk, int64_t nw, const void *vals, int vkind, int64_t q, const float *x,
                       int64_t ldx, float *y, int64_t ldy, int tb) {
#if RESMOE_AVX512
    switch (tb) { /* constant token counts: the accumulators stay in registers */
    case 1: bitmap_row_avx512(mk, nw, vals, vkind, q, x, ldx, y, ldy, 1, 4); return;
    case 2: bitmap_row_avx512(mk, nw, vals, vkind, q, x, ldx, y, ldy, 2, 2); return;
    case 3: bitmap_row_avx512(mk, nw, vals, vkind, q, x, ldx, y, ldy, 3, 2); return;
    case 4: bitmap_row_avx512(mk, nw, vals, vkind, q, x, ldx, y, ldy, 4, 1); return;
    case 5: bitmap_row_avx512(mk, nw, vals, vkind, q, x, ldx, y, ldy, 5, 1); return;
    case 6: bitmap_row_avx512(mk, nw, vals, vkind, q, x, ldx, y, ldy, 6, 1); return;
    case 7: bitmap_row_avx512(mk, nw, vals, vkind, q, x, ldx, y, ldy, 7, 1); return;
    default: bitmap_row_avx512(mk, nw, vals, vkind, q, x, ldx, y, ldy, 8, 1); return;
    }
#else
    float acc[TB] = {0};
    for (int64_t w = 0; w < nw; w++) {
        uint16_t b16;
        memcpy(&b16, mk + w, 2);
        uint32_t b = b16;
        while (b) {
            const int j = __builtin_ctz(b);
            const float v = value_at(vals, vkind, q++);
            for (int t = 0; t < tb; t++) acc[t] += v * x[t * ldx + 16 * w + j];
            b &= b - 1;
        }
    }
    for (int t = 0; t < tb; t++) y[t * ldy] = acc[t];
#endif
}

void resmoe_bitmap_matmul(int64_t m, int64_t nw, const uint16_t *mask, const int64_t *voff, const void *vals,
                          int vkind, int64_t T, const float *x, int64_t ldx, float *y, int64_t ldy, int nthreads) {
    const int64_t vb = vkind ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < m; r++) {
        if (r + AHEAD < m)
            prefetch_row(mask + (r + AHEAD) * nw, 2 * nw, (const char *)vals + vb * voff[r + AHEAD],
                         vb * (voff[r + AHEAD + 1] - voff[r + AHEAD]));
        for (int64_t t0 = 0; t0 < T; t0 += TB) {
            const int tb = (int)(T - t0 < TB ? T - t0 : TB);
            bitmap_row(mask + r * nw, nw, vals, vkind, voff[r], x + t0 * ldx, ldx, y + t0 * ldy + r, ldy, tb);
        }
    }
}

#if RESMOE_AVX512 && defined(__AVX512BF16__)
#define RESMOE_DPBF16 1
/* bf16 values and bf16 activations: 32 columns a step, the values spread to their lanes by vpexpandw from memory
   (it reads popcount(b) values, never past the last one) and multiplied by vdpbf16ps (exact bf16 products, float32
   sums); U independent accumulators per token */
static inline __attribute__((always_inline)) void bitmap_row_dpbf16(
    const uint32_t *mk, int64_t nw, const uint16_t *vals, int64_t q, const uint16_t *x, int64_t ldx,
    float *y, int64_t ldy, const int tb, const int U) {
    __m512 acc[TB][4];
    zero_sums(acc, tb, U);
    int64_t w = 0;
    for (; w + U <= nw; w += U) {
        for (int u = 0; u < U; u++) {
            const uint32_t b = load32(mk + w + u);
            const __m512i v = _mm512_maskz_expandloadu_epi16((__mmask32)b, vals + q);
            q += __builtin_popcount(b);
            for (int t = 0; t < tb; t++)
                acc[t][u] = _mm512_dpbf16_ps(acc[t][u], (__m512bh)v,
                                             (__m512bh)_mm512_loadu_si512(x + t * ldx + 32 * (w + u)));
        }
    }
    for (; w < nw; w++) {
        const uint32_t b = load32(mk + w);
        const __m512i v = _mm512_maskz_expandloadu_epi16((__mmask32)b, vals + q);
        q += __builtin_popcount(b);
        for (int t = 0; t < tb; t++)
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)v, (__m512bh)_mm512_loadu_si512(x + t * ldx + 32 * w));
    }
    store_sums(acc, tb, U, y, ldy);
}

/* R rows at once (R independent chains of value offsets and expands: a row alone waits on each word's expand),
   tb tokens, one accumulator a row and token; y[t * ldy + i] for row i */
static inline __attribute__((always_inline)) void bitmap_rows_dpbf16(
    const uint32_t *mk, int64_t nw, const uint16_t *vals, const int64_t *voff, const uint16_t *x, int64_t ldx,
    float *y, int64_t ldy, const int tb, const int R) {
    __m512 acc[4][TB];
    int64_t q[4];
    for (int i = 0; i < R; i++) {
        q[i] = voff[i];
        for (int t = 0; t < tb; t++) acc[i][t] = _mm512_setzero_ps();
    }
    for (int64_t w = 0; w < nw; w++) {
        __m512i v[4];
        for (int i = 0; i < R; i++) {
            const uint32_t b = load32(mk + i * nw + w);
            v[i] = _mm512_maskz_expandloadu_epi16((__mmask32)b, vals + q[i]);
            q[i] += __builtin_popcount(b);
        }
        for (int t = 0; t < tb; t++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + t * ldx + 32 * w);
            for (int i = 0; i < R; i++) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], (__m512bh)v[i], xv);
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < tb; t++) y[t * ldy + i] = _mm512_reduce_add_ps(acc[i][t]);
}
#else
#define RESMOE_DPBF16 0
#endif

int resmoe_kernels_dpbf16(void) { return RESMOE_DPBF16; }

/* The bitmap product for bf16 values and bf16 activations x (row stride ldx >= 32 nw32, zeros past n): the mask
   read as nw32 = ceil(n / 32) 32-bit words a row (nw = 2 nw32 16-bit words, the second half zero past n).
   Without AVX512_BF16 the activations are widened and the float32 kernel runs. */
void resmoe_bitmap_matmul_bf16(int64_t m, int64_t nw32, const uint32_t *mask, const int64_t *voff,
                               const uint16_t *vals, int64_t T, const uint16_t *x, int64_t ldx, float *y, int64_t ldy,
                               int nthreads) {
#if RESMOE_DPBF16
    /* rows a block: several for few tokens (bitmap_rows_dpbf16), one with its own passes of tokens otherwise */
    const int R = T <= 2 ? 4 : T <= 4 ? 2 : 1;
    const int64_t blocks = (m + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t r0 = blk * R;
        for (int64_t r = r0 + AHEAD; r < r0 + AHEAD + R && r < m; r++)
            prefetch_row(mask + r * nw32, 4 * nw32, vals + voff[r], 2 * (voff[r + 1] - voff[r]));
        const uint32_t *mk = mask + r0 * nw32;
        if (R > 1 && r0 + R <= m) {
            if (T == 1) bitmap_rows_dpbf16(mk, nw32, vals, voff + r0, x, ldx, y + r0, ldy, 1, 4);
            else if (T == 2) bitmap_rows_dpbf16(mk, nw32, vals, voff + r0, x, ldx, y + r0, ldy, 2, 4);
            else if (T == 3) bitmap_rows_dpbf16(mk, nw32, vals, voff + r0, x, ldx, y + r0, ldy, 3, 2);
            else bitmap_rows_dpbf16(mk, nw32, vals, voff + r0, x, ldx, y + r0, ldy, 4, 2);
            continue;
        }
        for (int64_t r = r0; r < r0 + R && r < m; r++)
            for (int64_t t0 = 0; t0 < T; t0 += TB) {
                const int tb = (int)(T - t0 < TB ? T - t0 : TB);
                const uint32_t *mr = mask + r * nw32;
                const uint16_t *xt = x + t0 * ldx;
                float *yt = y + t0 * ldy + r;
                switch (tb) {
                /* every token count a constant: the accumulators stay in registers */
                case 1: bitmap_row_dpbf16(mr, nw32, vals, voff[r], xt, ldx, yt, ldy, 1, 4); break;
                case 2: bitmap_row_dpbf16(mr, nw32, vals, voff[r], xt, ldx, yt, ldy, 2, 2); break;
                case 3: bitmap_row_dpbf16(mr, nw32, vals, voff[r], xt, ldx, yt, ldy, 3, 2); break;
                case 4: bitmap_row_dpbf16(mr, nw32, vals, voff[r], xt, ldx, yt, ldy, 4, 1); break;
                case 5: bitmap_row_dpbf16(mr, nw32, vals, voff[r], xt, ldx, yt, ldy, 5, 1); break;
                case 6: bitmap_row_dpbf16(mr, nw32, vals, voff[r], xt, ldx, yt, ldy, 6, 1); break;
                case 7: bitmap_row_dpbf16(mr, nw32, vals, voff[r], xt, ldx, yt, ldy, 7, 1); break;
                default: bitmap_row_dpbf16(mr, nw32, vals, voff[r], xt, ldx, yt, ldy, 8, 1); break;
                }
            }
    }
#else
    (void)m; (void)nw32; (void)mask; (void)voff; (void)vals; (void)T; (void)x; (void)ldx; (void)y; (void)ldy;
    (void)nthreads;
#endif
}

#if RESMOE_AVX512
/* one CSR row against tb tokens: 16 entries a step, their activations gathered (vgatherdps) */
static inline __attribute__((always_inline)) void csr_row_avx512(const uint16_t *cols, int64_t k0, int64_t k1,
                                                                 const void *vals, int vkind, const float *x,
                                                                 int64_t ldx, float *y, int64_t ldy, const int tb) {
    __m512 acc[TB];
    for (int t = 0; t < tb; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 km = (__mmask16)(k1 - k >= 16 ? 0xFFFFu : (1u << (k1 - k)) - 1);
        const __m512i idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(km, cols + k));
        const __m512 v = vkind ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                     _mm256_maskz_loadu_epi16(km, (const uint16_t *)vals + k)), 16))
                               : _mm512_maskz_loadu_ps(km, (const float *)vals + k);
        for (int t = 0; t < tb; t++)
            acc[t] = _mm512_fmadd_ps(v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), km, idx, x + t * ldx, 4), acc[t]);
    }
    for (int t = 0; t < tb; t++) y[t * ldy] = _mm512_reduce_add_ps(acc[t]);
}
#endif

void resmoe_csr_matmul(int64_t m, const uint16_t *cols, const int64_t *voff, const void *vals, int vkind,
                       int64_t T, const float *x, int64_t ldx, float *y, int64_t ldy, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < m; r++) {
        for (int64_t t0 = 0; t0 < T; t0 += TB) {
            const int tb = (int)(T - t0 < TB ? T - t0 : TB);
#if RESMOE_AVX512
            const float *xt = x + t0 * ldx;
            float *yt = y + t0 * ldy + r;
#define CSR_ROW(k) csr_row_avx512(cols, voff[r], voff[r + 1], vals, vkind, xt, ldx, yt, ldy, k)
            switch (tb) {
            case 1: CSR_ROW(1); break;
            case 2: CSR_ROW(2); break;
            case 3: CSR_ROW(3); break;
            case 4: CSR_ROW(4); break;
            case 5: CSR_ROW(5); break;
            case 6: CSR_ROW(6); break;
            case 7: CSR_ROW(7); break;
            default: CSR_ROW(8); break;
            }
#undef CSR_ROW
            continue;
#endif
            float acc[TB] = {0};
            for (int64_t k = voff[r]; k < voff[r + 1]; k++) {
                const float v = value_at(vals, vkind, k);
                const float *xc = x + t0 * ldx + cols[k];
                for (int t = 0; t < tb; t++) acc[t] += v * xc[t * ldx];
            }
            for (int t = 0; t < tb; t++) y[(t0 + t) * ldy + r] = acc[t];
        }
    }
}

/* y[t][c] = sum_r x[t][r] * D[r][c]: the product by a bitmap matrix D (m, n) held by rows (as a file stores an
   output matrix's residual), without transposing it. The nw32 32-column words of a row are split between the
   threads; a thread finds its first value of each row by counting the bits before its words. y (row stride
   ldy >= 32 nw32) must be zero on entry. */
void resmoe_bitmap_rmatmul(int64_t m, int64_t nw32, const uint32_t *mask, const int64_t *voff, const void *vals,
                           int vkind, int64_t T, const float *x, int64_t ldx, float *y, int64_t ldy, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        const int nt = thread_count(), id = thread_id();
        const int64_t w0 = nw32 * id / nt, w1 = nw32 * (id + 1) / nt;
        const int64_t vb = vkind ? 2 : 4;
        for (int64_t r = 0; r < m; r++) {
            if (r + AHEAD < m)
                prefetch_row(mask + (r + AHEAD) * nw32 + w0, 4 * (w1 - w0), (const char *)vals + vb * voff[r + AHEAD],
                             vb * (voff[r + AHEAD + 1] - voff[r + AHEAD]));
            const uint32_t *mk = mask + r * nw32;
            int64_t q = voff[r];
            for (int64_t w = 0; w < w0; w++) q += __builtin_popcount(load32(mk + w));
            for (int64_t w = w0; w < w1; w++) {
                const uint32_t b = load32(mk + w);
                if (!b) continue;
#if RESMOE_AVX512
                const __m512 lo = expand16(vals, vkind, q, (uint16_t)b);
                q += __builtin_popcount(b & 0xFFFFu);
                const __m512 hi = expand16(vals, vkind, q, (uint16_t)(b >> 16));
                q += __builtin_popcount(b >> 16);
                for (int64_t t = 0; t < T; t++) {
                    const __m512 xr = _mm512_set1_ps(x[t * ldx + r]);
                    float *yt = y + t * ldy + 32 * w;
                    _mm512_storeu_ps(yt, _mm512_fmadd_ps(xr, lo, _mm512_loadu_ps(yt)));
                    _mm512_storeu_ps(yt + 16, _mm512_fmadd_ps(xr, hi, _mm512_loadu_ps(yt + 16)));
                }
#else
                uint32_t bb = b;
                while (bb) {
                    const int j = __builtin_ctz(bb);
                    const float v = value_at(vals, vkind, q++);
                    for (int64_t t = 0; t < T; t++) y[t * ldy + 32 * w + j] += x[t * ldx + r] * v;
                    bb &= bb - 1;
                }
#endif
            }
        }
    }
}

/* y[t][c] = sum_r x[t][r] D[r][c] for a bitmap of bf16 values and bf16 activations x (T, m; row stride ldx), y (T,
   32 nw32; row stride ldy), every element written. Rows in blocks of four, two pairs (four independent chains of
   value offsets and expands): each 32-column word's values of a pair's rows spread to their lanes (vpexpandw),
   interleaved (vpunpcklwd / vpunpckhwd) and multiplied by the pair (x[t][r], x[t][r+1]) in one vdpbf16ps (exact
   products, float32 sums), summed in each thread's share of a scratch in the interleave's column order (lo: 8l +
   0..3, hi: 8l + 4..7 of each 32 columns), which is put back in order once, at the end. The threads take runs of
   blocks. Returns 0 (computing nothing) without AVX512-BF16, for more than TB tokens (many tokens' products expand
   the bitmap instead) or when the scratch cannot be had. */
int resmoe_bitmap_rmatmul_bf16(int64_t m, int64_t nw32, const uint32_t *mask, const int64_t *voff,
                               const uint16_t *vals, int64_t T, const uint16_t *x, int64_t ldx, float *y, int64_t ldy,
                               int nthreads) {
#if RESMOE_DPBF16
    if (T > TB) return 0;
    const int nt = nthreads > 1 ? nthreads : 1;
    const int64_t width = 32 * nw32, blocks = (m + 3) / 4;
    float *part = calloc((size_t)(nt * T * width), sizeof(float));
    if (!part) return 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int id = thread_id(), n_th = thread_count();
        float *acc = part + (int64_t)id * T * width;
        const int64_t p0 = blocks * id / n_th, p1 = blocks * (id + 1) / n_th;
        for (int64_t p = p0; p < p1; p++) { /* rows r ... r + 3 (those past m: no values) */
            const int64_t r = 4 * p;
            for (int64_t f = r + AHEAD; f < r + AHEAD + 4 && f < m; f++)
                prefetch_row(mask + f * nw32, 4 * nw32, vals + voff[f], 2 * (voff[f + 1] - voff[f]));
            int64_t q[4];
            for (int i = 0; i < 4; i++) q[i] = r + i < m ? voff[r + i] : 0;
            __m512bh x01[TB], x23[TB]; /* each token's activations of the two pairs, for every word */
            for (int64_t t = 0; t < T; t++) {
                uint32_t xr[4];
                for (int i = 0; i < 4; i++) xr[i] = r + i < m ? x[t * ldx + r + i] : 0;
                x01[t] = (__m512bh)_mm512_set1_epi32((int)(xr[0] | xr[1] << 16));
                x23[t] = (__m512bh)_mm512_set1_epi32((int)(xr[2] | xr[3] << 16));
            }
            for (int64_t w = 0; w < nw32; w++) {
                uint32_t b[4];
                __m512i v[4];
                for (int i = 0; i < 4; i++) {
                    b[i] = r + i < m ? load32(mask + (r + i) * nw32 + w) : 0;
                    v[i] = _mm512_maskz_expandloadu_epi16((__mmask32)b[i], vals + q[i]);
                    q[i] += __builtin_popcount(b[i]);
                }
                if (!(b[0] | b[1] | b[2] | b[3])) continue;
                const __m512i lo01 = _mm512_unpacklo_epi16(v[0], v[1]), hi01 = _mm512_unpackhi_epi16(v[0], v[1]);
                const __m512i lo23 = _mm512_unpacklo_epi16(v[2], v[3]), hi23 = _mm512_unpackhi_epi16(v[2], v[3]);
                for (int64_t t = 0; t < T; t++) {
                    float *a = acc + t * width + 32 * w;
                    _mm512_storeu_ps(a, _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_loadu_ps(a), (__m512bh)lo01, x01[t]),
                                                         (__m512bh)lo23, x23[t]));
                    _mm512_storeu_ps(a + 16, _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_loadu_ps(a + 16),
                                                                               (__m512bh)hi01, x01[t]),
                                                              (__m512bh)hi23, x23[t]));
                }
            }
        }
    }
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t t = 0; t < T; t++)
        for (int64_t w = 0; w < nw32; w++) {
            __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
            for (int i = 0; i < nt; i++) {
                const float *a = part + ((int64_t)i * T + t) * width + 32 * w;
                lo = _mm512_add_ps(lo, _mm512_loadu_ps(a));
                hi = _mm512_add_ps(hi, _mm512_loadu_ps(a + 16));
            }
            _mm512_storeu_ps(y + t * ldy + 32 * w, _mm512_permutex2var_ps(lo, first, hi));
            _mm512_storeu_ps(y + t * ldy + 32 * w + 16, _mm512_permutex2var_ps(lo, second, hi));
        }
    free(part);
    return 1;
#else
    (void)m; (void)nw32; (void)mask; (void)voff; (void)vals; (void)T; (void)x; (void)ldx; (void)y; (void)ldy;
    (void)nthreads;
    return 0;
#endif
}

/* y[t][r] = sum_c W[r][c] * x[t][c] for a dense bf16 matrix W (m, n; row stride ldw) and bf16 activations: the
   barycenter's products at small token counts, where one pass over W's bytes (vdpbf16ps: 32 products an
   instruction, float32 sums) is what the product costs. Returns 0 (computing nothing) without AVX512-BF16. */
#if RESMOE_DPBF16
/* one row of W against tb tokens (a constant after inlining: the accumulators stay in registers) */
static inline __attribute__((always_inline)) void dense_row_dpbf16(const uint16_t *wr, int64_t full, int64_t tail,
                                                                   const uint16_t *x, int64_t ldx, float *y,
                                                                   int64_t ldy, const int tb) {
    const __mmask32 kt = tail ? (__mmask32)((1u << tail) - 1) : 0;
    __m512 acc[TB][4];
    zero_sums(acc, tb, 2);
    int64_t w = 0;
    for (; w + 2 <= full; w += 2) {
        const __m512i a = _mm512_loadu_si512(wr + 32 * w), b = _mm512_loadu_si512(wr + 32 * w + 32);
        for (int t = 0; t < tb; t++) {
            const uint16_t *xt = x + t * ldx + 32 * w;
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)a, (__m512bh)_mm512_loadu_si512(xt));
            acc[t][1] = _mm512_dpbf16_ps(acc[t][1], (__m512bh)b, (__m512bh)_mm512_loadu_si512(xt + 32));
        }
    }
    for (; w < full; w++) {
        const __m512i a = _mm512_loadu_si512(wr + 32 * w);
        for (int t = 0; t < tb; t++)
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)a, (__m512bh)_mm512_loadu_si512(x + t * ldx + 32 * w));
    }
    if (tail) {
        const __m512i a = _mm512_maskz_loadu_epi16(kt, wr + 32 * full);
        for (int t = 0; t < tb; t++)
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)a,
                                         (__m512bh)_mm512_maskz_loadu_epi16(kt, x + t * ldx + 32 * full));
    }
    store_sums(acc, tb, 2, y, ldy);
}
#endif

/* y[t][r] = sum_c W[r][c] * x[t][c] for a dense bf16 matrix W (m, n; row stride ldw) and bf16 activations: the
   barycenter's products at small token counts, where one pass over W's bytes (vdpbf16ps: 32 products an
   instruction, float32 sums) is what the product costs. Returns 0 (computing nothing) without AVX512-BF16. */
int resmoe_dense_bf16_matmul(int64_t m, int64_t n, const uint16_t *W, int64_t ldw, int64_t T, const uint16_t *x,
                             int64_t ldx, float *y, int64_t ldy, int nthreads) {
#if RESMOE_DPBF16
    const int64_t full = n / 32, tail = n % 32;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < m; r++) {
        const uint16_t *wr = W + r * ldw;
        if (r + 1 < m) __builtin_prefetch(W + (r + 1) * ldw, 0, 0);
        for (int64_t t0 = 0; t0 < T; t0 += TB) {
            const int tb = (int)(T - t0 < TB ? T - t0 : TB);
            const uint16_t *xt = x + t0 * ldx;
            float *yt = y + t0 * ldy + r;
            switch (tb) {
            case 1: dense_row_dpbf16(wr, full, tail, xt, ldx, yt, ldy, 1); break;
            case 2: dense_row_dpbf16(wr, full, tail, xt, ldx, yt, ldy, 2); break;
            case 3: dense_row_dpbf16(wr, full, tail, xt, ldx, yt, ldy, 3); break;
            case 4: dense_row_dpbf16(wr, full, tail, xt, ldx, yt, ldy, 4); break;
            case 5: dense_row_dpbf16(wr, full, tail, xt, ldx, yt, ldy, 5); break;
            case 6: dense_row_dpbf16(wr, full, tail, xt, ldx, yt, ldy, 6); break;
            case 7: dense_row_dpbf16(wr, full, tail, xt, ldx, yt, ldy, 7); break;
            default: dense_row_dpbf16(wr, full, tail, xt, ldx, yt, ldy, 8); break;
            }
        }
    }
    return 1;
#else
    (void)m; (void)n; (void)W; (void)ldw; (void)T; (void)x; (void)ldx; (void)y; (void)ldy; (void)nthreads;
    return 0;
#endif
}

/* out[r][c] = D[r][c] for a bitmap matrix D (m, n) of 2- or 4-byte values (vb): the dense matrix that many tokens'
   products (a prefill) multiply by faster, with a blocked GEMM, than they read the bitmap row by row. out (row
   stride ldo, ldo >= n) must be zero on entry. */
void resmoe_bitmap_densify(int64_t m, int64_t nw32, const uint32_t *mask, const int64_t *voff, const void *vals,
                           int vb, void *out, int64_t ldo, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < m; r++) {
        int64_t q = voff[r];
        for (int64_t w = 0; w < nw32; w++) {
            uint32_t b = load32(mask + r * nw32 + w);
            while (b) {
                const int64_t c = 32 * w + __builtin_ctz(b);
                if (vb == 2)
                    ((uint16_t *)out)[r * ldo + c] = ((const uint16_t *)vals)[q++];
                else
                    ((float *)out)[r * ldo + c] = ((const float *)vals)[q++];
                b &= b - 1;
            }
        }
    }
}
