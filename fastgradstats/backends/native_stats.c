/* The "native" CPU backend's kernels: every statistic of a chunk in one pass over its elements.

   native_backend.py compiles this file on first use (cc -O3 -march=native) and calls it through ctypes, which
   releases the GIL, so Python threads work on disjoint chunk ranges at once. Each chunk writes its own raw
   row (layout of rows.py) and each thread its own histogram counts; Python merges them in chunk order, so
   results do not depend on the number of threads.

   Two paths. float32, bfloat16 and float16 chunks take the float32 path: FBLOCK elements at a time, as
   float32, into FLANES float32 lanes the compiler keeps in vector registers, then each block's lane sums are
   added into the chunk's row in float64. A block whose float32 sums could lose precision (a NaN or Inf, a
   deviation whose square would over- or underflow float32) is summed again on the float64 path. float64
   chunks take the float64 path: BLOCK elements at a time, in LANES float64 lanes. Either way squares are
   taken of deviations from a shift near the chunk's mean (the mean of its first block), so M2 keeps its
   precision when |mean| ≫ std. Where the CPU has bfloat16 dot products (AVX512_BF16), bfloat16 chunks are
   first summed around 0 by them (bf16_dot_moments), and again around such a shift only when their mean
   dominates (Σx² - (Σx)²/n < Σx²/2).

   Histogram counts are taken per element in 32-bit counters and added into the 64-bit counts of a layer when
   the next chunk belongs to another layer, when they could wrap, and at the end. Every histogram bin index
   is bounded before it is used, whatever the floating-point arithmetic gives. Linear bins divide through a
   reciprocal with an exact FMA correction (quotient), and the two linear histograms of a data-range pass are
   counted together, one increment per value, by path cell (see "Path counting"). */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

enum { N, SUM, M2, ABSSUM, ZEROS, NONFINITE, MAX, NEG_MIN, FMAX, NEG_FMIN, K };
enum { PAIR_N, DOT, AA, BB, DD, PAIR_K };
enum { F32, F64, BF16, F16 };        /* dtype codes: native_backend.DTYPE_CODES */
enum { HIST_NONE, HIST_LOG2, HIST_LINEAR };
enum { BLOCK = 2048, LANES = 16, COPIES = 4 };  /* float64 path */
enum { FBLOCK = 2048, FLANES = 32 };            /* float32 path (FBLOCK: a multiple of 64) */
enum { CENTER_SAMPLE = 64 };                   /* elements whose mean shifts a float32 chunk */
enum { FIELDS = 256 };                          /* float32 exponent fields */
enum { COMPARED_FIELDS = 24 };                  /* the widest range of fields counted by comparisons */
enum { JOINT_CELLS = 8192 };                    /* the largest joint (layer bin, total bin) count table */
enum { JOINT_COPIES = 2 };  /* joint tables: 4 would not stay in L1 beside the streamed data */

static const uint64_t FLUSH_AFTER = UINT32_MAX; /* elements a 32-bit count may take before its flush */

static int64_t itemsize(int32_t dtype) { return dtype == F64 ? 8 : dtype == F32 ? 4 : 2; }

/* The address of element index of an array of dtype that starts at address. */
static const char *element(int64_t address, int64_t index, int32_t dtype) {
    return (const char *)(intptr_t)address + index * itemsize(dtype);
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static double max2(double a, double b) { return a > b ? a : b; }

/* ------------------------------------------------------------------------------------------ conversions */

static double half_to_double(uint16_t h) {
    /* Bit by bit rather than through _Float16, which some compilers convert with a library call; subnormal
       halves (exponent 0) are mantissa·2^-24, computed without a subnormal operand. */
    uint64_t exponent = h >> 10 & 0x1f, mantissa = h & 0x3ff;
    uint64_t bits = (exponent == 0x1f ? 0x7ffull : exponent + 1008) << 52 | mantissa << 42;
    double magnitude;
    memcpy(&magnitude, &bits, sizeof magnitude);
    magnitude = exponent == 0 ? (double)mantissa * 0x1p-24 : magnitude;
    return h & 0x8000 ? -magnitude : magnitude;
}

static float half_to_float(uint16_t h) {
    /* As half_to_double; mantissa·2^-24 is exact in float32 too. */
    uint32_t exponent = h >> 10 & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits = (exponent == 0x1f ? 0xffu : exponent + 112) << 23 | mantissa << 13;
    float magnitude;
    memcpy(&magnitude, &bits, sizeof magnitude);
    magnitude = exponent == 0 ? (float)mantissa * 0x1p-24f : magnitude;
    return h & 0x8000 ? -magnitude : magnitude;
}

/* The n elements of the given dtype at src as doubles: src itself for float64, else converted into buf. */
static const double *as_double(const char *src, int32_t dtype, int64_t n, double *buf) {
    if (dtype == F64) return (const double *)src;
    if (dtype == F32) {
        const float *x = (const float *)src;
        for (int64_t i = 0; i < n; i++) buf[i] = x[i];
    } else if (dtype == BF16) {
        const uint16_t *x = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)x[i] << 16;
            float value;
            memcpy(&value, &bits, sizeof value);
            buf[i] = value;
        }
    } else {
        const uint16_t *x = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) buf[i] = half_to_double(x[i]);
    }
    return buf;
}

/* The n elements of dtype (not F64) at src as floats: src itself for float32, else converted into buf. */
static const float *as_float(const char *src, int32_t dtype, int64_t n, float *buf) {
    if (dtype == F32) return (const float *)src;
    const uint16_t *x = (const uint16_t *)src;
    if (dtype == BF16) {
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)x[i] << 16;
            memcpy(&buf[i], &bits, sizeof bits);
        }
    } else {
        for (int64_t i = 0; i < n; i++) buf[i] = half_to_float(x[i]);
    }
    return buf;
}

/* src as an array of kind F32 or BF16: src itself for those dtypes, float16 converted into buf (kind F32). */
static const void *readable(const char *src, int32_t dtype, int64_t n, float *buf, int32_t *kind) {
    *kind = dtype == F16 ? F32 : dtype;
    return dtype == F16 ? (const void *)as_float(src, F16, n, buf) : (const void *)src;
}

#define INLINE static inline __attribute__((always_inline))

/* The bits of element i of src, an array of kind F32 or BF16, as those of a float32. */
INLINE uint32_t float_bits(const void *src, int64_t i, int32_t kind) {
    if (kind == BF16) return (uint32_t)((const uint16_t *)src)[i] << 16;
    uint32_t bits;
    memcpy(&bits, (const char *)src + 4 * i, sizeof bits);
    return bits;
}

INLINE float load_float(const void *src, int64_t i, int32_t kind) {
    uint32_t bits = float_bits(src, i, kind);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* ------------------------------------------------------------------------------------ float64 moments */

/* Per-lane partial moments; lane j takes elements j, j + LANES, ... of a block. sum and sumsq are of the
   deviations v - center. */
typedef struct {
    double sum[LANES], sumsq[LANES], abssum[LANES], zeros[LANES], lo[LANES], hi[LANES];
} Moments;

static inline void add_moment(Moments *m, int j, double v, double center) {
    double d = v - center;
    m->sum[j] += d;
    m->sumsq[j] += d * d;
    m->abssum[j] += fabs(v);
    m->zeros[j] += v == 0.0;
    m->lo[j] = v < m->lo[j] ? v : m->lo[j];
    m->hi[j] = v > m->hi[j] ? v : m->hi[j];
}

/* Adds x[0:n]'s Σ(x - center) to row[SUM], Σ(x - center)² to row[M2], its Σ|x| and zero count to row, and
   its maxima to the MAX and NEG_MIN fields. A NaN leaves the maxima unspecified (rows.py) but reaches the
   sums. */
static void add_moments(const double *restrict x, int64_t n, double center, double *restrict row) {
    Moments m = {0};
    for (int j = 0; j < LANES; j++) m.lo[j] = INFINITY, m.hi[j] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) add_moment(&m, j, x[i + j], center);
    for (int j = 0; i < n; i++, j++) add_moment(&m, j, x[i], center);
    for (int j = 0; j < LANES; j++) {
        row[SUM] += m.sum[j];
        row[M2] += m.sumsq[j];
        row[ABSSUM] += m.abssum[j];
        row[ZEROS] += m.zeros[j];
        row[MAX] = max2(row[MAX], m.hi[j]);
        row[NEG_MIN] = max2(row[NEG_MIN], -m.lo[j]);
    }
}

