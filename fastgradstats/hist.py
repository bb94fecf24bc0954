"""Histogram specifications, their validation and their bin edges.

Two kinds, both computed in the same pass as the other statistics:

* ``log2``: bin ``clamp(floor(log2|x|), min_exp, max_exp) - min_exp`` for finite non-zero x, taken from the
  float32 exponent bits. Same edges for every layer and rank, so histograms merge by addition.
* ``linear``: ``bins`` equal-width bins over ``range=(lo, hi)`` or, when no range is given, over each layer's
  finite [min, max]. Everything is float32: x is rounded to float32 (finite float64 values beyond float32's
  range saturate to ±FLT_MAX), ``range`` must stay finite with lo < hi once rounded to float32 (else
  ValueError), and a data range is clamped to ±FLT_MAX. Edge rules are those of ``torch.histc`` on float32:
  the bin of lo <= x <= hi is ``int((x - lo) * bins / (hi - lo))`` evaluated in float32 — as if float32 had no
  overflow or underflow: x, lo and hi are first scaled by a power of two s (exact; s < 1 only when
  max(|lo|, |hi|) >= 2^101, where torch.histc itself overflows, s > 1 only when it is below 2^-100, so that
  hi - lo is a normal number) — then clamped to [0, bins - 1]; a value equal to hi goes in the last bin,
  values outside [lo, hi] and non-finite values are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rows import finite_range, merge_rows

# 2^-48 ≈ 3.6e-15 up to 2^15 = 32768, 64 bins: covers real bf16/fp32 gradients and parameters (values beyond
# either end are counted in the end bins) and shows what would underflow in fp16 (2^-24) or fp8 (2^-9, 2^-16).
DEFAULT_MIN_EXP = -48
DEFAULT_MAX_EXP = 15
# float32's normal exponents: subnormals all go to the first bin, so the bins stay exact from the exponent
# bits.
LOWEST_MIN_EXP = -126
HIGHEST_MAX_EXP = 127
FLOAT32_MAX = torch.finfo(torch.float32).max
# Linear bins are computed on values scaled into [2^-SCALED_EXP, 2^(SCALED_EXP + 1)): (x - lo)·bins cannot
# overflow float32 and hi - lo >= 2^-125 is normal, so backends may divide by it through its reciprocal.
SCALED_EXP = 100


@dataclass(frozen=True)
class HistSpec:
    """A validated histogram request. ``kind`` is "log2" or "linear"; ``range`` is None for per-layer
    ranges."""

    kind: str
    bins: int
    range: tuple[float, float] | None = None
    min_exp: int = DEFAULT_MIN_EXP
    max_exp: int = DEFAULT_MAX_EXP

    @staticmethod
    def make(
        hist: str | None,
        bins: int = 64,
        range: tuple[float, float] | None = None,
        min_exp: int = DEFAULT_MIN_EXP,
        max_exp: int = DEFAULT_MAX_EXP,
    ) -> HistSpec | None:
        """Validate the user's histogram arguments; None when ``hist`` is None."""
        if hist is None:
            return None
        if hist == "log2":
            if not all(isinstance(e, int) and not isinstance(e, bool) for e in (min_exp, max_exp)):
                raise TypeError(f"min_exp and max_exp must be ints, got {min_exp!r} and {max_exp!r}")
            if min_exp > max_exp:
                raise ValueError(f"min_exp ({min_exp}) must be <= max_exp ({max_exp})")
            if min_exp < LOWEST_MIN_EXP or max_exp > HIGHEST_MAX_EXP:
                raise ValueError(
                    f"log2 exponents must lie in [{LOWEST_MIN_EXP}, {HIGHEST_MAX_EXP}] "
                    f"(float32's normal range), got min_exp={min_exp}, max_exp={max_exp}"
                )
            return HistSpec("log2", max_exp - min_exp + 1, None, min_exp, max_exp)
        if hist == "linear":
            if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
                raise ValueError(f"bins must be an int >= 1, got {bins!r}")
            if range is not None:
                range = _float32_range(range)
            return HistSpec("linear", bins, range)
        raise ValueError(f"hist must be None, 'log2' or 'linear', got {hist!r}")


def _float32_range(range: tuple[float, float]) -> tuple[float, float]:
    """``range`` rounded to float32, where the linear bins are computed; ValueError unless it stays finite
    with lo < hi there."""
    try:
        lo, hi = (float(v) for v in range)
    except (TypeError, ValueError):
        raise ValueError(f"range must be two numbers (lo, hi), got {range!r}") from None
    lo32, hi32 = (float(torch.tensor(v, dtype=torch.float32)) for v in (lo, hi))
    if not (math.isfinite(lo32) and math.isfinite(hi32)):
        raise ValueError(f"range must be finite in float32 (|v| <= {FLOAT32_MAX:.7g}), got {range!r}")
    if lo32 >= hi32:
        raise ValueError(f"range must have lo < hi in float32, got {range!r} (float32: ({lo32!r}, {hi32!r}))")
    return lo32, hi32


