/* Products with k-quant matrices (spec 5.10) on the CPU, for resmoe's fused runtime (resmoe_format/torch/native.py).
 *
 * A matrix W (m, n) is one k-quant value part of m * n values in row-major order: codes of `bits` bits
 * (2 ... 8, LSB-first bit stream; bits 0 means ternary, five base-3 digits a byte), groups of 64 values with
 * their scale and offset codes unpacked to one byte each (pairs[2 g] = sc_g, pairs[2 g + 1] = mc_g) and
 * float16 super-block scales (supers[2 s] = d_s, supers[2 s + 1] = m_s) for `sup` groups a super-block.
 * n must be a multiple of 64, so that every row holds whole groups.
 *
 * Every weight is decoded exactly as spec 5.10 says: a = fp32(d) * sc, b = fp32(m) * mc (both exact), then
 * v = RNE32(RNE32(q * a) - b): a multiplication and a subtraction, or for levels q < 32 one fused multiply-subtract,
 * which gives the same bits because q * a is exact there (KQ_LEVELS); with rnd 1 v is then rounded to bfloat16,
 * RNE, and widened back (rnd 0: not rounded). Products and sums are float32 (their order differs from torch's,
 * spec 6.7).
 *
 *   resmoe_kq_matmul:  y[t][r] = sum_c W[r][c] * x[t][c]   (x @ W.T: rows of W split between threads)
 *   resmoe_kq_rmatmul: y[t][c] = sum_r h[t][r] * W[r][c]   (h @ W:   column groups split between threads)
 *   the _bf16 entry points: the same for bf16 activations: vdpbf16ps multiplies the codes as bf16 numbers and
 *   each group's a and b follow in float32, the weights exact (kq_levels_bf16; h @ W rounds each h[r] a to bf16
 *   once, kq_scale_rows); with rnd 1 a table of each group's weights rounded to bf16
 *   resmoe_kq_dequantize: every value of a matrix (products with many tokens)
 *
 * The AVX-512 path (F, BW, VBMI: vpermb and vpmultishiftqb cut 64 codes out of their bytes in two
 * instructions; for the bf16 path vpermb and vpsrlvw cut them into 16-bit words, faster on AMD Zen 4) needs
 * -march=native on such a CPU; any other CPU runs the portable loop.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define KQ_AVX512 1
#else
#define KQ_AVX512 0
#endif

#if KQ_AVX512 && defined(__AVX512BF16__)
#define KQ_DPBF16 1
#else
#define KQ_DPBF16 0
#endif

#define KQ_GROUP 64
#define KQ_TB 8 /* tokens per pass */
/* tokens a pass and column groups a block of the h @ W product (registers: KQ_RB KQ_NB 4 accumulators) */
#define KQ_RB 4
#define KQ_NB 4

/* CALL(k) with k = tb (1 ... KQ_TB) a constant, so that a row's accumulators stay in registers */
#define KQ_BY_TOKENS(tb, CALL)                                                                                       \
    switch (tb) {                                                                                                    \
    case 1: CALL(1); break;                                                                                          \
    case 2: CALL(2); break;                                                                                          \
    case 3: CALL(3); break;                                                                                          \
    case 4: CALL(4); break;                                                                                          \
    case 5: CALL(5); break;                                                                                          \
    case 6: CALL(6); break;                                                                                          \
    case 7: CALL(7); break;                                                                                          \
    default: CALL(8); break;                                                                                         \
    }

/* the products' loop: rows r split between the threads, tokens in passes of up to KQ_TB, with g0 the row's first
   group, tb the pass's tokens, xt (of type XT) and yt its activations and outputs; the body is the arguments */
#define KQ_ROWS(XT, ...)                                                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)")                             \
    for (int64_t r = 0; r < m; r++) {                                                                                \
        const int64_t g0 = r * groups;                                                                               \
        for (int64_t t0 = 0; t0 < T; t0 += KQ_TB) {                                                                  \
            const int tb = (int)(T - t0 < KQ_TB ? T - t0 : KQ_TB);                                                   \
            const XT *xt = x + t0 * ldx;                                                                             \
            float *yt = y + t0 * ldy + r;                                                                            \
            __VA_ARGS__                                                                                              \
        }                                                                                                            \
    }

int resmoe_kq_avx512(void) { return KQ_AVX512; }

static inline float kq_bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t kq_float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* IEEE binary16 -> binary32, exact (subnormals included; the loader rejects infinities and NaN) */
static inline float kq_half(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#endif
    const uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, f = h & 0x3ffu;
    if (e == 0) {
        const float v = (float)f * (1.0f / 16777216.0f); /* f * 2^-24: exact */
        return s ? -v : v;
    }
    return kq_bits_to_float(s | ((e + 112u) << 23) | (f << 13));
}

