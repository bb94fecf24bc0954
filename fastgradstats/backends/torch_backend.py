"""The pure-PyTorch backend: the reference the Triton kernels are tested against, and the CPU path.

Each tensor is walked in chunks of ``chunk_size`` elements, converted (bf16/fp16) into a reusable float32
buffer, so scratch memory is O(chunk), never O(model), and the passes over a chunk hit the cache. A chunk
takes about ten torch ops, each a pass over it: its min and max, its sum, its deviations from its mean with
their sum and sum of squares, |x| with its sum and its count of zeros, and for a log2 histogram a count of
|x|'s exponent fields. They leave a dozen numbers per chunk (torch's cascaded sums, float32 for all but
float64 tensors), from which the float64 rows of all chunks are derived at once (Σx and M2 keep their
precision when |mean| ≫ std) and merged per layer in float64 (M2 by Chan's formula). Histograms are binned
exactly as the kernels bin them. Nothing here syncs with a CUDA device; on the CPU a finite Σ|x| lets a chunk
skip the search for NaN and Inf.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import math
import os
from collections.abc import Sequence

import torch

from ..hist import HistSpec, linear_bins
from ..rows import PAIR_K, ZEROS, empty_rows, merge_rows

NAME = "torch"
DEFAULT_CHUNK_SIZE = 1 << 20  # 4 MB of float32: fits in cache next to its scratch buffer
SPLIT_COUNT = 1 << 16  # CPU counts of more values than this are split between two threads


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
    log2 = spec is not None and spec.kind == "log2"
    hist = torch.zeros(len(tensors), spec.bins, dtype=torch.int64, device=device) if spec else None
    scratch = _Scratch(min(chunk_size, max((t.numel() for t in tensors), default=0)), device)
    field_bins = {dtype: _log2_field_bins(dtype, spec, device) for dtype in _BITS} if log2 else {}
    partials, first_chunk = [], []
    for layer, t in enumerate(tensors):
        first_chunk.append(len(partials))
        for piece in _pieces(t, chunk_size):
            x, work = _convert(piece, _working_dtype(piece.dtype), scratch)
            chunk_partials, abs_x = _chunk_partials(x, work)
            partials.append(chunk_partials)
            if log2:  # the last exponent field, NaN and Inf, is not binned
                hist[layer].index_add_(0, field_bins[x.dtype], _exponent_field_counts(abs_x)[:-1])
            elif spec is not None:
                hist[layer] += _linear_counts(x, spec, ranges[layer])
    first_chunk.append(len(partials))
    chunk_rows = _rows_from_partials(torch.stack(partials)) if partials else empty_rows(0, device)
    rows = empty_rows(len(tensors), device)
    for layer, (start, end) in enumerate(itertools.pairwise(first_chunk)):
        if end - start == 1:  # the row merge_rows would give, without its dozen ops
            rows[layer] = chunk_rows[start]
        elif end > start:
            rows[layer] = merge_rows(chunk_rows[start:end])
    if log2:  # zeros share the exponent field of subnormals, which go to the first bin
        hist[:, 0] -= rows[:, ZEROS].to(torch.int64)
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


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}  # the working dtypes' integers
# A chunk's partials, float64 [13], from which _rows_from_partials derives its raw row: its element count n,
# torch's sum S of x, the centre c and unit u of its deviations d and their sums Σd and Σd², Σ|x|, its counts
# of non-zero and of finite elements, its max and min, and its finite max and min.
(P_N, P_SUM, P_CENTER, P_UNIT, P_SCALED_SUM, P_SCALED_SUM_SQ, P_ABSSUM, P_NONZERO, P_FINITE, P_MAX, P_MIN,
 P_FMAX, P_FMIN) = range(13)


def _chunk_partials(x: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [13] partials (P_* above) of one chunk x (float32 or float64, 1-D, non-empty), and |x| (in
    ``work``).

    Deviations d = x·u - c·u are taken from c = S/n, x's own mean in x's dtype (0 if not finite), scaled by a
    power of two u near 1/max|x| so that squares neither underflow nor overflow; Σd and Σd² are torch's
    sums (cascaded: error ~1e-7 of Σ|d| and Σd², not of n·ulp).
    """
    count = torch.full((), x.numel(), dtype=torch.float64, device=x.device)
    lo, hi = torch.aminmax(x)
    total = x.sum()
    center = total / x.numel()
    center = torch.where(center.isfinite(), center, 0.0)
    unit = torch.ldexp(torch.ones_like(center), -torch.frexp(torch.maximum(-lo, hi)).exponent)
    scaled = torch.mul(x, unit, out=work).sub_(center * unit)
    scaled_sum = scaled.sum()
    scaled_sum_sq = scaled.square_().sum()  # not torch.dot: BLAS sums float32 in a plain loop
    abs_x = torch.abs(x, out=work)
    abs_sum = abs_x.sum()
    nonzero = torch.count_nonzero(abs_x.view(_BITS[abs_x.dtype]))  # integers count faster than floats
    if x.device.type == "cpu" and math.isfinite(abs_sum):  # no NaN or Inf here (free to check on the CPU)
        finite, finite_lo, finite_hi = count, lo, hi
    else:
        is_finite = torch.isfinite(x)
        finite = is_finite.sum()
        finite_hi = torch.where(is_finite, x, float("-inf")).max()
        finite_lo = torch.where(is_finite, x, float("inf")).min()
    # one float64 stack (count is float64, so the integer counts convert exactly)
    partials = torch.stack([count, total, center, unit, scaled_sum, scaled_sum_sq, abs_sum, nonzero, finite,
                            hi, lo, finite_hi, finite_lo])
    return partials, abs_x


