"""Public statistics calls: validate, name the layers, dispatch, wrap the raw rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from . import dispatch
from .distributed import localize
from .hist import DEFAULT_MAX_EXP, DEFAULT_MIN_EXP, HistSpec
from .results import LayerStats, TensorStats
from .split import Split, split_names, split_parts

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

NamedTensors = Iterable[tuple[str, torch.Tensor]]
Parameters = NamedTensors | Iterable[torch.Tensor]


def tensor_stats(
    tensors: Sequence[torch.Tensor],
    names: Sequence[str] | None = None,
    *,
    hist: str | None = None,
    bins: int = 64,
    range: tuple[float, float] | None = None,
    min_exp: int = DEFAULT_MIN_EXP,
    max_exp: int = DEFAULT_MAX_EXP,
    backend: str | None = None,
    group: dist.ProcessGroup | None = None,
    split: Split | None = None,
) -> TensorStats:
    """Per-layer statistics of a list of tensors, in one pass over the data and without a host sync.

    Args:
        tensors: L tensors of any shape, dtype float32/bfloat16/float16/float64, all on one device. Each is
            one layer; empty tensors are allowed. Dense non-contiguous tensors (e.g. transposed weights) are
            read in place; tensors with gaps or overlaps (strided slices, expand) are copied first.
        names: L unique layer names; default "0", "1", ...
        hist: None, "log2" (bins floor(log2|x|) clamped to [min_exp, max_exp], from the exponent bits) or
            "linear" (``bins`` equal-width bins over ``range`` or each layer's finite [min, max], torch.histc
            rules).
        backend: None (auto), "torch" or "triton"; see :mod:`fastgradstats.dispatch`.
        group: for plain tensors sharded by hand across the ranks of this process group: each rank passes its
            shards and gets the statistics of the whole tensors. DTensors (FSDP2, tensor parallel) need no
            group: their mesh says how they are sharded. See :mod:`fastgradstats.distributed`.
        split: statistics per slice along dim 0: ``{regex: parts}`` (``re.search`` over layer names, first
            match wins) or a callable ``(name, tensor) -> parts | None``. A matching layer ``name`` of shape
            [n, ...] becomes the layers ``name[0]``, ..., ``name[parts - 1]`` (views, read in place; totals
            unchanged); ``stats.group(name)`` returns their rows. ValueError when parts does not divide n.
            See :mod:`fastgradstats.split`.

    Returns:
        TensorStats with [L] tensors on the input device; ``.total`` holds the global values.

    Example::

        stats = fgs.tensor_stats([w1, w2], names=["w1", "w2"], hist="log2")
        stats.l2, stats.total.l2, stats.hist   # [2], 0-d, [2, 64]
        experts = fgs.tensor_stats([w_stack], ["w1"], split={"w1": 64})   # w_stack: [64, d_ff, d]
        experts.group("w1").l2                  # [64] per-expert norms
    """
    tensors, names = _validate(tensors, names, "tensor_stats")
    spec = HistSpec.make(hist, bins, range, min_exp, max_exp)
    parts = split_parts(tensors, names, split, "tensor_stats")
    local, reducer = localize(tensors, names, group, "tensor_stats", parts)
    names, groups = split_names(names, parts, "tensor_stats")
    stats = TensorStats.from_raw(dispatch.raw_stats(local, spec, backend, reducer), names, spec)
    stats.splits = groups
    return derived_now(stats) if torch.compiler.is_compiling() else stats


def derived_now(stats: LayerStats) -> LayerStats:
    """``stats`` (and its total) with every field derived now, as torch ops in the graph being traced (so
    a compiled function that returns results returns them derived, not derived later outside the graph)."""
    for result in (stats, stats.total):
        result._derived  # noqa: B018  (derives on first read)
    return stats


def grad_stats(model_or_named_parameters: torch.nn.Module | Parameters, **kwargs) -> TensorStats:
    """``tensor_stats`` of the gradients: layers are the parameters whose ``.grad`` is set, in order.

    Takes a model (layers named by ``named_parameters()``), (name, parameter) pairs, or the parameters
    themselves (``model.parameters()``, a list of tensors): these are named "0", "1", ... by their position
    among all the parameters passed, so a parameter keeps its name whether or not the others have a grad.
    Keyword arguments as in ``tensor_stats``.

    Example::

        loss.backward()
        stats = fgs.grad_stats(model, hist="log2")
        stats.l2            # per-layer gradient norms, on the device
        fgs.grad_stats(model.parameters()).names   # ["0", "1", ...], skipping those without a grad
    """
    named = _named_parameters(model_or_named_parameters, "grad_stats")
    pairs = [(name, p.grad) for name, p in named if p.grad is not None]
    return tensor_stats([g for _, g in pairs], [name for name, _ in pairs], **kwargs)


def param_stats(model_or_named_parameters: torch.nn.Module | Parameters, **kwargs) -> TensorStats:
    """``tensor_stats`` of the parameter values (every parameter).

    Takes a model (layers named by ``named_parameters()``), (name, parameter) pairs, or the parameters
    themselves (``model.parameters()``, a list of tensors), named "0", "1", ... in order. Keyword arguments as
    in ``tensor_stats``.
    """
    named = _named_parameters(model_or_named_parameters, "param_stats")
    return tensor_stats([p.detach() for _, p in named], [name for name, _ in named], **kwargs)


def _named_parameters(obj: torch.nn.Module | Parameters, caller: str) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs of a model, of named pairs, or of bare parameters named by position."""
    if isinstance(obj, torch.nn.Module):
        return list(obj.named_parameters())
    expected = f"{caller}: expected an nn.Module, parameters or (name, parameter) pairs"
    if isinstance(obj, (torch.Tensor, str)) or not isinstance(obj, Iterable):
        raise TypeError(f"{expected}, got {type(obj).__name__}")
    items = list(obj)
    for item in items:
        if not (isinstance(item, torch.Tensor) or _is_named_pair(item)):
            raise TypeError(f"{expected}, got an item of type {type(item).__name__}")
    bare = [isinstance(item, torch.Tensor) for item in items]
    if all(bare):
        return [(str(i), tensor) for i, tensor in enumerate(items)]
    if any(bare):
        raise TypeError(f"{caller}: expected parameters or (name, parameter) pairs, not a mix of both")
    return items