/* the RNE rounding of a finite binary32 to bfloat16 (rnd 1), widened back to binary32 */
static inline float kq_round(float v, int rnd) {
    if (rnd == 1) {
        const uint32_t u = kq_float_bits(v);
        return kq_bits_to_float((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
    }
    return v;
}

/* the group's scale a and offset b (spec 5.10: both exact in binary32) */
static inline void kq_affine(const uint8_t *pairs, const uint16_t *supers, int sup, int64_t g, float *a, float *b) {
    const int64_t s = g / sup;
    *a = kq_half(supers[2 * s]) * (float)pairs[2 * g];
    *b = kq_half(supers[2 * s + 1]) * (float)pairs[2 * g + 1];
}

#if !KQ_AVX512
/* byte value -> its five base-3 digits, least significant first, in the low five bytes */
static uint64_t kq_ternary_digits[243];

static void kq_ternary_table(void) {
    for (unsigned v = 0; v < 243; v++) {
        uint64_t d = 0;
        for (unsigned j = 0, x = v; j < 5; j++, x /= 3) d |= (uint64_t)(x % 3) << (8 * j);
        kq_ternary_digits[v] = d;
    }
}

/* the 64 codes of group g, one byte each (portable: a 16-bit window per code, or the base-3 digits of the group's
   bytes by table; the loader has checked every ternary byte is at most 242) */
static void kq_codes_scalar(const uint8_t *codes, int bits, int64_t g, uint8_t *out) {
    if (bits == 0) {
        const int64_t first = KQ_GROUP * g, k0 = first / 5, k1 = (first + KQ_GROUP - 1) / 5;
        uint8_t digits[5 * 14 + 8];
        for (int64_t k = k0; k <= k1; k++) {
            const uint64_t d = kq_ternary_digits[codes[k]];
            memcpy(digits + 5 * (k - k0), &d, 8); /* the 3 bytes past the digits are overwritten next */
        }
        memcpy(out, digits + first % 5, KQ_GROUP);
        return;
    }
    const uint8_t *p = codes + (int64_t)bits * 8 * g; /* 64 codes of b bits: 8 b bytes, starting on a byte */
    const unsigned mask = (1u << bits) - 1;
    for (int i = 0; i < KQ_GROUP; i++) {
        const int bit = i * bits, byte = bit >> 3, sh = bit & 7;
        unsigned w = p[byte];
        if (sh + bits > 8) w |= (unsigned)p[byte + 1] << 8; /* still inside the group's 8 b bytes */
        out[i] = (uint8_t)((w >> sh) & mask);
    }
}

static void kq_weights_scalar(const uint8_t *codes, int bits, const uint8_t *pairs, const uint16_t *supers, int sup,
                              int rnd, int64_t g, float *w) {
    uint8_t q[KQ_GROUP];
    float a, b;
    kq_codes_scalar(codes, bits, g, q);
    kq_affine(pairs, supers, sup, g, &a, &b);
    for (int i = 0; i < KQ_GROUP; i++) {
        volatile float qa = (float)q[i] * a; /* its own rounding: never contracted into a fused multiply-add */
        w[i] = kq_round(qa - b, rnd);
    }
}

static void kq_row_scalar(const uint8_t *codes, int bits, const uint8_t *pairs, const uint16_t *supers, int sup,
                          int rnd, int64_t g0, int64_t groups, const float *x, int64_t ldx, float *y, int64_t ldy,
                          int tb) {
    float acc[KQ_TB] = {0};
    for (int64_t j = 0; j < groups; j++) {
        float w[KQ_GROUP];
        kq_weights_scalar(codes, bits, pairs, supers, sup, rnd, g0 + j, w);
        for (int t = 0; t < tb; t++) {
            const float *xr = x + t * ldx + KQ_GROUP * j;
            float s = 0.0f;
            for (int i = 0; i < KQ_GROUP; i++) s += w[i] * xr[i];
            acc[t] += s;
        }
    }
    for (int t = 0; t < tb; t++) y[t * ldy] = acc[t];
}
#endif /* !KQ_AVX512 */

#if KQ_AVX512
typedef struct {
    __m512i perm, shifts, mask;
    __mmask64 load;
    int bits;
    /* ternary, by the group's first digit (64 g mod 5) and half (codes 0-31, 32-63): for each 16-bit lane the
       byte holding its code, the multiplier whose high product word is byte / 3^digit, and the lanes of digit 0 */
    __m512i tperm[5][2], tmul[5][2];
    __mmask32 tdigit0[5][2];
    /* codes as 16-bit words (the bf16 path), per half of the group: the two bytes holding each code to its word
       (vpermb), the code's bit offset in them (vpsrlvw) */
    __m512i wperm[2], wshifts[2];
    __m512i ltab[2]; /* bf16 of level i mod 2^bits (i < 32), and of 32 + i (6-bit codes) */
} kq_unpacker;

static inline kq_unpacker kq_unpacker_for(int bits) {
    kq_unpacker u;
    uint8_t perm[64], shifts[64];
    u.bits = bits;
    if (bits == 0) bits = 8; /* ternary: decoded by the portable loop, the vectors unused */
    for (int lane = 0; lane < 8; lane++)
        for (int j = 0; j < 8; j++) {
            const int src = lane * bits + j; /* codes 8 lane ... 8 lane + 7 start at byte lane * bits */
            perm[8 * lane + j] = (uint8_t)(src < 64 ? src : 63);
            shifts[8 * lane + j] = (uint8_t)(j * bits);
        }
    if (u.bits == 0) {
        static const uint16_t mul[5] = {0, 21846, 7282, 2428, 810}; /* ceil(2^16 / 3^j): exact for bytes <= 242 */
        for (int d0 = 0; d0 < 5; d0++)
            for (int half = 0; half < 2; half++) {
                uint8_t tp[64];
                uint16_t tm[32];
                __mmask32 z = 0;
                for (int i = 0; i < 32; i++) {
                    const int c = d0 + 32 * half + i;
                    tp[2 * i] = (uint8_t)(c / 5);
                    tp[2 * i + 1] = 0;
                    tm[i] = mul[c % 5];
                    if (c % 5 == 0) z |= (__mmask32)1 << i;
                }
                u.tperm[d0][half] = _mm512_loadu_si512(tp);
                u.tmul[d0][half] = _mm512_loadu_si512(tm);
                u.tdigit0[d0][half] = z;
            }
    }
    for (int half = 0; half < 2; half++) {
        uint8_t wp[64];
        uint16_t ws[32];
        for (int i = 0; i < 32; i++) {
            const int bit = (32 * half + i) * bits; /* code 32 half + i: bits%8 + bits <= 16, inside two bytes */
            wp[2 * i] = (uint8_t)(bit / 8 < 64 ? bit / 8 : 63);
            wp[2 * i + 1] = (uint8_t)(bit / 8 + 1 < 64 ? bit / 8 + 1 : 63);
            ws[i] = (uint16_t)(bit % 8);
        }
        u.wperm[half] = _mm512_loadu_si512(wp);
        u.wshifts[half] = _mm512_loadu_si512(ws);
    }
    for (int half = 0; half < 2; half++) {
        uint16_t lt[32];
        for (int i = 0; i < 32; i++) {
            const int level = u.bits == 0 || bits >= 6 ? 32 * half + i : i % (1 << bits);
            lt[i] = (uint16_t)(kq_float_bits((float)level) >> 16);
        }
        u.ltab[half] = _mm512_loadu_si512(lt);
    }
    u.perm = _mm512_loadu_si512(perm);
    u.shifts = _mm512_loadu_si512(shifts);
    u.mask = _mm512_set1_epi8((char)((1u << bits) - 1));
    u.load = bits == 8 ? ~(__mmask64)0 : (((__mmask64)1 << (8 * bits)) - 1);
    return u;
}

static inline __m512i kq_codes64(const uint8_t *codes, const kq_unpacker *u, int64_t g) {
    if (u->bits == 0) {
        const int64_t first = KQ_GROUP * g, k0 = first / 5, nb = (first + KQ_GROUP - 1) / 5 - k0 + 1;
        const int d0 = (int)(first % 5);
        const __m512i raw = _mm512_maskz_loadu_epi8((((__mmask64)1) << nb) - 1, codes + k0);
        __m256i half[2];
        for (int h = 0; h < 2; h++) {
            /* each 16-bit lane: its code's byte b, then x = b / 3^digit (b itself for digit 0), then x mod 3 */
            const __m512i b = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, u->tperm[d0][h], raw);
            const __m512i x = _mm512_mask_mov_epi16(_mm512_mulhi_epu16(b, u->tmul[d0][h]), u->tdigit0[d0][h], b);
            const __m512i q = _mm512_mulhi_epu16(x, _mm512_set1_epi16(21846));
            half[h] = _mm512_cvtepi16_epi8(_mm512_sub_epi16(x, _mm512_mullo_epi16(q, _mm512_set1_epi16(3))));
        }
        return _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);
    }
    const __m512i raw = _mm512_maskz_loadu_epi8(u->load, codes + (int64_t)u->bits * 8 * g);
    /* qword lane i holds the bytes of codes 8i ... 8i + 7; each output byte takes its code's bits from there */
    const __m512i lanes = _mm512_permutexvar_epi8(u->perm, raw);
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(u->shifts, lanes), u->mask);
}