def _rows_from_partials(partials: torch.Tensor) -> torch.Tensor:
    """Raw rows float64 [C, K] of chunks from their partials float64 [C, 13].

    M2 = (Σd² - (Σd)²/n) / u² keeps its precision when |mean| ≫ std, because d is small where the mean is
    large. Σx = n·c + Σd / u when every x·u - c·u is exact: c = 0, or every x within [c/2, 2c] (Sterbenz),
    which holds where |mean| ≫ std (so c's own rounding, which the chunk merge would weigh by n, is in Σd);
    else torch's own sum S (no less accurate than torch.sum, where n·c + Σd / u would carry the rounding of
    each x·u - c·u).
    """
    n, center, inv_unit = partials[:, P_N], partials[:, P_CENTER], 1.0 / partials[:, P_UNIT]
    scaled_sum, scaled_sum_sq = partials[:, P_SCALED_SUM], partials[:, P_SCALED_SUM_SQ]
    hi, lo = partials[:, P_MAX], partials[:, P_MIN]
    extremes_toward_c = torch.stack([lo, hi]) * center.sign()
    within = (extremes_toward_c.amin(0) >= center.abs() / 2) & (extremes_toward_c.amax(0) <= center.abs() * 2)
    exact_deviations = (center == 0) | within
    total = torch.where(exact_deviations, n * center + scaled_sum * inv_unit, partials[:, P_SUM])
    m2 = (scaled_sum_sq - scaled_sum * scaled_sum / n) * inv_unit * inv_unit
    return torch.stack([  # the fields of rows.py, in order
        n, total, m2, partials[:, P_ABSSUM], n - partials[:, P_NONZERO], n - partials[:, P_FINITE],
        hi, -lo, partials[:, P_FMAX], -partials[:, P_FMIN],
    ], dim=-1)


def _linear_counts(x: torch.Tensor, spec: HistSpec, lo_hi_scale: torch.Tensor) -> torch.Tensor:
    """int64 [B] counts of x in ``spec.bins`` equal bins over one range (lo, hi, scale), float32 [3] (the rule
    of :mod:`fastgradstats.hist`)."""
    bins, _ = linear_bins(x, lo_hi_scale, spec.bins)
    return _bin_counts(bins, spec.bins + 1)[: spec.bins]  # uncounted elements went to the spill bin


def _bin_counts(bins: torch.Tensor, size: int) -> torch.Tensor:
    """int64 [size] counts of the values in ``bins`` (int32 or int64, each in [0, size)).

    The CPU counts int32 values as they are (torch.bincount: half the time of a copy to int64 and its count),
    and more than SPLIT_COUNT of them in two halves at once, the second on a thread of its own (a bincount is
    a plain loop on one core; torch releases the GIL while it runs).
    """
    if bins.device.type == "cpu":
        if bins.numel() <= SPLIT_COUNT:
            return torch.bincount(bins, minlength=size)
        first, second = bins.tensor_split(2)
        second_counts = _counting_thread(os.getpid()).submit(torch.bincount, second, minlength=size)
        return torch.bincount(first, minlength=size) + second_counts.result()
    # bincount sizes its output from the data's maximum: a sync on CUDA
    bins = bins.long()
    counts = torch.zeros(size, dtype=torch.int64, device=bins.device)
    return counts.index_add_(0, bins, torch.ones_like(bins))


@functools.cache
def _counting_thread(pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """The thread that counts the second halves in process ``pid`` (a forked child starts its own)."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"fastgradstats-count-{pid}")


def _exponent_field_counts(abs_x: torch.Tensor) -> torch.Tensor:
    """int64 [F] counts of the values of the exponent field of |x| (float32: F = 256; float64: F = 2048);
    ``abs_x`` is overwritten. The sign bit of |x| is 0, so its bits shifted right are the field."""
    if abs_x.dtype == torch.float64:
        return _bin_counts(abs_x.view(torch.int64).bitwise_right_shift_(52), 2048)
    return _bin_counts(abs_x.view(torch.int32).bitwise_right_shift_(23), 256)


def _log2_field_bins(dtype: torch.dtype, spec: HistSpec, device: torch.device) -> torch.Tensor:
    """int64 [F - 1]: the log2 bin of each exponent-field value of ``dtype`` but the last one (NaN and Inf).
    float32: 8-bit field, bias 127; float64: 11-bit field, bias 1023, so values beyond float32's range are
    clamped into the end bins, never lost. Field 0 (zeros and subnormals, below every bin) goes to the first
    bin."""
    fields = 2048 if dtype == torch.float64 else 256
    exponents = torch.arange(fields - 1, device=device) - (fields // 2 - 1)
    return exponents.clamp(spec.min_exp, spec.max_exp) - spec.min_exp


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
