"""Raw rows: the per-layer sufficient statistics every backend returns and every consumer derives from.

A raw row is a float64 vector of ``K`` fields. Fields ``[0, FIRST_MAX)`` merge by addition, except M2, which
merges by Chan's formula (ΣM2_i + Σ n_i·(mean_i - mean)², see :func:`merge_rows`); fields ``[FIRST_MAX, K)``
merge by maximum (minima are stored negated). Roots, divisions and NaN rules are applied only by
:func:`derive`.

M2 is stored around each row's own mean, never as Σx²: the variance M2/N then keeps its precision when
|mean| ≫ std (float64 Σx²/N - mean² would lose (mean/std)²·1e-16 of it, 1% at |mean|/std = 1e7).

Column meaning of tensor rows (x is one layer's elements, upcast to at least float32):

=========  ============================================================
N          number of elements
SUM        Σx
M2         Σ(x - mean)²  (NaN or inf when a NaN or Inf is present; see derive)
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

N, SUM, M2, ABSSUM, ZEROS, NONFINITE, MAX, NEG_MIN, FMAX, NEG_FMIN = range(10)
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
    triton: the rows come from the Triton kernels, whose finalize kernel then derives every field in one
        launch (:mod:`fastgradstats.kernels.finalize`); other backends derive with :func:`derive`.
    ranges: float32 [L + 1, 3] ranges a linear histogram was binned over (:func:`~.hist.linear_ranges`),
        kept so that its edges need not derive them again; None otherwise (or when not kept).
    """

    rows: torch.Tensor
    hist: torch.Tensor | None = None
    total_hist: torch.Tensor | None = None
    triton: bool = False
    ranges: torch.Tensor | None = None


