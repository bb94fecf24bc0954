"""The statistics as PyTorch custom operators: what :mod:`fastgradstats.dispatch` calls inside
``torch.compile``.

Two operators cover every backend ("torch", "native" and "triton"), on every device:

``fastgradstats::raw_stats(Tensor[] tensors, str? backend, str? hist, int bins, int min_exp, int max_exp,
float? range_lo, float? range_hi) -> (Tensor rows, Tensor hist, Tensor total_hist)``
    float64 [L, K] raw rows (:mod:`fastgradstats.rows`) of L tensors of any shape and layout, int64 [L, B]
    histogram counts (B = 0 without a histogram) and int64 [B] counts of all layers over their joint range
    for a linear histogram over data ranges ([0] otherwise): both passes of the two-pass protocol in one op.

``fastgradstats::pair_rows(Tensor[] a, Tensor[] b, Tensor[]? origin, str? backend) -> Tensor``
    float64 [L, PAIR_K] pair rows of layers a[i], b[i] (and origin[i]) of equal shapes.

Each is an opaque ``torch.library.custom_op`` whose implementation is the eager call (backend chosen when it
runs, from ``backend`` or ``FASTGRADSTATS_BACKEND``), with a fake implementation that gives the output shapes
from the number of tensors and the histogram's bins alone: Dynamo and AOTAutograd trace them, Inductor keeps
them as calls, and CUDA graphs capture the launches they make. Everything after the rows (merging, deriving
the fields, clipping) is plain torch ops in the caller's graph, which Inductor fuses.

Why an opaque ``custom_op`` for the Triton kernels, not ``torch.library.triton_op`` + ``wrap_triton``: the
kernels read a segment table built on the host from the tensors' ``data_ptr()``s and numels (base addresses,
alignment heads, chunk maps, per-dtype groups; :mod:`fastgradstats.kernels.segments`) and cached per address
set. FakeTensors have no addresses, and the table is host computation, not tensor ops, so it cannot be traced
into a graph; a ``triton_op`` would have to rebuild it from traceable ops each step. Inside an opaque op the
implementation runs on real tensors: the table is built once per address set and reused by every later call
(and every CUDA-graph replay, the addresses of a captured step being fixed).

The Triton finalize kernel (every field in one launch, :mod:`fastgradstats.kernels.finalize`) is not an op:
inside a graph the fields are derived by :func:`fastgradstats.rows.derive`'s torch ops, which Inductor fuses
into a few kernels (and a CUDA graph replays for free), and which are the same for every backend, since the
backend is chosen when the op runs, after tracing. Eager calls keep the finalize kernel.

Eager calls do not go through the ops (:func:`fastgradstats.dispatch.compiling`): the dispatcher round trip
costs about 55 µs per call over GPT-2 small's 148 tensors (native backend, 2-core CPU), a third of
GPT-2 small's whole read floor on an H100, and a ``TorchDispatchMode`` would see one opaque op where
:mod:`fastgradstats.launches` counts each kernel.

The ops read their inputs and write fresh outputs (no mutation, no aliasing). Statistics are read-only: the
outputs are marked non-differentiable (they never require grad, even of inputs that do), and
:mod:`fastgradstats.dispatch` calls the ops under ``torch.no_grad()`` anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hist import HistSpec
from .rows import PAIR_K, K, RawStats

NAMESPACE = "fastgradstats"
RAW_STATS_SCHEMA = ("(Tensor[] tensors, str? backend, str? hist, int bins, int min_exp, int max_exp, "
                    "float? range_lo, float? range_hi) -> (Tensor, Tensor, Tensor)")
PAIR_ROWS_SCHEMA = "(Tensor[] a, Tensor[] b, Tensor[]? origin, str? backend) -> Tensor"


def _spec(hist: str | None, bins: int, min_exp: int, max_exp: int, range_lo: float | None,
          range_hi: float | None) -> HistSpec | None:
    """The (already validated) HistSpec the scalar arguments describe."""
    if hist is None:
        return None
    value_range = None if range_lo is None else (range_lo, range_hi)
    return HistSpec(hist, bins, value_range, min_exp, max_exp)


def _two_pass(spec: HistSpec | None) -> bool:
    """A linear histogram over the layers' data ranges: the one case with a separate total histogram."""
    return spec is not None and spec.kind == "linear" and spec.range is None


