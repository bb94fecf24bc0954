"""Choosing a backend and asking it for raw rows.

Order of choice: the ``backend=`` argument, else the ``FASTGRADSTATS_BACKEND`` environment variable, else
"triton" for CUDA tensors when Triton imports, "native" (compiled C, :mod:`fastgradstats.native_backend`) for
CPU tensors when a C compiler builds it, and "torch" otherwise. "triton" on CPU tensors runs only under
``TRITON_INTERPRET=1`` (Triton's numpy interpreter, used by the tests).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from . import native_backend, torch_backend
from .dense import flat_elements
from .distributed import Reducer
from .hist import HistSpec
from .rows import PAIR_K, RawStats

BACKENDS = ("torch", "native", "triton")
_RAW_STATS = {"torch": torch_backend.raw_stats, "native": native_backend.raw_stats}
_PAIR_RAW_STATS = {"torch": torch_backend.pair_raw_stats, "native": native_backend.pair_raw_stats}


@functools.cache
def triton_available() -> bool:
    """True when Triton and the package's kernels import."""
    try:
        import fastgradstats.kernels  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, device: torch.device | None) -> str:
    """The backend that will run for tensors on ``device`` (None: no tensors, so "torch" once the name is
    valid).

    Raises ValueError for an unknown or unusable choice.
    """
    name = backend if backend is not None else os.environ.get("FASTGRADSTATS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be None, 'torch', 'native' or 'triton', got {name!r}")
    if device is None:
        return "torch"
    if name is None:
        if device.type == "cuda" and triton_available():
            return "triton"
        return "native" if device.type == "cpu" and native_backend.available() else "torch"
    if name == "native":
        if device.type != "cpu":
            raise ValueError(f"backend 'native' needs CPU tensors, got {device}")
        if not native_backend.available():
            raise ValueError(f"backend 'native' is unavailable: {native_backend.unavailable_reason()}")
    if name == "triton":
        if not triton_available():
            raise ValueError("backend 'triton' needs the triton package: pip install 'fastgradstats[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend 'triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    return name


@torch.no_grad()
def raw_stats(
    tensors: Sequence[torch.Tensor], spec: HistSpec | None, backend: str | None,
    reducer: Reducer | None = None,
) -> RawStats:
    """Raw rows of validated tensors (one device, floating dtypes) from the chosen backend.

    With a ``reducer`` (sharded tensors), the rows and histograms of all ranks are merged: the maxima before a
    linear histogram takes its ranges from them, then the sums and counts.
    """
    name = resolve_backend(backend, tensors[0].device if tensors else None)
    tensors = _resolved(tensors)
    if name in _RAW_STATS:
        compute = functools.partial(_RAW_STATS[name], tensors, spec)
    else:
        from fastgradstats.kernels import raw_stats as triton_raw_stats

        compute = functools.partial(triton_raw_stats, [flat_elements(t) for t in tensors], spec)
    if reducer is None:
        return compute()
    maxima_merged = []

    def merge_maxima(rows: torch.Tensor) -> None:
        reducer.merge_maxima(rows)
        maxima_merged.append(True)

    raw = compute(before_ranges=merge_maxima)
    if not maxima_merged:
        reducer.merge_maxima(raw.rows)
    reducer.merge_sums(raw)
    return raw


@torch.no_grad()
def pair_raw_stats(
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    origin: list[torch.Tensor] | None,
    backend: str | None,
    reducer: Reducer | None = None,
) -> torch.Tensor:
    """Pair rows [L, PAIR_K] of validated 1-D tensors in matching element order, from the chosen backend
    (summed over the ranks of ``reducer`` when given)."""
    name = resolve_backend(backend, a[0].device if a else None)
    a, b = _resolved(a), _resolved(b)
    origin = None if origin is None else _resolved(origin)
    if name in _PAIR_RAW_STATS:
        rows = _PAIR_RAW_STATS[name](a, b, origin)
    else:
        from fastgradstats.kernels import pair_raw_stats as triton_pair_raw_stats

        rows = triton_pair_raw_stats(a, b, origin)
    if reducer is not None:
        reducer.merge_sums(RawStats(rows), first_max=PAIR_K)
    return rows


def _resolved(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors with any negative bit materialised (``torch._neg_view``, ``z.conj().imag``): the kernels
    read raw memory, which holds the negated values of such views. A copy, for those tensors only."""
    return [t.resolve_neg() if t.is_neg() else t for t in tensors]
