"""Monitor(compiled=True): statistics computed inside a compiled train step (fullgraph, no graph break),
recorded outside it with the same numbers as the eager Monitor."""

import copy
import json

import pytest
import torch

import fastgradstats as fgs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batches(count):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)) for _ in range(count)]


@pytest.fixture(autouse=True)
def traced_backward():
    """Dynamo traces loss.backward() into the compiled step."""
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield


def make_step(model, monitor):
    def forward_backward(x, y, with_stats: bool):
        torch.nn.functional.mse_loss(model(x), y).backward()
        return monitor.compute() if with_stats else None
    return forward_backward


def run(compiled: bool, tmp_path, steps=5):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / f"{'compiled' if compiled else 'eager'}.jsonl"
    monitor = fgs.Monitor(model, every=2, track=("grad", "param"), sinks=[fgs.sinks.JSONL(path)],
                          compiled=compiled)
    forward_backward = torch.compile(make_step(model, monitor), fullgraph=True, backend="aot_eager")
    for x, y in batches(steps):
        if compiled:
            monitor.step(stats=forward_backward(x, y, monitor.next_tracked))
        else:
            torch.nn.functional.mse_loss(model(x), y).backward()
            monitor.step()
        optimizer.step()
        optimizer.zero_grad()
    monitor.close()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_compute_has_no_graph_break():
    model = tiny_model()
    monitor = fgs.Monitor(model, track=("grad", "param"), compiled=True)
    x, y = batches(1)[0]
    explanation = torch._dynamo.explain(make_step(model, monitor))(x, y, True)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_compiled_records_match_the_eager_monitor(tmp_path):
    compiled, eager = run(True, tmp_path), run(False, tmp_path)
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 3, 5]
    for got, want in zip(compiled, eager):
        for kind in ("grad", "param"):
            for name, values in want[kind]["layers"].items():
                for field in ("l2", "mean", "max", "zeros"):
                    assert got[kind]["layers"][name][field] == pytest.approx(values[field], rel=1e-5)
                assert got[kind]["layers"][name]["hist"] == values["hist"]
            assert got[kind]["total"]["l2"] == pytest.approx(want[kind]["total"]["l2"], rel=1e-5)
        assert got["alert_count"] == want["alert_count"]


def test_next_tracked_counts_calls():
    model = tiny_model()
    model(torch.randn(2, 4)).sum().backward()
    monitor = fgs.Monitor(model, every=3, compiled=True)
    seen = []
    for _ in range(7):
        seen.append(monitor.next_tracked)
        monitor.step(stats={})
    assert seen == [True, False, False, True, False, False, True]


def test_compute_changes_nothing_and_skips_missing_gradients():
    model = tiny_model()
    monitor = fgs.Monitor(model, track=("grad", "param"), compiled=True)
    assert set(monitor.compute()) == {"param"}
    assert monitor.steps == 0 and not monitor.history


def test_stats_from_compute_are_recorded_after_the_gradients_are_zeroed():
    model = tiny_model()
    monitor = fgs.Monitor(model, compiled=True)
    x, y = batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    want = fgs.grad_stats(model).total.l2
    stats = monitor.compute()
    model.zero_grad(set_to_none=True)
    record = monitor.step(stats=stats)
    assert torch.equal(record.stats["grad"].total.l2, want)


def test_compiled_mode_refuses_kinds_that_keep_copies_and_attach():
    model = tiny_model()
    with pytest.raises(ValueError, match="compiled=True, track must be a subset"):
        fgs.Monitor(model, track=("grad", "update"), compiled=True)
    monitor = fgs.Monitor(model, compiled=True)
    with pytest.raises(RuntimeError, match="compiled Monitor records what compute"):
        monitor.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="stats= must be what compute"):
        monitor.step(stats={"update": None})
    with pytest.raises(ValueError, match="stats= must be what compute"):
        monitor.step(stats=fgs.param_stats(model))
    assert monitor.steps == 0  # refused calls count no step


def test_compute_compiled_alone_gives_the_eager_statistics():
    model = tiny_model()
    twin = copy.deepcopy(model)
    monitor = fgs.Monitor(model, track=("param",), compiled=True)
    compute = torch.compile(monitor.compute, fullgraph=True, backend="aot_eager")
    assert torch.equal(compute()["param"].l2, fgs.param_stats(twin).l2)
