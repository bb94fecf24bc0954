"""Pairwise statistics between two parameter or gradient sets: per-layer and global dot, norms, cosine,
distance."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from . import dispatch
from .api import SUPPORTED_DTYPES, _check_names, derived_now
from .distributed import localize, same_sharding
from .results import PairStats
from .split import Split, split_names, split_parts

TensorSet = torch.nn.Module | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def pair_stats(
    a: TensorSet,
    b: TensorSet,
    names: Sequence[str] | None = None,
    *,
    origin: TensorSet | None = None,
    strict: bool = True,
    backend: str | None = None,
    group: dist.ProcessGroup | None = None,
    split: Split | None = None,
) -> PairStats:
    """Per-layer and global dot, norms, cosine and distance between two tensor sets, reading each element
    once.

    Args:
        a, b: equally long sequences of tensors with matching shapes (dtypes may differ between the lists), or
            two models / state_dicts matched by name (model parameters; floating-point state_dict entries,
            so integer buffers such as ``num_batches_tracked`` are skipped). Layers follow a's order. When a,
            b or origin is a model, the other sides' state_dicts are compared on its parameters: their
            entries that are buffers of the model (BatchNorm's ``running_mean``) or aliases of its tied
            parameters (``out.weight`` when it is ``emb.weight``, which ``named_parameters()`` lists once)
            are skipped.
        names: L unique layer names for sequences (default "0", "1", ...); models and state_dicts bring their
            own.
        origin: optional third set like a; directions are then measured from it (a' = a - origin,
            b' = b - origin, formed inside the kernel, never materialised).
        strict: with models / state_dicts, a name present in only one of them (or missing from origin), after
            the skips above, raises ValueError; with ``strict=False`` such layers are skipped.
        backend: None (auto), "torch" or "triton".
        group: for plain tensors sharded by hand across this process group (see ``tensor_stats``). DTensors
            need no group; a, b and origin must then be sharded alike.
        split: statistics per slice along dim 0, as in ``tensor_stats`` (matched on a's names and tensors;
            b and origin are split alike).

    Returns:
        PairStats with [L] tensors on the input device and ``.total`` over all layers flattened together.
        Tensors of a layer are read in storage order when a, b (and origin) share their strides; otherwise
        the non-contiguous ones among them are copied first.

    Example::

        prev = [p.grad.clone() for p in model.parameters()]   # last step's gradient
        ...
        s = fgs.pair_stats(prev, [p.grad for p in model.parameters()])
        s.cos, s.total.cos    # per-layer and global gradient direction stability
    """
    names, a_list, b_list, origin_list = _match(a, b, origin, names, strict)
    for i, name in enumerate(names):
        _check_layer(name, a_list[i], b_list[i], "b")
        if origin_list is not None:
            _check_layer(name, a_list[i], origin_list[i], "origin")
        if a_list[i].device != a_list[0].device:
            raise ValueError(
                f"pair_stats: layer '{name}' is on {a_list[i].device} but layer '{names[0]}' is on "
                f"{a_list[0].device}; one call takes tensors on one device"
            )
        for other, label in ((b_list[i], "b"), (None if origin_list is None else origin_list[i], "origin")):
            if other is not None and not same_sharding(a_list[i], other):
                raise ValueError(f"pair_stats: layer '{name}' is sharded differently in a and in {label}")
    parts = split_parts(a_list, names, split, "pair_stats")
    a_list, reducer = localize(a_list, names, group, "pair_stats", parts)
    b_list, _ = localize(b_list, names, group, "pair_stats", parts)
    if origin_list is not None:
        origin_list, _ = localize(origin_list, names, group, "pair_stats", parts)
    names, groups = split_names(names, parts, "pair_stats")
    rows = dispatch.layer_pair_rows(a_list, b_list, origin_list, backend, reducer)
    on_triton = bool(a_list) and dispatch.finalizes(backend, a_list[0].device)
    stats = PairStats.from_rows(rows, names, triton=on_triton)
    stats.splits = groups
    return derived_now(stats) if torch.compiler.is_compiling() else stats


def cosine_similarity(
    a: TensorSet,
    b: TensorSet,
    origin: TensorSet | None = None,
    *,
    strict: bool = True,
    backend: str | None = None,
    group: dist.ProcessGroup | None = None,
    split: Split | None = None,
) -> torch.Tensor:
    """The global cosine of a and b (optionally measured from origin), as if each set were one flat vector.

    A 0-d float32 tensor on the input device, equal to ``F.cosine_similarity(cat(a'), cat(b'), dim=0)``
    without the concatenation (``split=`` as in ``pair_stats``: it does not change the global cosine).
    Example: ``fgs.cosine_similarity(model_now, model_init)``.
    """
    return pair_stats(a, b, origin=origin, strict=strict, backend=backend, group=group, split=split).total.cos


def _named(tensors: TensorSet, not_parameters: set[str]) -> dict[str, torch.Tensor] | None:
    """name -> tensor for a model (its parameters) or a state_dict (its floating-point entries, less those
    named in ``not_parameters``); None for a plain sequence."""
    if isinstance(tensors, torch.nn.Module):
        return {name: p.detach() for name, p in tensors.named_parameters()}
    if isinstance(tensors, Mapping):
        return {name: t for name, t in tensors.items() if name not in not_parameters
                and (not isinstance(t, torch.Tensor) or t.is_floating_point())}
    return None


def _not_parameters(tensor_sets: Iterable[TensorSet | None]) -> set[str]:
    """The state_dict names of the models among ``tensor_sets`` that are not in their ``named_parameters()``:
    buffers, and the aliases of tied parameters (one Parameter registered under several names)."""
    names: set[str] = set()
    for module in tensor_sets:
        if isinstance(module, torch.nn.Module):
            parameters = dict(module.named_parameters())
            names.update(name for name, _ in module.named_parameters(remove_duplicate=False)
                         if name not in parameters)
            names.update(name for name, _ in module.named_buffers(remove_duplicate=False))
    return names


def _as_list(tensors: TensorSet, argument: str) -> list:
    if isinstance(tensors, (torch.Tensor, str)) or not isinstance(tensors, Iterable):
        raise TypeError(f"pair_stats: {argument} must be a model, a state_dict or a sequence of tensors, "
                        f"got {type(tensors).__name__}")
    return list(tensors)


def _match(a, b, origin, names, strict):
    """Layer names and the aligned tensor lists of a, b and origin (None when absent)."""
    not_parameters = _not_parameters((a, b, origin))
    named_a, named_b = _named(a, not_parameters), _named(b, not_parameters)
    if (named_a is None) != (named_b is None):
        raise TypeError("pair_stats: a and b must both be models/state_dicts or both be sequences of tensors")
    if named_a is None:
        a_list, b_list = _as_list(a, "a"), _as_list(b, "b")
        if len(a_list) != len(b_list):
            raise ValueError(f"pair_stats: a has {len(a_list)} tensors but b has {len(b_list)}")
        names = _check_names(names, len(a_list), "pair_stats")
        origin_list = None if origin is None else _as_list(origin, "origin")
        if origin_list is not None and len(origin_list) != len(a_list):
            raise ValueError(f"pair_stats: origin has {len(origin_list)} tensors but a has {len(a_list)}")
        return names, a_list, b_list, origin_list

    if names is not None:
        raise ValueError("pair_stats: names are taken from the models/state_dicts; do not pass names")
    named_origin = None if origin is None else _named(origin, not_parameters)
    if origin is not None and named_origin is None:
        raise TypeError("pair_stats: origin must be a model/state_dict when a and b are")
    only_a = [n for n in named_a if n not in named_b]
    only_b = [n for n in named_b if n not in named_a]
    not_in_origin = [] if named_origin is None else [n for n in named_a
                                                     if n in named_b and n not in named_origin]
    if strict and (only_a or only_b or not_in_origin):
        problems = [f"{label}: {', '.join(repr(n) for n in found[:5])}{' ...' if len(found) > 5 else ''}"
                    for label, found in (("only in a", only_a), ("only in b", only_b),
                                         ("missing from origin", not_in_origin)) if found]
        raise ValueError(f"pair_stats: layer names differ ({'; '.join(problems)}); "
                         "pass strict=False to skip them")
    names = [n for n in named_a if n in named_b and (named_origin is None or n in named_origin)]
    origin_list = None if named_origin is None else [named_origin[n] for n in names]
    return names, [named_a[n] for n in names], [named_b[n] for n in names], origin_list


def _check_layer(name: str, a: torch.Tensor, other: torch.Tensor, label: str) -> None:
    for tensor, argument in ((a, "a"), (other, label)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"pair_stats: layer '{name}' in {argument} is a {type(tensor).__name__}, "
                            "not a tensor")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"pair_stats: layer '{name}' in {argument} has dtype {tensor.dtype}; "
                            "supported: float32, bfloat16, float16, float64")
        if tensor.layout != torch.strided:
            raise TypeError(f"pair_stats: layer '{name}' in {argument} has layout {tensor.layout}")
    if a.shape != other.shape:
        raise ValueError(f"pair_stats: layer '{name}' has shape {tuple(a.shape)} in a but "
                         f"{tuple(other.shape)} in {label}")
    if a.device != other.device:
        raise ValueError(f"pair_stats: layer '{name}' is on {a.device} in a but on {other.device} in {label}")