/* The mean of x[0:n] (n > 0), or 0 when it is not finite. */
static double block_mean(const double *x, int64_t n) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += x[i];
    return isfinite(sum) ? sum / (double)n : 0.0;
}

/* Adds x[0:n]'s non-finite count to row and its finite maxima to the FMAX and NEG_FMIN fields. */
static void add_nonfinite(const double *x, int64_t n, double *row) {
    for (int64_t i = 0; i < n; i++) {
        if (isfinite(x[i])) {
            row[FMAX] = max2(row[FMAX], x[i]);
            row[NEG_FMIN] = max2(row[NEG_FMIN], -x[i]);
        } else {
            row[NONFINITE] += 1;
        }
    }
}

/* ------------------------------------------------------------------------------------ float32 moments */

typedef struct {
    float sum[FLANES], sumsq[FLANES], abssum[FLANES], lo[FLANES], hi[FLANES];
    int32_t zeros[FLANES];
} FloatMoments;

/* Sums, minimum and maximum of FLANES lanes, folded in halves (loops the compiler vectorizes). */
static double lane_sum(const float *lanes) {
    double half[FLANES / 2];
    for (int j = 0; j < FLANES / 2; j++) half[j] = (double)lanes[j] + (double)lanes[j + FLANES / 2];
    for (int width = FLANES / 4; width > 0; width /= 2)
        for (int j = 0; j < width; j++) half[j] += half[j + width];
    return half[0];
}

static float lane_min(const float *lanes) {
    float half[FLANES / 2];
    for (int j = 0; j < FLANES / 2; j++)
        half[j] = lanes[j + FLANES / 2] < lanes[j] ? lanes[j + FLANES / 2] : lanes[j];
    for (int width = FLANES / 4; width > 0; width /= 2)
        for (int j = 0; j < width; j++) half[j] = half[j + width] < half[j] ? half[j + width] : half[j];
    return half[0];
}

static float lane_max(const float *lanes) {
    float half[FLANES / 2];
    for (int j = 0; j < FLANES / 2; j++)
        half[j] = lanes[j + FLANES / 2] > lanes[j] ? lanes[j + FLANES / 2] : lanes[j];
    for (int width = FLANES / 4; width > 0; width /= 2)
        for (int j = 0; j < width; j++) half[j] = half[j + width] > half[j] ? half[j + width] : half[j];
    return half[0];
}

static inline void add_float_moment(FloatMoments *m, int j, float v, float center) {
    float d = v - center;
    m->sum[j] += d;
    m->sumsq[j] += d * d;
    m->abssum[j] += fabsf(v);
    m->zeros[j] -= -(int32_t)(v == 0.0f);
    m->lo[j] = v < m->lo[j] ? v : m->lo[j];
    m->hi[j] = v > m->hi[j] ? v : m->hi[j];
}

/* add_moments for a float32 block x[0:n] (n <= FBLOCK), summed in float32 lanes. The float32 sums are kept
   only when they are as good as float64 ones to well within float32 rounding: every value finite (a finite
   Σ|x|) and the largest deviation |x - center| zero or within [2^-40, 2^40], so that no square overflows
   and those that underflow weigh less than 2^-60 of Σ(x - center)². Returns 1 when it added them, 0 (row
   untouched) when the block must be summed on the float64 path. */
INLINE int float_moments(const void *restrict x, int32_t kind, int64_t n, float center,
                         double *restrict row) {
    FloatMoments m;
    for (int j = 0; j < FLANES; j++) {
        m.sum[j] = m.sumsq[j] = m.abssum[j] = 0.0f;
        m.zeros[j] = 0;
        m.lo[j] = INFINITY, m.hi[j] = -INFINITY;
    }
    int64_t i = 0;
    for (; i + FLANES <= n; i += FLANES)
        for (int j = 0; j < FLANES; j++) add_float_moment(&m, j, load_float(x, i + j, kind), center);
    for (int j = 0; i < n; i++, j++) add_float_moment(&m, j, load_float(x, i, kind), center);
    double sum = lane_sum(m.sum), sumsq = lane_sum(m.sumsq), abssum = lane_sum(m.abssum);
    int64_t zeros = 0;
    for (int j = 0; j < FLANES; j++) zeros += m.zeros[j];
    float lo = lane_min(m.lo), hi = lane_max(m.hi);
    double deviation = max2((double)hi - center, (double)center - lo);
    if (!isfinite(abssum) || !(deviation == 0.0 || (deviation >= 0x1p-40 && deviation <= 0x1p40))) return 0;
    row[SUM] += sum;
    row[M2] += sumsq;
    row[ABSSUM] += abssum;
    row[ZEROS] += zeros;
    row[MAX] = max2(row[MAX], hi);
    row[NEG_MIN] = max2(row[NEG_MIN], -lo);
    return 1;
}

/* bfloat16 lanes: the sums in float32 as in FloatMoments; the zero counts, minima and maxima on the 16-bit
   values themselves, which halves the vector work: a bfloat16 h's key h ^ (h < 0 ? 0x7fff : 0), as a signed
   16-bit integer, orders the non-NaN values as floats do (with -0 below +0) and is its own inverse. */
typedef struct {
    float sum[FLANES], sumsq[FLANES], abssum[FLANES];
    int16_t zeros[FLANES], lo[FLANES], hi[FLANES];
} Bf16Moments;

static inline int16_t bf16_key(uint16_t h) { return (int16_t)(h ^ ((uint16_t)((int16_t)h >> 15) & 0x7fff)); }

static inline float bf16_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline void add_bf16_moment(Bf16Moments *m, int j, uint16_t h, float center) {
    float v = bf16_float(h), d = v - center;
    m->sum[j] += d;
    m->sumsq[j] += d * d;
    m->abssum[j] += fabsf(v);
    m->zeros[j] += (h & 0x7fff) == 0;
    int16_t key = bf16_key(h);
    m->lo[j] = key < m->lo[j] ? key : m->lo[j];
    m->hi[j] = key > m->hi[j] ? key : m->hi[j];
}

/* float_moments of a bfloat16 block (n <= FBLOCK: the 16-bit zero counts cannot wrap). */
static int bf16_moments(const uint16_t *restrict x, int64_t n, float center, double *restrict row) {
    Bf16Moments m;
    for (int j = 0; j < FLANES; j++) {
        m.sum[j] = m.sumsq[j] = m.abssum[j] = 0.0f;
        m.zeros[j] = 0, m.lo[j] = INT16_MAX, m.hi[j] = INT16_MIN;
    }
    int64_t i = 0;
    for (; i + FLANES <= n; i += FLANES)
        for (int j = 0; j < FLANES; j++) add_bf16_moment(&m, j, x[i + j], center);
    for (int j = 0; i < n; i++, j++) add_bf16_moment(&m, j, x[i], center);
    double sum = lane_sum(m.sum), sumsq = lane_sum(m.sumsq), abssum = lane_sum(m.abssum);
    int64_t zeros = 0;
    int16_t lo_key = INT16_MAX, hi_key = INT16_MIN;
    for (int j = 0; j < FLANES; j++) {
        zeros += m.zeros[j];
        lo_key = m.lo[j] < lo_key ? m.lo[j] : lo_key;
        hi_key = m.hi[j] > hi_key ? m.hi[j] : hi_key;
    }
    float lo = bf16_float((uint16_t)bf16_key((uint16_t)lo_key));
    float hi = bf16_float((uint16_t)bf16_key((uint16_t)hi_key));
    double deviation = max2((double)hi - center, (double)center - lo);
    if (!isfinite(abssum) || !(deviation == 0.0 || (deviation >= 0x1p-40 && deviation <= 0x1p40))) return 0;
    row[SUM] += sum;
    row[M2] += sumsq;
    row[ABSSUM] += abssum;
    row[ZEROS] += (double)zeros;
    row[MAX] = max2(row[MAX], hi);
    row[NEG_MIN] = max2(row[NEG_MIN], -lo);
    return 1;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
enum { BF16_DOTS = 1 };  /* bf16_dot_moments is compiled in */

/* Accumulators of bf16_dot_moments. */
typedef struct {
    __m512 sum, sumsq, abssum;
} DotSums;

typedef struct {
    __m512i zeros, lo, hi;  /* 16-bit lanes */
} KeyLanes;

/* Adds the 32 bfloat16 values of h (lanes outside `in` are 0) to one set of accumulators. */
INLINE void add_dots(DotSums *d, KeyLanes *keys, __m512i h, __mmask32 in) {
    const __m512i magnitude = _mm512_set1_epi16(0x7fff);
    const __m512bh one = (__m512bh)_mm512_set1_epi16(0x3f80);  /* bfloat16 1.0 */
    d->sum = _mm512_dpbf16_ps(d->sum, (__m512bh)h, one);
    d->sumsq = _mm512_dpbf16_ps(d->sumsq, (__m512bh)h, (__m512bh)h);
    d->abssum = _mm512_dpbf16_ps(d->abssum, (__m512bh)_mm512_and_si512(h, magnitude), one);
    keys->zeros = _mm512_mask_sub_epi16(keys->zeros, in & _mm512_testn_epi16_mask(h, magnitude), keys->zeros,
                                        _mm512_set1_epi16(-1));
    __m512i key = _mm512_ternarylogic_epi32(h, _mm512_srai_epi16(h, 15), magnitude, 0x78);  /* bf16_key */
    keys->lo = _mm512_mask_min_epi16(keys->lo, in, keys->lo, key);
    keys->hi = _mm512_mask_max_epi16(keys->hi, in, keys->hi, key);
}

/* The sum of the 64 float32 lanes of a, b, c, d, in float64. */
static double dot_lane_sum(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512d wide = _mm512_setzero_pd();
    __m512 parts[4] = {a, b, c, d};
    for (int k = 0; k < 4; k++) {
        wide = _mm512_add_pd(wide, _mm512_cvtps_pd(_mm512_castps512_ps256(parts[k])));
        wide = _mm512_add_pd(wide, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(
            _mm512_castps_pd(parts[k]), 1))));
    }
    return _mm512_reduce_add_pd(wide);
}

