"""A float64 numpy oracle for tensor statistics, written from the contract and independent of the library.

Every function takes the actual (already rounded) tensor values, upcast exactly to float64 by :func:`values`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

FLOAT_FIELDS = ("sum", "mean", "std", "l1", "l2", "linf", "min", "max")
COUNT_FIELDS = ("numel", "zeros", "nonfinite")


def values(t: torch.Tensor) -> np.ndarray:
    """The elements of t as a flat float64 numpy array (exact: every supported dtype fits in float64)."""
    return t.detach().cpu().to(torch.float64).reshape(-1).numpy()


def stats(x: np.ndarray) -> dict[str, float | int]:
    """Every statistic of the float64 elements x, with torch's NaN/Inf semantics and the empty-layer rules."""
    n = x.size
    counts = {
        "numel": n,
        "zeros": int(np.count_nonzero(x == 0)),
        "nonfinite": int(np.count_nonzero(~np.isfinite(x))),
    }
    if n == 0:
        nan = math.nan
        return {
            **counts,
            "sum": 0.0,
            "mean": nan,
            "std": nan,
            "l1": 0.0,
            "l2": 0.0,
            "linf": 0.0,
            "min": nan,
            "max": nan,
        }
    with np.errstate(all="ignore"):
        total = float(np.sum(x))
        mean = total / n
        # Two-pass population std: exact to float64 rounding even when |mean| >> std; inf - inf gives NaN.
        std = float(np.sqrt(np.mean((x - np.mean(x)) ** 2)))
        return {
            **counts,
            "sum": total,
            "mean": mean,
            "std": std,
            "l1": float(np.sum(np.abs(x))),
            "l2": float(np.sqrt(np.sum(x * x))),
            "linf": float(np.max(np.abs(x))),
            "min": float(np.min(x)),
            "max": float(np.max(x)),
        }


def log2_hist(x: np.ndarray, min_exp: int, max_exp: int) -> np.ndarray:
    """int64 [max_exp - min_exp + 1] counts of finite non-zero float32 values by frexp exponent - 1."""
    x32 = x.astype(np.float32)
    x32 = x32[np.isfinite(x32) & (x32 != 0)]
    _, exponent = np.frexp(x32)
    bins = np.clip(exponent.astype(np.int64) - 1, min_exp, max_exp) - min_exp
    return np.bincount(bins, minlength=max_exp - min_exp + 1).astype(np.int64)


def linear_range(x: np.ndarray) -> tuple[np.float32, np.float32]:
    """torch.histc's data range in float32: finite [min, max], (-1, 1) without finite values.

    min == max widens to (min - 1, max + 1), and at least to the neighbouring float32 values where ±1 is
    lost to float32 rounding (what torch.histc does for a float32 input).
    """
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.float32(-1.0), np.float32(1.0)
    lo, hi = np.float32(finite.min()), np.float32(finite.max())  # float32 data, as torch.histc sees it
    if lo == hi:
        lo = min(lo - np.float32(1.0), np.nextafter(lo, np.float32(-np.inf)))
        hi = max(hi + np.float32(1.0), np.nextafter(hi, np.float32(np.inf)))
    return lo, hi


def linear_hist(x: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """int64 [bins] counts with bin int((x - lo) * bins / (hi - lo)) evaluated in float32.

    Values equal to hi go to the last bin; values outside [lo, hi] and non-finite values are not counted.
    """
    x32 = x.astype(np.float32)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    with np.errstate(invalid="ignore"):
        x32 = x32[np.isfinite(x32) & (x32 >= lo32) & (x32 <= hi32)]
    position = ((x32 - lo32) * np.float32(bins)) / (hi32 - lo32)
    assert position.dtype == np.float32
    index = np.minimum(position.astype(np.int64), bins - 1)
    return np.bincount(index, minlength=bins).astype(np.int64)
