"""optimizer_stats: statistics of the optimizer state, and of the last update rebuilt from it, against a
copy of the parameters taken before the step."""

import json

import pytest
import torch
from conftest import NATIVE

import fastgradstats as fgs
from fastgradstats import optim
from fastgradstats.hist import HistSpec

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adam-l2-maximize": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1, maximize=True),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    "adam-foreach-decoupled": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1, foreach=True,
                                                          decoupled_weight_decay=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
    "adamw-amsgrad-maximize": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, amsgrad=True,
                                                           maximize=True),
    "adamw-no-decay": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0),
    "adamw-tensor-lr": lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3), weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "sgd-decay-maximize": lambda ps: torch.optim.SGD(ps, lr=1e-2, weight_decay=0.1, maximize=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
}


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.Tanh(), torch.nn.Linear(96, 5)).to(dtype)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> list[torch.Tensor]:
    """``steps`` steps; returns copies of the parameters taken just before the last one (the reference)."""
    dtype = next(model.parameters()).dtype
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        optimizer.zero_grad()
        model(torch.randn(16, 32, generator=generator).to(dtype)).pow(2).mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
    return before


def reference_updates(model: torch.nn.Module, before: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(p.detach().double() - b.double()) for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("config", list(OPTIMIZERS))
def test_update_equals_the_copy_based_difference_for_float32(config):
    model = make_model()
    optimizer = OPTIMIZERS[config](model.parameters())
    before = train(model, optimizer)
    stats = fgs.optimizer_stats(optimizer, model, backend="torch")
    deltas = reference_updates(model, before)
    want = fgs.tensor_stats([d.float() for d in deltas], [n for n, _ in model.named_parameters()])
    assert stats.update.names == want.names
    # θ_before is rebuilt from θ_after and the state by the step's own formula and rounded to float32; it can
    # differ from the true θ_before by one float32 ulp of θ in a few elements (~1e-7·|θ|, against updates
    # of ~1e-3·|θ| here), so the update statistics agree to ~1e-4 of the update at worst (the bound).
    for field in ("l2", "l1", "linf", "mean", "std"):
        torch.testing.assert_close(getattr(stats.update, field), getattr(want, field), rtol=1e-4, atol=1e-9)
    ratio = torch.stack([d.norm() / b.double().norm() for d, b in zip(deltas, before)]).float()
    torch.testing.assert_close(stats.update_ratio, ratio, rtol=1e-4, atol=0)
    total = torch.cat([d.flatten() for d in deltas]).norm() / torch.cat([b.flatten() for b in before]).norm()
    torch.testing.assert_close(stats.update_ratio_total, total.float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("config", ["adam", "adamw-amsgrad-maximize", "adam-fused", "sgd-decay-maximize",
                                    "sgd-momentum", "sgd-nesterov"])
def test_update_recovers_the_bfloat16_step(config):
    model = make_model(torch.bfloat16)
    optimizer = OPTIMIZERS[config](model.parameters())
    before = train(model, optimizer)
    stats = fgs.optimizer_stats(optimizer, model, backend="torch")
    deltas = reference_updates(model, before)
    # A bf16 step rounds θ_before + u onto a grid 2^-8·|θ| wide, so the applied Δθ is a multiple of θ's ulp.
    # θ_before is rebuilt as the bf16 value whose replayed step gives θ_after; it is ambiguous only where two
    # grid values round to the same θ_after (θ crossed a power of two, or decoupled decay rounded θ first),
    # and there it is off by one ulp. Measured over every configuration of OPTIMIZERS: at most 1.5% of the
    # elements, per-layer norms within 1.5% (the 5-element bias, where one element is a large part of the
    # norm), the total within 0.25%.
    want = fgs.tensor_stats([d.float() for d in deltas])
    torch.testing.assert_close(stats.update.l2, want.l2, rtol=2e-2, atol=0)
    torch.testing.assert_close(stats.update.total.l2, want.total.l2, rtol=1e-2, atol=0)


@pytest.mark.parametrize("backend", ["torch", NATIVE, "triton"])
def test_update_statistics_merge_chunks_on_every_backend(backend):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    before = train(model, optimizer)
    named = optim._named_optimizer_parameters(optimizer, model)
    update, pairs = optim.update_stats(optim._update_plan(optimizer, named), HistSpec.make("log2"),
                                       backend, chunk_size=100)
    deltas = [d.float() for d in reference_updates(model, before)]
    want = fgs.tensor_stats(deltas, update.names, hist="log2", backend="torch")
    for field in ("l2", "mean", "std", "linf", "min", "max"):
        torch.testing.assert_close(getattr(update, field), getattr(want, field), rtol=1e-4, atol=1e-9)
    assert torch.equal(update.numel, want.numel)
    assert torch.equal(update.hist.sum(1) + update.zeros, want.hist.sum(1) + want.zeros)
    torch.testing.assert_close(pairs.b_l2, torch.stack([b.norm() for b in before]), rtol=1e-6, atol=0)


def test_linear_histogram_of_the_update_uses_each_layers_range():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    before = train(model, optimizer)
    stats = fgs.optimizer_stats(optimizer, model, hist="linear", backend="torch")
    want = fgs.tensor_stats([d.float() for d in reference_updates(model, before)], hist="linear")
    assert stats.update.hist.sum() == want.hist.sum()
    torch.testing.assert_close(stats.update.hist_edges, want.hist_edges, rtol=1e-5, atol=1e-12)
    assert (stats.update.hist - want.hist).abs().sum() <= 4  # elements on a bin edge may move by one bin


def test_state_keys_are_tensor_stats_of_the_state_named_by_parameter():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    train(model, optimizer)
    stats = fgs.optimizer_stats(optimizer, model, hist="log2")
    assert stats.keys() == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    names = [name for name, _ in model.named_parameters()]
    state = [optimizer.state[p]["exp_avg_sq"] for p in model.parameters()]
    want = fgs.tensor_stats(state, names, hist="log2")
    assert stats["exp_avg_sq"].names == names
    assert torch.equal(stats["exp_avg_sq"].l2, want.l2)
    assert torch.equal(stats["exp_avg_sq"].hist, want.hist)
    assert "step" not in stats


def test_layers_are_named_by_group_and_index_without_a_model():
    model = make_model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], lr=1e-2,
                                momentum=0.9)
    train(model, optimizer)
    stats = fgs.optimizer_stats(optimizer)
    assert stats["momentum_buffer"].names == ["group0.0", "group0.1", "group1.0", "group1.1"]
    assert stats.update.names == stats["momentum_buffer"].names