/* bf16_moments with no shift (center 0), the sums taken by bfloat16 dot products: Σx, Σx² and Σ|x| of 32
   values per instruction (VDPBF16PS: x·1, x·x, |x|·1 in pairs, accumulated in float32, with bfloat16 and
   float32 subnormals read and written as 0) into 4 sets of accumulators; zeros, minimum and maximum as in
   bf16_moments. Kept under bf16_moments' conditions with center 0 (a subnormal's weight, below 2^-126 in each
   sum, is then negligible); returns 0 otherwise. */
static int bf16_dot_moments(const uint16_t *restrict x, int64_t n, double *restrict row) {
    DotSums d[4];
    for (int k = 0; k < 4; k++) d[k].sum = d[k].sumsq = d[k].abssum = _mm512_setzero_ps();
    KeyLanes keys = {_mm512_setzero_si512(), _mm512_set1_epi16(INT16_MAX), _mm512_set1_epi16(INT16_MIN)};
    const __mmask32 all = (__mmask32)0xffffffffu;
    int64_t i = 0;
    for (; i + 128 <= n; i += 128)
        for (int k = 0; k < 4; k++) add_dots(&d[k], &keys, _mm512_loadu_si512(x + i + 32 * k), all);
    for (; i < n; i += 32) {
        __mmask32 in = n - i >= 32 ? all : (__mmask32)((1u << (n - i)) - 1);
        add_dots(&d[0], &keys, _mm512_maskz_loadu_epi16(in, x + i), in);
    }
    int16_t zero_lanes[32], lo_lanes[32], hi_lanes[32];
    _mm512_storeu_si512(zero_lanes, keys.zeros);
    _mm512_storeu_si512(lo_lanes, keys.lo);
    _mm512_storeu_si512(hi_lanes, keys.hi);
    int64_t zero_count = 0;
    int16_t lo_key = INT16_MAX, hi_key = INT16_MIN;
    for (int j = 0; j < 32; j++) {
        zero_count += zero_lanes[j];
        lo_key = lo_lanes[j] < lo_key ? lo_lanes[j] : lo_key;
        hi_key = hi_lanes[j] > hi_key ? hi_lanes[j] : hi_key;
    }
    double abssum = dot_lane_sum(d[0].abssum, d[1].abssum, d[2].abssum, d[3].abssum);
    float low = bf16_float((uint16_t)bf16_key((uint16_t)lo_key));
    float high = bf16_float((uint16_t)bf16_key((uint16_t)hi_key));
    double deviation = max2(high, -(double)low);
    if (!isfinite(abssum) || !(deviation == 0.0 || (deviation >= 0x1p-40 && deviation <= 0x1p40))) return 0;
    row[SUM] += dot_lane_sum(d[0].sum, d[1].sum, d[2].sum, d[3].sum);
    row[M2] += dot_lane_sum(d[0].sumsq, d[1].sumsq, d[2].sumsq, d[3].sumsq);
    row[ABSSUM] += abssum;
    row[ZEROS] += (double)zero_count;
    row[MAX] = max2(row[MAX], high);
    row[NEG_MIN] = max2(row[NEG_MIN], -low);
    return 1;
}
#else
enum { BF16_DOTS = 0 };
static int bf16_dot_moments(const uint16_t *x, int64_t n, double *row) {
    (void)x, (void)n, (void)row;
    return 0;  /* never called: BF16_DOTS is 0 */
}
#endif

/* float_moments of x of kind F32 or BF16. */
static int add_float_moments(const void *x, int32_t kind, int64_t n, float center, double *row) {
    return kind == F32 ? float_moments(x, F32, n, center, row) : bf16_moments(x, n, center, row);
}

/* The float32 mean of x's first min(n, CENTER_SAMPLE) elements (n > 0), x of kind F32 or BF16, or 0 when it
   is not finite. */
static float float_block_mean(const void *x, int32_t kind, int64_t n) {
    double sum = 0.0;
    n = min64(n, CENTER_SAMPLE);
    for (int64_t i = 0; i < n; i++) sum += load_float(x, i, kind);
    return isfinite(sum) ? (float)(sum / (double)n) : 0.0f;
}

/* ------------------------------------------------------------------------------------------ histograms */

/* Histograms take two steps per block: the bin of each element (a loop the compiler vectorizes), then the
   counting, into COPIES interleaved arrays of counts so that runs of equal bins do not wait on each other's
   increments. */

/* floor(log2|x|) from the float64 exponent field, which for every float32, bfloat16 and float16 value is
   that of float32 (float32 subnormals, below 2^-126, fall under every bin and are clamped into the first). */
static void log2_bins(const double *x, int64_t n, int32_t min_exp, int32_t bins, int32_t *bin) {
    for (int64_t i = 0; i < n; i++) {
        uint64_t bits;
        memcpy(&bits, &x[i], sizeof bits);
        int32_t field = bits >> 52 & 0x7ff;  /* 0: zero or subnormal, 0x7ff: NaN or Inf */
        int32_t exponent = field - 1023 < min_exp ? min_exp : field - 1023;
        exponent = exponent > min_exp + bins - 1 ? min_exp + bins - 1 : exponent;
        bin[i] = x[i] == 0.0 || field == 0x7ff ? bins : exponent - min_exp;
    }
}

/* x as float32, finite values beyond float32's range saturated to ±FLT_MAX (hist.py's rule). */
static float saturated_float(double x) {
    return fabs(x) > FLT_MAX && isfinite(x) ? (x > 0 ? FLT_MAX : -FLT_MAX) : (float)x;
}

/* Linear bins of hist.py: lo_hi_scale = (lo, hi, s) with s a power of two; the bin of lo <= x <= hi is
   (x·s - lo·s)·bins / (hi·s - lo·s) in float32 (torch.histc's rule, scaled so that it cannot overflow),
   clamped to [0, bins - 1] before its conversion to an integer. */
static void linear_bins(const double *x, int64_t n, const float *lo_hi_scale, int32_t bins, int32_t *bin) {
    float lo = lo_hi_scale[0], hi = lo_hi_scale[1], scale = lo_hi_scale[2];
    float scaled_lo = lo * scale, width = hi * scale - scaled_lo, last = (float)(bins - 1);
    for (int64_t i = 0; i < n; i++) {
        float value = saturated_float(x[i]);
        int32_t counted = value >= lo && value <= hi;  /* false for NaN */
        float inside = counted ? value : lo;
        float position = (inside * scale - scaled_lo) * (float)bins / width;
        position = position > 0.0f ? position : 0.0f;  /* also maps NaN to 0 */
        position = position < last ? position : last;
        bin[i] = counted ? (int32_t)position : bins;
    }
}

/* A linear range (lo, hi, scale) prepared for float32 binning: reciprocal = 1/width rounded to float32, with
   which float_bin divides when width and its reciprocal are normal (always, for the ranges of hist.py: width
   >= 2^-125); divide is set otherwise. */
