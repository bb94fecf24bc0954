"""Sharded statistics under real torch.distributed (gloo, 2 CPU ranks) equal those of the unsharded model.

Each test spawns two ranks once and runs a whole scenario in them (spawning costs seconds); a failed assertion
in a rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
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
    # A gloo worker thread may still be releasing the last collectives' tensors, and a decref that races with
    # interpreter finalization ends in std::terminate (SIGABRT, seen in about 1 run in 10): leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def expert_tensors() -> tuple[list[torch.Tensor], list[str], dict[str, int]]:
    """Stacked expert tensors (expert 1 of the first received no gradient), and how to split them."""
    torch.manual_seed(4)
    full = [torch.randn(4, 6, 5), torch.randn(6, 4), torch.randn(3, 2, 3), torch.randn(4, 3), torch.randn(5)]
    full[0][1] = 0.0
    full[1][1, 0] = float("nan")
    names = ["moe.w1", "moe.w2", "moe.w3", "moe.router", "norm"]
    return full, names, {r"moe\.w1": 4, r"moe\.w2": 3, r"moe\.w3": 3, "router": 2}


def assert_split_stats(sharded: list[torch.Tensor], full: list[torch.Tensor], names: list[str], split,
                       backends=("torch", "native", "triton"), hists=(None, "log2", "linear")) -> None:
    """Per-expert statistics of sharded tensors, each expert once, equal those of the full tensors, with the
    same two collectives per call."""
    for hist in hists:
        want = fgs.tensor_stats(full, names, hist=hist, split=split)
        for backend in backends:
            with CountingAllReduce() as counter:
                got = fgs.tensor_stats(sharded, names, hist=hist, backend=backend, split=split)
            assert counter.calls == 2, (hist, backend, counter.calls)
            assert_same_stats(got, want)
            assert got.splits == want.splits
            assert_same_stats(got.group(r"moe\.w1"), want.group(r"moe\.w1"))


def expert_parallel_scenario(rank: int) -> None:
    """Experts sharded along dim 0 (Shard(0)): uneven shards, and shard boundaries inside an expert (w2's
    expert 1 has rows 2-3 and the ranks hold rows 0-2 and 3-5); the router is sharded along dim 1 and the
    norm replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    full, names, split = expert_tensors()
    placements = [Shard(0), Shard(0), Shard(0), Shard(1), Replicate()]
    sharded = [distribute_tensor(t, mesh, [p]) for t, p in zip(full, placements)]
    assert sharded[1].to_local().shape[0] == 3 and sharded[2].to_local().shape[0] == (2 if rank == 0 else 1)
    assert_split_stats(sharded, full, names, split)
    local_experts = fgs.tensor_stats(sharded, names, split=split).group(r"moe\.w1")
    assert local_experts.numel.tolist() == [30, 30, 30, 30] and local_experts.zeros[1].item() == 30

    with CountingAllReduce() as counter:
        pairs = fgs.pair_stats(sharded, [t * 2 + 1 for t in sharded], names, split=split)
    assert counter.calls == 1
    want = fgs.pair_stats(full, [t * 2 + 1 for t in full], names, split=split)
    assert pairs.names == want.names
    for field in fgs.PairStats.FIELDS:
        got_field, want_field = getattr(pairs, field).double(), getattr(want, field).double()
        both_nan = got_field.isnan() & want_field.isnan()
        assert (torch.isclose(got_field, want_field, rtol=1e-5, atol=1e-7) | both_nan).all(), field

    params = [torch.nn.Parameter(distribute_tensor(torch.randn(t.shape), mesh, [p])) for t, p in
              zip(full, placements)]
    references = [torch.nn.Parameter(p.detach().full_tensor()) for p in params]
    for p, q, g in zip(params, references, full):
        g = g.nan_to_num()
        p.grad, q.grad = distribute_tensor(g, mesh, p.placements), g.clone()
    total, stats = fgs.clip_grad_norm_(params, 1.0, return_stats=True, split={"^0$": 4, "^1$": 3})
    want_total, want_stats = fgs.clip_grad_norm_(references, 1.0, return_stats=True,
                                                 split={"^0$": 4, "^1$": 3})
    assert torch.allclose(total, want_total, rtol=1e-6)
    assert_same_stats(stats, want_stats)
    for p, q in zip(params, references):
        assert torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-8)

    with pytest.raises(ValueError, match="split= needs whole tensors or DTensors"):
        fgs.tensor_stats([t.to_local() for t in sharded[:2]], group=dist.group.WORLD, split={"0": 2})