static inline __m512 kq_round16(__m512 v, int rnd) {
    if (rnd == 1) {
        const __m512i x = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
        return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
    }
    return v;
}

/* q a - b for levels q < 32 as spec 5.10 computes it, RNE32(RNE32(q a) - b), in one fused multiply-subtract: a has
   at most 11 + 8 significant bits (5.10), so q a (at most 24) is exact and its own rounding changes nothing */
#define KQ_LEVELS(q, va, vb) _mm512_fmsub_ps((q), (va), (vb))

/* the group's 64 weights as four vectors of 16 */
static inline __attribute__((always_inline)) void kq_weights64(const uint8_t *codes, const kq_unpacker *u,
                                                               const uint8_t *pairs, const uint16_t *supers, int sup,
                                                               int rnd, int64_t g, __m512 w[4]) {
    const __m512i q = kq_codes64(codes, u, g);
    float a, b;
    kq_affine(pairs, supers, sup, g, &a, &b);
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    if (u->bits <= 5) { /* ternary, q2 ... q5: the levels' weights in one or two registers, looked up by code */
        const __m512 i0 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 lo = kq_round16(KQ_LEVELS(i0, va, vb), rnd);
        const __m512 hi = u->bits == 5 ? kq_round16(KQ_LEVELS(_mm512_add_ps(i0, _mm512_set1_ps(16)), va, vb), rnd) : lo;
        for (int k = 0; k < 4; k++)
            w[k] = _mm512_permutex2var_ps(lo, _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, k)), hi);
        return;
    }
    for (int k = 0; k < 4; k++) {
        const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, k)));
        w[k] = kq_round16(_mm512_sub_ps(_mm512_mul_ps(qf, va), vb), rnd);
    }
}

/* one row against tb tokens (a constant after inlining: the accumulators stay in registers) */
static inline __attribute__((always_inline)) void kq_row(const uint8_t *codes, const kq_unpacker *u,
                                                         const uint8_t *pairs, const uint16_t *supers, int sup,
                                                         int rnd, int64_t g0, int64_t groups, const float *x,
                                                         int64_t ldx, float *y, int64_t ldy, const int tb) {
    __m512 acc[KQ_TB][2];
    for (int t = 0; t < tb; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int64_t j = 0; j < groups; j++) {
        __m512 w[4];
        kq_weights64(codes, u, pairs, supers, sup, rnd, g0 + j, w);
        for (int t = 0; t < tb; t++) {
            const float *xt = x + t * ldx + KQ_GROUP * j;
            acc[t][0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xt), acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xt + 16), acc[t][1]);
            acc[t][0] = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(xt + 32), acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(xt + 48), acc[t][1]);
        }
    }
    for (int t = 0; t < tb; t++) y[t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}
#endif

#if KQ_AVX512
/* a block's sums for rows from r0 into y: stored for the first rows (r0 0), added to what earlier rows left after */
static inline void kq_add_sums(float *y, __m512 v, int64_t r0) {
    _mm512_storeu_ps(y, r0 == 0 ? v : _mm512_add_ps(_mm512_loadu_ps(y), v));
}
#endif

