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
from typing import Protocol

import torch

from . import ops
from .backends import native_backend, torch_backend
from .dense import flat_elements
from .distributed import Reducer
from .hist import HistSpec, fixed_ranges, linear_ranges
from .rows import PAIR_K, RawStats

BACKENDS = ("torch", "native", "triton")
# The oldest Triton we declare (pyproject.toml's "triton>=3.4"); the kernels are compiled with 3.9 in CI and
# 3.6 on the lent GPU machine, not with older releases.
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


class Backend(Protocol):
    """What dispatch asks of a backend (a module: :mod:`.backends.torch_backend`,
    :mod:`.backends.native_backend` or :mod:`fastgradstats.kernels`). Inputs are validated 1-D tensors of one
    device, each read in storage order (dispatch flattens them and resolves negative bits once); ``options``
    are backend tuning knobs such as ``chunk_size`` (tests pass small ones). No operation syncs with a CUDA
    device. A new statistic plugs in here, once, for every backend."""

    NAME: str  # "torch", "native" or "triton"; "triton" rows are derived by the finalize kernel

    def raw_rows(self, tensors: list[torch.Tensor], spec: HistSpec | None, ranges: torch.Tensor | None,
                 **options) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float64 [L, K] raw rows, int64 [L, B] histogram counts or None) in one pass. ``spec`` is None, a
        log2 histogram, or a linear one over the fixed ``ranges`` float32 [L + 1, 3] (lo, hi, scale)."""

    def linear_hist(self, tensors: list[torch.Tensor], spec: HistSpec, ranges: torch.Tensor,
                    **options) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 [L, B] counts of each layer over its range, int64 [B] counts of all layers over the last
        range) of a linear histogram; ``ranges`` float32 [L + 1, 3] (lo, hi, scale) are data ranges: each
        holds every finite value of its layer (the last one of every layer), so exactly the finite values
        count."""

    def pair_rows(self, a: list[torch.Tensor], b: list[torch.Tensor], origin: list[torch.Tensor] | None,
                  **options) -> torch.Tensor:
        """float64 [L, PAIR_K] pair rows of a[i], b[i] (and origin[i]), equal numels, matching order."""


def backend_module(name: str) -> Backend:
    """The module implementing backend ``name`` (one of :data:`BACKENDS`)."""
    if name == "triton":
        import fastgradstats.kernels

        return fastgradstats.kernels
    return {"torch": torch_backend, "native": native_backend}[name]


@torch.no_grad()
def raw_stats(
    tensors: Sequence[torch.Tensor], spec: HistSpec | None, backend: str | None,
    reducer: Reducer | None = None, **options,
) -> RawStats:
    """Raw rows (and histograms) of validated tensors (one device, floating dtypes, any dense layout) from
    the chosen backend: :func:`run_raw_stats` with its module.

    Inside ``torch.compile`` (:func:`compiling`) the call goes through the custom op
    ``fastgradstats::raw_stats`` (:mod:`fastgradstats.ops`), whose implementation is this eager call.
    """
    if compiling(tensors, reducer, options):
        return ops.raw_stats(list(tensors), spec, backend)
    device = tensors[0].device if tensors else torch.device("cpu")
    impl = backend_module(resolve_backend(backend, device if tensors else None))
    with _current_device(device):
        return run_raw_stats(impl, tensors, spec, reducer, **options)


def run_raw_stats(
    impl: Backend, tensors: Sequence[torch.Tensor], spec: HistSpec | None, reducer: Reducer | None = None,
    **options,
) -> RawStats:
    """The protocol every backend runs under: one pass computes the rows with a log2 or fixed-range
    histogram; a linear histogram over data ranges takes a second pass over the ranges derived from the
    rows. With a ``reducer`` (sharded tensors) the maxima of all ranks are merged before those ranges are
    taken, and the sums and counts after. ``options`` go to the backend (e.g. ``chunk_size``).
    """
    flats = _prepared(tensors)
    device = flats[0].device if flats else torch.device("cpu")
    one_pass = spec is not None and (spec.kind == "log2" or spec.range is not None)
    ranges = fixed_ranges(spec, len(flats), device) if one_pass and spec.kind == "linear" else None
    rows, hist = impl.raw_rows(flats, spec if one_pass else None, ranges, **options)
    if reducer is not None:
        reducer.merge_maxima(rows)
    total_hist = None
    if spec is not None and not one_pass:
        ranges = linear_ranges(spec, rows)
        hist, total_hist = impl.linear_hist(flats, spec, ranges, **options)
    raw = RawStats(rows, hist, total_hist, triton=impl.NAME == "triton", ranges=ranges)
    if reducer is not None:
        reducer.merge_sums(raw)
    return raw


