"""Exact statistics of sharded tensors: local raw rows, then one all_reduce(MAX) and one all_reduce(SUM).

Every statistic derives from raw rows whose fields merge by a sum or a max (:mod:`fastgradstats.rows`), so the
statistics of a tensor sharded across ranks are those of the merged rows of its shards: per call, one packed
``all_reduce(MAX)`` of the max fields and one packed ``all_reduce(SUM)`` of the sum fields and histogram
counts, whatever the number of layers, and never a gather of data. M2 (around each rank's own mean) is summed
as Σ(x - s)² = M2 + n·(mean - s)² around s, the midpoint of the global finite range known after the MAX,
and turned back into M2 after the SUM: with s within the data's range that loses at most ~2N·1e-16 of M2.
A linear histogram over data ranges takes its ranges after the MAX, so the bins are the same on every rank.
Results are identical on every rank.

Inputs:

* DTensors (FSDP2 ``fully_shard``, tensor parallel, ``distribute_tensor``): all on one device mesh. A shard
  replicated along a mesh dimension counts only on the ranks at coordinate 0 of that dimension (the others
  read nothing), so replicas are not double counted. ``Partial`` placements are first reduced to ``Replicate``
  by DTensor itself (a reduction of that tensor's data).
* Plain tensors sharded by hand (Megatron style) with ``group=``: each rank passes its shards (``split=``
  needs DTensors or whole tensors: shards by hand carry no global row ranges).
* ``split=`` on DTensors (experts stacked [E, ...] and sharded ``Shard(0)`` by expert parallelism, possibly
  with FSDP on another mesh dimension): parts are cut by global dim-0 ranges, each rank reading the rows of
  each part that its shard holds (none, all, or some when a shard boundary cuts an expert), so every part
  is counted exactly once by the same two collectives. ``_StridedShard`` along dim 0 is refused.
* DDP needs none of this: replicated gradients are identical on every rank, so plain calls are already global.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .rows import FIRST_MAX, FMAX, M2, NEG_FMIN, SUM, N, RawStats
from .split import expand, part_slices


def is_dtensor(t: object) -> bool:
    """True for a DTensor. Without ``torch.distributed.tensor`` imported there can be none, so this reads
    ``sys.modules`` instead of importing it (and stays traceable by Dynamo, which a cached import is not)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


@dataclass
class Reducer:
    """Merges raw rows of all ranks of ``group`` (None: the default group) in place."""

    group: dist.ProcessGroup | None = None

    def merge_maxima(self, rows: torch.Tensor, first_max: int = FIRST_MAX) -> None:
        """all_reduce(MAX) of the max fields of rows [L, K]."""
        maxima = rows[:, first_max:].contiguous()
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.group)
        rows[:, first_max:] = maxima

    def merge_sums(self, raw: RawStats, first_max: int = FIRST_MAX) -> None:
        """One all_reduce(SUM) of the sum fields of raw.rows and of the histogram counts (exact in
        float64). Tensor rows (``first_max == FIRST_MAX``) need their maxima merged first."""
        tensor_rows = first_max == FIRST_MAX
        if tensor_rows:
            shift = _midpoint(raw.rows)
            raw.rows[:, M2] += _offset_squares(raw.rows, shift)
        parts = [raw.rows[:, :first_max]] + [h for h in (raw.hist, raw.total_hist) if h is not None]
        packed = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        offset = 0
        for part in parts:
            part.copy_(packed[offset : offset + part.numel()].view(part.shape))
            offset += part.numel()
        if tensor_rows:
            raw.rows[:, M2] -= _offset_squares(raw.rows, shift)


def _midpoint(rows: torch.Tensor) -> torch.Tensor:
    """float64 [L] midpoint of each row's finite range (0 without a finite element)."""
    lo, hi = -rows[:, NEG_FMIN], rows[:, FMAX]
    return torch.where(hi >= lo, lo / 2 + hi / 2, 0.0)


