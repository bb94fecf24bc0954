"""Fused multi-tensor statistics: every raw field and the histogram of many tensors in two launches.

Stage 1 (one program per chunk) reads each element once, accumulates in float32 and writes one float64 row of
partials per chunk (layout of :mod:`fastgradstats.rows`); histogram counts are added to [L, B] with integer
atomics (exact, so still deterministic). Stage 2 (one program per tensor) merges each tensor's chunk rows in a
fixed order into its output row. A linear histogram over per-layer data ranges runs stage 1 once more in
histogram-only mode, reading the ranges from device memory.

A program reads its chunk in 16 KB tiles [R, VEC], VEC elements (16 bytes) per row, so every thread issues
several independent 16-byte loads per tile and folds whole rows into its own rows' accumulators in
registers: few registers, many loads in flight (``python -m fastgradstats.kernels.roofline`` shows the
compiled result). Row r keeps Σd and Σd² of d = x - c_r, c_r one of its own elements (exact for values
within a factor 2 of it), Σ|x|, max, min and zeros; at the end of the chunk the rows merge in float64 by
Chan's formula into Σx and M2 = Σ(x - mean)², which the row stores, and stage 2 merges chunk M2s the same
way. Variances keep their precision when |mean| ≫ std (LayerNorm weights near 1), and an outlier costs
precision only in its own row. NaN/Inf counts and the finite extremes come from a second pass over the
chunk, only when its Σ|x| is not finite. The log2 histogram of 32-bit values counts exponent fields (no
clamp, no mask per element) and folds them into the clamped bins once per chunk. 16-bit rows tally their
nonzeros as Σ min(|x|, u), u the dtype's least subnormal (a min and an add per element, no compare), and
full bfloat16 tiles are read as int32 words, each widened to two float32 by a shift and a mask.

float16/bfloat16/float32 are accumulated in float32, float64 in float64 (so values beyond float32's range
stay finite and the log2 bins come from the float64 exponent, clamped like every other).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgradstats.hist import HistSpec
from fastgradstats.rows import FIRST_MAX, K

from .chunking import chunk_span, edge_range
from .merge import merge_chunk_rows
from .segments import segment_table

DEFAULT_CHUNK_SIZE = 1 << 16
DEFAULT_BLOCK_SIZE = 2048  # pair statistics' block
NUM_WARPS = 8
LOADS_PER_THREAD = 4  # independent 16-byte loads in flight per thread and tile
TILE_BYTES = NUM_WARPS * 32 * LOADS_PER_THREAD * 16  # a statistics tile: 16 KB whatever the dtype
# The histogram-only pass bins 16 elements per thread and tile (8 KB of bfloat16): with 32, their predicates
# overflow the predicate registers and ptxas spends instructions packing them (roofline: 23.5 -> 21.8 per
# element, bfloat16, sm_90).
HIST_ONLY_TILE = NUM_WARPS * 32 * 16

HIST_NONE, HIST_LOG2, HIST_LINEAR = 0, 1, 2

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}


FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
# The smallest magnitude of each 16-bit dtype (its least subnormal), by which they tally nonzeros (_moments).
NONZERO_UNITS = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}


@triton.jit
def _linear_bins(x, valid, lo, hi, scale, BINS: tl.constexpr, WIDE: tl.constexpr, DATA_RANGE: tl.constexpr):
    """int32 bins of x by the linear rule of :mod:`fastgradstats.hist` over (lo, hi, scale); values not
    counted (outside [lo, hi], non-finite, or not valid) go to the spill slot BINS. A DATA_RANGE holds every
    finite value of x (see :func:`linear_hist`), so only the finite ones are tested.

    The rule's correctly rounded division n / w (w = hi·s - lo·s, normal by the choice of s) is n·r with
    r = 1/w, corrected by one exact residual (Markstein): q0 = n·r, e = n - q0·w (exact with an fma),
    q = q0 + e·r is n / w correctly rounded for normal n; a subnormal n gives a quotient < 1 either way, so
    the same bin 0. Three fmas instead of a division per element.
    """
    if WIDE:  # float64: finite values beyond float32's range saturate to ±FLT_MAX
        big = (tl.abs(x) > FLOAT32_MAX) & (tl.abs(x) < float("inf"))
        x = tl.where(big, tl.where(x > 0, FLOAT32_MAX, -FLOAT32_MAX), x)
    x = x.to(tl.float32)
    if DATA_RANGE:
        counted = valid & (tl.abs(x) < float("inf"))
    else:
        counted = valid & (x >= lo) & (x <= hi)  # False for NaN; ±inf lies outside every (finite) range
    scaled_lo = lo * scale
    width = hi * scale - scaled_lo
    inverse = tl.math.div_rn(1.0, width)  # loop-invariant: hoisted out of the caller's loop
    if (BINS & (BINS - 1)) == 0:  # (x·s - lo·s)·BINS in one rounding: scaling by 2^k is exact
        n = tl.fma(x, scale * BINS, -scaled_lo * BINS)
    else:
        n = (x * scale - scaled_lo) * BINS
    q0 = n * inverse
    q = tl.fma(tl.fma(-q0, width, n), inverse, q0)  # >= 0 where counted
    # Clamped after the conversion, as unsigned: that also shows the compiler every slot is in range, so
    # tl.histogram needs no branch. Uncounted lanes may convert NaN or ±inf: their slot is BINS anyway.
    index = tl.minimum(q.to(tl.int32).to(tl.uint32), BINS - 1)
    return tl.where(counted, index, BINS).to(tl.int32)


@triton.jit
def _moments(x, x_loaded, valid, shift, sum_d, sum_d2, abs_sum, max_x, min_x, zero_tally, FULL: tl.constexpr,
             ZEROS: tl.constexpr, NONZERO_UNIT: tl.constexpr):
    """Fold a tile x [R, V] (lanes where valid is False are ignored unless FULL) into per-row accumulators
    [R]: Σd, Σd² of d = x - shift (shift [R]), Σ|x|, max, min and, if ZEROS, the zero tally (see
    :func:`_zero_count`); x_loaded is the tile as loaded (float16: before its upcast to x)."""
    d = x - shift[:, None]
    if FULL:
        abs_x = tl.abs(x)
        hi = x
        lo = x
        is_zero = x == 0.0
    else:
        d = tl.where(valid, d, 0.0)
        abs_x = tl.where(valid, tl.abs(x), 0.0)
        hi = tl.where(valid, x, float("-inf"))
        lo = tl.where(valid, x, float("inf"))
        is_zero = valid & (x == 0.0)
    sum_d += tl.sum(d, 1)
    sum_d2 += tl.sum(d * d, 1)
    abs_sum += tl.sum(abs_x, 1)
    max_x = tl.maximum(max_x, tl.max(hi, 1))
    min_x = tl.minimum(min_x, tl.min(lo, 1))
    if ZEROS and NONZERO_UNIT > 0:
        # min(|x|, u) is u for every nonzero (NaN included) and 0 for zeros and invalid lanes: a min and an
        # add per element, where x == 0 compiles to a 16-bit compare, a select and an add. On a full float16
        # tile both run on pairs of float16 (exact: VEC·u is a float16).
        magnitude = tl.abs(x_loaded) if FULL else abs_x
        zero_tally += tl.sum(tl.minimum(magnitude, NONZERO_UNIT), 1).to(tl.float32)
    elif ZEROS:
        # Summed as floats (exact: at most VEC ones): an integer sum compiles to a branchless +1 and a
        # predicated move per element, one instruction more.
        zero_tally += tl.sum(tl.where(is_zero, 1.0, 0.0), 1).to(tl.int32)
    return sum_d, sum_d2, abs_sum, max_x, min_x, zero_tally


@triton.jit
def _zero_count(zero_tally, count, NONZERO_UNIT: tl.constexpr):
    """The zeros among the count [R] elements of the rows: the tally [R] is their zero count (int32) or, for
    16-bit inputs (NONZERO_UNIT > 0, their smallest magnitude), NONZERO_UNIT × their nonzero count (float32,
    exact)."""
    zeros = zero_tally
    if NONZERO_UNIT > 0:
        zeros = count - (zero_tally.to(tl.float64) * (1.0 / NONZERO_UNIT)).to(tl.int32)
    return tl.sum(zeros, 0)


@triton.jit
def _histogram(x, valid, lo, hi, scale, HIST: tl.constexpr, WIDE: tl.constexpr, MIN_EXP: tl.constexpr,
               MAX_EXP: tl.constexpr, BINS: tl.constexpr, PADDED_BINS: tl.constexpr, SIZE: tl.constexpr,
               DATA_RANGE: tl.constexpr):
    """int32 [PADDED_BINS] counts of a tile x [R, V] of SIZE = R·V elements (slots of :func:`_slots`)."""
    slots = _slots(x, valid, lo, hi, scale, HIST, WIDE, MIN_EXP, MAX_EXP, BINS, DATA_RANGE)
    return tl.histogram(tl.reshape(slots, [SIZE]), PADDED_BINS)


@triton.jit
def _histogram_of_halves(x_even, x_odd, valid, lo, hi, scale, HIST: tl.constexpr, WIDE: tl.constexpr,
                         MIN_EXP: tl.constexpr, MAX_EXP: tl.constexpr, BINS: tl.constexpr,
                         PADDED_BINS: tl.constexpr, SIZE: tl.constexpr, DATA_RANGE: tl.constexpr):
    """int32 [PADDED_BINS] counts of a tile read as words (see _chunk_kernel), its even and odd elements
    [R, V / 2] counted together, SIZE = R·V: one tl.histogram (its barriers) per tile."""
    slots = tl.join(_slots(x_even, valid, lo, hi, scale, HIST, WIDE, MIN_EXP, MAX_EXP, BINS, DATA_RANGE),
                    _slots(x_odd, valid, lo, hi, scale, HIST, WIDE, MIN_EXP, MAX_EXP, BINS, DATA_RANGE))
    return tl.histogram(tl.reshape(slots, [SIZE]), PADDED_BINS)


@triton.jit
def _slots(x, valid, lo, hi, scale, HIST: tl.constexpr, WIDE: tl.constexpr, MIN_EXP: tl.constexpr,
           MAX_EXP: tl.constexpr, BINS: tl.constexpr, DATA_RANGE: tl.constexpr):
    """int32 histogram slots of a tile x [R, V] (HIST 1: log2, 2: linear, over a data range if DATA_RANGE).

    Every lane goes to some slot, so the count needs no mask (no branch per element). log2 of 32-bit values
    counts float32 exponent fields (slot 256: invalid lanes), which :func:`_fold_fields` folds into the
    clamped bins once per chunk; float64 (WIDE) counts bins, with slots BINS for zeros, BINS + 1 for NaN and
    ±Inf, BINS + 2 for invalid lanes; linear counts bins, with slot BINS for everything not counted.
    """
    if HIST == 1 and not WIDE:  # the exponent field: 0 for zeros and subnormals, 255 for NaN and ±Inf
        bins = tl.where(valid, (x.to(tl.int32, bitcast=True) >> 23) & 0xFF, 256)
    elif HIST == 1:  # floor(log2|x|) from the float64 exponent field
        if WIDE:
            bits = x.to(tl.int64, bitcast=True)
            field = ((bits >> 52) & 0x7FF).to(tl.int32)
            magnitude = bits & 0x7FFFFFFFFFFFFFFF
            exponent = field - 1023
            special = 0x7FF
        else:
            bits = x.to(tl.int32, bitcast=True)
            field = (bits >> 23) & 0xFF
            magnitude = bits & 0x7FFFFFFF
            exponent = field - 127
            special = 0xFF
        bins = tl.minimum(tl.maximum(exponent, MIN_EXP), MAX_EXP) - MIN_EXP
        bins = tl.where(field == special, BINS + 1, bins)
        bins = tl.where(magnitude == 0, BINS, bins)
        bins = tl.where(valid, bins, BINS + 2)
    else:
        bins = _linear_bins(x, valid, lo, hi, scale, BINS, WIDE, DATA_RANGE)
    return bins


@triton.jit
def _fold_fields(fields, zeros, hist_out, MIN_EXP: tl.constexpr, MAX_EXP: tl.constexpr, BINS: tl.constexpr,
                 PADDED_BINS: tl.constexpr):
    """Add counts per float32 exponent field (int32 [PADDED_BINS], slots 0..255) to the log2 bins at
    hist_out [BINS]: field f holds values in [2^(f-127), 2^(f-126)), clamped to [MIN_EXP, MAX_EXP]; field 0
    also holds the ``zeros`` (not binned), field 255 NaN and ±Inf (not binned)."""
    field = tl.arange(0, PADDED_BINS)
    counts = (fields - tl.where(field == 0, zeros, 0)).to(tl.int64)
    bins = tl.minimum(tl.maximum(field - 127, MIN_EXP), MAX_EXP) - MIN_EXP
    tl.atomic_add(hist_out + bins, counts, mask=(field < 255) & (counts > 0))


@triton.jit
def _chunk_kernel(
    tensor_table, chunk_table, partials, hist_out, total_hist_out, ranges, num_layers,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
    NUM_FIELDS: tl.constexpr, ROWS: tl.constexpr, HIST: tl.constexpr, TOTAL_HIST: tl.constexpr,
    MIN_EXP: tl.constexpr, MAX_EXP: tl.constexpr, BINS: tl.constexpr, PADDED_BINS: tl.constexpr,
    NONZERO_UNIT: tl.constexpr,
):
    """Stage 1: one chunk → one row of partials (ROWS) and its histogram counts added to hist_out (HIST).

    The chunk is read in tiles [R, VEC] of BLOCK = R·VEC elements, VEC elements (16 bytes) per row, so each
    thread loads whole rows with 16-byte loads and folds them into its rows' accumulators in registers. Row r
    accumulates Σd, Σd² of d = x - c_r, c_r one of the row's own elements (exact for values within a factor
    2 of it); rows merge by Chan's formula in float64 at the end. Finite extremes and the non-finite count
    come from a second pass over the chunk only when its Σ|x| is not finite (rare).
    """
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(chunk_table + 2 * pid)
    chunk_start = tl.load(chunk_table + 2 * pid + 1)
    base = tl.load(tensor_table + 4 * tensor).to(tl.pointer_type(DTYPE))
    head = tl.load(tensor_table + 4 * tensor + 1)
    numel = tl.load(tensor_table + 4 * tensor + 2)
    out_row = tl.load(tensor_table + 4 * tensor + 3)

    lo_idx, hi_idx, first_full, last_full = chunk_span(chunk_start, head, numel, CHUNK, BLOCK)
    R: tl.constexpr = BLOCK // VEC
    rows = tl.arange(0, R).to(tl.int64)
    lanes = rows[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [R, VEC] offsets within a tile
    # bfloat16 full tiles are read as int32 words, [R, VEC / 2], each widened to two float32 by a shift and
    # a mask (1 instruction per element, where a bfloat16 load widens the upper halves in 2).
    WORDS: tl.constexpr = DTYPE == tl.bfloat16
    words = base.to(tl.pointer_type(tl.int32))
    word_lanes = rows[:, None] * (VEC // 2) + tl.arange(0, VEC // 2)[None, :]  # [R, VEC / 2]
    WIDE: tl.constexpr = ACC == tl.float64
    ZEROS: tl.constexpr = not (HIST == 1 and WIDE)  # float64 log2 histograms count zeros in a slot

    lo = 0.0
    hi = 1.0
    scale = 1.0
    total_lo = 0.0
    total_hi = 1.0
    total_scale = 1.0
    if HIST == 2:  # ranges: float32 [L + 1, 3] (lo, hi, scale), see fastgradstats.hist.linear_ranges
        lo = tl.load(ranges + 3 * out_row)
        hi = tl.load(ranges + 3 * out_row + 1)
        scale = tl.load(ranges + 3 * out_row + 2)
        total_lo = tl.load(ranges + 3 * num_layers)
        total_hi = tl.load(ranges + 3 * num_layers + 1)
        total_scale = tl.load(ranges + 3 * num_layers + 2)

    shift = tl.zeros([R], ACC)
    if ROWS:  # c_r: element lo + r·VEC of the chunk (its last element when the chunk is shorter)
        shift = tl.load(base + tl.minimum(lo_idx + rows * VEC, hi_idx - 1)).to(ACC)
        shift = tl.where(tl.abs(shift) < float("inf"), shift, 0.0)
    sum_d = tl.zeros([R], ACC)
    sum_d2 = tl.zeros([R], ACC)
    abs_sum = tl.zeros([R], ACC)
    max_x = tl.full([R], float("-inf"), ACC)
    min_x = tl.full([R], float("inf"), ACC)
    if NONZERO_UNIT > 0:
        zero_tally = tl.zeros([R], tl.float32)
    else:
        zero_tally = tl.zeros([R], tl.int32)
    count = tl.zeros([R], tl.int32) + VEC * tl.maximum(last_full - first_full, 0).to(tl.int32)
    hist = tl.zeros([PADDED_BINS], tl.int32)
    total_hist = tl.zeros([PADDED_BINS], tl.int32)

    all_valid = tl.full([R, 1], 1, tl.int1)
    for block in range(first_full, last_full):  # full tiles: aligned, unmasked, 16-byte vector loads
        if WORDS:
            p_words = words + (block * (BLOCK // 2) + word_lanes)
            word = tl.load(tl.max_contiguous(tl.multiple_of(p_words, [16, 16]), [1, VEC // 2]))
            x = (word << 16).to(tl.float32, bitcast=True)  # [R, VEC // 2]: the even elements
            x_odd = (word & -65536).to(tl.float32, bitcast=True)  # the odd elements
            x_loaded = x
        else:
            ptrs = base + (block * BLOCK + lanes)
            x_loaded = tl.load(tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, VEC]))
            x = x_loaded.to(ACC)
        if ROWS:
            sum_d, sum_d2, abs_sum, max_x, min_x, zero_tally = _moments(
                x, x_loaded, all_valid, shift, sum_d, sum_d2, abs_sum, max_x, min_x, zero_tally, True, ZEROS,
                NONZERO_UNIT)
            if WORDS:
                sum_d, sum_d2, abs_sum, max_x, min_x, zero_tally = _moments(
                    x_odd, x_odd, all_valid, shift, sum_d, sum_d2, abs_sum, max_x, min_x, zero_tally, True,
                    ZEROS, NONZERO_UNIT)
        if HIST != 0 and WORDS:
            hist += _histogram_of_halves(x, x_odd, all_valid, lo, hi, scale, HIST, WIDE, MIN_EXP, MAX_EXP,
                                         BINS, PADDED_BINS, BLOCK, TOTAL_HIST)
            if TOTAL_HIST:
                total_hist += _histogram_of_halves(x, x_odd, all_valid, total_lo, total_hi, total_scale,
                                                   HIST, WIDE, MIN_EXP, MAX_EXP, BINS, PADDED_BINS, BLOCK,
                                                   TOTAL_HIST)
        elif HIST != 0:
            hist += _histogram(x, all_valid, lo, hi, scale, HIST, WIDE, MIN_EXP, MAX_EXP, BINS, PADDED_BINS,
                               BLOCK, TOTAL_HIST)
            if TOTAL_HIST:
                total_hist += _histogram(x, all_valid, total_lo, total_hi, total_scale, HIST, WIDE, MIN_EXP,
                                         MAX_EXP, BINS, PADDED_BINS, BLOCK, TOTAL_HIST)
    for edge in tl.static_range(2):  # the partial tiles at either end, R elements a step (few registers)
        edge_lo, edge_hi = edge_range(edge, lo_idx, hi_idx, first_full, last_full, BLOCK)
        for start in range(edge_lo, edge_hi, R):
            valid = (start + rows < edge_hi)[:, None]  # [R, 1]
            x = tl.load(base + start + rows[:, None], mask=valid, other=0.0).to(ACC)
            if ROWS:
                count += tl.sum(valid.to(tl.int32), 1)
                sum_d, sum_d2, abs_sum, max_x, min_x, zero_tally = _moments(
                    x, x, valid, shift, sum_d, sum_d2, abs_sum, max_x, min_x, zero_tally, False, ZEROS,
                    NONZERO_UNIT)
            if HIST != 0:
                hist += _histogram(x, valid, lo, hi, scale, HIST, WIDE, MIN_EXP, MAX_EXP, BINS, PADDED_BINS,
                                   R, TOTAL_HIST)
                if TOTAL_HIST:
                    total_hist += _histogram(x, valid, total_lo, total_hi, total_scale, HIST, WIDE, MIN_EXP,
                                             MAX_EXP, BINS, PADDED_BINS, R, TOTAL_HIST)

    if ROWS:
        # Rows to the chunk by Chan's formula, in float64: n_r, mean_r = c_r + Σd/n_r, M2_r = Σd² - (Σd)²/n_r.
        n_r = count.to(tl.float64)
        sum_r = sum_d.to(tl.float64)
        safe_n_r = tl.maximum(n_r, 1.0)
        mean_r = shift.to(tl.float64) + sum_r / safe_n_r
        n = (hi_idx - lo_idx).to(tl.float64)
        chunk_sum = tl.sum(n_r * shift.to(tl.float64) + sum_r, 0)
        spread = tl.where(n_r > 0, n_r * (mean_r - chunk_sum / n) * (mean_r - chunk_sum / n), 0.0)
        chunk_m2 = tl.sum(sum_d2.to(tl.float64) - sum_r * sum_r / safe_n_r + spread, 0)
        abs_total = tl.sum(abs_sum.to(tl.float64), 0)
        chunk_max = tl.max(max_x, 0).to(tl.float64)
        chunk_min = tl.min(min_x, 0).to(tl.float64)
        nonfinite = tl.zeros([], tl.float64)
        finite_max = chunk_max
        finite_min = chunk_min
        if not (abs_total < float("inf")):  # a NaN or Inf: count them and find the finite extremes
            nonfinite_r = tl.zeros([R], tl.int32)
            fmax_r = tl.full([R], float("-inf"), ACC)
            fmin_r = tl.full([R], float("inf"), ACC)
            for start in range(lo_idx, hi_idx, R):  # R elements a step: few registers for a rare path
                in_chunk = start + rows < hi_idx
                value = tl.load(base + start + rows, mask=in_chunk, other=0.0).to(ACC)
                finite = in_chunk & (tl.abs(value) < float("inf"))
                nonfinite_r += (in_chunk & ~finite).to(tl.int32)
                fmax_r = tl.maximum(fmax_r, tl.where(finite, value, float("-inf")))
                fmin_r = tl.minimum(fmin_r, tl.where(finite, value, float("inf")))
            nonfinite = tl.sum(nonfinite_r, 0).to(tl.float64)
            finite_max = tl.max(fmax_r, 0).to(tl.float64)
            finite_min = tl.min(fmin_r, 0).to(tl.float64)
        row = partials + pid * NUM_FIELDS  # field order of fastgradstats.rows
        tl.store(row + 0, n)
        tl.store(row + 1, chunk_sum)
        tl.store(row + 2, chunk_m2)
        tl.store(row + 3, abs_total)
        if ZEROS:
            zero_count = _zero_count(zero_tally, count, NONZERO_UNIT)
        else:  # counted in the histogram's zero slot
            zero_count = tl.sum(tl.where(tl.arange(0, PADDED_BINS) == BINS, hist, 0), 0)
        tl.store(row + 4, zero_count.to(tl.float64))
        tl.store(row + 5, nonfinite)
        tl.store(row + 6, chunk_max)
        tl.store(row + 7, -chunk_min)
        tl.store(row + 8, finite_max)
        tl.store(row + 9, -finite_min)
    if HIST == 1 and not WIDE:
        _fold_fields(hist, _zero_count(zero_tally, count, NONZERO_UNIT), hist_out + out_row * BINS, MIN_EXP,
                     MAX_EXP, BINS, PADDED_BINS)
    elif HIST != 0:
        bins = tl.arange(0, PADDED_BINS)
        tl.atomic_add(hist_out + out_row * BINS + bins, hist.to(tl.int64), mask=bins < BINS)
        if TOTAL_HIST:
            tl.atomic_add(total_hist_out + bins, total_hist.to(tl.int64), mask=bins < BINS)


def check_sizes(chunk_size: int, block_size: int) -> None:
    """Blocks must be powers of two of at least 16 elements (16-byte alignment of full blocks) dividing
    chunks."""
    if block_size < 16 or block_size & (block_size - 1) or chunk_size < block_size or chunk_size % block_size:
        raise ValueError(
            "block_size must be a power of two >= 16 that divides chunk_size, "
            f"got {block_size} and {chunk_size}"
        )


def raw_rows(
    tensors: list[torch.Tensor],
    spec: HistSpec | None = None,
    ranges: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw rows float64 [L, K] and int64 [L, B] log2 or fixed-range (``ranges`` float32 [L + 1, 3])
    histogram counts of 1-D dense tensors on one device (the backend protocol of
    :class:`fastgradstats.dispatch.Backend`).

    ``block_size``: elements per tile (default: TILE_BYTES of each dtype); tests pass small sizes.
    Launches, per dtype group, stage 1 (skipped when the group has no element) and stage 2. No host sync.
    """
    device = tensors[0].device
    rows = torch.empty(len(tensors), K, dtype=torch.float64, device=device)
    hist = None if spec is None else torch.zeros(len(tensors), spec.bins, dtype=torch.int64, device=device)
    hist_mode = HIST_NONE if spec is None else HIST_LOG2 if spec.kind == "log2" else HIST_LINEAR
    for dtype, table in _tables(tensors, chunk_size, block_size).items():
        partials = torch.empty(table.num_chunks, K, dtype=torch.float64, device=device)
        _launch_chunks(table, dtype, spec, hist_mode, partials, hist, None, ranges, chunk_size, block_size)
        merge_chunk_rows(table, partials, rows, FIRST_MAX, chan=True)
    return rows, hist