def empty_rows(num_layers: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows of empty layers: zero sums and -inf maxima, float64 [num_layers, K]."""
    rows = torch.zeros(num_layers, K, dtype=torch.float64, device=device)
    rows[:, FIRST_MAX:] = float("-inf")
    return rows


def merge_rows(rows: torch.Tensor) -> torch.Tensor:
    """Merge tensor rows [M, K] into one row [K]: sums add, M2 by Chan's formula, maxima take the maximum.

    A fixed-order reduction (deterministic on every device); M = 0 gives the row of an empty layer.
    """
    merged = empty_rows(1, rows.device)[0]
    if rows.shape[0] == 0:
        return merged
    merged[:FIRST_MAX] = rows[:, :FIRST_MAX].sum(0)
    merged[FIRST_MAX:] = rows[:, FIRST_MAX:].amax(0)
    merged[M2] += _spread(rows, merged[SUM] / merged[N]).sum(0)
    return merged


def merge_rows_by_index(rows: torch.Tensor, index: torch.Tensor, num_out: int) -> torch.Tensor:
    """Merge tensor rows [M, K] into [num_out, K], row i into output row index[i] (int64 [M]), as
    :func:`merge_rows` does. For CPU tensors: ``index_add_`` adds in index order there (on CUDA it would use
    float atomics)."""
    merged = empty_rows(num_out, rows.device)
    merged[:, :FIRST_MAX] = 0.0
    merged[:, :FIRST_MAX].index_add_(0, index, rows[:, :FIRST_MAX])
    maxima = rows[:, FIRST_MAX:]
    merged[:, FIRST_MAX:].scatter_reduce_(0, index[:, None].expand_as(maxima), maxima, "amax")
    mean = merged[:, SUM] / merged[:, N]
    merged[:, M2].index_add_(0, index, _spread(rows, mean[index]))
    return merged


def _spread(rows: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Chan's correction n_i·(mean_i - mean)² of rows [M, K] around the merged mean(s) (0 for empty rows)."""
    n = rows[:, N]
    return torch.where(n > 0, n * (rows[:, SUM] / n - mean).square(), 0.0)


def merge_pair_rows(rows: torch.Tensor) -> torch.Tensor:
    """Merge pair rows [M, PAIR_K] into one row [PAIR_K] (every field adds)."""
    return rows.sum(0)


def derive(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Derive the user-facing statistics from raw rows [..., K]; every result has shape [...].

    Float results are float32, counts int64. Semantics follow torch on the same elements: a NaN makes
    sum, mean, mean_abs, std, l1, l2, linf, min and max NaN; an Inf makes l1/l2/linf/mean_abs inf. Empty
    layers give numel 0, zero sums and norms, NaN mean/mean_abs/std/min/max. mean_abs is Σ|x| / N. The
    variance is M2/N and l2 = sqrt(M2 + (Σx)²/N), a sum of two non-negative terms, so neither loses
    precision when |mean| ≫ std.
    """
    n = rows[..., N]
    has_nan = rows[..., ABSSUM].isnan()
    empty = n == 0
    nan = torch.full_like(n, float("nan"))

    mean = rows[..., SUM] / n
    var = rows[..., M2].clamp_min(0) / n

    def nan_if_nan_or_empty(value: torch.Tensor) -> torch.Tensor:
        return torch.where(has_nan | empty, nan, value)

    maximum = nan_if_nan_or_empty(rows[..., MAX])
    minimum = nan_if_nan_or_empty(-rows[..., NEG_MIN])

    f32 = torch.float32
    return {
        "numel": n.to(torch.int64),
        "sum": rows[..., SUM].to(f32),
        "mean": mean.to(f32),
        "mean_abs": (rows[..., ABSSUM] / n).to(f32),
        "std": var.sqrt().to(f32),
        "l1": rows[..., ABSSUM].to(f32),
        "l2": l2_norm(rows).to(f32),
        "linf": linf_norm(rows).to(f32),
        "min": minimum.to(f32),
        "max": maximum.to(f32),
        "zeros": rows[..., ZEROS].to(torch.int64),
        "nonfinite": rows[..., NONFINITE].to(torch.int64),
    }


def l2_norm(rows: torch.Tensor) -> torch.Tensor:
    """float64 [...] sqrt(Σx²) = sqrt(M2 + (Σx)²/N) of raw rows [..., K] (0 when empty); with a NaN or Inf it
    is Σ|x|'s NaN or inf, as torch's norm."""
    n = rows[..., N]
    sum_sq = rows[..., M2].clamp_min(0) + torch.where(n == 0, 0.0, rows[..., SUM].square() / n)
    return torch.where(rows[..., ABSSUM].isfinite(), sum_sq.sqrt(), rows[..., ABSSUM])


def linf_norm(rows: torch.Tensor) -> torch.Tensor:
    """float64 [...] max |x| of raw rows [..., K] (0 when empty, NaN with a NaN)."""
    linf = torch.maximum(rows[..., MAX], rows[..., NEG_MIN]).clamp_min(0)
    linf = torch.where(rows[..., ABSSUM].isnan(), float("nan"), linf)
    return torch.where(rows[..., N] == 0, 0.0, linf)


def finite_range(rows: torch.Tensor) -> torch.Tensor:
    """Per-row (finite min, finite max) as float64 [..., 2]; (0, 0) for a row with no finite element."""
    lo, hi = -rows[..., NEG_FMIN], rows[..., FMAX]
    none_finite = hi < lo
    return torch.stack([torch.where(none_finite, 0.0, lo), torch.where(none_finite, 0.0, hi)], dim=-1)


def derive_pair(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Derive pair statistics from pair rows [..., PAIR_K]; every result has shape [...] (float32, numel
    int64).

    cos = dot / (max(|a'|, eps) · max(|b'|, eps)) with eps = :data:`COSINE_EPS` (1e-8), which is
    ``torch.nn.functional.cosine_similarity`` of the flattened a', b': 0 when either is a zero vector (or
    the layer is empty). ratio = ‖a - b‖ / ‖b'‖ (dist / b_l2, divided in float64): a's distance relative
    to the reference b, so the update-to-weight ratio ‖Δθ‖ / ‖θ_before‖ when a is θ now and b θ before (as
    ``OptimizerStats.update_ratio``); +inf when b' = 0 but a ≠ b, NaN when b' = 0 and a = b (0 / 0, an empty
    layer included), NaN or inf as the norms are with NaN or Inf values.
    """
    a_l2, b_l2, dist = rows[..., AA].sqrt(), rows[..., BB].sqrt(), rows[..., DD].sqrt()
    f32 = torch.float32
    return {
        "numel": rows[..., PAIR_N].to(torch.int64),
        "dot": rows[..., DOT].to(f32),
        "a_l2": a_l2.to(f32),
        "b_l2": b_l2.to(f32),
        "cos": cosine(rows[..., DOT], a_l2, b_l2).to(f32),
        "dist": dist.to(f32),
        "ratio": (dist / b_l2).to(f32),
    }


def cosine(dot: torch.Tensor, a_l2: torch.Tensor, b_l2: torch.Tensor) -> torch.Tensor:
    """The one cosine rule of fastgradstats: dot / (max(‖a‖, eps) · max(‖b‖, eps)), eps = :data:`COSINE_EPS`
    (``torch.nn.functional.cosine_similarity``'s), so a zero vector has cosine 0 with anything. Elementwise
    over tensors of one shape and dtype; NaN in, NaN out."""
    return dot / (a_l2.clamp_min(COSINE_EPS) * b_l2.clamp_min(COSINE_EPS))


def derive_hist_sums(rows: torch.Tensor, kind: str, value_range: tuple[float, float] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Σ and Σ² of the values a histogram of ``kind`` counted, from tensor rows [..., K]: float64 [...] each,
    as TensorBoard's ``add_histogram_raw`` wants them (``sum``, ``sum_squares``).

    ``hist_sum`` is Σ|x| for a log2 histogram (its bins are of |x|) and Σx for a linear one;
    ``hist_sum_squares`` is Σx² for both. The histograms count every finite value (log2: zeros contribute
    nothing; linear over data ranges) except a linear histogram with a fixed ``value_range``, which leaves
    out the values outside it. The rows keep sums over all values only, so both are NaN for a layer with
    NaN/Inf values, and, with a ``value_range``, for a layer whose finite values do not all lie in it. An
    empty layer gives 0.
    """
    n = rows[..., N]
    square_sum = rows[..., M2].clamp_min(0) + torch.where(n == 0, 0.0, rows[..., SUM].square() / n)
    known = rows[..., NONFINITE] == 0
    if kind == "linear" and value_range is not None:
        known &= (-rows[..., NEG_FMIN] >= value_range[0]) & (rows[..., FMAX] <= value_range[1])
    value_sum = rows[..., ABSSUM if kind == "log2" else SUM]
    return {"hist_sum": torch.where(known, value_sum, float("nan")),
            "hist_sum_squares": torch.where(known, square_sum, float("nan"))}
