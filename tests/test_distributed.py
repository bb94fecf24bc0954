"""Sharded statistics under real torch.distributed (gloo, 2 CPU ranks) equal those of the unsharded model.

Each test spawns two ranks once and runs a whole scenario in them (spawning costs seconds); a failed assertion
in a rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import copy
import os
import socket
from typing import Self

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastgradstats as fgs
from fastgradstats.results import TensorStats

WORLD = 2
FIELDS = TensorStats.FIELDS
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def spawn(scenario: str, world: int = WORLD) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_main, args=(port, scenario, world), nprocs=world, join=True)


def _rank_main(rank: int, port: int, scenario: str, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    SCENARIOS[scenario](rank)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


class CountingAllReduce:
    """Counts dist.all_reduce calls made by fastgradstats while installed."""

    def __init__(self) -> None:
        self.calls = 0
        self.original = dist.all_reduce

    def __enter__(self) -> Self:
        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self.original


def assert_same_stats(got, want) -> None:
    """Counts and histograms exactly, the rest to float32 accuracy (sums relative to Σ|x|: they cancel)."""
    assert got.names == want.names
    for stats_got, stats_want in ((got, want), (got.total, want.total)):
        for field in FIELDS:
            a, b = getattr(stats_got, field).double(), getattr(stats_want, field).double()
            scale = {"sum": stats_want.l1,
                     "mean": stats_want.l1 / stats_want.numel.clamp_min(1)}.get(field, b.abs())
            close = ((a - b).abs() <= 1e-5 * scale.double() + 1e-12) | (a == b) | (a.isnan() & b.isnan())
            assert close.all(), (field, a, b)
        if stats_want.hist is not None:
            assert torch.equal(stats_got.hist, stats_want.hist)
            assert torch.allclose(stats_got.hist_edges, stats_want.hist_edges)


class TinyTransformer(torch.nn.Module):
    """Odd sizes so shards are uneven; the 1-row head leaves rank 1 with empty shards."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.block = torch.nn.TransformerEncoderLayer(6, 2, dim_feedforward=10, batch_first=True, dropout=0.0)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(tokens))).sum()