def compiling(tensors: Sequence[torch.Tensor], reducer: Reducer | None, options: dict) -> bool:
    """True when Dynamo is tracing a call of non-empty ``tensors``: it then goes through the custom ops of
    :mod:`fastgradstats.ops` (an empty call is plain torch ops, traceable as it is). Eager calls launch their
    kernels directly, so that the launch counts of :mod:`fastgradstats.launches` see each kernel and the
    dispatcher adds nothing.

    Raises NotImplementedError inside ``torch.compile`` for sharded tensors (``group=``, DTensors) and for
    backend tuning ``options``, which the ops do not take.
    """
    if not torch.compiler.is_compiling() or not tensors:
        return False
    if reducer is not None:
        raise NotImplementedError("fastgradstats inside torch.compile: sharded tensors (group=, DTensors) "
                                  "are not supported there yet; call it outside the compiled region")
    if options:
        raise NotImplementedError(f"fastgradstats inside torch.compile: backend options {sorted(options)} "
                                  "are not supported there")
    return True


def finalizes(backend: str | None, device: torch.device) -> bool:
    """True when the rows of ``backend`` on ``device`` are derived by the Triton finalize kernel; inside
    ``torch.compile`` rows are derived by torch ops in the caller's graph, which Inductor fuses."""
    return not torch.compiler.is_compiling() and resolve_backend(backend, device) == "triton"


@torch.no_grad()
def layer_pair_rows(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    origin: Sequence[torch.Tensor] | None,
    backend: str | None,
    reducer: Reducer | None = None,
) -> torch.Tensor:
    """Pair rows [L, PAIR_K] of validated layers a[i], b[i] (and origin[i]) of matching shapes, any layouts:
    each layer is read in storage order when its tensors share their strides, else the non-contiguous ones
    are copied first (:func:`pair_layer_flats`); then :func:`pair_raw_stats`. Inside ``torch.compile`` the
    call goes through the custom op ``fastgradstats::pair_rows``, whose implementation is this eager call."""
    if compiling(a, reducer, {}):
        return ops.pair_rows(list(a), list(b), None if origin is None else list(origin), backend)
    flats = [pair_layer_flats(a[i], b[i], None if origin is None else origin[i]) for i in range(len(a))]
    origin_flat = None if origin is None else [f[2] for f in flats]
    return pair_raw_stats([f[0] for f in flats], [f[1] for f in flats], origin_flat, backend, reducer)


def pair_layer_flats(a: torch.Tensor, b: torch.Tensor, origin: torch.Tensor | None) -> list[torch.Tensor]:
    """1-D views of one layer's tensors with matching element order (copies only when layouts differ)."""
    tensors = [t for t in (a, b, origin) if t is not None]
    if all(t.stride() == a.stride() for t in tensors):
        return [flat_elements(t) for t in tensors]
    return [t.reshape(-1) for t in tensors]


@torch.no_grad()
def pair_raw_stats(
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    origin: list[torch.Tensor] | None,
    backend: str | None,
    reducer: Reducer | None = None,
    **options,
) -> torch.Tensor:
    """Pair rows [L, PAIR_K] of validated 1-D tensors in matching element order, from the chosen backend
    (summed over the ranks of ``reducer`` when given). ``options`` go to the backend."""
    device = a[0].device if a else torch.device("cpu")
    name = resolve_backend(backend, device if a else None)
    a, b = _prepared(a), _prepared(b)
    origin = None if origin is None else _prepared(origin)
    with _current_device(device):
        rows = backend_module(name).pair_rows(a, b, origin, **options)
    if reducer is not None:
        reducer.merge_sums(RawStats(rows), first_max=PAIR_K)
    return rows


def _current_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` as the current CUDA device: Triton launches on the current device, which need not be the
    tensors' (tensors on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _prepared(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as 1-D tensors of their elements in storage order (:func:`flat_elements`: a view unless a
    tensor has gaps or overlaps), with any negative bit materialised (``torch._neg_view``,
    ``z.conj().imag``; the kernels read raw memory, which holds the negated values): a copy for those
    tensors only."""
    return [flat_elements(t.resolve_neg() if t.is_neg() else t) for t in tensors]
