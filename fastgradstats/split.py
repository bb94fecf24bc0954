"""Statistics per slice: one stacked tensor (MoE experts [E, ...], heads, scanned layers) as several layers.

``split=`` maps a layer name to a number of equal parts along dim 0, either as ``{regex: parts}`` (the first
pattern that ``re.search`` finds in the name wins) or as a callable ``(name, tensor) -> parts | None``. A
matching layer ``name`` of shape [n, ...] becomes the layers ``name[0]``, ..., ``name[parts - 1]``, part i
holding rows [i·n/parts, (i + 1)·n/parts). Parts are slices of the tensor (views: no copy, no extra launch;
:mod:`fastgradstats.dense` decides how each is read), so totals are those of the unsplit tensors.

For a DTensor the parts are cut by *global* dim-0 ranges: each rank reads the intersection of a part's range
with the dim-0 range of its local shard (an empty slice where they do not meet), so an expert sharded across
ranks, or one that a shard boundary cuts, is merged by the usual reduction into exactly one row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

Split = Mapping[str, int] | Callable[[str, torch.Tensor], "int | None"]


def split_parts(tensors: list[torch.Tensor], names: list[str], split: Split | None,
                caller: str) -> list[int | None]:
    """The number of parts of each layer (None: not split), validated against the (global) shapes.

    Raises TypeError for a ``split`` that is neither a mapping nor a callable, and ValueError for an invalid
    regular expression, parts that are not an int >= 1, a 0-d tensor or a dim 0 that parts does not divide.
    """
    if split is None:
        return [None] * len(tensors)
    if isinstance(split, Mapping):
        patterns = []
        for pattern, parts in split.items():
            try:
                patterns.append((re.compile(pattern), parts))
            except (re.error, TypeError) as error:
                raise ValueError(f"{caller}: split pattern {pattern!r} is not a valid regular expression: "
                                 f"{error}") from None

        def parts_of(name: str, _: torch.Tensor) -> int | None:
            return next((parts for regex, parts in patterns if regex.search(name)), None)
    elif callable(split):
        parts_of = split
    else:
        raise TypeError(f"{caller}: split must be a mapping {{regex: parts}} or a callable "
                        f"(name, tensor) -> parts | None, got {type(split).__name__}")
    result = []
    for name, tensor in zip(names, tensors):
        parts = parts_of(name, tensor)
        if parts is not None:
            _check_parts(name, tensor, parts, caller)
        result.append(parts)
    return result


def _check_parts(name: str, tensor: torch.Tensor, parts: object, caller: str) -> None:
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"{caller}: split of layer '{name}' must be an int >= 1, got {parts!r}")
    if tensor.dim() == 0:
        raise ValueError(f"{caller}: layer '{name}' is 0-d and cannot be split into {parts} parts")
    if tensor.shape[0] % parts:
        raise ValueError(f"{caller}: layer '{name}' has shape {tuple(tensor.shape)}: dim 0 "
                         f"({tensor.shape[0]}) does not split into {parts} equal parts")


def split_names(names: list[str], parts: list[int | None], caller: str) -> tuple[list[str], dict[str, range]]:
    """The layer names after splitting, and {split layer name: range of its parts' row indices}.

    Raises ValueError when a part's name is also the name of another layer.
    """
    out: list[str] = []
    groups: dict[str, range] = {}
    for name, count in zip(names, parts):
        if count is None:
            out.append(name)
        else:
            groups[name] = range(len(out), len(out) + count)
            out.extend(f"{name}[{i}]" for i in range(count))
    if len(set(out)) != len(out):
        duplicate = next(name for name in out if out.count(name) > 1)
        raise ValueError(f"{caller}: after splitting, layer name '{duplicate}' appears more than once")
    return out, groups


def part_slices(local: torch.Tensor, parts: int, global_rows: int, offset: int = 0) -> list[torch.Tensor]:
    """The slices of ``local`` (rows [offset, offset + local rows) of a tensor with ``global_rows`` rows
    along dim 0) that fall in each of ``parts`` equal global row ranges, in order; empty where none do."""
    size = global_rows // parts
    local_rows = local.shape[0] if local.dim() > 0 else 0
    slices = []
    for i in range(parts):
        start = min(max(i * size - offset, 0), local_rows)
        stop = min(max((i + 1) * size - offset, start), local_rows)
        slices.append(local[start:stop])
    return slices


def expand(tensors: list[torch.Tensor], parts: list[int | None]) -> list[torch.Tensor]:
    """Plain tensors with each split layer replaced by its parts (views)."""
    out = []
    for tensor, count in zip(tensors, parts):
        out.extend([tensor] if count is None else part_slices(tensor, count, tensor.shape[0]))
    return out
