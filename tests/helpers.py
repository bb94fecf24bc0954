"""Helpers shared by the tests: the backend protocol as the tests call it, histogram specs, poisoned
allocations and a Triton launch counter (fixtures over them live in conftest.py)."""

from __future__ import annotations

import pytest
import torch

from fastgradstats import dispatch
from fastgradstats.hist import HistSpec
from fastgradstats.rows import RawStats

# Histogram requests the backend tests run: none, log2 (default and narrow), linear over a fixed range and
# over each layer's data range.
SPECS = {
    "none": None,
    "log2": HistSpec.make("log2"),
    "log2_narrow": HistSpec.make("log2", min_exp=-10, max_exp=3),
    "linear_range": HistSpec.make("linear", bins=7, range=(-2.0, 2.0)),
    "linear": HistSpec.make("linear", bins=5),
}


def raw_stats(backend: str, tensors: list[torch.Tensor], spec: HistSpec | None = None, **options) -> RawStats:
    """The raw rows of ``tensors`` from ``backend`` through dispatch (flattening, both histogram passes);
    ``options`` (chunk_size, block_size) go to the backend."""
    return dispatch.raw_stats(tensors, spec, backend, **options)


def pair_rows(backend: str, a: list[torch.Tensor], b: list[torch.Tensor],
              origin: list[torch.Tensor] | None = None, **options) -> torch.Tensor:
    """Pair rows [L, PAIR_K] of ``backend`` through dispatch; ``options`` go to the backend."""
    return dispatch.pair_raw_stats(a, b, origin, backend, **options)


class Poison:
    """``torch.empty`` that returns NaN-filled floats and very negative ints, so that any slot a kernel
    never writes shows up in its results. ``poison(fn, *args)`` runs one call poisoned; :meth:`install`
    poisons the rest of the test. ``allocations`` holds what was poisoned."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.allocations: list[torch.Tensor] = []
        self.real_empty = torch.empty

    def empty(self, *size, **kwargs) -> torch.Tensor:
        t = self.real_empty(*size, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and not t.is_complex():
            t.fill_(torch.iinfo(t.dtype).min // 2)
        self.allocations.append(t)
        return t

    def install(self) -> None:
        self.monkeypatch.setattr(torch, "empty", self.empty)

    def __call__(self, fn, *args, **kwargs):
        with self.monkeypatch.context() as patch:
            patch.setattr(torch, "empty", self.empty)
            return fn(*args, **kwargs)


class CountingKernel:
    """Stands in for a ``@triton.jit`` function and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.launches += 1
            return launch(*args, **kwargs)

        return counted
