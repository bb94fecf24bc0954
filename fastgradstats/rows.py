"""Raw rows: the per-layer sufficient statistics every backend returns and every consumer derives from.

A raw row is a float64 vector of ``K`` fields. Fields ``[0, FIRST_MAX)`` merge by addition, fields
``[FIRST_MAX, K)`` merge by maximum (minima are stored negated), so rows of chunks, layers or ranks merge
with one sum and one max. Roots, divisions and NaN rules are applied only by :func:`derive`.

Column meaning of tensor rows (x is one layer's elements, upcast to at least float32):

=========  ============================================================
N          number of elements
SUM        Σx
SUMSQ      Σx²  (NaN is allowed here when an Inf is present; see derive)
ABSSUM     Σ|x|  (NaN iff a NaN is present, +Inf iff an Inf is present)
ZEROS      number of exact zeros
NONFINITE  number of NaN and ±Inf
MAX        max x            (-inf for an empty layer; unspecified if NaN)
NEG_MIN    max(-x)          (idem)
FMAX       max over finite x     (-inf when no finite element)
NEG_FMIN   max over finite -x    (idem)
=========  ============================================================

Pair rows (:data:`PAIR_K` fields, all merged by addition) describe two tensors a, b of one layer and an
optional origin o (zero when absent), with a' = a - o and b' = b - o:
PAIR_N (element count), DOT Σa'b', AA Σa'², BB Σb'², DD Σ(a - b)² (from the differences themselves, which
stays exact when a ≈ b, unlike |a|² + |b|² - 2ab).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

N, SUM, SUMSQ, ABSSUM, ZEROS, NONFINITE, MAX, NEG_MIN, FMAX, NEG_FMIN = range(10)
K = 10
FIRST_MAX = MAX

PAIR_N, DOT, AA, BB, DD = range(5)
PAIR_K = 5
COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


@dataclass
class RawStats:
    """What a backend returns for L layers.

    rows: float64 [L, K] raw rows (layout above), on the input device.
    hist: int64 [L, B] histogram counts, or None when no histogram was asked for.
    total_hist: int64 [B] histogram of all layers together when it is not the sum of ``hist``
        (a linear histogram over per-layer data ranges); None otherwise.
    """

    rows: torch.Tensor
    hist: torch.Tensor | None = None
    total_hist: torch.Tensor | None = None


def empty_rows(num_layers: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows of empty layers: zero sums and -inf maxima, float64 [num_layers, K]."""
    rows = torch.zeros(num_layers, K, dtype=torch.float64, device=device)
    rows[:, FIRST_MAX:] = float("-inf")
    return rows


def merge_rows(rows: torch.Tensor, first_max: int = FIRST_MAX) -> torch.Tensor:
    """Merge raw rows [..., M, K] over their second-to-last dim into [..., K].

    Fields before ``first_max`` add, the others take the maximum (pair rows: ``first_max=PAIR_K``).
    """
    sums = rows[..., :first_max].sum(-2)
    if rows.shape[-2] == 0:  # nothing merged: the row of an empty layer
        maxima = rows.new_full((*rows.shape[:-2], rows.shape[-1] - first_max), float("-inf"))
    else:
        maxima = rows[..., first_max:].amax(-2)
    return torch.cat([sums, maxima], dim=-1)


def derive(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Derive the user-facing statistics from raw rows [..., K]; every result has shape [...].

    Float results are float32, counts int64. Semantics follow torch on the same elements: a NaN makes
    sum, mean, std, l1, l2, linf, min and max NaN; an Inf makes l1/l2/linf inf. Empty layers give
    numel 0, zero sums and norms, NaN mean/std/min/max. The variance Σx²/N - mean² is taken in float64
    from Σx² accumulated around chunk means, so it keeps ~1e-16·(mean/std)² relative precision: better than
    1e-5 up to |mean|/std ≈ 3e5.
    """
    n = rows[..., N]
    has_nan = rows[..., ABSSUM].isnan()
    empty = n == 0
    nan = torch.full_like(n, float("nan"))

    mean = rows[..., SUM] / n
    var = (rows[..., SUMSQ] / n - mean * mean).clamp_min(0)
    # SUMSQ is NaN when an Inf met a finite shift in the kernel's centred sums; l2 is then Σ|x|'s inf.
    l2 = torch.where(rows[..., SUMSQ].isnan(), rows[..., ABSSUM], rows[..., SUMSQ].sqrt())

    def nan_if_nan_or_empty(value: torch.Tensor) -> torch.Tensor:
        return torch.where(has_nan | empty, nan, value)

    maximum = nan_if_nan_or_empty(rows[..., MAX])
    minimum = nan_if_nan_or_empty(-rows[..., NEG_MIN])
    linf = torch.where(has_nan, nan, torch.maximum(rows[..., MAX], rows[..., NEG_MIN]).clamp_min(0))
    linf = torch.where(empty, torch.zeros_like(linf), linf)

    f32 = torch.float32
    return {
        "numel": n.to(torch.int64),
        "sum": rows[..., SUM].to(f32),
        "mean": mean.to(f32),
        "std": var.sqrt().to(f32),
        "l1": rows[..., ABSSUM].to(f32),
        "l2": l2.to(f32),
        "linf": linf.to(f32),
        "min": minimum.to(f32),
        "max": maximum.to(f32),
        "zeros": rows[..., ZEROS].to(torch.int64),
        "nonfinite": rows[..., NONFINITE].to(torch.int64),
    }


def finite_range(rows: torch.Tensor) -> torch.Tensor:
    """Per-row (finite min, finite max) as float64 [..., 2]; (0, 0) for a row with no finite element."""
    lo, hi = -rows[..., NEG_FMIN], rows[..., FMAX]
    none_finite = hi < lo
    return torch.stack([torch.where(none_finite, 0.0, lo), torch.where(none_finite, 0.0, hi)], dim=-1)


def derive_pair(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Derive pair statistics from pair rows [..., PAIR_K]; every result has shape [...] (float32, numel
    int64).

    cos = dot / (max(|a'|, eps) · max(|b'|, eps)), which is ``torch.nn.functional.cosine_similarity`` of the
    flattened a', b' (0 for a zero vector).
    """
    a_l2, b_l2 = rows[..., AA].sqrt(), rows[..., BB].sqrt()
    cos = rows[..., DOT] / (a_l2.clamp_min(COSINE_EPS) * b_l2.clamp_min(COSINE_EPS))
    f32 = torch.float32
    return {
        "numel": rows[..., PAIR_N].to(torch.int64),
        "dot": rows[..., DOT].to(f32),
        "a_l2": a_l2.to(f32),
        "b_l2": b_l2.to(f32),
        "cos": cos.to(f32),
        "dist": rows[..., DD].sqrt().to(f32),
    }
