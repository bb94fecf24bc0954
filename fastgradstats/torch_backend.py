"""The pure-PyTorch backend: the reference the Triton kernels are tested against, and the CPU path.

It walks each tensor in chunks of ``chunk_size`` elements (so scratch memory is O(chunk), never O(model)),
accumulates every raw field in float64 and bins histograms exactly as the kernels do. It never syncs with
the host, so it is also safe on CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dense import flat_elements
from .hist import HistSpec, linear_ranges
from .rows import PAIR_K, RawStats, empty_rows, merge_rows

DEFAULT_CHUNK_SIZE = 1 << 22


def raw_stats(
    tensors: Sequence[torch.Tensor], spec: HistSpec | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> RawStats:
    """Raw rows [L, K] (and histogram counts [L, B]) of each tensor; see :mod:`fastgradstats.rows`."""
    device = tensors[0].device if len(tensors) else torch.device("cpu")
    num_layers = len(tensors)
    one_pass_hist = spec is not None and (spec.kind == "log2" or spec.range is not None)
    hist = torch.zeros(num_layers, spec.bins, dtype=torch.int64, device=device) if spec else None
    rows = empty_rows(num_layers, device)
    fixed_range = _fixed_range(spec, device) if one_pass_hist and spec.kind == "linear" else None

    for layer, t in enumerate(tensors):
        chunk_rows = [_chunk_row(piece) for piece in _chunks(t, chunk_size)]
        if chunk_rows:
            rows[layer] = merge_rows(torch.stack(chunk_rows))
        if one_pass_hist:
            for piece in _chunks(t, chunk_size):
                _add_to_hist(hist[layer], piece, spec, fixed_range)

    total_hist = None
    if spec is not None and not one_pass_hist:
        ranges = linear_ranges(spec, rows)
        total_hist = torch.zeros(spec.bins, dtype=torch.int64, device=device)
        for layer, t in enumerate(tensors):
            for piece in _chunks(t, chunk_size):
                _add_to_hist(hist[layer], piece, spec, ranges[layer])
                _add_to_hist(total_hist, piece, spec, ranges[-1])
    return RawStats(rows, hist, total_hist)


def _chunks(t: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, ...]:
    return flat_elements(t).split(chunk_size) if t.numel() else ()


def _chunk_row(piece: torch.Tensor) -> torch.Tensor:
    x = piece.to(torch.float64)
    finite = x.isfinite()
    neg_inf = torch.full((), float("-inf"), dtype=torch.float64, device=x.device)
    return torch.stack(
        [
            torch.full((), x.numel(), dtype=torch.float64, device=x.device),
            x.sum(),
            (x * x).sum(),
            x.abs().sum(),
            (x == 0).sum().to(torch.float64),
            (~finite).sum().to(torch.float64),
            x.max(),
            (-x).max(),
            torch.where(finite, x, neg_inf).max(),
            torch.where(finite, -x, neg_inf).max(),
        ]
    )


def _fixed_range(spec: HistSpec, device: torch.device) -> torch.Tensor:
    lo, hi = spec.range
    return torch.stack([torch.full((), v, dtype=torch.float32, device=device) for v in (lo, hi)])


def _add_to_hist(hist: torch.Tensor, piece: torch.Tensor, spec: HistSpec, lo_hi: torch.Tensor | None) -> None:
    """Add the bin counts of one chunk into hist [B] (int64, in place)."""
    x = piece.to(torch.float32)
    finite = x.isfinite()
    if spec.kind == "log2":
        exponent = ((x.view(torch.int32) >> 23) & 0xFF) - 127
        bins = exponent.clamp(spec.min_exp, spec.max_exp) - spec.min_exp
        counted = finite & (x != 0)
    else:
        lo, hi = lo_hi[0], lo_hi[1]
        counted = finite & (x >= lo) & (x <= hi)
        position = torch.where(counted, (x - lo) * spec.bins / (hi - lo), 0)
        bins = position.to(torch.int64).clamp_max(spec.bins - 1)
    # Uncounted elements go to a spill bin past the end, so nothing here depends on data (no sync).
    bins = torch.where(counted, bins.to(torch.int64), spec.bins)
    counts = torch.zeros(spec.bins + 1, dtype=torch.int64, device=x.device)
    counts.index_add_(0, bins, torch.ones_like(bins))
    hist += counts[: spec.bins]


def pair_raw_stats(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    origin: Sequence[torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Pair rows float64 [L, PAIR_K] of 1-D tensors a[i], b[i] (and origin[i]) in matching element order."""
    device = a[0].device if len(a) else torch.device("cpu")
    rows = torch.zeros(len(a), PAIR_K, dtype=torch.float64, device=device)
    for layer in range(len(a)):
        origin_pieces = origin[layer].split(chunk_size) if origin is not None else None
        for i, (piece_a, piece_b) in enumerate(zip(a[layer].split(chunk_size), b[layer].split(chunk_size))):
            x, y = piece_a.to(torch.float64), piece_b.to(torch.float64)
            diff = x - y
            if origin_pieces is not None:
                o = origin_pieces[i].to(torch.float64)
                x, y = x - o, y - o
            count = torch.full((), x.numel(), dtype=torch.float64, device=device)
            rows[layer] += torch.stack([count, torch.dot(x, y), torch.dot(x, x), torch.dot(y, y), torch.dot(diff, diff)])
    return rows
