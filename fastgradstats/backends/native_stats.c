/* The "native" CPU backend's kernels: every statistic of a chunk in one pass over its elements.

   native_backend.py compiles this file on first use (cc -O3 -march=native) and calls it through ctypes, which
   releases the GIL, so Python threads work on disjoint chunk ranges at once. Each chunk writes its own raw
   row (layout of rows.py) and each thread its own histogram counts; Python merges them in chunk order, so
   results do not depend on the number of threads.

   Elements are converted to double one block at a time and summed in double, in LANES independent lanes the
   compiler keeps in vector registers: squares of float32 values can neither overflow nor underflow there.
   Squares are taken of deviations from a shift near the chunk's mean (the mean of its first block), so M2
   keeps its precision when |mean| ≫ std.

   Every histogram bin index is bounded before it is used, whatever the floating-point arithmetic gives. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { N, SUM, M2, ABSSUM, ZEROS, NONFINITE, MAX, NEG_MIN, FMAX, NEG_FMIN, K };
enum { PAIR_N, DOT, AA, BB, DD, PAIR_K };
enum { F32, F64, BF16, F16 };        /* dtype codes: native_backend.DTYPE_CODES */
enum { HIST_NONE, HIST_LOG2, HIST_LINEAR };
enum { BLOCK = 2048, LANES = 16, COPIES = 4 };

static int64_t itemsize(int32_t dtype) { return dtype == F64 ? 8 : dtype == F32 ? 4 : 2; }

/* The address of element index of an array of dtype that starts at address. */
static const char *element(int64_t address, int64_t index, int32_t dtype) {
    return (const char *)(intptr_t)address + index * itemsize(dtype);
}

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

static double max2(double a, double b) { return a > b ? a : b; }

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

/* Histograms take two steps per block: the bin of each element (a loop the compiler vectorizes; bins: not
   counted), then the counting, into COPIES interleaved arrays of bins + 1 counts so that runs of equal bins
   do not wait on each other's increments. */

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
    int32_t bin[BLOCK];
    uint32_t *counts = calloc((size_t)COPIES * (bins + 1), sizeof *counts);
    if (!counts) return -1;
    for (int64_t c = first; c < last; c++) {
        double *row = rows + c * K;
        for (int f = 0; f < K; f++) row[f] = f < MAX ? 0.0 : -INFINITY;
        double center = 0.0;
        for (int64_t start = 0; start < numel[c]; start += BLOCK) {
            int64_t n = numel[c] - start < BLOCK ? numel[c] - start : BLOCK;
            const double *x = as_double(element(addr[c], start, dtype[c]), dtype[c], n, buf);
            if (start == 0) center = block_mean(x, n);
            add_moments(x, n, center, row);
            if (hist_kind != HIST_NONE) {
                if (hist_kind == HIST_LOG2) log2_bins(x, n, min_exp, bins, bin);
                else linear_bins(x, n, ranges + 3 * layer[c], bins, bin);
                count_bins(bin, n, bins, counts);
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
                int64_t n = numel[c] - start < BLOCK ? numel[c] - start : BLOCK;
                add_nonfinite(as_double(element(addr[c], start, dtype[c]), dtype[c], n, buf), n, row);
            }
        }
        if (hist_kind != HIST_NONE) flush_counts(counts, bins, hist + layer[c] * bins);
    }
    free(counts);
    return 0;
}

/* Linear histograms of chunks [first, last) (as in fgs_tensor_stats) over each layer's range, added to
   hist[layer * bins + bin], and over ranges[3 * num_layers : 3 * num_layers + 3], added to total[bin].
   The 32-bit counts are flushed into the 64-bit ones after every chunk, so they cannot wrap.
   Returns 0, or -1 when out of memory. */
int fgs_linear_hist(int64_t first, int64_t last, const int64_t *addr, const int64_t *numel,
                    const int32_t *dtype, const int64_t *layer, int32_t bins, const float *ranges,
                    int64_t num_layers, int64_t *hist, int64_t *total) {
    double buf[BLOCK];
    int32_t bin[BLOCK];
    uint32_t *counts = calloc((size_t)2 * COPIES * (bins + 1), sizeof *counts);
    uint32_t *total_counts = counts + COPIES * (bins + 1);
    if (!counts) return -1;
    for (int64_t c = first; c < last; c++) {
        for (int64_t start = 0; start < numel[c]; start += BLOCK) {
            int64_t n = numel[c] - start < BLOCK ? numel[c] - start : BLOCK;
            const double *x = as_double(element(addr[c], start, dtype[c]), dtype[c], n, buf);
            linear_bins(x, n, ranges + 3 * layer[c], bins, bin);
            count_bins(bin, n, bins, counts);
            linear_bins(x, n, ranges + 3 * num_layers, bins, bin);
            count_bins(bin, n, bins, total_counts);
        }
        flush_counts(counts, bins, hist + layer[c] * bins);
        flush_counts(total_counts, bins, total);
    }
    free(counts);
    return 0;
}

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

/* Pair rows of chunks [first, last): chunk c pairs numel[c] elements at a_addr[c] and b_addr[c] (and
   o_addr[c], unless it is 0: no origin), of dtypes dtypes[3 * c : 3 * c + 3]; its row goes to
   rows[c * PAIR_K : (c + 1) * PAIR_K]. Returns 0. */
int fgs_pair_stats(int64_t first, int64_t last, const int64_t *a_addr, const int64_t *b_addr,
                   const int64_t *o_addr, const int32_t *dtypes, const int64_t *numel, double *rows) {
    double a_buf[BLOCK], b_buf[BLOCK], o_buf[BLOCK], no_origin[BLOCK] = {0};
    for (int64_t c = first; c < last; c++) {
        double *row = rows + c * PAIR_K;
        const int32_t *dt = dtypes + 3 * c;
        memset(row, 0, sizeof *row * PAIR_K);
        row[PAIR_N] = (double)numel[c];
        for (int64_t start = 0; start < numel[c]; start += BLOCK) {
            int64_t n = numel[c] - start < BLOCK ? numel[c] - start : BLOCK;
            const double *a = as_double(element(a_addr[c], start, dt[0]), dt[0], n, a_buf);
            const double *b = as_double(element(b_addr[c], start, dt[1]), dt[1], n, b_buf);
            const double *o = o_addr[c] ? as_double(element(o_addr[c], start, dt[2]), dt[2], n, o_buf)
                                        : no_origin;
            add_pair_sums(a, b, o, n, row);
        }
    }
    return 0;
}