typedef struct {
    float lo, hi, scale, scaled_lo, width, reciprocal, bins, last;
    int divide;
} Range;

static Range prepared(const float *lo_hi_scale, int32_t bins) {
    Range r = {.lo = lo_hi_scale[0], .hi = lo_hi_scale[1], .scale = lo_hi_scale[2], .bins = (float)bins,
               .last = (float)(bins - 1)};
    r.scaled_lo = r.lo * r.scale;
    r.width = r.hi * r.scale - r.scaled_lo;
    r.reciprocal = 1.0f / r.width;
    r.divide = !(r.width >= FLT_MIN && r.width <= 0x1p125f);
    return r;
}

/* numerator / r->width, correctly rounded: by a division when divide is set, else through the reciprocal
   (Markstein): q0 = n·(1/w), e = n - q0·w (exact, by an FMA), q = q0 + e·(1/w), which is the correctly
   rounded n/w whenever n is a normal float; a subnormal n's quotient may differ from it by an ulp, but both
   are below 1 (the first bin). */
INLINE float quotient(float numerator, const Range *r, int divide) {
    if (divide) return numerator / r->width;
    float q0 = numerator * r->reciprocal;
    float e = fmaf(-q0, r->width, numerator);
    return fmaf(e, r->reciprocal, q0);
}

/* linear_bins' bin of a float32 value (spill: bins). An uncounted value's position may be NaN or Inf: the
   clamps bound it before its conversion, and its bin is the spill bin anyway. x·s - lo·s is one explicit FMA
   (x·s is exact but for underflow), so that every loop, vectorized or not, rounds it alike: path counting
   relies on scalar and vector bins being equal. */
INLINE int32_t float_bin(float value, const Range *r, int32_t bins, int divide) {
    int32_t counted = (value >= r->lo) & (value <= r->hi);  /* false for NaN */
    float position = quotient(fmaf(value, r->scale, -r->scaled_lo) * r->bins, r, divide);
    position = position > 0.0f ? position : 0.0f;  /* also maps NaN to 0 */
    position = position < r->last ? position : r->last;
    int32_t inside = (int32_t)position;  /* converted unconditionally: a loop without branches */
    return counted ? inside : bins;
}

/* linear_bins of the float32 values of x, of kind F32 or BF16. */
INLINE void float_linear_bins(const void *x, int32_t kind, int64_t n, const Range *r, int divide,
                              int32_t bins, int32_t *bin) {
    for (int64_t i = 0; i < n; i++) bin[i] = float_bin(load_float(x, i, kind), r, bins, divide);
}

/* The joint cells first_bin * (bins + 1) + second_bin of x's values over two ranges. */
INLINE void float_joint_cells(const void *x, int32_t kind, int64_t n, const Range *a, const Range *b,
                              int divide, int32_t bins, int32_t *cell) {
    for (int64_t i = 0; i < n; i++) {
        float value = load_float(x, i, kind);
        cell[i] = float_bin(value, a, bins, divide) * (bins + 1) + float_bin(value, b, bins, divide);
    }
}

static void joint_cells_float(const void *x, int32_t kind, int64_t n, const float *first, const float *second,
                              int32_t bins, int32_t *cell) {
    Range a = prepared(first, bins), b = prepared(second, bins);
    int divide = a.divide || b.divide;
    if (divide) float_joint_cells(x, kind, n, &a, &b, 1, bins, cell);
    else if (kind == F32) float_joint_cells(x, F32, n, &a, &b, 0, bins, cell);
    else float_joint_cells(x, BF16, n, &a, &b, 0, bins, cell);
}

static void linear_bins_float(const void *x, int32_t kind, int64_t n, const float *lo_hi_scale, int32_t bins,
                              int32_t *bin) {
    Range r = prepared(lo_hi_scale, bins);
    if (r.divide) float_linear_bins(x, kind, n, &r, 1, bins, bin);
    else if (kind == F32) float_linear_bins(x, F32, n, &r, 0, bins, bin);
    else float_linear_bins(x, BF16, n, &r, 0, bins, bin);
}

static void count_bins(const int32_t *bin, int64_t n, int32_t bins, uint32_t *counts) {
    int64_t i = 0;
    for (; i + COPIES <= n; i += COPIES)
        for (int c = 0; c < COPIES; c++) counts[c * (bins + 1) + bin[i + c]]++;
    for (; i < n; i++) counts[bin[i]]++;
}

/* Adds the COPIES count arrays into hist[0:bins] and clears them. */
static void flush_counts(uint32_t *counts, int32_t bins, int64_t *hist) {
    for (int c = 0; c < COPIES; c++)
        for (int32_t b = 0; b < bins; b++) hist[b] += counts[c * (bins + 1) + b];
    memset(counts, 0, sizeof *counts * COPIES * (bins + 1));
}

/* Joint counts of (first bin, second bin) pairs, cell first * (bins + 1) + second, in JOINT_COPIES
   interleaved (bins + 1)² tables: one increment per element for two histograms. */
static void count_joint(const int32_t *cell, int64_t n, int32_t bins, uint32_t *tables) {
    int64_t cells = (int64_t)(bins + 1) * (bins + 1);
    int64_t i = 0;
    for (; i + JOINT_COPIES <= n; i += JOINT_COPIES)
        for (int c = 0; c < JOINT_COPIES; c++) tables[c * cells + cell[i + c]]++;
    for (; i < n; i++) tables[cell[i]]++;
}

/* Adds the joint tables' margins into hist[0:bins] (first bins) and total[0:bins] (second bins), clears
   them. */
static void flush_joint(uint32_t *tables, int32_t bins, int64_t *hist, int64_t *total) {
    int64_t cells = (int64_t)(bins + 1) * (bins + 1);
    for (int c = 1; c < JOINT_COPIES; c++)
        for (int64_t cell = 0; cell < cells; cell++) tables[cell] += tables[c * cells + cell];
    for (int32_t a = 0; a <= bins; a++) {
        const uint32_t *line = tables + (int64_t)a * (bins + 1);
        int64_t across = 0;
        for (int32_t b = 0; b < bins; b++) {
            across += line[b];
            total[b] += line[b];
        }
        if (a < bins) hist[a] += across + line[bins];
    }
    memset(tables, 0, sizeof *tables * JOINT_COPIES * cells);
}

/* Exponent-field counts of float32 values. */

typedef uint8_t Bytes __attribute__((vector_size(64)));
typedef uint64_t Words __attribute__((vector_size(64)));

/* The sums of each 8 consecutive bytes of b. */
static inline Words byte_sums(Bytes b) {
#if defined(__AVX512BW__)
    return (Words)_mm512_sad_epu8((__m512i)b, _mm512_setzero_si512());
#else
    Words words = (Words)b;
    words = (words & 0x00ff00ff00ff00ffull) + (words >> 8 & 0x00ff00ff00ff00ffull);
    words = (words & 0x0000ffff0000ffffull) + (words >> 16 & 0x0000ffff0000ffffull);
    return (words & 0xffffffffull) + (words >> 32);
#endif
}

/* Exponent-field counts of one thread: counts[c * FIELDS + field] counted one by one, sums[field] the byte
   sums of comparisons. */
typedef struct {
    uint32_t counts[COPIES * FIELDS];
    Words sums[FIELDS];
} FieldCounts;

/* Adds to sums[first + j], for j < values (1 to 4), the 8-byte sums of how many of the count * 64 bytes of
   fields equal first + j (count <= 255): four values per pass over the fields, in four independent chains. */
static inline void count_equal(const Bytes *fields, int64_t count, int32_t first, int32_t values,
                               Words *sums) {
#if defined(__AVX512BW__)
    /* a compare into a mask and an add under it: two instructions per 64 fields and value */
    __m512i target[4], hits[4], one = _mm512_set1_epi8(1);
    for (int j = 0; j < 4; j++) {
        target[j] = _mm512_set1_epi8((char)(uint8_t)(first + (j < values ? j : 0)));
        hits[j] = _mm512_setzero_si512();
    }
    for (int64_t k = 0; k < count; k++) {
        for (int j = 0; j < 4; j++) {
            __mmask64 equal = _mm512_cmpeq_epi8_mask((__m512i)fields[k], target[j]);
            hits[j] = _mm512_mask_add_epi8(hits[j], equal, hits[j], one);
        }
    }
    for (int j = 0; j < values; j++) sums[first + j] += byte_sums((Bytes)hits[j]);
#else
    Bytes hits[4] = {{0}};
    for (int64_t k = 0; k < count; k++)
        for (int j = 0; j < 4; j++)
            hits[j] -= (Bytes)(fields[k] == (uint8_t)(first + (j < values ? j : 0)));  /* == gives -1 or 0 */
    for (int j = 0; j < values; j++) sums[first + j] += byte_sums(hits[j]);
#endif
}