def fsdp2_scenario(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyTransformer()
    reference = copy.deepcopy(model)
    tokens = torch.randint(11, (3, 5))
    reference(tokens).backward()
    for module in (model.embed, model.block, model.head, model):
        fully_shard(module)
    model(tokens).backward()  # the same batch on both ranks: averaged gradients equal the reference's

    for hist in (None, "log2", "linear"):
        with CountingAllReduce() as counter:
            got = fgs.grad_stats(model, hist=hist)
        assert counter.calls == 2, (hist, counter.calls)
        assert_same_stats(got, fgs.grad_stats(reference, hist=hist))
    assert_same_stats(fgs.param_stats(model, hist="log2"), fgs.param_stats(reference, hist="log2"))

    grads = [p.grad for p in model.parameters()]
    with CountingAllReduce() as counter:
        pairs = fgs.pair_stats(grads, [p.detach() for p in model.parameters()])
    assert counter.calls == 1
    want = fgs.pair_stats([p.grad for p in reference.parameters()],
                          [p.detach() for p in reference.parameters()])
    for field in fgs.PairStats.FIELDS:
        assert torch.allclose(getattr(pairs, field).double(), getattr(want, field).double(),
                              rtol=1e-5, atol=1e-7)

    total = fgs.clip_grad_norm_(model.parameters(), 0.05)
    want_total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    assert torch.allclose(total, want_total, rtol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-8)


def dtensor_scenario(rank: int) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(1)
    full = [torch.randn(5, 3), torch.randn(4, 7), torch.randn(1, 4), torch.randn(6), torch.randn(3, 3)]
    full[1][0, 0] = float("nan")
    placements = [Shard(0), Shard(1), Shard(0), Replicate(), Shard(0)]
    sharded = [distribute_tensor(t, mesh, [p]) for t, p in zip(full, placements)]
    assert sharded[2].to_local().numel() == (4 if rank == 0 else 0)  # rank 1's shard is empty

    for hist in (None, "log2", "linear"):
        # triton runs in the interpreter on CPU (TRITON_INTERPRET=1)
        for backend in ("torch", "native", "triton"):
            with CountingAllReduce() as counter:
                got = fgs.tensor_stats(sharded, hist=hist, backend=backend)
            assert counter.calls == 2
            assert_same_stats(got, fgs.tensor_stats(full, hist=hist))

    # Partial placements (unreduced sums) are reduced first: each rank holds half of the value.
    from torch.distributed.tensor import DTensor, Partial

    halves = [DTensor.from_local(t / WORLD, mesh, [Partial()]) for t in full]
    assert_same_stats(fgs.tensor_stats(halves, hist="log2"), fgs.tensor_stats(full, hist="log2"))

    # The same tensors sharded by hand, with group=.
    by_hand = [t.chunk(WORLD)[rank] if len(t.chunk(WORLD)) > rank else t[:0] for t in full]
    assert_same_stats(fgs.tensor_stats(by_hand, hist="log2", group=dist.group.WORLD),
                      fgs.tensor_stats(full, hist="log2"))

    # DDP: gradients are averaged into identical replicas, so a plain call is already global.
    torch.manual_seed(2)
    model, batch = torch.nn.Linear(4, 3), torch.randn(6, 4)
    reference = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # kept alive: its reducer averages in backward
    ddp(batch.chunk(WORLD)[rank]).pow(2).mean().backward()
    reference(batch).pow(2).mean().backward()
    with CountingAllReduce() as counter:
        got = fgs.grad_stats(model, hist="log2")
    assert counter.calls == 0
    assert_same_stats(got, fgs.grad_stats(reference, hist="log2"))

    with pytest.raises(ValueError, match="sharded differently"):
        fgs.pair_stats([sharded[0]], [distribute_tensor(full[0], mesh, [Replicate()])])
    with pytest.raises(ValueError, match="plain tensor among DTensors"):
        fgs.tensor_stats([sharded[0], full[1]])
    with pytest.raises(ValueError, match="group= is for plain tensors"):
        fgs.tensor_stats(sharded, group=dist.group.WORLD)
    from torch.distributed.device_mesh import DeviceMesh

    reversed_mesh = DeviceMesh("cpu", list(reversed(range(WORLD))))
    with pytest.raises(ValueError, match="one call takes DTensors of one mesh"):
        fgs.tensor_stats([sharded[0], distribute_tensor(full[1], reversed_mesh, [Shard(0)])])
    only_rank_0 = dist.new_group([0])
    if rank == 1:  # rank 0 makes no call, so nothing waits on a collective
        with pytest.raises(ValueError, match="not a member"):
            fgs.tensor_stats(by_hand, group=only_rank_0)


def two_dim_mesh_scenario(rank: int) -> None:
    """HSDP-style 2×2 mesh: replicated along dim 0, sharded along dim 1 (and the reverse, and both
    sharded)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2))
    torch.manual_seed(3)
    full = [torch.randn(5, 3), torch.randn(3, 7), torch.randn(4, 6)]
    placements = [[Replicate(), Shard(0)], [Shard(1), Replicate()], [Shard(0), Shard(1)]]
    sharded = [distribute_tensor(t, mesh, p) for t, p in zip(full, placements)]
    with CountingAllReduce() as counter:
        got = fgs.tensor_stats(sharded, hist="log2")
    assert counter.calls == 2
    assert_same_stats(got, fgs.tensor_stats(full, hist="log2"))
    pairs = fgs.pair_stats(sharded, [t * 2 for t in sharded])
    assert torch.allclose(pairs.total.dist, torch.cat([t.flatten() for t in full]).norm(), rtol=1e-5)


SCENARIOS = {"fsdp2": fsdp2_scenario, "dtensor": dtensor_scenario, "2d-mesh": two_dim_mesh_scenario}


def test_fsdp2_statistics_equal_the_unsharded_model():
    spawn("fsdp2")


def test_dtensor_placements_and_hand_sharded_groups_give_global_statistics():
    spawn("dtensor")


def test_two_dimensional_meshes_count_replicas_once():
    spawn("2d-mesh", world=4)
