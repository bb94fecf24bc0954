"""Fused multi-tensor statistics: every raw field and the histogram of many tensors in two launches.

Stage 1 (one program per chunk) reads each element once, accumulates in float32 and writes one float64 row of
partials per chunk (layout of :mod:`fastgradstats.rows`); histogram counts are added to [L, B] with integer
atomics (exact, so still deterministic). Stage 2 (one program per tensor) merges each tensor's chunk rows in a
fixed order into its output row. A linear histogram over per-layer data ranges runs stage 1 once more in
histogram-only mode, reading the ranges from device memory.

Each lane works on deviations d = x - c from the chunk's center c (the mean of its first block, or 0 if that
is not finite): it keeps Σd and a running (mean, M2) of d by Welford's update. At the end of a chunk the
lanes merge in float64 (Chan's formula) into Σx = n·c + Σd and M2 = Σ(x - mean)², which the row stores; stage
2 merges chunk M2s by Chan's formula too. Variances keep their precision when |mean| ≫ std (LayerNorm
weights near 1) whatever the order of the data or its outliers.

float16/bfloat16/float32 are accumulated in float32, float64 in float64 (so values beyond float32's range
stay finite and the log2 bins come from the float64 exponent, clamped like every other).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from fastgradstats.hist import HistSpec, linear_ranges
from fastgradstats.rows import FIRST_MAX, K, RawStats

from .chunking import chunk_span, edge_block
from .merge import merge_chunk_rows
from .segments import segment_table

DEFAULT_CHUNK_SIZE = 1 << 16
DEFAULT_BLOCK_SIZE = 2048
NUM_WARPS = 8

HIST_NONE, HIST_LOG2, HIST_LINEAR = 0, 1, 2

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}


FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _linear_bins(x, valid, lo, hi, scale, BINS: tl.constexpr, WIDE: tl.constexpr):
    """(bins int32, counted) of x by the linear rule of :mod:`fastgradstats.hist` over (lo, hi, scale)."""
    if WIDE:  # float64: finite values beyond float32's range saturate to ±FLT_MAX
        big = (tl.abs(x) > FLOAT32_MAX) & (tl.abs(x) < float("inf"))
        x = tl.where(big, tl.where(x > 0, FLOAT32_MAX, -FLOAT32_MAX), x)
    x = x.to(tl.float32)
    counted = valid & (x >= lo) & (x <= hi)  # False for NaN; ±inf lies outside every (finite) range
    scaled_lo = lo * scale
    position = tl.math.div_rn((tl.where(counted, x, lo) * scale - scaled_lo) * BINS, hi * scale - scaled_lo)
    position = tl.minimum(tl.maximum(position, 0.0), BINS - 1)
    return position.to(tl.int32), counted


@triton.jit
def _accumulate(
    x, valid, center, inv_count, lo, hi, scale, total_lo, total_hi, total_scale,
    sum_d, mean, m2, abs_sum, max_x, min_x, fmax_x, fmin_x, zeros, nonfinite, hist, total_hist,
    ROWS: tl.constexpr, HIST: tl.constexpr, TOTAL_HIST: tl.constexpr, WIDE: tl.constexpr,
    MIN_EXP: tl.constexpr, MAX_EXP: tl.constexpr, BINS: tl.constexpr, PADDED_BINS: tl.constexpr,
):
    """Fold one block of values x (float32, or float64 when WIDE; lanes where valid is False are ignored) into
    the accumulators.

    center: the chunk's shift c; inv_count: 1 / (the lane's element count including this one), for Welford.
    """
    abs_x = tl.abs(x)
    finite = abs_x < float("inf")  # False for NaN and ±Inf
    if ROWS:
        d = x - center
        sum_d += tl.where(valid, d, 0.0)
        delta = tl.where(valid, d - mean, 0.0)
        mean += delta * inv_count
        m2 += tl.where(valid, delta * (d - mean), 0.0)
        abs_sum += tl.where(valid, abs_x, 0.0)
        max_x = tl.maximum(max_x, tl.where(valid, x, float("-inf")))
        min_x = tl.minimum(min_x, tl.where(valid, x, float("inf")))
        fmax_x = tl.maximum(fmax_x, tl.where(valid & finite, x, float("-inf")))
        fmin_x = tl.minimum(fmin_x, tl.where(valid & finite, x, float("inf")))
        zeros += (valid & (x == 0.0)).to(tl.int32)
        nonfinite += (valid & ~finite).to(tl.int32)
    if HIST == 1:
        if WIDE:
            exponent = (((x.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023).to(tl.int32)
        else:
            exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        bins = tl.minimum(tl.maximum(exponent, MIN_EXP), MAX_EXP) - MIN_EXP
        hist += tl.histogram(bins, PADDED_BINS, mask=valid & finite & (x != 0.0))
    if HIST == 2:
        bins, counted = _linear_bins(x, valid, lo, hi, scale, BINS, WIDE)
        hist += tl.histogram(bins, PADDED_BINS, mask=counted)
        if TOTAL_HIST:
            bins, counted = _linear_bins(x, valid, total_lo, total_hi, total_scale, BINS, WIDE)
            total_hist += tl.histogram(bins, PADDED_BINS, mask=counted)
    return sum_d, mean, m2, abs_sum, max_x, min_x, fmax_x, fmin_x, zeros, nonfinite, hist, total_hist


@triton.jit
def _chunk_kernel(
    tensor_table, chunk_table, partials, hist_out, total_hist_out, ranges, num_layers,
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    NUM_FIELDS: tl.constexpr, ROWS: tl.constexpr, HIST: tl.constexpr, TOTAL_HIST: tl.constexpr,
    MIN_EXP: tl.constexpr, MAX_EXP: tl.constexpr, BINS: tl.constexpr, PADDED_BINS: tl.constexpr,
):
    """Stage 1: one chunk → one row of partials (ROWS) and its histogram counts added to hist_out (HIST)."""
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(chunk_table + 2 * pid)
    chunk_start = tl.load(chunk_table + 2 * pid + 1)
    base = tl.load(tensor_table + 4 * tensor).to(tl.pointer_type(DTYPE))
    head = tl.load(tensor_table + 4 * tensor + 1)
    numel = tl.load(tensor_table + 4 * tensor + 2)
    out_row = tl.load(tensor_table + 4 * tensor + 3)

    lo_idx, hi_idx, first_full, last_full = chunk_span(chunk_start, head, numel, CHUNK, BLOCK)

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
    WIDE: tl.constexpr = ACC == tl.float64

    sum_d = tl.zeros([BLOCK], ACC)
    mean = tl.zeros([BLOCK], ACC)
    m2 = tl.zeros([BLOCK], ACC)
    abs_sum = tl.zeros([BLOCK], ACC)
    max_x = tl.full([BLOCK], float("-inf"), ACC)
    min_x = tl.full([BLOCK], float("inf"), ACC)
    fmax_x = tl.full([BLOCK], float("-inf"), ACC)
    fmin_x = tl.full([BLOCK], float("inf"), ACC)
    zeros = tl.zeros([BLOCK], tl.int32)
    nonfinite = tl.zeros([BLOCK], tl.int32)
    hist = tl.zeros([PADDED_BINS], tl.int32)
    total_hist = tl.zeros([PADDED_BINS], tl.int32)

    lanes = tl.arange(0, BLOCK).to(tl.int64)
    all_valid = tl.full([BLOCK], 1, tl.int1)
    center = tl.full([], 0.0, ACC)
    if ROWS:
        first = tl.load(base + lo_idx + lanes, mask=lo_idx + lanes < hi_idx, other=0.0).to(ACC)
        center = tl.sum(first, 0) / tl.minimum(hi_idx - lo_idx, BLOCK).to(ACC)
        center = tl.where(tl.abs(center) < float("inf"), center, 0.0)
    for block in range(first_full, last_full):  # full blocks: aligned, unmasked, 16-byte vector loads
        offs = block * BLOCK + lanes
        ptrs = tl.max_contiguous(tl.multiple_of(base + offs, 16), BLOCK)
        x = tl.load(ptrs).to(ACC)
        inv_count = 1.0 / (block - first_full + 1).to(tl.float32)  # the same for every lane
        (sum_d, mean, m2, abs_sum, max_x, min_x, fmax_x, fmin_x, zeros, nonfinite, hist,
         total_hist) = _accumulate(
            x, all_valid, center, inv_count, lo, hi, scale, total_lo, total_hi, total_scale,
            sum_d, mean, m2, abs_sum, max_x, min_x, fmax_x, fmin_x, zeros, nonfinite, hist, total_hist,
            ROWS, HIST, TOTAL_HIST, WIDE, MIN_EXP, MAX_EXP, BINS, PADDED_BINS)
    # The partial blocks at either end of the chunk (empty when lo_idx / hi_idx are block-aligned).
    count = tl.zeros([BLOCK], tl.float32) + tl.maximum(last_full - first_full, 0).to(tl.float32)
    for edge in tl.static_range(2):
        offs, valid = edge_block(edge, lo_idx, hi_idx, first_full, last_full, lanes, BLOCK)
        x = tl.load(base + offs, mask=valid, other=0.0).to(ACC)
        count += valid.to(tl.float32)
        inv_count = 1.0 / tl.maximum(count, 1.0)
        (sum_d, mean, m2, abs_sum, max_x, min_x, fmax_x, fmin_x, zeros, nonfinite, hist,
         total_hist) = _accumulate(
            x, valid, center, inv_count, lo, hi, scale, total_lo, total_hi, total_scale,
            sum_d, mean, m2, abs_sum, max_x, min_x, fmax_x, fmin_x, zeros, nonfinite, hist, total_hist,
            ROWS, HIST, TOTAL_HIST, WIDE, MIN_EXP, MAX_EXP, BINS, PADDED_BINS)

    if ROWS:
        # Chan's merge of the lanes' (count, mean, M2), in float64.
        n = (hi_idx - lo_idx).to(tl.float64)
        sum_deviations = tl.sum(sum_d.to(tl.float64), 0)
        chunk_sum = n * center.to(tl.float64) + sum_deviations
        deviation = mean.to(tl.float64) - sum_deviations / n
        chunk_m2 = tl.sum(m2.to(tl.float64) + count.to(tl.float64) * deviation * deviation, 0)
        row = partials + pid * NUM_FIELDS  # field order of fastgradstats.rows
        tl.store(row + 0, n)
        tl.store(row + 1, chunk_sum)
        tl.store(row + 2, chunk_m2)
        tl.store(row + 3, tl.sum(abs_sum.to(tl.float64), 0))
        tl.store(row + 4, tl.sum(zeros, 0).to(tl.float64))
        tl.store(row + 5, tl.sum(nonfinite, 0).to(tl.float64))
        tl.store(row + 6, tl.max(max_x, 0).to(tl.float64))
        tl.store(row + 7, -tl.min(min_x, 0).to(tl.float64))
        tl.store(row + 8, tl.max(fmax_x, 0).to(tl.float64))
        tl.store(row + 9, -tl.min(fmin_x, 0).to(tl.float64))
    if HIST != 0:
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


def raw_stats(
    tensors: list[torch.Tensor],
    spec: HistSpec | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    before_ranges: Callable[[torch.Tensor], None] | None = None,
) -> RawStats:
    """Raw rows [L, K] float64 (and int64 histogram counts) of 1-D dense tensors on one device.

    Launches, per dtype group, stage 1 (skipped when the group has no element) and stage 2; a linear
    histogram over per-layer data ranges adds one histogram-only stage 1 per group, after
    ``before_ranges(rows)`` when given (the distributed layer merges all ranks' maxima there). No host sync.
    """
    check_sizes(chunk_size, block_size)
    num_layers = len(tensors)
    device = tensors[0].device
    rows = torch.empty(num_layers, K, dtype=torch.float64, device=device)
    hist = total_hist = ranges = None
    hist_mode = HIST_NONE
    if spec is not None:
        hist = torch.zeros(num_layers, spec.bins, dtype=torch.int64, device=device)
        hist_mode = HIST_LOG2 if spec.kind == "log2" else HIST_LINEAR
        if spec.kind == "linear" and spec.range is not None:
            ranges = linear_ranges(spec, rows)
    per_layer_ranges = hist_mode == HIST_LINEAR and ranges is None

    groups: dict[torch.dtype, list[int]] = {}
    for layer, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(layer)
    tables = {dtype: segment_table([tensors[i] for i in layers], layers, chunk_size)
              for dtype, layers in groups.items()}

    for dtype, table in tables.items():
        partials = torch.empty(table.num_chunks, K, dtype=torch.float64, device=device)
        mode = HIST_NONE if per_layer_ranges else hist_mode
        _launch_chunks(table, dtype, spec, mode, partials, hist, None, ranges, chunk_size, block_size)
        merge_chunk_rows(table, partials, rows, FIRST_MAX, chan=True)

    if per_layer_ranges:  # needs every layer's finite [min, max], so after all groups' stage 2
        if before_ranges is not None:
            before_ranges(rows)
        ranges = linear_ranges(spec, rows)
        total_hist = torch.zeros(spec.bins, dtype=torch.int64, device=device)
        for dtype, table in tables.items():
            _launch_chunks(table, dtype, spec, HIST_LINEAR, None, hist, total_hist, ranges, chunk_size,
                           block_size)
    return RawStats(rows, hist, total_hist)


def _launch_chunks(table, dtype, spec, hist_mode, partials, hist, total_hist, ranges, chunk_size, block_size):
    """Launch stage 1 over a group's chunks: raw-row partials when ``partials`` is given, histograms per
    mode."""
    if table.num_chunks == 0:
        return
    unused = table.tensors  # any tensor will do for a pointer argument a specialization never reads
    _chunk_kernel[(table.num_chunks,)](
        table.tensors, table.chunks,
        unused if partials is None else partials,
        unused if hist is None else hist,
        unused if total_hist is None else total_hist,
        unused if ranges is None else ranges,
        0 if ranges is None else ranges.shape[0] - 1,
        DTYPE=TL_DTYPES[dtype], ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        CHUNK=chunk_size, BLOCK=block_size, NUM_FIELDS=K,
        ROWS=partials is not None, HIST=hist_mode, TOTAL_HIST=total_hist is not None,
        MIN_EXP=spec.min_exp if spec else 0, MAX_EXP=spec.max_exp if spec else 0,
        BINS=spec.bins if spec else 1, PADDED_BINS=spec.padded_bins if spec else 1,
        num_warps=NUM_WARPS,
    )