def _is_named_pair(item: object) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


def _check_names(names: Sequence[str] | None, count: int, caller: str) -> list[str]:
    """``count`` unique str layer names (default "0", "1", ...); TypeError or ValueError names the culprit."""
    if isinstance(names, str):
        raise TypeError(f"{caller}: names must be a sequence of str, got the str {names!r}")
    if names is None:
        return [str(i) for i in range(count)]
    names = list(names)
    if len(names) != count:
        raise ValueError(f"{caller}: {len(names)} names for {count} tensors")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{caller}: layer names must be str, got {name!r}")
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"{caller}: layer name '{duplicate}' appears more than once")
    return names


def _validate(
    tensors: Sequence[torch.Tensor], names: Sequence[str] | None, caller: str
) -> tuple[list[torch.Tensor], list[str]]:
    if isinstance(tensors, (torch.Tensor, str)) or not isinstance(tensors, Iterable):
        raise TypeError(f"{caller}: tensors must be a sequence of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    names = _check_names(names, len(tensors), caller)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{caller}: layer '{name}' is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{caller}: layer '{name}' has dtype {t.dtype}; "
                            "supported: float32, bfloat16, float16, float64")
        if t.layout != torch.strided:
            raise TypeError(f"{caller}: layer '{name}' has layout {t.layout}; "
                            "only dense (strided) tensors are supported")
        if t.device != tensors[0].device:
            raise ValueError(
                f"{caller}: layer '{name}' is on {t.device} but layer '{names[0]}' is on "
                f"{tensors[0].device}; one call takes tensors on one device"
            )
    return tensors, names