def linear_hist(
    tensors: list[torch.Tensor],
    spec: HistSpec,
    ranges: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [L, B] linear-histogram counts of each tensor over its range in ``ranges`` float32 [L + 1, 3]
    (read on the device: no sync), and int64 [B] counts of all tensors over the last range: one
    histogram-only stage 1 per dtype group. The ranges are data ranges
    (:func:`fastgradstats.hist.linear_ranges`): they hold every finite value, so the kernel tests finiteness
    only."""
    device = tensors[0].device
    hist = torch.zeros(len(tensors), spec.bins, dtype=torch.int64, device=device)
    total_hist = torch.zeros(spec.bins, dtype=torch.int64, device=device)
    for dtype, table in _tables(tensors, chunk_size, block_size).items():
        _launch_chunks(table, dtype, spec, HIST_LINEAR, None, hist, total_hist, ranges, chunk_size,
                       block_size)
    return hist, total_hist


def _tables(tensors: list[torch.Tensor], chunk_size: int, block_size: int | None) -> dict:
    """The (cached) segment table of each dtype group of ``tensors``, after checking the tile sizes."""
    groups: dict[torch.dtype, list[int]] = {}
    for layer, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(layer)
    for dtype in groups:
        check_sizes(chunk_size, _block(dtype, block_size))
    return {dtype: segment_table([tensors[i] for i in layers], layers, chunk_size)
            for dtype, layers in groups.items()}


def _histogram_slots(spec: HistSpec | None, hist_mode: int, dtype: torch.dtype) -> int:
    """Slots of the in-kernel histogram (see _histogram): exponent fields and an invalid-lane slot for 32-bit
    log2, else the bins and their spill slots, rounded up to a power of two."""
    if hist_mode == HIST_NONE:
        return 1
    if hist_mode == HIST_LOG2 and dtype != torch.float64:
        return 512
    return triton.next_power_of_2(spec.bins + 3)


def _block(dtype: torch.dtype, block_size: int | None, rows: bool = True) -> int:
    """Elements per tile: TILE_BYTES, or at most HIST_ONLY_TILE elements in the histogram-only pass."""
    if block_size is not None:
        return block_size
    return TILE_BYTES // dtype.itemsize if rows else min(TILE_BYTES // dtype.itemsize, HIST_ONLY_TILE)


def _nonzero_unit(dtype: torch.dtype, chunk_size: int, block_size: int, vec: int) -> float:
    """NONZERO_UNITS[dtype] (see _moments) where a row's float32 tally stays exact, at most 2^24 elements a
    row and chunk (its full tiles and both partial ones); else 0: zeros are compared and counted."""
    per_row = chunk_size // (block_size // vec) + 2 * vec
    return NONZERO_UNITS.get(dtype, 0.0) if per_row <= 2**24 else 0.0


def _launch_chunks(table, dtype, spec, hist_mode, partials, hist, total_hist, ranges, chunk_size, block_size):
    """Launch stage 1 over a group's chunks: raw-row partials when ``partials`` is given, histograms per
    mode."""
    if table.num_chunks == 0:
        return
    block_size = _block(dtype, block_size, rows=partials is not None)
    vec = min(16 // dtype.itemsize, block_size)
    unused = table.tensors  # any tensor will do for a pointer argument a specialization never reads
    _chunk_kernel[(table.num_chunks,)](
        table.tensors, table.chunks,
        unused if partials is None else partials,
        unused if hist is None else hist,
        unused if total_hist is None else total_hist,
        unused if ranges is None else ranges,
        0 if ranges is None else ranges.shape[0] - 1,
        DTYPE=TL_DTYPES[dtype], ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        CHUNK=chunk_size, BLOCK=block_size, VEC=vec, NUM_FIELDS=K,
        ROWS=partials is not None, HIST=hist_mode, TOTAL_HIST=total_hist is not None,
        MIN_EXP=spec.min_exp if spec else 0, MAX_EXP=spec.max_exp if spec else 0,
        BINS=spec.bins if spec else 1, PADDED_BINS=_histogram_slots(spec, hist_mode, dtype),
        NONZERO_UNIT=_nonzero_unit(dtype, chunk_size, block_size, vec), num_warps=NUM_WARPS,
    )