#if KQ_DPBF16
/* the group's codes as two vectors of 32 16-bit words (codes 0-31, 32-63); bits above a code's in its word are
   not cleared (kq_levels_bf16's table ignores them) */
static inline __attribute__((always_inline)) void kq_codes_words(const uint8_t *codes, const kq_unpacker *u,
                                                                 int64_t g, __m512i q[2], const int tern) {
    if (tern) {
        const int64_t first = KQ_GROUP * g, k0 = first / 5, nb = (first + KQ_GROUP - 1) / 5 - k0 + 1;
        const int d0 = (int)(first % 5);
        const __m512i raw = _mm512_maskz_loadu_epi8((((__mmask64)1) << nb) - 1, codes + k0);
        for (int h = 0; h < 2; h++) {
            const __m512i b = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, u->tperm[d0][h], raw);
            const __m512i x = _mm512_mask_mov_epi16(_mm512_mulhi_epu16(b, u->tmul[d0][h]), u->tdigit0[d0][h], b);
            const __m512i t = _mm512_mulhi_epu16(x, _mm512_set1_epi16(21846));
            q[h] = _mm512_sub_epi16(x, _mm512_mullo_epi16(t, _mm512_set1_epi16(3)));
        }
        return;
    }
    const __m512i raw = _mm512_maskz_loadu_epi8(u->load, codes + (int64_t)u->bits * 8 * g);
    for (int h = 0; h < 2; h++) q[h] = _mm512_srlv_epi16(_mm512_permutexvar_epi8(u->wperm[h], raw), u->wshifts[h]);
}

/* the bf16 activations' path (spec 6.7) multiplies by the codes themselves: W[r][c] = q a - b with the group's
   a and b (kq_affine16), so x . W_group = a (x . q) - b (sum of x). The group's codes become the bf16 numbers q
   (exact: q < 256) by a constant table (vpermw reads bits 0-4 of each word, vpermt2w 0-5, so the bits above a code
   of 2 to 4 bits select periodic entries), then vdpbf16ps multiplies them: every weight exact, no table a group. */
static inline __attribute__((always_inline)) void kq_levels_bf16(const uint8_t *codes, const kq_unpacker *u,
                                                                 const uint8_t *pairs, const uint16_t *supers, int sup,
                                                                 int64_t g, __m512i w[2], const int tern,
                                                                 const int rnd) {
    kq_codes_words(codes, u, g, w, tern);
    __m512i lo = u->ltab[0], hi = u->ltab[1];
    if (rnd) { /* the weights themselves, rounded to bf16: a table of the group's levels RNE32(q a - b) (KQ_LEVELS) */
        float a, b;
        kq_affine(pairs, supers, sup, g, &a, &b);
        const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
        const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 l0 = _mm512_cvtepi32_ps(_mm512_and_si512(i0, _mm512_set1_epi32(tern ? 15 : (1 << u->bits) - 1)));
        const __m512 l16 = _mm512_add_ps(l0, _mm512_set1_ps(u->bits >= 5 ? 16.0f : 0.0f));
        lo = (__m512i)_mm512_cvtne2ps_pbh(KQ_LEVELS(l16, va, vb), KQ_LEVELS(l0, va, vb));
        if (!tern && u->bits == 6) {
            const __m512 l32 = _mm512_add_ps(l0, _mm512_set1_ps(32)), l48 = _mm512_add_ps(l0, _mm512_set1_ps(48));
            hi = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(_mm512_mul_ps(l48, va), vb),
                                              _mm512_sub_ps(_mm512_mul_ps(l32, va), vb));
        }
    }
    if (!tern && u->bits == 6) {
        w[0] = _mm512_permutex2var_epi16(lo, w[0], hi);
        w[1] = _mm512_permutex2var_epi16(lo, w[1], hi);
    } else {
        w[0] = _mm512_permutexvar_epi16(w[0], lo);
        w[1] = _mm512_permutexvar_epi16(w[1], lo);
    }
}

/* the scales a and offsets b (spec 5.10: both exact in binary32) of the `count` (1 ... 16) groups from g, one a
   lane; the lanes past count are 0 */
static inline void kq_affine16(const uint8_t *pairs, const uint16_t *supers, int sup, int64_t g, int count,
                               __m512 *va, __m512 *vb) {
    const __mmask16 k = (__mmask16)((1u << count) - 1);
    const __m512i p = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, pairs + 2 * g)); /* sc | mc << 8 */
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_and_si512(p, _mm512_set1_epi32(0xff)));
    const __m512 mc = _mm512_cvtepi32_ps(_mm512_srli_epi32(p, 8));
    /* lane i's super-block: g / sup + (g % sup + i) / sup (the float quotient of small integers truncates right) */
    const int64_t s0 = g / sup;
    const __m512 lane = _mm512_add_ps(_mm512_set1_ps((float)(g % sup)),
                                      _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i s = _mm512_cvttps_epi32(_mm512_div_ps(lane, _mm512_set1_ps((float)sup)));
    const __m512i dm = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, s, (const int *)(supers + 2 * s0), 4);
    *va = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm)), sc);
    *vb = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16))), mc);
}

/* sx[t][j] = the sum of token t's activations in column group j (float32), for the groups' offset terms */
static void kq_group_sums(int64_t T, int64_t groups, const uint16_t *x, int64_t ldx, float *sx) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < groups; j++) {
            const uint16_t *xg = x + t * ldx + KQ_GROUP * j;
            __m512 s = _mm512_setzero_ps();
            for (int k = 0; k < KQ_GROUP; k += 16)
                s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(
                                         _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xg + k))), 16)));
            sx[t * groups + j] = _mm512_reduce_add_ps(s);
        }
}