/* Adds the exponent fields (bits 23-30) of float32 x[0:n] (n <= FBLOCK) to counts. A full block whose
   non-zero fields span at most COMPARED_FIELDS values (real gradients span about 20) is counted by comparing
   64 fields at a time with each value; others one by one. */
INLINE void fields_of(const void *restrict x, int32_t kind, int64_t n, FieldCounts *restrict counts) {
    _Alignas(64) uint8_t field[FBLOCK];
    uint8_t lowest = 0xff, highest = 0;  /* of field - 1 (zeros and subnormals wrap to 255) and of field */
    for (int64_t i = 0; i < n; i++) {
        uint8_t f = kind == BF16 ? ((const uint16_t *)x)[i] >> 7 & 0xff : float_bits(x, i, F32) >> 23 & 0xff;
        uint8_t below = f - 1;
        field[i] = f;
        lowest = below < lowest ? below : lowest;
        highest = f > highest ? f : highest;
    }
    int32_t first = lowest + 1, last = highest;  /* first = 256 when every field is 0 */
    if (n != FBLOCK || last - first + 1 > COMPARED_FIELDS) {
        int64_t i = 0;
        for (; i + COPIES <= n; i += COPIES)
            for (int c = 0; c < COPIES; c++) counts->counts[c * FIELDS + field[i + c]]++;
        for (; i < n; i++) counts->counts[field[i]]++;
        return;
    }
    const Bytes *fields = (const Bytes *)field;
    count_equal(fields, FBLOCK / 64, 0, 1, counts->sums);
    for (int32_t f = first; f <= last; f += 4)
        count_equal(fields, FBLOCK / 64, f, last - f + 1 < 4 ? last - f + 1 : 4, counts->sums);
}

static void count_fields(const void *x, int32_t kind, int64_t n, FieldCounts *counts) {
    if (kind == F32) fields_of(x, F32, n, counts);
    else fields_of(x, BF16, n, counts);
}

/* Adds the exponent-field counts, less `zeros` zeros from field 0, into the log2 bins hist[0:bins] of
   exponents min_exp ... (fields 0 and 1 to the first bin, field 255, NaN and Inf, to none), clears them. */
static void flush_fields(FieldCounts *counts, int64_t zeros, int32_t min_exp, int32_t bins, int64_t *hist) {
    for (int32_t f = 0; f < FIELDS - 1; f++) {
        int64_t total = f == 0 ? -zeros : 0;
        for (int c = 0; c < COPIES; c++) total += counts->counts[c * FIELDS + f];
        for (int w = 0; w < 8; w++) total += (int64_t)counts->sums[f][w];
        int32_t exponent = f - 127 < min_exp ? min_exp : f - 127;
        exponent = exponent > min_exp + bins - 1 ? min_exp + bins - 1 : exponent;
        hist[exponent - min_exp] += total;
    }
    memset(counts, 0, sizeof *counts);
}

/* ---------------------------------------------------------------------------------------- tensor stats */

static void clear_row(double *row) {
    for (int f = 0; f < K; f++) row[f] = f < MAX ? 0.0 : -INFINITY;
}

/* Adds the moments of block x[0:n] of kind F32 or BF16 around shift to row: in float32 lanes when they are
   precise enough (float_moments), else on the float64 path (buf: its scratch). */
static void add_block_moments(const void *x, int32_t kind, int64_t n, float shift, double *row, double *buf) {
    if (!add_float_moments(x, kind, n, shift, row)) add_moments(as_double(x, kind, n, buf), n, shift, row);
}

/* Adds the moments of a float32, bfloat16 or float16 chunk to row, around the mean of its first elements
   (float_block_mean), which it returns. */
static float shifted_moments(const char *src, int32_t dtype, int64_t numel, float *fbuf, double *buf,
                             double *row) {
    float shift = 0.0f;
    for (int64_t start = 0; start < numel; start += FBLOCK) {
        int64_t n = min64(numel - start, FBLOCK);
        int32_t kind;
        const void *x = readable(src + start * itemsize(dtype), dtype, n, fbuf, &kind);
        if (start == 0) shift = float_block_mean(x, kind, n);
        add_block_moments(x, kind, n, shift, row, buf);
    }
    return shift;
}

/* Sums a float64 chunk (addr, numel) into row on the float64 path; histogram counts as in fgs_tensor_stats.
   Returns the shift. */
static double double_chunk(const double *x_all, int64_t numel, double *row, int32_t hist_kind, int32_t bins,
                           int32_t min_exp, const float *range, uint32_t *counts, int32_t *bin) {
    double center = 0.0;
    for (int64_t start = 0; start < numel; start += BLOCK) {
        int64_t n = min64(numel - start, BLOCK);
        const double *x = x_all + start;
        if (start == 0) center = block_mean(x, n);
        add_moments(x, n, center, row);
        if (hist_kind != HIST_NONE) {
            if (hist_kind == HIST_LOG2) log2_bins(x, n, min_exp, bins, bin);
            else linear_bins(x, n, range, bins, bin);
            count_bins(bin, n, bins, counts);
        }
    }
    return center;
}

/* Raw rows of chunks [first, last): chunk c holds numel[c] elements of dtype[c] at address addr[c] and
   belongs to layer layer[c]; its row goes to rows[c * K : (c + 1) * K].

   The row holds Σx in SUM and Σ(x - mean)² in M2, from deviations from the mean of the chunk's first block.
   hist_kind HIST_LOG2: bins of exponents min_exp ... min_exp + bins - 1 (see log2_bins); HIST_LINEAR:
   ranges[3 * l : 3 * l + 3] is layer l's float32 (lo, hi, scale). Counts are added to
   hist[layer * bins + bin].
   Returns 0, or -1 when out of memory. */
int fgs_tensor_stats(int64_t first, int64_t last, const int64_t *addr, const int64_t *numel,
                     const int32_t *dtype, const int64_t *layer, double *rows, int32_t hist_kind,
                     int32_t bins, int32_t min_exp, const float *ranges, int64_t *hist) {
    double buf[BLOCK];
    float fbuf[FBLOCK];
    int32_t bin[BLOCK];
    /* bin counts of float64 chunks and of linear histograms; exponent-field counts of float32 ones */
    uint32_t *counts = calloc((size_t)COPIES * (bins + 1), sizeof *counts);
    FieldCounts *field_counts = aligned_alloc(64, sizeof *field_counts);
    if (!counts || !field_counts) {
        free(counts);
        free(field_counts);
        return -1;
    }
    memset(field_counts, 0, sizeof *field_counts);
    int64_t pending = 0, pending_zeros = 0;  /* elements and zeros in field_counts */
    for (int64_t c = first; c < last; c++) {
        double *row = rows + c * K;
        clear_row(row);
        const float *range = hist_kind == HIST_LINEAR ? ranges + 3 * layer[c] : NULL;
        double center = 0.0;
        if (dtype[c] == F64) {
            center = double_chunk((const double *)element(addr[c], 0, F64), numel[c], row, hist_kind, bins,
                                  min_exp, range, counts, bin);
        } else {
            float shift = 0.0f;
            int unshifted = BF16_DOTS && dtype[c] == BF16;  /* summed by bf16_dot_moments, center 0 */
            for (int64_t start = 0; start < numel[c]; start += FBLOCK) {
                int64_t n = min64(numel[c] - start, FBLOCK);
                int32_t kind;
                const void *x = readable(element(addr[c], start, dtype[c]), dtype[c], n, fbuf, &kind);
                if (unshifted) {
                    if (!bf16_dot_moments(x, n, row)) add_moments(as_double(x, kind, n, buf), n, 0.0, row);
                } else {
                    if (start == 0) shift = float_block_mean(x, kind, n);
                    add_block_moments(x, kind, n, shift, row, buf);
                }
                if (hist_kind == HIST_LOG2) {
                    count_fields(x, kind, n, field_counts);
                } else if (hist_kind == HIST_LINEAR) {
                    linear_bins_float(x, kind, n, range, bins, bin);
                    count_bins(bin, n, bins, counts);
                }
            }
            if (unshifted && 2.0 * row[SUM] * row[SUM] > row[M2] * (double)numel[c]) {
                /* Σx² - (Σx)²/n would cancel more than half of Σx²: the moments again, from a shift */
                clear_row(row);
                shift = shifted_moments(element(addr[c], 0, dtype[c]), dtype[c], numel[c], fbuf, buf, row);
            }
            center = shift;
            if (hist_kind == HIST_LOG2) {
                pending += numel[c];
                pending_zeros += (int64_t)row[ZEROS];
            }
        }
        row[N] = (double)numel[c];
        double deviations = row[SUM];  /* Σ(x - center) */
        row[SUM] = row[N] * center + deviations;
        row[M2] -= deviations * deviations / row[N];
        if (isfinite(row[ABSSUM])) {  /* no NaN or Inf: the maxima are the finite maxima */
            row[FMAX] = row[MAX];
            row[NEG_FMIN] = row[NEG_MIN];
        } else {
            for (int64_t start = 0; start < numel[c]; start += BLOCK) {
                int64_t n = min64(numel[c] - start, BLOCK);
                add_nonfinite(as_double(element(addr[c], start, dtype[c]), dtype[c], n, buf), n, row);
            }
        }
        int layer_ends = c + 1 == last || layer[c + 1] != layer[c];
        if (hist_kind == HIST_LOG2 && pending > 0
            && (layer_ends || pending + numel[c + 1] > (int64_t)FLUSH_AFTER)) {
            flush_fields(field_counts, pending_zeros, min_exp, bins, hist + layer[c] * bins);
            pending = pending_zeros = 0;
        }
        if (hist_kind != HIST_NONE) flush_counts(counts, bins, hist + layer[c] * bins);
    }
    free(counts);
    free(field_counts);
    return 0;
}

