"""The pure-PyTorch backend: the reference the Triton kernels are tested against, and the CPU path.

Each tensor is walked in chunks of ``chunk_size`` elements, converted (bf16/fp16) into a reusable float32
buffer, so scratch memory is O(chunk), never O(model), and the handful of passes over a chunk hit the cache.
Within a chunk, Σx is summed in float64, M2 (for the variance) from torch's float32 sums of deviations
around a shift near the chunk mean, the other reductions in float32; chunk rows merge in float64 (M2 by
Chan's formula). Histograms are binned exactly as the kernels bin them. Nothing here syncs with a CUDA
device; on the CPU a finite Σ|x| lets a chunk skip the search for NaN and Inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..hist import HistSpec, linear_bins
from ..rows import PAIR_K, ZEROS, empty_rows, merge_rows

NAME = "torch"
DEFAULT_CHUNK_SIZE = 1 << 20  # 4 MB of float32: fits in cache next to its scratch buffer
CENTER_SAMPLE = 4096  # elements whose mean centres a chunk's sums


class _Scratch:
    """Chunk-sized buffers reused across chunks (allocating per chunk would fault in fresh pages each
    time)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device
        self.buffers: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two buffers of n elements of dtype: one for converted values, one for intermediate results."""
        if dtype not in self.buffers:
            self.buffers[dtype] = tuple(torch.empty(self.size, dtype=dtype, device=self.device)
                                        for _ in range(2))
        converted, work = self.buffers[dtype]
        return converted[:n], work[:n]


def raw_rows(
    tensors: Sequence[torch.Tensor],
    spec: HistSpec | None = None,
    ranges: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw rows float64 [L, K] (see :mod:`fastgradstats.rows`) of 1-D tensors, and int64 [L, B] counts of a
    log2 histogram or of a linear one over fixed ``ranges`` float32 [L + 1, 3] (the backend protocol of
    :class:`fastgradstats.dispatch.Backend`)."""
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    hist = torch.zeros(len(tensors), spec.bins, dtype=torch.int64, device=device) if spec else None
    rows = empty_rows(len(tensors), device)
    scratch = _Scratch(min(chunk_size, max((t.numel() for t in tensors), default=0)), device)
    for layer, t in enumerate(tensors):
        chunk_rows = []
        for piece in _pieces(t, chunk_size):
            x, work = _convert(piece, _working_dtype(piece.dtype), scratch)
            chunk_rows.append(_chunk_row(x, work))
            if spec is not None and spec.kind == "log2":
                hist[layer] += _log2_counts(x, work, spec, zeros=chunk_rows[-1][ZEROS])
            elif spec is not None:
                hist[layer] += _linear_counts(x, spec, ranges[layer])
        if chunk_rows:
            rows[layer] = merge_rows(torch.stack(chunk_rows))
    return rows, hist


