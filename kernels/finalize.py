"""The last launch of a call: every user-facing field of every layer and of the total, from the raw rows.

:func:`fastgradstats.rows.derive` / :func:`~fastgradstats.rows.derive_pair` and
:func:`~fastgradstats.rows.merge_rows` are the PyTorch twins; this kernel computes the same numbers in one
launch instead of some fifty small torch ops, so that reading a field of a result is a view. Program p
derives layers [p·LAYERS, (p + 1)·LAYERS); program 0 also merges all rows into the total row (M2 by Chan's
formula), derives it into the last column, sums the layers' histograms into the total histogram and writes
the log2 edges.

Outputs (written, never read): ``floats`` float32 [F, L + 1] and ``counts`` int64 [C, L + 1], one field per
row (layer l in column l, the total in column L); ``total_row`` float64 [K]; optional ``total_hist`` int64 [B]
and ``edges`` float32 [B + 1]; ``total_norms`` float64 [2] (the total's l2 and linf, for clipping); with a
histogram, ``hist_sums`` float64 [2, L + 1] (:data:`HIST_SUMS`, see
:func:`fastgradstats.rows.derive_hist_sums`).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fastgradstats.hist import HistSpec
from fastgradstats.rows import COSINE_EPS, PAIR_K, K

LAYERS = 128  # layers per program
TENSOR_FLOATS = ("sum", "mean", "std", "l1", "l2", "linf", "min", "max", "mean_abs")
TENSOR_COUNTS = ("numel", "zeros", "nonfinite")
HIST_SUMS = ("hist_sum", "hist_sum_squares")
PAIR_FLOATS = ("dot", "a_l2", "b_l2", "cos", "dist", "ratio")
PAIR_COUNTS = ("numel",)


@triton.jit
def _tensor_fields(n, total, m2, abs_sum, zeros, nonfinite, max_x, neg_min, floats, counts, column, stride,
                   mask):
    """Store the derived fields of rows given as float64 field vectors (see fastgradstats.rows.derive)."""
    empty = n == 0
    has_nan = ~(tl.abs(abs_sum) <= float("inf"))  # only NaN compares false
    m2 = tl.where(m2 < 0, 0.0, m2)  # keeps NaN, unlike a maximum
    mean = total / n
    square_sum = m2 + tl.where(empty, 0.0, total * total / tl.where(empty, 1.0, n))
    finite = tl.abs(abs_sum) < float("inf")
    l2 = tl.where(finite, tl.sqrt(square_sum), abs_sum)
    linf = tl.where(max_x > neg_min, max_x, neg_min)
    linf = tl.where(linf < 0, 0.0, linf)
    linf = tl.where(has_nan, float("nan"), tl.where(empty, 0.0, linf))
    unset = has_nan | empty
    values = (total, mean, tl.sqrt(m2 / n), abs_sum, l2, linf, tl.where(unset, float("nan"), -neg_min),
              tl.where(unset, float("nan"), max_x), abs_sum / n)
    for i in tl.static_range(9):
        tl.store(floats + i * stride + column, values[i].to(tl.float32), mask=mask)
    tl.store(counts + column, n.to(tl.int64), mask=mask)
    tl.store(counts + stride + column, zeros.to(tl.int64), mask=mask)
    tl.store(counts + 2 * stride + column, nonfinite.to(tl.int64), mask=mask)


@triton.jit
def _hist_sums(n, total, m2, abs_sum, nonfinite, finite_max, finite_neg_min, hist_sums, column, stride, mask,
               lo, hi, ABS: tl.constexpr, RANGED: tl.constexpr):
    """Store Σ (of |x| when ABS, else of x) and Σx² of the values the histogram counted, NaN where the rows
    cannot tell them (see fastgradstats.rows.derive_hist_sums); ``lo``, ``hi``: a linear histogram's fixed
    range when RANGED."""
    m2 = tl.where(m2 < 0, 0.0, m2)
    square_sum = m2 + tl.where(n == 0, 0.0, total * total / tl.where(n == 0, 1.0, n))
    known = nonfinite == 0
    if RANGED:
        known = known & (-finite_neg_min >= lo) & (finite_max <= hi)
    if ABS:
        value_sum = abs_sum
    else:
        value_sum = total
    tl.store(hist_sums + column, tl.where(known, value_sum, float("nan")), mask=mask)
    tl.store(hist_sums + stride + column, tl.where(known, square_sum, float("nan")), mask=mask)


@triton.jit
def _store_norms(n, total, m2, abs_sum, max_x, neg_min, out):
    """out[0] = l2, out[1] = linf of one row, in float64 (fastgradstats.rows.l2_norm / linf_norm)."""
    m2 = tl.where(m2 < 0, 0.0, m2)
    square_sum = m2 + tl.where(n == 0, 0.0, total * total / tl.where(n == 0, 1.0, n))
    tl.store(out, tl.where(tl.abs(abs_sum) < float("inf"), tl.sqrt(square_sum), abs_sum))
    linf = tl.where(max_x > neg_min, max_x, neg_min)
    linf = tl.where(linf < 0, 0.0, linf)
    has_nan = ~(tl.abs(abs_sum) <= float("inf"))
    tl.store(out + 1, tl.where(has_nan, float("nan"), tl.where(n == 0, 0.0, linf)))


@triton.jit
def _tensor_finalize_kernel(
    rows, hist, floats, counts, total_row, total_hist, edges, total_norms, hist_sums, num_layers, lo, hi,
    LAYERS: tl.constexpr, HIST_TOTAL: tl.constexpr, BINS: tl.constexpr, PADDED_BINS: tl.constexpr,
    EDGES: tl.constexpr, MIN_EXP: tl.constexpr, HIST_SUMS: tl.constexpr, ABS: tl.constexpr,
    RANGED: tl.constexpr,
):
    pid = tl.program_id(0)
    stride = num_layers + 1
    layer = pid * LAYERS + tl.arange(0, LAYERS)
    mask = layer < num_layers
    row = rows + layer.to(tl.int64) * 10  # field order of fastgradstats.rows
    _tensor_fields(tl.load(row, mask=mask, other=0.0), tl.load(row + 1, mask=mask, other=0.0),
                   tl.load(row + 2, mask=mask, other=0.0), tl.load(row + 3, mask=mask, other=0.0),
                   tl.load(row + 4, mask=mask, other=0.0), tl.load(row + 5, mask=mask, other=0.0),
                   tl.load(row + 6, mask=mask, other=0.0), tl.load(row + 7, mask=mask, other=0.0),
                   floats, counts, layer, stride, mask)
    if HIST_SUMS:
        _hist_sums(tl.load(row, mask=mask, other=0.0), tl.load(row + 1, mask=mask, other=0.0),
                   tl.load(row + 2, mask=mask, other=0.0), tl.load(row + 3, mask=mask, other=0.0),
                   tl.load(row + 5, mask=mask, other=0.0), tl.load(row + 8, mask=mask, other=0.0),
                   tl.load(row + 9, mask=mask, other=0.0), hist_sums, layer, stride, mask, lo, hi, ABS,
                   RANGED)
    if pid == 0:
        sums = tl.zeros([LAYERS], tl.float64)
        n = tl.zeros([LAYERS], tl.float64)
        abs_sum = tl.zeros([LAYERS], tl.float64)
        zeros = tl.zeros([LAYERS], tl.float64)
        nonfinite = tl.zeros([LAYERS], tl.float64)
        maxima = tl.full([LAYERS], float("-inf"), tl.float64)
        neg_minima = tl.full([LAYERS], float("-inf"), tl.float64)
        finite_maxima = tl.full([LAYERS], float("-inf"), tl.float64)
        finite_neg_minima = tl.full([LAYERS], float("-inf"), tl.float64)
        m2 = tl.zeros([LAYERS], tl.float64)
        for start in range(0, num_layers, LAYERS):
            index = start + tl.arange(0, LAYERS)
            inside = index < num_layers
            layer_row = rows + index.to(tl.int64) * 10
            n += tl.load(layer_row, mask=inside, other=0.0)
            sums += tl.load(layer_row + 1, mask=inside, other=0.0)
            m2 += tl.load(layer_row + 2, mask=inside, other=0.0)
            abs_sum += tl.load(layer_row + 3, mask=inside, other=0.0)
            zeros += tl.load(layer_row + 4, mask=inside, other=0.0)
            nonfinite += tl.load(layer_row + 5, mask=inside, other=0.0)
            maxima = tl.maximum(maxima, tl.load(layer_row + 6, mask=inside, other=float("-inf")))
            neg_minima = tl.maximum(neg_minima, tl.load(layer_row + 7, mask=inside, other=float("-inf")))
            finite_maxima = tl.maximum(finite_maxima,
                                       tl.load(layer_row + 8, mask=inside, other=float("-inf")))
            finite_neg_minima = tl.maximum(finite_neg_minima,
                                           tl.load(layer_row + 9, mask=inside, other=float("-inf")))
        total_n = tl.sum(n, 0)
        total_sum = tl.sum(sums, 0)
        mean = total_sum / total_n
        spread = tl.zeros([LAYERS], tl.float64)
        for start in range(0, num_layers, LAYERS):  # Chan: M2 = ΣM2_l + Σ n_l·(mean_l - mean)²
            index = start + tl.arange(0, LAYERS)
            inside = index < num_layers
            layer_n = tl.load(rows + index.to(tl.int64) * 10, mask=inside, other=0.0)
            layer_sum = tl.load(rows + index.to(tl.int64) * 10 + 1, mask=inside, other=0.0)
            deviation = layer_sum / tl.where(layer_n > 0, layer_n, 1.0) - mean
            spread += tl.where(layer_n > 0, layer_n * deviation * deviation, 0.0)
        total = (total_n, total_sum, tl.sum(m2, 0) + tl.sum(spread, 0), tl.sum(abs_sum, 0), tl.sum(zeros, 0),
                 tl.sum(nonfinite, 0), tl.max(maxima, 0), tl.max(neg_minima, 0), tl.max(finite_maxima, 0),
                 tl.max(finite_neg_minima, 0))
        for f in tl.static_range(10):
            tl.store(total_row + f, total[f])
        last = tl.full([1], 0, tl.int32) + num_layers
        one = tl.full([1], 0.0, tl.float64)
        _tensor_fields(one + total[0], one + total[1], one + total[2], one + total[3], one + total[4],
                       one + total[5], one + total[6], one + total[7], floats, counts, last, stride,
                       last == num_layers)
        _store_norms(total[0], total[1], total[2], total[3], total[6], total[7], total_norms)
        if HIST_SUMS:
            _hist_sums(one + total[0], one + total[1], one + total[2], one + total[3], one + total[5],
                       one + total[8], one + total[9], hist_sums, last, stride, last == num_layers, lo, hi,
                       ABS, RANGED)
        if HIST_TOTAL:
            bins = tl.arange(0, PADDED_BINS)
            summed = tl.zeros([PADDED_BINS], tl.int64)
            for layer_index in range(num_layers):
                summed += tl.load(hist + layer_index * BINS + bins, mask=bins < BINS, other=0)
            tl.store(total_hist + bins, summed, mask=bins < BINS)
        if EDGES:  # 2^(MIN_EXP + i), exactly, from the float32 exponent field (field 255: 2^128 is inf)
            edge = tl.arange(0, PADDED_BINS)
            exponent_field = MIN_EXP + edge + 127
            tl.store(edges + edge, (exponent_field << 23).to(tl.float32, bitcast=True), mask=edge <= BINS)


@triton.jit
def _pair_finalize_kernel(rows, floats, counts, total_row, num_layers, LAYERS: tl.constexpr,
                          EPS: tl.constexpr):
    pid = tl.program_id(0)
    stride = num_layers + 1
    layer = pid * LAYERS + tl.arange(0, LAYERS)
    mask = layer < num_layers
    row = rows + layer.to(tl.int64) * 5
    _pair_fields(tl.load(row, mask=mask, other=0.0), tl.load(row + 1, mask=mask, other=0.0),
                 tl.load(row + 2, mask=mask, other=0.0), tl.load(row + 3, mask=mask, other=0.0),
                 tl.load(row + 4, mask=mask, other=0.0), floats, counts, layer, stride, mask, EPS)
    if pid == 0:
        sums = tl.zeros([LAYERS, 8], tl.float64)
        fields = tl.arange(0, 8)
        for start in range(0, num_layers, LAYERS):
            index = start + tl.arange(0, LAYERS)
            inside = (index < num_layers)[:, None] & (fields < 5)[None, :]
            sums += tl.load(rows + index.to(tl.int64)[:, None] * 5 + fields[None, :], mask=inside, other=0.0)
        total = tl.sum(sums, 0)
        tl.store(total_row + fields, total, mask=fields < 5)
        last = tl.full([1], 0, tl.int32) + num_layers
        one = tl.full([1], 0.0, tl.float64)
        _pair_fields(one + tl.sum(tl.where(fields == 0, total, 0.0), 0),
                     one + tl.sum(tl.where(fields == 1, total, 0.0), 0),
                     one + tl.sum(tl.where(fields == 2, total, 0.0), 0),
                     one + tl.sum(tl.where(fields == 3, total, 0.0), 0),
                     one + tl.sum(tl.where(fields == 4, total, 0.0), 0), floats, counts, last, stride,
                     last == num_layers, EPS)


@triton.jit
def _pair_fields(n, dot, aa, bb, dd, floats, counts, column, stride, mask, EPS: tl.constexpr):
    """Store the derived pair fields (see fastgradstats.rows.derive_pair)."""
    a_l2 = tl.sqrt(aa)
    b_l2 = tl.sqrt(bb)
    cos = dot / (tl.where(a_l2 > EPS, a_l2, EPS) * tl.where(b_l2 > EPS, b_l2, EPS))
    dist = tl.sqrt(dd)
    values = (dot, a_l2, b_l2, cos, dist, dist / b_l2)
    for i in tl.static_range(6):
        tl.store(floats + i * stride + column, values[i].to(tl.float32), mask=mask)
    tl.store(counts + column, n.to(tl.int64), mask=mask)


def finalize_tensor_stats(rows: torch.Tensor, hist: torch.Tensor | None, total_hist: torch.Tensor | None,
                          spec: HistSpec | None) -> dict:
    """Every derived field of tensor rows [L, K] and of their total, in one launch.

    Returns {"layers": {field: [L] view}, "total": {field: 0-d view}, "total_row": [K], "total_hist": [B] or
    None (``total_hist`` when given, else the sum of ``hist`` over layers), "edges": [B + 1] for log2 or None,
    "total_norms": float64 [2] (l2, linf of the total)}; with a histogram the fields include the float64
    :data:`HIST_SUMS` of ``spec``'s kind.
    """
    num_layers, device = rows.shape[0], rows.device
    floats = torch.empty(len(TENSOR_FLOATS), num_layers + 1, dtype=torch.float32, device=device)
    counts = torch.empty(len(TENSOR_COUNTS), num_layers + 1, dtype=torch.int64, device=device)
    outputs = torch.empty(K + 2, dtype=torch.float64, device=device)  # total row, then the total's norms
    hist_total = hist is not None and total_hist is None
    bins = 1 if spec is None else spec.bins
    log2 = spec is not None and spec.kind == "log2"
    if hist_total:
        total_hist = torch.empty(bins, dtype=torch.int64, device=device)
    edges = torch.empty(bins + 1, dtype=torch.float32, device=device) if log2 else None
    hist_sums = None if spec is None else torch.empty(len(HIST_SUMS), num_layers + 1, dtype=torch.float64,
                                                      device=device)
    ranged = spec is not None and spec.range is not None
    lo, hi = spec.range if ranged else (0.0, 0.0)
    _tensor_finalize_kernel[(max(1, triton.cdiv(num_layers, LAYERS)),)](
        rows, outputs if hist is None else hist, floats, counts, outputs,
        total_hist if hist_total else outputs, outputs if edges is None else edges, outputs[K:],
        outputs if hist_sums is None else hist_sums, num_layers, lo, hi,
        LAYERS=LAYERS, HIST_TOTAL=hist_total, BINS=bins, PADDED_BINS=triton.next_power_of_2(bins + 1),
        EDGES=log2, MIN_EXP=spec.min_exp if log2 else 0, HIST_SUMS=spec is not None, ABS=log2, RANGED=ranged,
        num_warps=4,
    )
    wide = () if hist_sums is None else HIST_SUMS
    return {
        "layers": {**{f: floats[i, :num_layers] for i, f in enumerate(TENSOR_FLOATS)},
                   **{f: counts[i, :num_layers] for i, f in enumerate(TENSOR_COUNTS)},
                   **{f: hist_sums[i, :num_layers] for i, f in enumerate(wide)}},
        "total": {**{f: floats[i, num_layers] for i, f in enumerate(TENSOR_FLOATS)},
                  **{f: counts[i, num_layers] for i, f in enumerate(TENSOR_COUNTS)},
                  **{f: hist_sums[i, num_layers] for i, f in enumerate(wide)}},
        "total_row": outputs[:K], "total_hist": total_hist, "edges": edges, "total_norms": outputs[K:],
    }


def finalize_pair_stats(rows: torch.Tensor) -> dict:
    """Every derived field of pair rows [L, PAIR_K] and of their total, in one launch: {"layers": {field: [L]
    view}, "total": {field: 0-d view}, "total_row": [PAIR_K]}."""
    num_layers, device = rows.shape[0], rows.device
    floats = torch.empty(len(PAIR_FLOATS), num_layers + 1, dtype=torch.float32, device=device)
    counts = torch.empty(len(PAIR_COUNTS), num_layers + 1, dtype=torch.int64, device=device)
    total_row = torch.empty(PAIR_K, dtype=torch.float64, device=device)
    _pair_finalize_kernel[(max(1, triton.cdiv(num_layers, LAYERS)),)](
        rows, floats, counts, total_row, num_layers, LAYERS=LAYERS, EPS=COSINE_EPS, num_warps=4,
    )
    return {
        "layers": {**{f: floats[i, :num_layers] for i, f in enumerate(PAIR_FLOATS)},
                   "numel": counts[0, :num_layers]},
        "total": {**{f: floats[i, num_layers] for i, f in enumerate(PAIR_FLOATS)},
                  "numel": counts[0, num_layers]},
        "total_row": total_row,
    }


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """float32 or float64 x rounded to DTYPE to nearest, ties to even (as torch rounds); bfloat16 by hand from
    the float32 bits (Triton's interpreter truncates), then converted exactly."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # NaN stays NaN, inf stays inf
        return bits.to(tl.float32, bitcast=True).to(DTYPE)
    return x.to(DTYPE)


@triton.jit
def _clip_kernel(total_norms, out, max_norm_bits, INF_NORM: tl.constexpr, DTYPE: tl.constexpr,
                 OPMATH: tl.constexpr):
    """torch's total norm and clip coefficient min(1, max_norm / (norm + 1e-6)) from the float64 norm, each
    step as torch takes it (computed in OPMATH, float32 or float64, and rounded to DTYPE), so the gradients
    are scaled by the very same number; max_norm arrives as the bits of a float64 (an integer argument).
    out: DTYPE [2] (norm, coefficient)."""
    norm = _rounded(tl.load(total_norms + INF_NORM).to(OPMATH), DTYPE)  # torch: float64 -> float -> DTYPE
    max_norm = tl.cast(max_norm_bits, tl.int64).to(tl.float64, bitcast=True)
    eps = tl.cast(1.0, OPMATH) / 1000000.0  # 1e-6 rounded in OPMATH (a float literal is float32 here)
    denominator = _rounded(norm.to(OPMATH) + eps, DTYPE)
    # torch computes max_norm / t as t.reciprocal() * max_norm
    reciprocal = _rounded(1.0 / denominator.to(OPMATH), DTYPE)
    coef = _rounded(reciprocal.to(OPMATH) * max_norm.to(OPMATH), DTYPE)
    tl.store(out, norm)
    tl.store(out + 1, tl.where(coef.to(OPMATH) > 1.0, 1.0, coef.to(OPMATH)).to(DTYPE))


def clip_coefficient(total_norms: torch.Tensor, norm_type: float, max_norm: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, clip coefficient), 0-d tensors of ``dtype``, from the finalize kernel's float64
    ``total_norms`` (l2, linf), in one launch."""
    out = torch.empty(2, dtype=dtype, device=total_norms.device)
    bits = int(np.float64(max_norm).view(np.int64))
    _clip_kernel[(1,)](total_norms, out, bits, INF_NORM=norm_type != 2.0,
                       DTYPE=_TL_DTYPES[dtype], OPMATH=tl.float64 if dtype == torch.float64 else tl.float32,
                       num_warps=1)
    return out[0], out[1]


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}