/* one row against tb bf16 tokens: per group, vdpbf16ps of the levels with the activations, times a; the offsets'
   share b sx once per 16 groups */
static inline __attribute__((always_inline)) void kq_row_bf16(const uint8_t *codes, const kq_unpacker *u,
                                                              const uint8_t *pairs, const uint16_t *supers, int sup,
                                                              int64_t g0, int64_t groups, const uint16_t *x,
                                                              int64_t ldx, const float *sx, float *y, int64_t ldy,
                                                              const int tb, const int tern, const int rnd) {
    __m512 acc[KQ_TB], off[KQ_TB];
    for (int t = 0; t < tb; t++) acc[t] = off[t] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < groups; j0 += 16) {
        const int count = (int)(groups - j0 < 16 ? groups - j0 : 16);
        __m512 va, vb;
        float a[16];
        kq_affine16(pairs, supers, sup, g0 + j0, count, &va, &vb);
        if (rnd) { /* the levels are the rounded weights */
            va = _mm512_set1_ps(1.0f);
            vb = _mm512_setzero_ps();
        }
        _mm512_storeu_ps(a, va);
        for (int t = 0; t < tb; t++)
            off[t] = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1),
                                                                  sx + t * groups + j0), off[t]);
        for (int j = 0; j < count; j++) {
            __m512i w[2];
            kq_levels_bf16(codes, u, pairs, supers, sup, g0 + j0 + j, w, tern, rnd);
            const __m512 aj = _mm512_set1_ps(a[j]);
            for (int t = 0; t < tb; t++) {
                const uint16_t *xt = x + t * ldx + KQ_GROUP * (j0 + j);
                __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[0], (__m512bh)_mm512_loadu_si512(xt));
                d = _mm512_dpbf16_ps(d, (__m512bh)w[1], (__m512bh)_mm512_loadu_si512(xt + 32));
                acc[t] = _mm512_fmadd_ps(d, aj, acc[t]);
            }
        }
    }
    for (int t = 0; t < tb; t++) y[t * ldy] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[t], off[t]));
}

/* h @ W for bf16 h: y[t][c] = sum_r (h[t][r] a_rg) q_rc - sum_r h[t][r] b_rg, g the column's group. kq_scale_rows
   holds each h[t][r] a_rg rounded to bf16 (RNE: the one rounding of this product, like the bf16 rounding h itself
   carries), by pairs of rows, and the second sum (float32) per (t, g). */
typedef struct {
    const uint32_t *hi;      /* [t][r / 2][g]: bf16 of rows r (low half) and r + 1 (high half) */
    const float *corr;       /* [t][g] */
    int64_t pairs;           /* (m + 1) / 2 */
} kq_scaled;

/* the pairs of rows p0 ... p1 - 1 of the scaled activations (a missing row m: 0) and their share of the sums in
   part[t][g] */
static void kq_scale_rows(const uint8_t *pairs, const uint16_t *supers, int sup, int rnd, int64_t m, int64_t groups,
                          int64_t p0, int64_t p1, int64_t T, const uint16_t *h, int64_t ldh, const kq_scaled *out,
                          float *part) {
    uint32_t *ohi = (uint32_t *)out->hi;
    for (int64_t p = p0; p < p1; p++)
        for (int64_t j0 = 0; j0 < groups; j0 += 16) {
            const int count = (int)(groups - j0 < 16 ? groups - j0 : 16);
            const __mmask16 k = (__mmask16)((1u << count) - 1);
            __m512 va[2], vb[2];
            const int rows = 2 * p + 1 < m ? 2 : 1;
            for (int i = 0; i < rows; i++) {
                kq_affine16(pairs, supers, sup, (2 * p + i) * groups + j0, count, va + i, vb + i);
                if (rnd) { /* the levels are the rounded weights: h itself, no offsets */
                    va[i] = _mm512_set1_ps(1.0f);
                    vb[i] = _mm512_setzero_ps();
                }
            }
            for (int64_t t = 0; t < T; t++) {
                __m512i hw = _mm512_setzero_si512();
                __m512 c = _mm512_maskz_loadu_ps(k, part + t * groups + j0);
                for (int i = 0; i < rows; i++) {
                    const __m512 hr = _mm512_set1_ps(kq_bits_to_float((uint32_t)h[t * ldh + 2 * p + i] << 16));
                    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(hr, va[i])));
                    c = _mm512_fmadd_ps(hr, vb[i], c);
                    hw = _mm512_or_si512(hw, _mm512_slli_epi32(hi, 16 * i));
                }
                _mm512_mask_storeu_ps(part + t * groups + j0, k, c);
                const int64_t at = (t * out->pairs + p) * groups + j0;
                _mm512_mask_storeu_epi32(ohi + at, k, hw);
            }
        }
}

/* y[t][64 j ...] for the nb column groups j0 ... j0 + nb - 1 and tb tokens: rows in pairs, the two rows'
   levels of each column interleaved (vpunpcklwd / vpunpckhwd) and multiplied by the pair's scaled activations in
   vdpbf16ps. The interleave orders each 32 columns as lo: 8l + 0..3, hi: 8l + 4..7 (l = 0..3); the sums
   are put back in column order once, at the end. */