/* Path counting of two linear histograms at once. Over the values x inside both ranges, each range's bin is a
   non-decreasing function of x, so their sum, the path cell s = layer bin + total bin, is too, and it
   determines both bins (path_bins). Blocks whose values are all inside both ranges are counted by path cell:
   one increment per value into PATH_COPIES interleaved tables of PATH_CELLS counts, which stay in L1. */

enum { PATH_CELLS = 128, PATH_OUTSIDE = 127, PATH_COPIES = 8 };  /* bins <= 64: s <= 126; copies: 4k, k >= 1 */
enum { BF16_PATTERNS = 1 << 16 };

/* float32 values in the order of integers: a < b iff key(a) < key(b) (-0 and +0 are both 0); finite x. */
static int64_t float_key(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits >> 31 ? -(int64_t)(bits & 0x7fffffff) : (int64_t)bits;
}

static float key_float(int64_t key) {
    uint32_t bits = key < 0 ? 0x80000000u | (uint32_t)-key : (uint32_t)key;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* first[k] for k = 1 ... bins - 1: the key of the smallest x in [lo, hi] whose bin over r (divide unset) is
   at least k, key(hi) + 1 when there is none; found from an estimate by doubling steps, then by bisection. */
static void bin_thresholds(const Range *r, int32_t bins, int64_t *first) {
    int64_t low = float_key(r->lo), high = float_key(r->hi);
    for (int32_t k = 1; k < bins; k++) {
        double estimate = (double)r->lo + ((double)r->hi - (double)r->lo) * k / bins;
        int64_t guess = float_key((float)estimate), below, above;  /* bin(below) < k <= bin(above) */
        guess = guess < low ? low : guess > high ? high : guess;
        if (float_bin(key_float(guess), r, bins, 0) >= k) {
            above = guess;
            for (int64_t step = 1;; step *= 2) {
                below = above - step;
                if (below < low) {
                    below = low - 1;
                    break;
                }
                if (float_bin(key_float(below), r, bins, 0) < k) break;
                above = below;
            }
        } else {
            below = guess;
            for (int64_t step = 1;; step *= 2) {
                above = below + step;
                if (above > high) {
                    above = high + 1;
                    break;
                }
                if (float_bin(key_float(above), r, bins, 0) >= k) break;
                below = above;
            }
        }
        while (above - below > 1) {
            int64_t middle = below + (above - below) / 2;
            if (float_bin(key_float(middle), r, bins, 0) >= k) above = middle;
            else below = middle;
        }
        first[k] = above;
    }
}

/* layer_bin[s]: the layer bin of path cell s, for the cells of values inside both ranges (others: -1), from
   the thresholds of bin_thresholds (layer_first of the layer range a, total_first of the total range b). */
static void path_bins(const Range *a, const Range *b, int32_t bins, const int64_t *layer_first,
                      const int64_t *total_first, int8_t *layer_bin) {
    memset(layer_bin, -1, PATH_CELLS - 1);
    int64_t key = float_key(a->lo > b->lo ? a->lo : b->lo), end = float_key(a->hi < b->hi ? a->hi : b->hi);
    int32_t i = 0, j = 0;  /* thresholds passed: the bins at key */
    while (key <= end) {
        while (i + 1 < bins && layer_first[i + 1] <= key) i++;
        while (j + 1 < bins && total_first[j + 1] <= key) j++;
        layer_bin[i + j] = (int8_t)i;
        int64_t next = i + 1 < bins ? layer_first[i + 1] : INT64_MAX;
        key = j + 1 < bins && total_first[j + 1] < next ? total_first[j + 1] : next;
    }
}

/* float_bin of a value inside r (divide unset), without the range test and the lower clamp: its quotient is
   then at least 0, or for a subnormal numerator above -1, which truncates to 0 as well. */
INLINE int32_t inner_bin(float value, const Range *r) {
    float position = quotient(fmaf(value, r->scale, -r->scaled_lo) * r->bins, r, 0);
    position = position < r->last ? position : r->last;
    return (int32_t)position;
}

/* The path cell of value over ranges a and b (divide unset, their intersection [lower, upper] not empty) if
   it is inside both, else PATH_OUTSIDE: value is clamped into both (NaN to lower) before it is binned. */
INLINE int32_t path_cell(float value, const Range *a, const Range *b, float lower, float upper) {
    float inside = value > lower ? value : lower;
    inside = inside < upper ? inside : upper;
    int32_t cell = inner_bin(inside, a) + inner_bin(inside, b);
    return inside == value ? cell : PATH_OUTSIDE;
}

/* cell[i] = the path cell of float32 x[i] over ranges a and b (as in path_cell). Returns 1 when every value
   is inside both ranges, else 0 (then the caller counts the block otherwise). */
static int path_cells(const float *restrict x, int64_t n, const Range *a, const Range *b,
                      uint16_t *restrict cell) {
    Range layer_range = *a, total_range = *b;
    float lower = a->lo > b->lo ? a->lo : b->lo, upper = a->hi < b->hi ? a->hi : b->hi;
    int32_t outside = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t s = path_cell(x[i], &layer_range, &total_range, lower, upper);
        outside += s == PATH_OUTSIDE;  /* a sum, which the compiler vectorizes */
        cell[i] = (uint16_t)s;
    }
    return !outside;
}

/* table[h] = path_cell of each bfloat16 bit pattern h over ranges a and b: bfloat16 blocks are counted by
   looking their cells up. Only the patterns of either sign whose magnitude is at most max(|lower|, |upper|)
   can be inside; their cells are computed BLOCK patterns at a time as 16-bit cells (a loop the compiler
   vectorizes, which it does not when the loop stores bytes), then narrowed; all others are PATH_OUTSIDE. */
static void bf16_path_table(const Range *a, const Range *b, uint8_t *restrict table) {
    Range layer_range = *a, total_range = *b;
    float lower = a->lo > b->lo ? a->lo : b->lo, upper = a->hi < b->hi ? a->hi : b->hi;
    float largest = fabsf(lower) > fabsf(upper) ? fabsf(lower) : fabsf(upper);
    uint32_t largest_bits;
    memcpy(&largest_bits, &largest, sizeof largest_bits);
    int32_t magnitudes = (int32_t)(largest_bits >> 16) + 1;  /* patterns 0 ... largest rounded down to bf16 */
    memset(table, PATH_OUTSIDE, BF16_PATTERNS);
    uint16_t cell[BLOCK];
    for (int32_t sign = 0; sign < BF16_PATTERNS; sign += BF16_PATTERNS / 2) {
        for (int32_t start = 0; start < magnitudes; start += BLOCK) {
            int32_t n = magnitudes - start < BLOCK ? magnitudes - start : BLOCK;
            for (int32_t i = 0; i < n; i++) {
                float value = bf16_float((uint16_t)(sign + start + i));
                cell[i] = (uint16_t)path_cell(value, &layer_range, &total_range, lower, upper);
            }
            for (int32_t i = 0; i < n; i++) table[sign + start + i] = (uint8_t)cell[i];
        }
    }
}