def expert_fsdp_mesh_scenario(rank: int) -> None:
    """A 2×2 (EP × FSDP) mesh: experts sharded along dim 0 by EP and along dim 0 or 1 by FSDP, or replicated
    along EP."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "fsdp"))
    full, names, split = expert_tensors()
    placements = [[Shard(0), Shard(1)], [Shard(0), Shard(0)], [Replicate(), Shard(0)],
                  [Shard(1), Replicate()], [Replicate(), Replicate()]]
    sharded = [distribute_tensor(t, mesh, p) for t, p in zip(full, placements)]
    assert_split_stats(sharded, full, names, split, backends=("native", "triton"), hists=("log2", "linear"))


def _gns_reference(model, batches, b, world, ema_state, ema=0.95):
    """Single-process reference for the per-rank form: per layer, |G_b|² the mean over the ranks' batches of
    their own mean gradient's squared norm, |G_B|² that of the full batch's mean gradient (float64); this
    step's estimators and the bias-corrected EMAs (ema_state: [g2, trace, steps], updated)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        return [g.double() for g in torch.autograd.grad(loss, params)]

    per_rank = [grads(x, y) for x, y in batches]
    full = grads(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    small = torch.stack([torch.stack([g.square().sum() for g in rank]) for rank in per_rank]).mean(0)
    large = torch.stack([g.square().sum() for g in full])
    g2_step = (world * large - small) / (world - 1)
    trace_step = (small - large) * (b * world / (world - 1))
    ema_state[0] = ema * ema_state[0] + (1 - ema) * g2_step
    ema_state[1] = ema * ema_state[1] + (1 - ema) * trace_step
    ema_state[2] += 1
    correction = 1 - ema ** ema_state[2]
    layer_g2, layer_trace = ema_state[0] / correction, ema_state[1] / correction
    return {"small": small.sum(), "large": large.sum(), "g2_step": g2_step.sum(),
            "trace_step": trace_step.sum(), "layer_g2": layer_g2, "layer_trace": layer_trace,
            "b_simple": layer_trace.sum() / layer_g2.sum()}


def _close(got, want, rtol=1e-5) -> None:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert torch.allclose(got, want, rtol=rtol, atol=1e-12), (got, want)


def gns_ddp_scenario(rank: int) -> None:
    """GradientNoiseScale's per-rank form on DDP: each rank's local batch of b examples is a small batch, the
    all-reduced gradient the large one (B = W·b); the estimates equal a single-process reference from the same
    per-rank batches and are identical on every rank, with one all-reduce per step()."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    b, steps = 3, 4
    gns = fgs.GradientNoiseScale(ddp, batch_size=b)
    assert gns.names == [name for name, _ in reference.named_parameters()]
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(6)  # the same batches on every rank
    ema_state = [0.0, 0.0, 0]
    for _ in range(steps):
        x, y = torch.randn(WORLD * b, 4, generator=generator), torch.randn(WORLD * b, 2, generator=generator)
        batches = list(zip(x.split(b), y.split(b)))
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(batches[rank][0]), batches[rank][1]).backward()
        with CountingAllReduce() as counter:
            estimate = gns.step()
        assert counter.calls == 1
        want = _gns_reference(reference, batches, b, WORLD, ema_state)
        # |G_b|² and |G_B|² back from the estimators: E|G_n|² = |G|² + tr(Σ)/n inverted exactly.
        _close(estimate.g2_step.double() + estimate.trace_step.double() / b, want["small"])
        _close(estimate.g2_step.double() + estimate.trace_step.double() / (WORLD * b), want["large"])
        for field in ("g2_step", "trace_step", "layer_g2", "layer_trace", "b_simple"):
            _close(getattr(estimate, field), want[field])
        assert estimate.step == ema_state[2]
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, estimate.to_dict())
        assert all(values == gathered[0] for values in gathered)  # bit-identical on every rank
        reference_optimizer.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        reference_optimizer.step()
        optimizer.step()

    with pytest.raises(RuntimeError, match="not used with a DistributedDataParallel"):
        gns.micro_step()
    with pytest.raises(RuntimeError, match="no gradient was all-reduced"):
        gns.step()
    optimizer.zero_grad()
    for _ in range(2):  # accumulation without no_sync(): all-reduced twice
        ddp(batches[rank][0]).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="more than once"):
        gns.step()

    # Accumulation: k micro-batches per rank, all but the last under no_sync(); b = k·(micro-batch size).
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    k, micro = 2, 3
    gns = fgs.GradientNoiseScale(ddp, batch_size=k * micro)
    ema_state = [0.0, 0.0, 0]
    for _ in range(2):
        x = torch.randn(WORLD * k * micro, 4, generator=generator)
        y = torch.randn(WORLD * k * micro, 2, generator=generator)
        batches = list(zip(x.split(k * micro), y.split(k * micro)))
        ddp.zero_grad()
        local_x, local_y = batches[rank]
        with ddp.no_sync():
            (torch.nn.functional.mse_loss(ddp(local_x[:micro]), local_y[:micro]) / k).backward()
        (torch.nn.functional.mse_loss(ddp(local_x[micro:]), local_y[micro:]) / k).backward()
        estimate = gns.step()
        want = _gns_reference(reference, batches, k * micro, WORLD, ema_state)
        for field in ("g2_step", "trace_step", "layer_g2", "layer_trace", "b_simple"):
            _close(getattr(estimate, field), want[field])

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    hooked = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
    hooked.register_comm_hook(None, allreduce_hook)
    with pytest.raises(ValueError, match="already has a communication hook"):
        fgs.GradientNoiseScale(hooked, batch_size=4)


SCENARIOS = {"fsdp2": fsdp2_scenario, "dtensor": dtensor_scenario, "2d-mesh": two_dim_mesh_scenario,
             "ep": expert_parallel_scenario, "ep-fsdp": expert_fsdp_mesh_scenario,
             "gns-ddp": gns_ddp_scenario}


def test_fsdp2_statistics_equal_the_unsharded_model():
    spawn("fsdp2")


def test_dtensor_placements_and_hand_sharded_groups_give_global_statistics():
    spawn("dtensor")


def test_two_dimensional_meshes_count_replicas_once():
    spawn("2d-mesh", world=4)


def test_expert_parallel_split_gives_each_expert_once():
    spawn("ep")


def test_expert_parallel_by_fsdp_mesh_split_gives_each_expert_once():
    spawn("ep-fsdp", world=4)


def test_gradient_noise_scale_per_rank_form_under_ddp_equals_the_single_process_reference():
    spawn("gns-ddp")