static inline __attribute__((always_inline)) void kq_rcols_bf16(const uint8_t *codes, const kq_unpacker *u,
                                                                const uint8_t *pairs, const uint16_t *supers, int sup,
                                                                int64_t m, int64_t r0, int64_t r1, int64_t groups,
                                                                int64_t j0, const kq_scaled *sc, int64_t t0, float *y,
                                                                int64_t ldy, const int tb, const int nb,
                                                                const int tern, const int rnd) {
    __m512 acc[KQ_RB][KQ_NB][4];
    for (int t = 0; t < tb; t++)
        for (int b = 0; b < nb; b++)
            for (int k = 0; k < 4; k++) acc[t][b][k] = _mm512_setzero_ps();
    const __m512i none = _mm512_setzero_si512(); /* row m of an odd m (its scaled activations are 0 too) */
    for (int64_t r = r0; r < r1; r += 2) {
        const int pair = r + 1 < m;
        for (int b = 0; b < nb; b++) {
            __m512i w0[2], w1[2] = {none, none};
            kq_levels_bf16(codes, u, pairs, supers, sup, r * groups + j0 + b, w0, tern, rnd);
            if (pair) kq_levels_bf16(codes, u, pairs, supers, sup, (r + 1) * groups + j0 + b, w1, tern, rnd);
            __m512i hh[KQ_RB];
            for (int t = 0; t < tb; t++) {
                const int64_t at = ((t0 + t) * sc->pairs + r / 2) * groups + j0 + b;
                hh[t] = _mm512_set1_epi32((int)sc->hi[at]);
            }
            for (int k = 0; k < 2; k++) {
                const __m512i lo = _mm512_unpacklo_epi16(w0[k], w1[k]), hi = _mm512_unpackhi_epi16(w0[k], w1[k]);
                for (int t = 0; t < tb; t++) {
                    acc[t][b][2 * k] = _mm512_dpbf16_ps(acc[t][b][2 * k], (__m512bh)lo, (__m512bh)hh[t]);
                    acc[t][b][2 * k + 1] = _mm512_dpbf16_ps(acc[t][b][2 * k + 1], (__m512bh)hi, (__m512bh)hh[t]);
                }
            }
        }
    }
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int t = 0; t < tb; t++)
        for (int b = 0; b < nb; b++) {
            const __m512 corr = _mm512_set1_ps(r0 == 0 ? sc->corr[(t0 + t) * groups + j0 + b] : 0.0f);
            for (int k = 0; k < 2; k++) {
                float *yc = y + t * ldy + KQ_GROUP * (j0 + b) + 32 * k;
                kq_add_sums(yc, _mm512_sub_ps(_mm512_permutex2var_ps(acc[t][b][2 * k], first, acc[t][b][2 * k + 1]),
                                              corr), r0);
                kq_add_sums(yc + 16, _mm512_sub_ps(_mm512_permutex2var_ps(acc[t][b][2 * k], second,
                                                                          acc[t][b][2 * k + 1]), corr), r0);
            }
        }
}
#endif

/* what every entry point prepares: the AVX-512 unpacker `u`, or the portable loops' ternary table */
#if KQ_AVX512
#define KQ_SETUP(bits) const kq_unpacker u = kq_unpacker_for(bits)
#else
#define KQ_SETUP(bits)                                                                                               \
    if ((bits) == 0 && !kq_ternary_digits[242]) kq_ternary_table()
#endif

/* AS(args..., TERN, RND) with ternary codes (bits 0) or bit fields, and exact (rnd 0) or rounded weights as
   constants, so that the bf16 kernels' loops are compiled for each */
#define KQ_BY_CODES(AS, ...)                                                                                         \
    do {                                                                                                             \
        if (bits == 0) {                                                                                             \
            if (rnd) AS(__VA_ARGS__, 1, 1); else AS(__VA_ARGS__, 1, 0);                                              \
        } else {                                                                                                     \
            if (rnd) AS(__VA_ARGS__, 0, 1); else AS(__VA_ARGS__, 0, 0);                                              \
        }                                                                                                            \
    } while (0)

int resmoe_kq_dpbf16(void) { return KQ_DPBF16; }

/* y[t][r] = sum_c W[r][c] * x[t][c] for bf16 activations x, the weights exact (kq_row_bf16: vdpbf16ps on the codes,
   float32 sums). Returns 0 (computing nothing) without AVX512-BF16, for 8-bit codes (128 + q is not a bf16 number)
   or with rnd 1 (weights rounded to bf16 first), where resmoe_kq_matmul serves. */
int resmoe_kq_matmul_bf16(int64_t m, int64_t n, const uint8_t *codes, int bits, const uint8_t *pairs,
                          const uint16_t *supers, int sup, int rnd, int64_t T, const uint16_t *x, int64_t ldx,
                          float *y, int64_t ldy, int nthreads) {
#if KQ_DPBF16
    if (bits == 8) return 0;
    const int64_t groups = n / KQ_GROUP;
    float *sx = malloc((size_t)(T * groups) * sizeof(float));
    if (!sx) return 0;
    kq_group_sums(T, groups, x, ldx, sx);
    KQ_SETUP(bits);
#define KQ_ROW_BF16_AS(k, TERN, RND)                                                                                 \
    kq_row_bf16(codes, &u, pairs, supers, sup, g0, groups, xt, ldx, sx + t0 * groups, yt, ldy, k, TERN, RND)
#define KQ_ROW_BF16(k) KQ_BY_CODES(KQ_ROW_BF16_AS, k)
    KQ_ROWS(uint16_t, KQ_BY_TOKENS(tb, KQ_ROW_BF16))
#undef KQ_ROW_BF16
#undef KQ_ROW_BF16_AS
    free(sx);
    return 1;
#else
    (void)m; (void)n; (void)codes; (void)bits; (void)pairs; (void)supers; (void)sup; (void)rnd; (void)T; (void)x;
    (void)ldx; (void)y; (void)ldy; (void)nthreads;
    return 0;
#endif
}