@torch.library.custom_op(f"{NAMESPACE}::raw_stats", mutates_args=(), schema=RAW_STATS_SCHEMA)
def _raw_stats_op(tensors: list[Tensor], backend: str | None, hist: str | None, bins: int, min_exp: int,
                  max_exp: int, range_lo: float | None, range_hi: float | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    from . import dispatch

    spec = _spec(hist, bins, min_exp, max_exp, range_lo, range_hi)
    raw = dispatch.raw_stats(tensors, spec, backend)
    device = raw.rows.device
    counts = raw.hist if raw.hist is not None else torch.empty(len(tensors), 0, dtype=torch.int64,
                                                                 device=device)
    total = raw.total_hist if raw.total_hist is not None else torch.empty(0, dtype=torch.int64, device=device)
    return raw.rows.contiguous(), counts.contiguous(), total.contiguous()


@_raw_stats_op.register_fake
def _raw_stats_fake(tensors, backend, hist, bins, min_exp, max_exp, range_lo, range_hi):
    spec = _spec(hist, bins, min_exp, max_exp, range_lo, range_hi)
    first, layers = tensors[0], len(tensors)
    rows = first.new_empty((layers, K), dtype=torch.float64)
    counts = first.new_empty((layers, 0 if spec is None else spec.bins), dtype=torch.int64)
    total = first.new_empty((spec.bins if _two_pass(spec) else 0,), dtype=torch.int64)
    return rows, counts, total


@torch.library.custom_op(f"{NAMESPACE}::pair_rows", mutates_args=(), schema=PAIR_ROWS_SCHEMA)
def _pair_rows_op(a: list[Tensor], b: list[Tensor], origin: list[Tensor] | None,
                  backend: str | None) -> Tensor:
    from . import dispatch

    return dispatch.layer_pair_rows(a, b, origin, backend).contiguous()


@_pair_rows_op.register_fake
def _pair_rows_fake(a, b, origin, backend):
    return a[0].new_empty((len(a), PAIR_K), dtype=torch.float64)


def _non_differentiable(ctx, inputs, output) -> None:
    """Statistics are read-only: their outputs never require grad, so a backward through them fails with
    torch's usual "does not require grad" error instead of giving a wrong gradient."""
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))


def _no_backward(ctx, *grads):
    raise RuntimeError("fastgradstats statistics are not differentiable")


_raw_stats_op.register_autograd(_no_backward, setup_context=_non_differentiable)
_pair_rows_op.register_autograd(_no_backward, setup_context=_non_differentiable)


def raw_stats(tensors: list[Tensor], spec: HistSpec | None, backend: str | None) -> RawStats:
    """:func:`fastgradstats.dispatch.raw_stats` of validated tensors (at least one) through
    ``fastgradstats::raw_stats``: traceable by Dynamo and AOTAutograd."""
    lo, hi = (None, None) if spec is None or spec.range is None else spec.range
    rows, counts, total = torch.ops.fastgradstats.raw_stats(
        tensors, backend, None if spec is None else spec.kind, 0 if spec is None else spec.bins,
        0 if spec is None else spec.min_exp, 0 if spec is None else spec.max_exp, lo, hi)
    return RawStats(rows, None if spec is None else counts, total if _two_pass(spec) else None)


def pair_rows(a: list[Tensor], b: list[Tensor], origin: list[Tensor] | None,
              backend: str | None) -> Tensor:
    """:func:`fastgradstats.dispatch.layer_pair_rows` of validated layers (at least one) through
    ``fastgradstats::pair_rows``: traceable by Dynamo and AOTAutograd."""
    return torch.ops.fastgradstats.pair_rows(a, b, origin, backend)
