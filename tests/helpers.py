"""Helpers shared by the tests: the backend protocol as the tests call it."""

from __future__ import annotations

import torch

from fastgradstats import dispatch
from fastgradstats.hist import HistSpec
from fastgradstats.rows import RawStats


def raw_stats(backend: str, tensors: list[torch.Tensor], spec: HistSpec | None = None, **options) -> RawStats:
    """The raw rows of ``tensors`` from ``backend`` through dispatch (flattening, both histogram passes);
    ``options`` (chunk_size, block_size) go to the backend."""
    return dispatch.raw_stats(tensors, spec, backend, **options)


def pair_rows(backend: str, a: list[torch.Tensor], b: list[torch.Tensor],
              origin: list[torch.Tensor] | None = None, **options) -> torch.Tensor:
    """Pair rows [L, PAIR_K] of ``backend`` through dispatch; ``options`` go to the backend."""
    return dispatch.pair_raw_stats(a, b, origin, backend, **options)