void resmoe_kq_matmul(int64_t m, int64_t n, const uint8_t *codes, int bits, const uint8_t *pairs,
                      const uint16_t *supers, int sup, int rnd, int64_t T, const float *x, int64_t ldx, float *y,
                      int64_t ldy, int nthreads) {
    const int64_t groups = n / KQ_GROUP;
    KQ_SETUP(bits);
#if KQ_AVX512
#define KQ_ROW(k) kq_row(codes, &u, pairs, supers, sup, rnd, g0, groups, xt, ldx, yt, ldy, k)
    KQ_ROWS(float, KQ_BY_TOKENS(tb, KQ_ROW))
#undef KQ_ROW
#else
    KQ_ROWS(float, kq_row_scalar(codes, bits, pairs, supers, sup, rnd, g0, groups, xt, ldx, yt, ldy, tb);)
#endif
}

#if KQ_AVX512
/* y[t][64 j ...] for the nb column groups j0 ... j0 + nb - 1, tb tokens and rows r0 ... r1 - 1: every row's share
   summed in registers (tb nb 4 accumulators), added to y once at the end (constants after inlining) */
static inline __attribute__((always_inline)) void kq_rcols(const uint8_t *codes, const kq_unpacker *u,
                                                           const uint8_t *pairs, const uint16_t *supers, int sup,
                                                           int rnd, int64_t r0, int64_t r1, int64_t groups,
                                                           int64_t j0, const float *h, int64_t ldh, float *y,
                                                           int64_t ldy, const int tb, const int nb) {
    __m512 acc[KQ_RB][KQ_NB][4];
    for (int t = 0; t < tb; t++)
        for (int b = 0; b < nb; b++)
            for (int k = 0; k < 4; k++) acc[t][b][k] = _mm512_setzero_ps();
    const int64_t row_bytes = u->bits ? (int64_t)u->bits * 8 * groups : (KQ_GROUP * groups) / 5;
    for (int64_t r = r0; r < r1; r++) {
        __builtin_prefetch(codes + (r + 4) * row_bytes + (u->bits ? (int64_t)u->bits * 8 * j0 : KQ_GROUP * j0 / 5),
                           0, 0);
        __m512 ht[KQ_RB];
        for (int t = 0; t < tb; t++) ht[t] = _mm512_set1_ps(h[t * ldh + r]);
        for (int b = 0; b < nb; b++) {
            __m512 w[4];
            kq_weights64(codes, u, pairs, supers, sup, rnd, r * groups + j0 + b, w);
            for (int t = 0; t < tb; t++)
                for (int k = 0; k < 4; k++) acc[t][b][k] = _mm512_fmadd_ps(ht[t], w[k], acc[t][b][k]);
        }
    }
    for (int t = 0; t < tb; t++)
        for (int b = 0; b < nb; b++)
            for (int k = 0; k < 4; k++) kq_add_sums(y + t * ldy + KQ_GROUP * (j0 + b) + 16 * k, acc[t][b][k], r0);
}
#endif

