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
    """int64 [max_exp - min_exp + 1] counts of finite non-zero values by floor(log2|x|) = frexp exponent - 1,
    clamped to [min_exp, max_exp] (so every finite non-zero value of every dtype lands in a bin)."""
    x = x[np.isfinite(x) & (x != 0)]
    _, exponent = np.frexp(x)
    bins = np.clip(exponent.astype(np.int64) - 1, min_exp, max_exp) - min_exp
    return np.bincount(bins, minlength=max_exp - min_exp + 1).astype(np.int64)


def linear_range(x: np.ndarray) -> tuple[np.float32, np.float32]:
    """torch.histc's data range in float32: finite [min, max], (-1, 1) without finite values.

    min == max widens to (min - 1, max + 1), and at least to the neighbouring float32 values where ±1 is
    lost to float32 rounding (what torch.histc does for a float32 input).
    """
    finite = _as_float32(x)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return np.float32(-1.0), np.float32(1.0)
    lo, hi = finite.min(), finite.max()  # float32 data, as torch.histc sees it
    if lo == hi:
        lo = min(lo - np.float32(1.0), np.nextafter(lo, np.float32(-np.inf)))
        hi = max(hi + np.float32(1.0), np.nextafter(hi, np.float32(np.inf)))
    big = np.finfo(np.float32).max
    return np.clip(lo, -big, big), np.clip(hi, -big, big)


def _as_float32(x: np.ndarray) -> np.ndarray:
    """x rounded to float32, finite values beyond float32's range saturated to ±FLT_MAX."""
    big = np.finfo(np.float32).max
    with np.errstate(invalid="ignore"):
        saturated = np.where(np.isfinite(x), np.clip(x, -big, big), x)
    return saturated.astype(np.float32)


def linear_hist(x: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """int64 [bins] counts with bin int((x - lo) * bins / (hi - lo)) evaluated in float32 without overflow.

    Values equal to hi go to the last bin; values outside [lo, hi] and non-finite values are not counted.
    Where float32 would overflow (max(|lo|, |hi|) >= 2^101), x, lo and hi are first scaled by 2^-k so that
    the largest of |lo|, |hi| is below 2^101; where it is below 2^-100, by 2^k so that it is at least 2^-100
    (exact, powers of two).
    """
    x32 = _as_float32(x)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    with np.errstate(invalid="ignore"):
        x32 = x32[np.isfinite(x32) & (x32 >= lo32) & (x32 <= hi32)]
    _, exponent = np.frexp(max(abs(lo32), abs(hi32)))
    e = int(exponent) - 1
    scale = np.float32(2.0 ** (-max(0, e - 100) + max(0, -100 - e)))
    position = ((x32 * scale - lo32 * scale) * np.float32(bins)) / (hi32 * scale - lo32 * scale)
    assert position.dtype == np.float32
    index = np.clip(position.astype(np.int64), 0, bins - 1)
    return np.bincount(index, minlength=bins).astype(np.int64)