def test_parameters_never_stepped_have_no_update_and_no_state():
    model = make_model()
    model[2].weight.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optimizer)
    stats = fgs.optimizer_stats(optimizer, model)
    assert stats.update.names == ["0.weight", "0.bias", "2.bias"]
    assert stats["exp_avg"].names == stats.update.names


def test_update_chunks_never_allocate_a_parameter_sized_tensor():
    model = torch.nn.Linear(1000, 1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    train_linear = model(torch.randn(4, 1000)).sum()
    train_linear.backward()
    optimizer.step()
    plan = optim._update_plan(optimizer, optim._named_optimizer_parameters(optimizer, model))
    largest = 0

    class Sizes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.data_ptr() not in owned:
                    largest = max(largest, t.numel())
            return out

    owned = {p.data_ptr() for p in model.parameters()} | {
        t.data_ptr() for s in optimizer.state.values() for t in s.values()}
    with Sizes():
        optim.update_stats(plan, None, "torch", chunk_size=4096)
    assert largest <= 4096


def test_other_optimizers_raise_naming_the_optimizer_and_the_fallback():
    model = make_model()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    train(model, optimizer)
    stats = fgs.optimizer_stats(optimizer, model)
    assert stats.keys() == ["square_avg"] and not stats.has_update
    with pytest.raises(NotImplementedError, match=r"RMSprop.*Monitor\(track='update'\)"):
        _ = stats.update


def test_plain_sgd_without_a_gradient_skips_the_layer_and_nesterov_needs_it():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    train(model, optimizer)
    optimizer.zero_grad()
    assert len(fgs.optimizer_stats(optimizer, model).update) == 0
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
    train(model, optimizer)
    optimizer.zero_grad()
    with pytest.raises(ValueError, match=r"'0.weight' has no \.grad: SGD with nesterov"):
        _ = fgs.optimizer_stats(optimizer, model).update


def test_a_parameter_outside_the_model_is_named_in_the_error():
    optimizer = torch.optim.SGD(make_model().parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \(shape \(96, 32\)\)"):
        fgs.optimizer_stats(optimizer, make_model())


def test_to_dict_flattens_keys_and_carries_the_update_ratio():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, optimizer)
    stats = fgs.optimizer_stats(optimizer, model)
    data = stats.to_dict()
    assert data["total"] is None
    assert set(data["totals"]) == {"exp_avg", "exp_avg_sq", "update"}
    assert data["layers"]["update/0.weight"]["ratio"] == pytest.approx(stats.update_ratio[0].item())
    assert data["totals"]["update"]["ratio"] == pytest.approx(stats.update_ratio_total.item())


def attached_training(optimizer_kind, track, steps: int = 4, every: int = 2, sinks=()):
    """A Monitor attached to an optimizer over ``steps`` steps; returns (monitor, the parameters before each
    step, copied by the test, not the monitor)."""
    model = make_model()
    optimizer = optimizer_kind(model.parameters())
    monitor = fgs.Monitor(model, every=every, track=track, sinks=list(sinks)).attach(optimizer)
    befores = []
    for step in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 32, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        befores.append({n: p.detach().clone() for n, p in model.named_parameters()})
        optimizer.step()
    return monitor, befores


def test_monitor_update_is_rebuilt_without_a_copy_for_adamw():
    monitor, befores = attached_training(
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1), track=("grad", "update"))
    assert monitor._previous_params is None  # nothing copied
    record = monitor.history[-1]  # step 3: the update of step 2, taken from the parameters before step 3
    assert record.step == 3
    before, after = befores[1], befores[2]
    want = torch.stack([(after[n] - before[n]).norm() for n in record.stats["update"].names])
    torch.testing.assert_close(record.stats["update"].dist, want, rtol=1e-4, atol=0)
    torch.testing.assert_close(record.update_ratio, want / torch.stack([before[n].norm() for n in before]),
                               rtol=1e-4, atol=0)