static inline int kq_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int kq_threads(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* rows a chunk of the h @ W loop (even: pairs of rows stay together) */
#define KQ_CHUNK 64

/* the h @ W loop: tokens in passes of up to KQ_RB (tb of them; ht, yt), column groups in blocks split between the
   threads, each thread's blocks taken a chunk of KQ_CHUNK rows at a time (r0 ... r1 - 1), so that it reads the
   matrix's rows in order (column strips over all rows read memory far apart); RCOLS(J, TB, NB) adds those rows'
   share of the NB groups from J for TB tokens (constants: registers hold the sums) */
#define KQ_COLUMN_BLOCKS(HT, RCOLS)                                                                                  \
    for (int64_t t0 = 0; t0 < T; t0 += KQ_RB) {                                                                      \
        const int tb = (int)(T - t0 < KQ_RB ? T - t0 : KQ_RB);                                                       \
        const int nb = tb <= 2 ? KQ_NB / tb : 1; /* tb nb <= 4: at most 16 accumulators */                          \
        const int64_t blocks = (groups + nb - 1) / nb;                                                               \
        const HT *ht = h + t0 * ldh;                                                                                 \
        (void)ht;                                                                                                    \
        float *yt = y + t0 * ldy;                                                                                    \
        _Pragma("omp parallel num_threads(nthreads) if (nthreads > 1)")                                              \
        {                                                                                                            \
            const int64_t per = (blocks + kq_threads() - 1) / kq_threads(), b0 = kq_thread() * per;                  \
            const int64_t b1 = b0 + per < blocks ? b0 + per : blocks;                                                \
            for (int64_t r0 = 0; r0 < m; r0 += KQ_CHUNK) {                                                           \
                const int64_t r1 = r0 + KQ_CHUNK < m ? r0 + KQ_CHUNK : m;                                            \
                for (int64_t blk = b0; blk < b1; blk++) {                                                            \
                    const int64_t j0 = blk * nb;                                                                     \
                    const int nbb = (int)(groups - j0 < nb ? groups - j0 : nb);                                      \
                    if (nbb == nb && tb == 1) {                                                                      \
                        RCOLS(j0, 1, KQ_NB);                                                                         \
                    } else if (nbb == nb && tb == 2) {                                                               \
                        RCOLS(j0, 2, KQ_NB / 2);                                                                     \
                    } else { /* a pass of 3 or 4 tokens, or the last block's groups one by one */                    \
                        for (int64_t j = j0; j < j0 + nbb; j++) {                                                    \
                            if (tb == 1) RCOLS(j, 1, 1);                                                             \
                            else if (tb == 2) RCOLS(j, 2, 1);                                                        \
                            else if (tb == 3) RCOLS(j, 3, 1);                                                        \
                            else RCOLS(j, 4, 1);                                                                     \
                        }                                                                                            \
                    }                                                                                                \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
    }

#if !KQ_AVX512
/* y[t][64 j ...] += sum_r h[t][r] W[r][64 j ...] over rows r0 ... r1 - 1 for one column group (the portable loop;
   the rows from 0 start it from zero) */
static void kq_rcol_scalar(const uint8_t *codes, int bits, const uint8_t *pairs, const uint16_t *supers, int sup,
                           int rnd, int64_t r0, int64_t r1, int64_t groups, int64_t j, const float *h, int64_t ldh,
                           float *y, int64_t ldy, int tb) {
    if (r0 == 0)
        for (int t = 0; t < tb; t++) memset(y + t * ldy + KQ_GROUP * j, 0, KQ_GROUP * sizeof(float));
    for (int64_t r = r0; r < r1; r++) {
        float w[KQ_GROUP];
        kq_weights_scalar(codes, bits, pairs, supers, sup, rnd, r * groups + j, w);
        for (int t = 0; t < tb; t++) {
            const float hr = h[t * ldh + r];
            float *yr = y + t * ldy + KQ_GROUP * j;
            for (int i = 0; i < KQ_GROUP; i++) yr[i] += hr * w[i];
        }
    }
}
#endif

/* every element of y (T, n; row stride ldy) is written */
void resmoe_kq_rmatmul(int64_t m, int64_t n, const uint8_t *codes, int bits, const uint8_t *pairs,
                       const uint16_t *supers, int sup, int rnd, int64_t T, const float *h, int64_t ldh, float *y,
                       int64_t ldy, int nthreads) {
    const int64_t groups = n / KQ_GROUP;
    KQ_SETUP(bits);
#if KQ_AVX512
#define KQ_RCOLS(J, TB, NB) kq_rcols(codes, &u, pairs, supers, sup, rnd, r0, r1, groups, J, ht, ldh, yt, ldy, TB, NB)
#else
#define KQ_RCOLS(J, TB, NB)                                                                                          \
    for (int64_t jj = (J); jj < (J) + (NB); jj++)                                                                    \
    kq_rcol_scalar(codes, bits, pairs, supers, sup, rnd, r0, r1, groups, jj, ht, ldh, yt, ldy, TB)
#endif
    KQ_COLUMN_BLOCKS(float, KQ_RCOLS)
#undef KQ_RCOLS
}

/* h @ W for bf16 h, the weights exact (kq_rcols_bf16). Returns 0 (computing nothing) where resmoe_kq_matmul_bf16
   does, or when its scratch cannot be allocated; resmoe_kq_rmatmul serves then. */
int resmoe_kq_rmatmul_bf16(int64_t m, int64_t n, const uint8_t *codes, int bits, const uint8_t *pairs,
                           const uint16_t *supers, int sup, int rnd, int64_t T, const uint16_t *h, int64_t ldh,
                           float *y, int64_t ldy, int nthreads) {
#if KQ_DPBF16
    if (bits == 8) return 0;
    const int64_t groups = n / KQ_GROUP, npairs = (m + 1) / 2;
    int nt = nthreads > 1 ? nthreads : 1;
    uint32_t *hp = malloc((size_t)(T * npairs * groups) * sizeof(uint32_t));
    float *part = calloc((size_t)(nt * T * groups), sizeof(float));
    if (!hp || !part) {
        free(hp);
        free(part);
        return 0;
    }
    kq_scaled sc = {hp, part, npairs};
    /* the scaled activations, pairs of rows split between the threads, each thread's sums apart */
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int i = 0; i < nt; i++) {
        const int64_t per = (npairs + nt - 1) / nt, p0 = i * per, p1 = p0 + per < npairs ? p0 + per : npairs;
        if (p0 < p1)
            kq_scale_rows(pairs, supers, sup, rnd, m, groups, p0, p1, T, h, ldh, &sc, part + (int64_t)i * T * groups);
    }
    for (int i = 1; i < nt; i++)
        for (int64_t k = 0; k < T * groups; k++) part[k] += part[(int64_t)i * T * groups + k];
    KQ_SETUP(bits);
#define KQ_RCOLS_BF16_AS(J, TB, NB, TERN, RND)                                                                       \
    kq_rcols_bf16(codes, &u, pairs, supers, sup, m, r0, r1, groups, J, &sc, t0, yt, ldy, TB, NB, TERN, RND)
#define KQ_RCOLS_BF16(J, TB, NB) KQ_BY_CODES(KQ_RCOLS_BF16_AS, J, TB, NB)
    KQ_COLUMN_BLOCKS(uint16_t, KQ_RCOLS_BF16)
#undef KQ_RCOLS_BF16
#undef KQ_RCOLS_BF16_AS
    free(hp);
    free(part);
    return 1;
#else
    (void)m; (void)n; (void)codes; (void)bits; (void)pairs; (void)supers; (void)sup; (void)rnd; (void)T; (void)h;
    (void)ldh; (void)y; (void)ldy; (void)nthreads;
    return 0;
#endif
}

/* out[64 g + i] = the decoded value i of group g (spec 5.10, bit for bit) for the first `groups` groups of a value
   part: the whole matrix, for products with many tokens (a blocked GEMM then reuses each weight) */
void resmoe_kq_dequantize(int64_t groups, const uint8_t *codes, int bits, const uint8_t *pairs, const uint16_t *supers,
                          int sup, float *out, int nthreads) {
    KQ_SETUP(bits);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t g = 0; g < groups; g++) {
#if KQ_AVX512
        __m512 w[4];
        kq_weights64(codes, &u, pairs, supers, sup, 0, g, w);
        for (int k = 0; k < 4; k++) _mm512_storeu_ps(out + KQ_GROUP * g + 16 * k, w[k]);
#else
        kq_weights_scalar(codes, bits, pairs, supers, sup, 0, g, out + KQ_GROUP * g);
#endif
    }
}
