"""Histogram specifications, their validation and their bin edges.

Two kinds, both computed in the same pass as the other statistics:

* ``log2``: bin ``clamp(floor(log2|x|), min_exp, max_exp) - min_exp`` for finite non-zero x, taken from the
  float32 exponent bits. Same edges for every layer and rank, so histograms merge by addition.
* ``linear``: ``bins`` equal-width bins over ``range=(lo, hi)`` or, when no range is given, over each layer's
  finite [min, max]. Edge rules are those of ``torch.histc`` on float32: the bin of x is
  ``int((x - lo) * bins / (hi - lo))`` evaluated in float32, a value equal to hi goes in the last bin,
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
                lo, hi = (float(v) for v in range)
                if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                    raise ValueError(f"range must be finite with lo < hi, got {range!r}")
                range = (lo, hi)
            return HistSpec("linear", bins, range)
        raise ValueError(f"hist must be None, 'log2' or 'linear', got {hist!r}")

    @property
    def padded_bins(self) -> int:
        """The bin count rounded up to a power of two (what the kernels compute internally)."""
        return 1 << (self.bins - 1).bit_length()


def log2_edges(spec: HistSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [B + 1] edges 2**arange(min_exp, max_exp + 2) of a log2 histogram."""
    exps = torch.arange(spec.min_exp, spec.max_exp + 2, dtype=torch.float64, device=device)
    return torch.exp2(exps).to(torch.float32)


def linear_ranges(spec: HistSpec, rows: torch.Tensor) -> torch.Tensor:
    """float32 [L + 1, 2] (lo, hi) of each layer, then of all layers together, for a linear histogram.

    From ``spec.range`` when given, else from the finite min and max in the raw rows (on the device: no sync),
    widened like ``torch.histc`` where lo == hi in float32: to (min(lo - 1, lo⁻), max(hi + 1, hi⁺)) with x⁻/x⁺
    the neighbouring float32 values (no finite element: (-1, 1)).
    """
    num_layers = rows.shape[0]
    if spec.range is not None:
        ranges = torch.empty(num_layers + 1, 2, dtype=torch.float32, device=rows.device)
        ranges[:, 0], ranges[:, 1] = spec.range  # fills on the device: no host-to-device copy, no sync
        return ranges
    ranges = torch.cat([finite_range(rows), finite_range(merge_rows(rows))[None]]).to(torch.float32)
    lo, hi = ranges.unbind(-1)
    same = lo == hi
    wider_lo = torch.minimum(lo - 1, torch.nextafter(lo, torch.full_like(lo, float("-inf"))))
    wider_hi = torch.maximum(hi + 1, torch.nextafter(hi, torch.full_like(hi, float("inf"))))
    return torch.stack([torch.where(same, wider_lo, lo), torch.where(same, wider_hi, hi)], dim=-1)


def linear_edges(ranges: torch.Tensor, bins: int) -> torch.Tensor:
    """float32 [..., bins + 1] equal-width edges for (lo, hi) ranges [..., 2]."""
    ranges = ranges.to(torch.float64)
    steps = torch.arange(bins + 1, dtype=torch.float64, device=ranges.device) / bins
    lo, hi = ranges[..., :1], ranges[..., 1:]
    return (lo + (hi - lo) * steps).to(torch.float32)