def _offset_squares(rows: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """n·(mean - shift)² of each row (0 for an empty row): Σ(x - shift)² - M2."""
    n = rows[:, N]
    return torch.where(n > 0, n * (rows[:, SUM] / n - shift).square(), 0.0)


def localize(
    tensors: list[torch.Tensor], names: list[str], group: dist.ProcessGroup | None, caller: str,
    parts: list[int | None] | None = None,
) -> tuple[list[torch.Tensor], Reducer | None]:
    """The tensors this rank reads, and the Reducer that makes their statistics global (None: local call).

    ``parts`` (from :func:`~.split.split_parts`) replaces each split layer by its parts; a DTensor's parts are
    cut by global dim-0 ranges, so each rank reads the rows of each part that its shard holds.

    Raises ValueError for DTensors on different meshes, DTensors mixed with plain tensors or with ``group=``,
    and a group that does not contain this rank.
    """
    parts = [None] * len(tensors) if parts is None else parts
    dtensors = [is_dtensor(t) for t in tensors]
    if not any(dtensors):
        if group is None:
            return expand(tensors, parts), None
        if not dist.is_initialized() or dist.get_rank() not in dist.get_process_group_ranks(group):
            raise ValueError(f"{caller}: this rank is not a member of the group passed as group=")
        if any(count is not None for count in parts):
            raise ValueError(f"{caller}: split= needs whole tensors or DTensors; tensors sharded by hand "
                             "with group= have no global row ranges")
        return tensors, Reducer(group)
    if group is not None:
        raise ValueError(f"{caller}: group= is for plain tensors; DTensors bring their device mesh")
    if not all(dtensors):
        plain = names[dtensors.index(False)]
        raise ValueError(f"{caller}: layer '{plain}' is a plain tensor among DTensors; "
                         "pass all or none as DTensors")
    mesh = tensors[0].device_mesh
    for name, t in zip(names, tensors):
        if t.device_mesh != mesh:
            raise ValueError(f"{caller}: layer '{name}' is on device mesh {t.device_mesh}, but layer "
                             f"'{names[0]}' is on {mesh}; one call takes DTensors of one mesh")
    local = []
    for name, t, count in zip(names, tensors, parts):
        if count is None:
            local.append(local_shard(t))
        else:
            local.extend(part_slices(local_shard(t), count, t.shape[0], _dim0_offset(t, name, caller)))
    return local, Reducer(_mesh_group(mesh, caller))


def _dim0_offset(t: torch.Tensor, name: str, caller: str) -> int:
    """The global dim-0 index of the first row of this rank's shard of DTensor t."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in t.placements:
        if isinstance(p, Shard) and type(p) is not Shard and p.dim == 0:
            raise ValueError(f"{caller}: layer '{name}' is sharded along dim 0 by {p}, whose rows are not "
                             "one range per rank; split= needs Shard(0) or another dim")
    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)[1][0]


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """What this rank contributes for DTensor t: its local shard, or an empty tensor where it holds a replica
    that a rank at coordinate 0 of the replicating mesh dimension already counts."""
    from torch.distributed.tensor import Replicate

    if any(p.is_partial() for p in t.placements):
        t = t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])
    coordinate = t.device_mesh.get_coordinate()
    local = t.to_local()
    replica = any(p.is_replicate() and coordinate[dim] != 0 for dim, p in enumerate(t.placements))
    return local.new_empty(0) if replica else local


def same_sharding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b are both plain tensors, or DTensors with the same mesh and placements."""
    if is_dtensor(a) != is_dtensor(b):
        return False
    return not is_dtensor(a) or (a.device_mesh == b.device_mesh and a.placements == b.placements)


def _mesh_group(mesh, caller: str) -> dist.ProcessGroup | None:
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None
    raise ValueError(f"{caller}: a {mesh.ndim}-D device mesh must span all ranks ({mesh.size()} of "
                     f"{dist.get_world_size()})")