def test_monitor_keeps_the_copying_update_for_other_optimizers():
    monitor, befores = attached_training(lambda ps: torch.optim.RMSprop(ps, lr=1e-3), track=("update",))
    record = monitor.history[-1]
    assert monitor._previous_params is not None
    want = torch.stack([(befores[2][n] - befores[1][n]).norm() for n in record.stats["update"].names])
    torch.testing.assert_close(record.stats["update"].dist, want, rtol=1e-5, atol=0)


def test_monitor_records_optimizer_stats_and_the_jsonl_sink_writes_them(tmp_path):
    sink = fgs.sinks.JSONL(tmp_path / "stats.jsonl")
    monitor, _ = attached_training(lambda ps: torch.optim.Adam(ps, lr=1e-3), track=("optim", "update"),
                                   sinks=[sink])
    monitor.close()
    first, last = monitor.history
    assert "optim" not in first.stats  # step 1: no step before it
    optim_stats = last.stats["optim"]
    assert isinstance(optim_stats, fgs.OptimizerStats) and optim_stats.keys() == ["exp_avg", "exp_avg_sq"]
    assert last.stats["update"] is optim_stats.update_pairs  # one rebuild serves both kinds
    lines = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert "exp_avg/0.weight" in lines[-1]["optim"]["layers"]
    assert lines[-1]["optim"]["totals"]["update"]["ratio"] == pytest.approx(
        optim_stats.update_ratio_total.item())