/* Counts the cells table[x[i]] of bfloat16 x[0:n] as count_path does. Returns 1 when every value is inside
   both ranges, else 0 (the values outside are then counted in cell PATH_OUTSIDE, which flush_path skips). */
static int count_bf16_path(const uint16_t *x, int64_t n, const uint8_t *table, uint32_t *tables) {
    uint32_t outside = 0;
    for (int c = 0; c < PATH_COPIES; c++) outside -= tables[c * PATH_CELLS + PATH_OUTSIDE];
    int64_t i = 0;
    for (; i + PATH_COPIES <= n; i += PATH_COPIES) {
        uint64_t words[PATH_COPIES / 4];
        memcpy(words, x + i, sizeof words);  /* little-endian: x[i + c] at bit 16 (c % 4) of words[c / 4] */
        for (int c = 0; c < PATH_COPIES; c++)
            tables[c * PATH_CELLS + table[words[c / 4] >> 16 * (c % 4) & 0xffff]]++;
    }
    for (; i < n; i++) tables[table[x[i]]]++;
    for (int c = 0; c < PATH_COPIES; c++) outside += tables[c * PATH_CELLS + PATH_OUTSIDE];
    return outside == 0;
}

/* Counts cell[0:n] into tables[c * PATH_CELLS + cell], cell i in copy c = i % PATH_COPIES (read four at a
   time). */
static void count_path(const uint16_t *cell, int64_t n, uint32_t *tables) {
    int64_t i = 0;
    for (; i + PATH_COPIES <= n; i += PATH_COPIES) {
        uint64_t words[PATH_COPIES / 4];
        memcpy(words, cell + i, sizeof words);  /* as in count_bf16_path */
        for (int c = 0; c < PATH_COPIES; c++)
            tables[c * PATH_CELLS + (words[c / 4] >> 16 * (c % 4) & 0xffff)]++;
    }
    for (; i < n; i++) tables[cell[i]]++;
}

/* Adds the path counts to the layer's bins hist[0:bins] and the total bins total[0:bins] through layer_bin
   (path_bins), clears them. */
static void flush_path(uint32_t *tables, const int8_t *layer_bin, int64_t *hist, int64_t *total) {
    for (int32_t s = 0; s < PATH_CELLS - 1; s++) {
        int64_t count = 0;
        for (int c = 0; c < PATH_COPIES; c++) count += tables[c * PATH_CELLS + s];
        if (count == 0) continue;
        hist[layer_bin[s]] += count;
        total[s - layer_bin[s]] += count;
    }
    memset(tables, 0, sizeof *tables * PATH_COPIES * PATH_CELLS);
}

/* Linear histograms of chunks [first, last) (as in fgs_tensor_stats) over each layer's range, added to
   hist[layer * bins + bin], and over ranges[3 * num_layers : 3 * num_layers + 3], added to total[bin].
   The 32-bit counts are flushed into the 64-bit ones when the layer changes and before they could wrap.
   Returns 0, or -1 when out of memory. */
int fgs_linear_hist(int64_t first, int64_t last, const int64_t *addr, const int64_t *numel,
                    const int32_t *dtype, const int64_t *layer, int32_t bins, const float *ranges,
                    int64_t num_layers, int64_t *hist, int64_t *total) {
    double buf[BLOCK];
    float fbuf[BLOCK];
    int32_t layer_bin[BLOCK], total_bin[BLOCK];
    uint16_t path_cell[BLOCK];
    int64_t layer_first[PATH_CELLS / 2], total_first[PATH_CELLS / 2];  /* bin_thresholds */
    int8_t layer_of_cell[PATH_CELLS - 1];                               /* path_bins */
    const float *total_range = ranges + 3 * num_layers;
    Range total_prepared = prepared(total_range, bins), layer_prepared = total_prepared;
    int joint = (int64_t)(bins + 1) * (bins + 1) <= JOINT_CELLS;
    int by_path = joint && bins <= PATH_CELLS / 2 && !total_prepared.divide, layer_by_path = 0;
    size_t cells = joint ? (size_t)JOINT_COPIES * (bins + 1) * (bins + 1) : (size_t)2 * COPIES * (bins + 1);
    uint32_t *counts = calloc(cells + (by_path ? PATH_COPIES * PATH_CELLS : 0), sizeof *counts);
    uint8_t *bf16_cells = by_path ? malloc(sizeof *bf16_cells * BF16_PATTERNS) : NULL;  /* bf16_path_table */
    if (!counts || (by_path && !bf16_cells)) {
        free(counts);
        free(bf16_cells);
        return -1;
    }
    uint32_t *total_counts = joint ? NULL : counts + COPIES * (bins + 1), *path_counts = counts + cells;
    int bf16_cells_ready = 0;  /* for the current layer */
    if (by_path) bin_thresholds(&total_prepared, bins, total_first);
    int64_t pending = 0;
    for (int64_t c = first; c < last; c++) {
        const float *range = ranges + 3 * layer[c];
        if (by_path && (c == first || layer[c] != layer[c - 1])) {
            layer_prepared = prepared(range, bins);
            layer_by_path = !layer_prepared.divide && layer_prepared.lo <= total_prepared.hi
                            && total_prepared.lo <= layer_prepared.hi;  /* the ranges intersect */
            bf16_cells_ready = 0;
            if (layer_by_path) {
                bin_thresholds(&layer_prepared, bins, layer_first);
                path_bins(&layer_prepared, &total_prepared, bins, layer_first, total_first, layer_of_cell);
            }
        }
        for (int64_t start = 0; start < numel[c]; start += BLOCK) {
            int64_t n = min64(numel[c] - start, BLOCK);
            const char *src = element(addr[c], start, dtype[c]);
            if (layer_by_path && dtype[c] == BF16) {
                if (!bf16_cells_ready) bf16_path_table(&layer_prepared, &total_prepared, bf16_cells);
                bf16_cells_ready = 1;
                const uint16_t *h = (const uint16_t *)src;
                if (!count_bf16_path(h, n, bf16_cells, path_counts)) {
                    for (int64_t i = 0; i < n; i++) {  /* the values outside a range, one by one */
                        if (bf16_cells[h[i]] != PATH_OUTSIDE) continue;
                        float value = bf16_float(h[i]);
                        counts[float_bin(value, &layer_prepared, bins, 0) * (bins + 1)
                               + float_bin(value, &total_prepared, bins, 0)]++;
                    }
                }
                continue;
            }
            int32_t kind;
            const void *x = dtype[c] == F64 ? NULL : readable(src, dtype[c], n, fbuf, &kind);
            if (x && kind == F32 && layer_by_path
                && path_cells(x, n, &layer_prepared, &total_prepared, path_cell)) {
                count_path(path_cell, n, path_counts);
                continue;
            }
            if (x && joint) {
                joint_cells_float(x, kind, n, range, total_range, bins, layer_bin);
                count_joint(layer_bin, n, bins, counts);
                continue;
            }
            if (x) {
                linear_bins_float(x, kind, n, range, bins, layer_bin);
                linear_bins_float(x, kind, n, total_range, bins, total_bin);
            } else {
                const double *wide = as_double(src, F64, n, buf);
                linear_bins(wide, n, range, bins, layer_bin);
                linear_bins(wide, n, total_range, bins, total_bin);
            }
            if (joint) {
                for (int64_t i = 0; i < n; i++) layer_bin[i] = layer_bin[i] * (bins + 1) + total_bin[i];
                count_joint(layer_bin, n, bins, counts);
            } else {
                count_bins(layer_bin, n, bins, counts);
                count_bins(total_bin, n, bins, total_counts);
            }
        }
        pending += numel[c];
        if (c + 1 == last || layer[c + 1] != layer[c] || pending + numel[c + 1] > (int64_t)FLUSH_AFTER) {
            if (layer_by_path) flush_path(path_counts, layer_of_cell, hist + layer[c] * bins, total);
            if (joint) {
                flush_joint(counts, bins, hist + layer[c] * bins, total);
            } else {
                flush_counts(counts, bins, hist + layer[c] * bins);
                flush_counts(total_counts, bins, total);
            }
            pending = 0;
        }
    }
    free(counts);
    free(bf16_cells);
    return 0;
}

/* ----------------------------------------------------------------------------------------------- pairs */

/* Per-lane partial pair sums, lanes as in Moments. */
typedef struct {
    double dot[LANES], aa[LANES], bb[LANES], dd[LANES];
} PairSums;

