"""clip_grad_norm_: torch's gradient clipping, with the norm (and per-layer statistics) from one fused
pass."""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist

from .api import tensor_stats
from .distributed import is_dtensor
from .results import TensorStats
from .split import Split

FUSED_NORM_TYPES = (2.0, math.inf)


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    return_stats: bool = False,
    group: dist.ProcessGroup | None = None,
    split: Split | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TensorStats]:
    """A drop-in for ``torch.nn.utils.clip_grad_norm_``: same return value, same clipping, same errors.

    The total norm of norm_type 2 or inf comes from the fused statistics kernel (other norm types use
    torch's ``get_total_norm``); the scaling itself is torch's ``clip_grads_with_norm_``. Returns the total
    norm (a 0-d tensor in the gradients' promoted dtype), or ``(total_norm, stats)`` with
    ``return_stats=True``, where ``stats`` are the per-layer gradient statistics (layers named "0", "1", ...
    in parameter order, skipping parameters without a gradient). No host sync unless ``error_if_nonfinite``.
    The norm is taken in float64 from the fused pass's float64 rows, then rounded to the gradients' dtype, so
    float64 gradients keep float64 norms (beyond float32's range too).
    DTensor gradients (FSDP2, tensor parallel) get the global norm and their local shards are scaled; plain
    gradients sharded by hand pass the process group as ``group=``. ``split=`` (as in ``tensor_stats``, over
    the names "0", "1", ...) splits the layers of ``stats`` into slices; the norm and the clipping are those
    of all gradients together, as without it.

    Example::

        total_norm, stats = fgs.clip_grad_norm_(model.parameters(), 1.0, return_stats=True)
        stats.l2   # per-layer norms before clipping
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = list(parameters)
    if is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        empty = torch.tensor(0.0)
        return (empty, tensor_stats([])) if return_stats else empty

    fused = return_stats or norm_type in FUSED_NORM_TYPES
    stats = tensor_stats(grads, group=group, split=split) if fused else None
    clip_coef = None
    if norm_type in FUSED_NORM_TYPES:
        dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads))
        if stats.total.finalized:  # the Triton path: norm and coefficient in one more launch
            from fastgradstats.kernels.finalize import clip_coefficient

            total_norm, clip_coef = clip_coefficient(stats.total._norms, norm_type, max_norm, dtype)
        else:
            total_norm = stats.total_norm(norm_type).to(dtype)
    else:
        total_norm = torch.nn.utils.get_total_norm(grads, norm_type, False, foreach)
        if is_dtensor(total_norm):
            total_norm = total_norm.full_tensor()

    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    if clip_coef is None and any(is_dtensor(g) for g in grads):
        clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    if clip_coef is None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    else:  # scale as torch does (DTensors through their local shards: the total norm is already global)
        local = [g.to_local() if is_dtensor(g) else g for g in grads]
        for same_kind in _by_device_and_dtype(local):
            if foreach is False:
                for g in same_kind:
                    g.mul_(clip_coef)
            else:
                torch._foreach_mul_(same_kind, clip_coef)
    return (total_norm, stats) if return_stats else total_norm


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())
