"""Choosing a backend and asking it for raw rows.

Order of choice: the ``backend=`` argument, else the ``FASTGRADSTATS_BACKEND`` environment variable, else
"triton" for CUDA tensors when a recent enough Triton imports (:data:`TRITON_MIN_VERSION`), "native"
(compiled C, :mod:`fastgradstats.backends.native_backend`) for CPU tensors when a C compiler builds it,
and "torch" otherwise. "triton" on CPU tensors runs only under ``TRITON_INTERPRET=1`` (Triton's numpy
interpreter, used by the tests). Triton kernels launch on the tensors' device, whichever device is current.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from collections.abc import Sequence

import torch

from .backends import native_backend, torch_backend
from .dense import flat_elements
from .distributed import Reducer
from .hist import HistSpec
from .rows import PAIR_K, RawStats

BACKENDS = ("torch", "native", "triton")
_RAW_STATS = {"torch": torch_backend.raw_stats, "native": native_backend.raw_stats}
_PAIR_RAW_STATS = {"torch": torch_backend.pair_raw_stats, "native": native_backend.pair_raw_stats}
# The oldest Triton we declare (setup.py's "triton>=3.4"); the kernels are compiled with 3.9 in CI and 3.6 on
# the lent GPU machine, not with older releases.
TRITON_MIN_VERSION = (3, 4)
_warned_old_triton = False


def triton_version() -> str | None:
    """The installed Triton's version string, or None when Triton does not import."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def parse_version(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: "3.4.0+git1a2b" -> (3, 4, 0)."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


@functools.cache
def triton_unavailable_reason() -> str | None:
    """Why the Triton backend cannot run (not installed, too old, kernels fail to import), or None."""
    version = triton_version()
    if version is None:
        return "needs the triton package: pip install 'fastgradstats[triton]'"
    if parse_version(version) < TRITON_MIN_VERSION:
        need = ".".join(map(str, TRITON_MIN_VERSION))
        return f"needs triton >= {need}, but triton {version} is installed"
    try:
        import fastgradstats.kernels  # noqa: F401
    except ImportError as error:
        return f"cannot import its kernels with triton {version}: {error}"
    return None


def triton_available() -> bool:
    """True when a recent enough Triton and the package's kernels import."""
    return triton_unavailable_reason() is None


def _warn_old_triton_once() -> None:
    """One warning per process when an installed Triton cannot run the kernels and CUDA tensors fall back."""
    global _warned_old_triton
    if not _warned_old_triton and triton_version() is not None:
        _warned_old_triton = True
        warnings.warn(f"fastgradstats: using the torch backend on CUDA: the triton backend "
                      f"{triton_unavailable_reason()}", RuntimeWarning, stacklevel=3)


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
        if device.type == "cuda":
            if triton_available():
                return "triton"
            _warn_old_triton_once()
        return "native" if device.type == "cpu" and native_backend.available() else "torch"
    if name == "native":
        if device.type != "cpu":
            raise ValueError(f"backend 'native' needs CPU tensors, got {device}")
        if not native_backend.available():
            raise ValueError(f"backend 'native' is unavailable: {native_backend.unavailable_reason()}")
    if name == "triton":
        if not triton_available():
            raise ValueError(f"backend 'triton' {triton_unavailable_reason()}")
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

        compute = functools.partial(_launched_on, tensors[0].device, triton_raw_stats,
                                    [flat_elements(t) for t in tensors], spec)
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

        rows = _launched_on(a[0].device, triton_pair_raw_stats, a, b, origin)
    if reducer is not None:
        reducer.merge_sums(RawStats(rows), first_max=PAIR_K)
    return rows


def _launched_on(device: torch.device, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``device`` as the current CUDA device: Triton launches on the current
    device, which need not be the tensors' (tensors on cuda:1 while cuda:0 is current)."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return fn(*args, **kwargs)


def _resolved(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors with any negative bit materialised (``torch._neg_view``, ``z.conj().imag``): the kernels
    read raw memory, which holds the negated values of such views. A copy, for those tensors only."""
    return [t.resolve_neg() if t.is_neg() else t for t in tensors]