static inline void add_pair(PairSums *p, int j, double a, double b, double o) {
    double x = a - o, y = b - o, d = a - b;
    p->dot[j] += x * y;
    p->aa[j] += x * x;
    p->bb[j] += y * y;
    p->dd[j] += d * d;
}

/* Adds the pair sums of a[0:n], b[0:n] and origin o[0:n] to row (layout of rows.py). */
static void add_pair_sums(const double *restrict a, const double *restrict b, const double *restrict o,
                          int64_t n, double *restrict row) {
    PairSums p = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) add_pair(&p, j, a[i + j], b[i + j], o[i + j]);
    for (int j = 0; i < n; i++, j++) add_pair(&p, j, a[i], b[i], o[i]);
    for (int j = 0; j < LANES; j++) {
        row[DOT] += p.dot[j];
        row[AA] += p.aa[j];
        row[BB] += p.bb[j];
        row[DD] += p.dd[j];
    }
}

typedef struct {
    float dot[FLANES], aa[FLANES], bb[FLANES], dd[FLANES];
} FloatPairSums;

static inline void add_float_pair(FloatPairSums *p, int j, float a, float b, float o) {
    float x = a - o, y = b - o, d = a - b;
    p->dot[j] += x * y;
    p->aa[j] += x * x;
    p->bb[j] += y * y;
    p->dd[j] += d * d;
}

/* add_pair_sums of blocks of kind F32 or BF16 (n <= FBLOCK), summed in float32 lanes (o: NULL for no
   origin). The sums are kept when each of Σ(a - o)², Σ(b - o)², Σ(a - b)² is finite and either 0 (every term
   below 2^-75) or at least 2^-100, so that the squares that underflow weigh less than 2^-40 of it. Returns 1
   when it added them, 0 (row untouched) when the block must be summed on the float64 path. */
INLINE int float_pair_sums(const void *restrict a, const void *restrict b, const void *restrict o,
                           int32_t kind, int64_t n, double *restrict row) {
    FloatPairSums p;
    for (int j = 0; j < FLANES; j++) p.dot[j] = p.aa[j] = p.bb[j] = p.dd[j] = 0.0f;
    int64_t i = 0;
    if (o) {
        for (; i + FLANES <= n; i += FLANES)
            for (int j = 0; j < FLANES; j++)
                add_float_pair(&p, j, load_float(a, i + j, kind), load_float(b, i + j, kind),
                               load_float(o, i + j, kind));
        for (int j = 0; i < n; i++, j++)
            add_float_pair(&p, j, load_float(a, i, kind), load_float(b, i, kind), load_float(o, i, kind));
    } else {
        for (; i + FLANES <= n; i += FLANES)
            for (int j = 0; j < FLANES; j++)
                add_float_pair(&p, j, load_float(a, i + j, kind), load_float(b, i + j, kind), 0.0f);
        for (int j = 0; i < n; i++, j++)
            add_float_pair(&p, j, load_float(a, i, kind), load_float(b, i, kind), 0.0f);
    }
    double dot = lane_sum(p.dot), aa = lane_sum(p.aa), bb = lane_sum(p.bb), dd = lane_sum(p.dd);
    double squares[3] = {aa, bb, dd};
    for (int s = 0; s < 3; s++)
        if (!isfinite(squares[s]) || (squares[s] != 0.0 && squares[s] < 0x1p-100)) return 0;
    row[DOT] += dot;
    row[AA] += aa;
    row[BB] += bb;
    row[DD] += dd;
    return 1;
}

/* float_pair_sums of a, b and o (or NULL) of the given dtypes, not F64: read as they are when they share
   kind F32 or BF16, else each converted to float32 into its buffer first. */
static int add_float_pair_sums(const char *a, const char *b, const char *o, const int32_t *dt, int64_t n,
                               float *a_buf, float *b_buf, float *o_buf, double *row) {
    if ((dt[0] == F32 || dt[0] == BF16) && dt[1] == dt[0] && (!o || dt[2] == dt[0]))
        return dt[0] == F32 ? float_pair_sums(a, b, o, F32, n, row) : float_pair_sums(a, b, o, BF16, n, row);
    const float *x = as_float(a, dt[0], n, a_buf), *y = as_float(b, dt[1], n, b_buf);
    return float_pair_sums(x, y, o ? as_float(o, dt[2], n, o_buf) : NULL, F32, n, row);
}

/* Pair rows of chunks [first, last): chunk c pairs numel[c] elements at a_addr[c] and b_addr[c] (and
   o_addr[c], unless it is 0: no origin), of dtypes dtypes[3 * c : 3 * c + 3]; its row goes to
   rows[c * PAIR_K : (c + 1) * PAIR_K]. Chunks with a float64 list take the float64 path, the others the
   float32 path. Returns 0. */
int fgs_pair_stats(int64_t first, int64_t last, const int64_t *a_addr, const int64_t *b_addr,
                   const int64_t *o_addr, const int32_t *dtypes, const int64_t *numel, double *rows) {
    double a_buf[BLOCK], b_buf[BLOCK], o_buf[BLOCK], no_origin[BLOCK] = {0};
    float a_fbuf[FBLOCK], b_fbuf[FBLOCK], o_fbuf[FBLOCK];
    for (int64_t c = first; c < last; c++) {
        double *row = rows + c * PAIR_K;
        const int32_t *dt = dtypes + 3 * c;
        memset(row, 0, sizeof *row * PAIR_K);
        row[PAIR_N] = (double)numel[c];
        int wide = dt[0] == F64 || dt[1] == F64 || (o_addr[c] && dt[2] == F64);
        int64_t block = wide ? BLOCK : FBLOCK;
        for (int64_t start = 0; start < numel[c]; start += block) {
            int64_t n = min64(numel[c] - start, block);
            const char *a = element(a_addr[c], start, dt[0]), *b = element(b_addr[c], start, dt[1]);
            const char *o = o_addr[c] ? element(o_addr[c], start, dt[2]) : NULL;
            if (!wide && add_float_pair_sums(a, b, o, dt, n, a_fbuf, b_fbuf, o_fbuf, row)) continue;
            add_pair_sums(as_double(a, dt[0], n, a_buf), as_double(b, dt[1], n, b_buf),
                          o ? as_double(o, dt[2], n, o_buf) : no_origin, n, row);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ chunk ranges */

/* The entry points above over `count` chunk ranges [bounds[i], bounds[i + 1]), range i adding its counts at
   offset i·stride of each histogram output: in parallel on OpenMP's threads when compiled with -fopenmp, in
   turn otherwise (fgs_openmp says which). Under torch, which loads libgomp.so.1 first, these are torch's own
   intra-op threads: the ones that still spin after its last parallel op take the ranges at once, where
   threads of our own would compete with them for the cores. Return 0, or -1 when any range ran out of
   memory. */
int fgs_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int fgs_tensor_stats_ranges(int32_t count, const int64_t *bounds, const int64_t *addr, const int64_t *numel,
                            const int32_t *dtype, const int64_t *layer, double *rows, int32_t hist_kind,
                            int32_t bins, int32_t min_exp, const float *ranges, int64_t *hist,
                            int64_t stride) {
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int32_t i = 0; i < count; i++)
        failed |= fgs_tensor_stats(bounds[i], bounds[i + 1], addr, numel, dtype, layer, rows, hist_kind, bins,
                                   min_exp, ranges, hist + i * stride);
    return failed;
}

int fgs_linear_hist_ranges(int32_t count, const int64_t *bounds, const int64_t *addr, const int64_t *numel,
                           const int32_t *dtype, const int64_t *layer, int32_t bins, const float *ranges,
                           int64_t num_layers, int64_t *hist, int64_t *total, int64_t hist_stride,
                           int64_t total_stride) {
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int32_t i = 0; i < count; i++)
        failed |= fgs_linear_hist(bounds[i], bounds[i + 1], addr, numel, dtype, layer, bins, ranges, num_layers,
                                  hist + i * hist_stride, total + i * total_stride);
    return failed;
}

int fgs_pair_stats_ranges(int32_t count, const int64_t *bounds, const int64_t *a_addr, const int64_t *b_addr,
                          const int64_t *o_addr, const int32_t *dtypes, const int64_t *numel, double *rows) {
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int32_t i = 0; i < count; i++)
        failed |= fgs_pair_stats(bounds[i], bounds[i + 1], a_addr, b_addr, o_addr, dtypes, numel, rows);
    return failed;
}