def log2_edges(spec: HistSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [B + 1] edges 2**arange(min_exp, max_exp + 2) of a log2 histogram."""
    exps = torch.arange(spec.min_exp, spec.max_exp + 2, dtype=torch.float64, device=device)
    return torch.exp2(exps).to(torch.float32)


def linear_ranges(spec: HistSpec, rows: torch.Tensor) -> torch.Tensor:
    """float32 [L + 1, 3] (lo, hi, s) of each layer, then of all layers together, for a linear histogram.

    (lo, hi) comes from ``spec.range`` when given, else from the finite min and max in the raw rows (on the
    device: no sync), clamped to ±FLT_MAX and widened like ``torch.histc`` where lo == hi in float32: to
    (min(lo - 1, lo⁻), max(hi + 1, hi⁺)) with x⁻/x⁺ the neighbouring float32 values (no finite element:
    (-1, 1)). s is the power of two by which every backend scales x, lo and hi before it bins (module
    docstring): 2^-(e - SCALED_EXP) for e = floor(log2 max(|lo|, |hi|)) > SCALED_EXP, 2^(-SCALED_EXP - e) for
    e < -SCALED_EXP, else 1.
    """
    if spec.range is not None:
        return fixed_ranges(spec, rows.shape[0], rows.device)
    data = torch.cat([finite_range(rows), finite_range(merge_rows(rows))[None]])
    lo, hi = data.clamp(-FLOAT32_MAX, FLOAT32_MAX).to(torch.float32).unbind(-1)
    same = lo == hi
    wider_lo = torch.minimum(lo - 1, torch.nextafter(lo, torch.full_like(lo, float("-inf"))))
    wider_hi = torch.maximum(hi + 1, torch.nextafter(hi, torch.full_like(hi, float("inf"))))
    lo_hi = torch.stack([torch.where(same, wider_lo, lo), torch.where(same, wider_hi, hi)], dim=-1)
    return _with_scale(lo_hi.clamp(-FLOAT32_MAX, FLOAT32_MAX))


def fixed_ranges(spec: HistSpec, num_layers: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [num_layers + 1, 3] (lo, hi, s): ``spec.range`` for every layer and for all layers together
    (see :func:`linear_ranges`)."""
    lo_hi = torch.empty(num_layers + 1, 2, dtype=torch.float32, device=device)
    lo_hi[:, 0], lo_hi[:, 1] = spec.range  # fills on the device: no host-to-device copy, no sync
    return _with_scale(lo_hi)


def _with_scale(lo_hi: torch.Tensor) -> torch.Tensor:
    """[R, 3] (lo, hi, s) of ranges [R, 2], s as documented in :func:`linear_ranges`."""
    exponent = torch.frexp(lo_hi.abs().amax(-1)).exponent - 1  # floor(log2 max(|lo|, |hi|))
    shift = (exponent - SCALED_EXP).clamp_min(0) - (-SCALED_EXP - exponent).clamp_min(0)
    scale = torch.ldexp(torch.ones_like(lo_hi[:, 0]), -shift)
    return torch.cat([lo_hi, scale[:, None]], dim=-1)


def linear_bins(x: torch.Tensor, lo_hi_scale: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference binning of hist.py's linear rule: (bin int64, counted bool) for x of any floating dtype
    and one range (lo, hi, s) float32 [3]; bins of uncounted elements are ``bins`` (a spill bin)."""
    lo, hi, scale = lo_hi_scale.unbind(-1)
    if x.dtype == torch.float64:
        big = (x.abs() > FLOAT32_MAX) & x.isfinite()
        x = torch.where(big, x.sign() * FLOAT32_MAX, x)
    x = x.to(torch.float32)
    counted = (x >= lo) & (x <= hi)  # False for NaN; ±inf is outside every (finite) range
    scaled_lo = lo * scale
    position = (torch.where(counted, x, lo) * scale - scaled_lo) * bins / (hi * scale - scaled_lo)
    position = position.clamp(0, bins - 1)
    return torch.where(counted, position.to(torch.int64), bins), counted


def linear_edges(ranges: torch.Tensor, bins: int) -> torch.Tensor:
    """float32 [..., bins + 1] equal-width edges for ranges [..., 2 or 3] (lo, hi[, scale])."""
    ranges = ranges[..., :2].to(torch.float64)
    steps = torch.arange(bins + 1, dtype=torch.float64, device=ranges.device) / bins
    lo, hi = ranges[..., :1], ranges[..., 1:]
    return (lo + (hi - lo) * steps).to(torch.float32)