def linear_hist(
    tensors: Sequence[torch.Tensor],
    spec: HistSpec,
    ranges: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [L, B] linear-histogram counts of each 1-D tensor over its range in ``ranges`` float32
    [L + 1, 3], and int64 [B] counts of all of them over the last range."""
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    hist = torch.zeros(len(tensors), spec.bins, dtype=torch.int64, device=device)
    total_hist = torch.zeros(spec.bins, dtype=torch.int64, device=device)
    scratch = _Scratch(min(chunk_size, max((t.numel() for t in tensors), default=0)), device)
    for layer, t in enumerate(tensors):
        for piece in _pieces(t, chunk_size):
            x, _ = _convert(piece, _working_dtype(piece.dtype), scratch)
            hist[layer] += _linear_counts(x, spec, ranges[layer])
            total_hist += _linear_counts(x, spec, ranges[-1])
    return hist, total_hist


def _pieces(t: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, ...]:
    """Consecutive chunks of at most ``chunk_size`` elements of a 1-D tensor (none when it is empty)."""
    return t.split(chunk_size) if t.numel() else ()


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is worked on in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_row(x: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """The float64 raw row of one chunk x (float32 or float64, 1-D, non-empty); ``work`` is overwritten."""
    n = x.numel()
    lo, hi = torch.aminmax(x)
    # Σx is summed in float64 (more accurate than torch's own float32 sum). M2 comes from deviations
    # d = (x - c)·u from c, the mean of the first CENTER_SAMPLE elements (0 if not finite), scaled by a power
    # of two u near 1/max|x| so that float32 squares neither underflow nor overflow: Σd and Σd² are torch's
    # float32 sums (cascaded: error ~1e-7 of Σ|d| and Σd², not of n·ulp), M2 = (Σd² - (Σd)²/n) / u² in
    # float64 keeps its precision when |mean| ≫ std, because d is small where the mean is large.
    total = x.sum(dtype=torch.float64)
    center = x[:CENTER_SAMPLE].mean()
    center = torch.where(center.isfinite(), center, 0.0)
    unit = torch.ldexp(torch.ones_like(center), -torch.frexp(torch.maximum(-lo, hi)).exponent)
    scaled = torch.addcmul(-center * unit, x, unit, out=work)
    scaled_sum = scaled.sum().double()
    scaled_sum_sq = scaled.square_().sum().double()  # not torch.dot: BLAS sums float32 in a plain loop
    inv_unit = 1.0 / unit.double()
    m2 = (scaled_sum_sq - scaled_sum * scaled_sum / n) * inv_unit * inv_unit
    abs_sum = torch.abs(x, out=work).sum()
    zeros = n - torch.count_nonzero(x)
    if x.device.type == "cpu" and math.isfinite(abs_sum):  # no NaN or Inf here (free to check on the CPU)
        nonfinite, finite_lo, finite_hi = torch.zeros_like(total), lo, hi
    else:
        finite = torch.isfinite(x)
        nonfinite = n - finite.sum()
        finite_hi = torch.where(finite, x, float("-inf")).max()
        finite_lo = torch.where(finite, x, float("inf")).min()
    f64 = torch.float64
    return torch.stack([
        torch.full_like(total, n), total, m2, abs_sum.to(f64), zeros.to(f64),
        nonfinite.to(f64), hi.to(f64), -lo.to(f64), finite_hi.to(f64), -finite_lo.to(f64),
    ])


def _linear_counts(x: torch.Tensor, spec: HistSpec, lo_hi_scale: torch.Tensor) -> torch.Tensor:
    """int64 [B] counts of x in ``spec.bins`` equal bins over one range (lo, hi, scale), float32 [3] (the rule
    of :mod:`fastgradstats.hist`)."""
    bins, _ = linear_bins(x, lo_hi_scale, spec.bins)
    return _bin_counts(bins, spec.bins + 1)[: spec.bins]  # uncounted elements went to the spill bin


def _bin_counts(bins: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [size] counts (or sums of int64 weights) of the values in ``bins`` (int32 or int64, each in
    [0, size)); the CPU counts int32 values as they are (torch.bincount: half the time of a copy to int64 and
    its count)."""
    if bins.device.type == "cpu":
        return torch.bincount(bins, weights, minlength=size).to(torch.int64)
    # bincount sizes its output from the data's maximum: a sync on CUDA
    bins = bins.long()
    counts = torch.zeros(size, dtype=torch.int64, device=bins.device)
    return counts.index_add_(0, bins, torch.ones_like(bins) if weights is None else weights)


def _log2_counts(x: torch.Tensor, work: torch.Tensor, spec: HistSpec, zeros: torch.Tensor) -> torch.Tensor:
    """int64 [B] log2-bin counts of x (float32 or float64), from a count of x's exponent-field values.

    ``zeros``: x's count of zeros (0-d); ``work`` is overwritten.
    """
    # float32: 8-bit field, bias 127; float64: 11-bit field, bias 1023 (so values beyond float32's range are
    # clamped into the end bins, never lost).
    mantissa_bits, fields = (52, 2048) if x.dtype == torch.float64 else (23, 256)
    bits = x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)
    out = work.view(bits.dtype)[: x.numel()]
    field = torch.bitwise_right_shift(bits, mantissa_bits, out=out).bitwise_and_(fields - 1)
    per_field = _bin_counts(field, fields)
    # Field 0 holds zeros (not binned) and subnormals (below every bin: the first one); the last NaN and Inf.
    per_field[0] -= zeros.to(torch.int64)
    exponents = torch.arange(fields, device=x.device) - (fields // 2 - 1)
    bins = exponents.clamp(spec.min_exp, spec.max_exp) - spec.min_exp
    bins[-1] = spec.bins
    return _bin_counts(bins, spec.bins + 1, per_field)[: spec.bins]


def pair_rows(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    origin: Sequence[torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Pair rows float64 [L, PAIR_K] of 1-D tensors a[i], b[i] (and origin[i]) in matching element order.

    Per chunk, a, b and origin are converted into float32 buffers (float64 if one of them is float64), the
    differences a - b, a - o, b - o formed in buffers, and the four sums taken as float32 dot products.
    """
    device = a[0].device if len(a) else torch.device("cpu")
    rows = torch.zeros(len(a), PAIR_K, dtype=torch.float64, device=device)
    scratch = {name: _Scratch(min(chunk_size, max((t.numel() for t in a), default=0)), device)
               for name in ("a", "b", "origin")}
    for layer in range(len(a)):
        tensors = [a[layer], b[layer]] + ([] if origin is None else [origin[layer]])
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        for pieces in zip(*(t.split(chunk_size) for t in tensors)):
            (x, x_work), (y, y_work), *with_origin = [
                _convert(piece, dtype, scratch[name]) for piece, name in zip(pieces, scratch)
            ]
            diff = torch.sub(x, y, out=x_work)
            diff_sq = torch.dot(diff, diff)
            if with_origin:
                o = with_origin[0][0]
                x, y = torch.sub(x, o, out=x_work), torch.sub(y, o, out=y_work)
            n = torch.full_like(diff_sq, x.numel())
            rows[layer] += torch.stack([n, torch.dot(x, y), torch.dot(x, x), torch.dot(y, y),
                                        diff_sq]).double()
    return rows


def _convert(piece: torch.Tensor, dtype: torch.dtype, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """(piece as ``dtype``, converted in a scratch buffer if needed; a work buffer of the same size)."""
    converted, work = scratch.get(dtype, piece.numel())
    return (piece if piece.dtype == dtype else converted.copy_(piece)), work
