"""Monitor: tracked steps, what each tracked kind measures, alerts, history, hooks and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

import fastgradstats as fgs
from fastgradstats.monitoring.alerts import AlertConfig


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def backward(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(16, 4, generator=generator)).pow(2).mean().backward()


def train(monitor: fgs.Monitor, model: torch.nn.Module, steps: int, lr: float = 0.1, tamper=None) -> list:
    """SGD steps with monitor.step() between backward and the update; ``tamper(step)`` may edit the grads."""
    records = []
    for step in range(1, steps + 1):
        backward(model, seed=step)
        if tamper is not None:
            tamper(step)
        records.append(monitor.step())
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return records


def test_only_every_nth_step_is_tracked():
    model = make_model()
    records = train(fgs.Monitor(model, every=3), model, steps=7)
    assert [r.step if r else None for r in records] == [1, None, None, 4, None, None, 7]


def test_a_given_step_number_names_the_record_but_calls_still_decide_what_is_tracked(tmp_path):
    model = make_model()
    path = tmp_path / "stats.jsonl"
    monitor = fgs.Monitor(model, every=3, sinks=[fgs.sinks.JSONL(str(path))])
    records = []
    for global_step in range(7):  # a trainer's global step starts at 0
        backward(model, seed=global_step)
        records.append(monitor.step(global_step))
    monitor.close()
    assert [r.step if r else None for r in records] == [0, None, None, 3, None, None, 6]
    assert [r.step for r in monitor.history] == [0, 3, 6]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 3, 6]


@pytest.mark.parametrize("step", [1.0, "3", True])
def test_a_step_number_that_is_not_an_int_is_rejected(step):
    model = make_model()
    backward(model, seed=0)
    with pytest.raises(TypeError, match="step must be an int"):
        fgs.Monitor(model).step(step)


def test_grad_stats_are_those_of_the_gradients():
    model = make_model()
    record = train(fgs.Monitor(model), model, steps=1)[0]
    want = fgs.grad_stats(model)
    assert record.stats["grad"].names == want.names
    assert torch.equal(record.stats["grad"].l2, want.l2)
    assert record.stats["grad"].hist is not None  # log2 by default


def test_update_is_the_last_optimizer_step():
    model = make_model()
    monitor = fgs.Monitor(model, track=("grad", "update"), every=2)
    grads_before_step_2, params_at_step_3 = {}, {}

    def remember(step):
        if step == 2:
            grads_before_step_2.update({n: p.grad.clone() for n, p in model.named_parameters()})
        if step == 3:
            params_at_step_3.update({n: p.detach().clone() for n, p in model.named_parameters()})

    records = train(monitor, model, steps=3, lr=0.1, tamper=remember)
    assert "update" not in records[0].stats  # nothing before the first step
    update, ratio = records[2].stats["update"], records[2].update_ratio
    for i, name in enumerate(update.names):
        step_norm = 0.1 * grads_before_step_2[name].norm().item()
        assert update.dist[i].item() == pytest.approx(step_norm, rel=1e-5)
        before = params_at_step_3[name] + 0.1 * grads_before_step_2[name]  # SGD: θ_after = θ_before - lr·g
        assert ratio[i].item() == pytest.approx(step_norm / before.norm().item(), rel=1e-5)


def test_grad_cos_compares_with_the_last_tracked_gradient():
    model = make_model()
    monitor = fgs.Monitor(model, track=("grad_cos",))
    grads = []
    records = []
    for step in (1, 2):
        backward(model, seed=step)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        records.append(monitor.step())
    cos = records[1].stats["grad_cos"]
    for i, name in enumerate(cos.names):
        want = F.cosine_similarity(grads[1][name].flatten(), grads[0][name].flatten(), dim=0)
        assert cos.cos[i].item() == pytest.approx(want.item(), rel=1e-5)


def test_init_measures_the_distance_from_the_first_step():
    model = make_model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = train(fgs.Monitor(model, track=("init",)), model, steps=4)[-1]
    init = record.stats["init"]
    for i, name in enumerate(init.names):
        # the record is taken before step 4's update: three SGD steps away from the start
        distance = (dict(model.named_parameters())[name].detach()
                    + 0.1 * dict(model.named_parameters())[name].grad - initial[name]).norm()
        assert init.dist[i].item() == pytest.approx(distance.item(), rel=1e-4)


def test_healthy_training_raises_no_alert():
    model = make_model()
    records = train(fgs.Monitor(model), model, steps=12)
    assert all(not r.alerts for r in records)


def test_nan_gradient_alert_names_the_layer():
    model = make_model()

    def inject(step):
        if step == 3:
            model[2].weight.grad[0, 1] = float("nan")

    records = train(fgs.Monitor(model), model, steps=3, tamper=inject)
    alerts = records[-1].alerts
    assert [(a.kind, a.layer, a.value) for a in alerts] == [("nonfinite", "2.weight", 1.0)]
    assert "2.weight" in alerts[0].message


def test_dead_layer_alert():
    model = make_model()

    def kill(step):
        model[0].bias.grad.zero_()

    alerts = train(fgs.Monitor(model), model, steps=2, tamper=kill)[-1].alerts
    assert [(a.kind, a.layer) for a in alerts] == [("dead", "0.bias")]


@pytest.mark.parametrize("factor, kind", [(1e4, "exploding"), (1e-6, "vanishing")])
def test_spike_or_collapse_against_a_layers_history(factor, kind):
    model = make_model()
    config = AlertConfig(warmup=3)

    def scale(step):
        if step == 8:
            model[2].weight.grad.mul_(factor)

    records = train(fgs.Monitor(model, alert_config=config), model, steps=8, lr=0.01, tamper=scale)
    assert all(not r.alerts for r in records[:-1])
    assert [(a.kind, a.layer) for a in records[-1].alerts] == [(kind, "2.weight")]


def test_alerts_stay_on_the_device_until_read():
    model = make_model()
    record = train(fgs.Monitor(model), model, steps=1)[0]
    assert "alerts" not in record.__dict__  # not materialised (no sync) yet
    assert all(isinstance(flag, torch.Tensor) for flag in record.alert_flags.flags.values())
    assert record.alerts == []


def test_history_is_bounded():
    model = make_model()
    monitor = fgs.Monitor(model, history=3)
    train(monitor, model, steps=5)
    assert [r.step for r in monitor.history] == [3, 4, 5]


def test_attach_steps_from_the_optimizer_hook():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = fgs.Monitor(model, every=2).attach(optimizer)
    for step in range(1, 5):
        backward(model, seed=step)
        optimizer.step()
    assert [r.step for r in monitor.history] == [1, 3]
    monitor.close()
    backward(model, seed=9)
    optimizer.step()  # detached: no more records, no error
    assert len(monitor.history) == 2


def test_sinks_receive_each_tracked_record_and_are_closed():
    class Collect:
        def __init__(self):
            self.records, self.closed = [], False

        def write(self, record):
            self.records.append(record.step)

        def close(self):
            self.closed = True

    model = make_model()
    sink = Collect()
    with fgs.Monitor(model, every=2, sinks=[sink]) as monitor:
        train(monitor, model, steps=4)
    assert sink.records == [1, 3] and sink.closed


def test_step_before_backward_warns_once_and_records_nothing():
    model = make_model()
    monitor = fgs.Monitor(model)
    with pytest.warns(UserWarning, match="no parameter has a gradient"):
        record = monitor.step()
    assert record.stats == {}
    monitor.step()  # no second warning (pytest would not fail on it, so check the flag)
    assert monitor._warned_no_grads


def test_stepping_a_closed_monitor_raises():
    monitor = fgs.Monitor(make_model())
    monitor.close()
    monitor.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        monitor.step()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every": 0}, ValueError, "every"),
        ({"track": ("grad", "weights")}, ValueError, "track"),
        ({"track": ()}, ValueError, "track"),
        ({"sinks": [object()]}, TypeError, "sink"),
        ({"hist": "log"}, ValueError, "hist must be None, 'log2' or 'linear', got 'log'"),
        ({"backend": "cuda"}, ValueError, "backend must be None, 'torch', 'native' or 'triton'"),
        ({"sinks": 3}, TypeError, "sinks must be a list of sinks"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fgs.Monitor(make_model(), **kwargs)


def test_backend_is_checked_against_the_models_device():
    with pytest.raises(ValueError, match="backend 'native' needs CPU tensors, got meta"):
        fgs.Monitor(make_model().to("meta"), backend="native")


def test_a_single_sink_instead_of_a_list_is_rejected_with_a_hint(tmp_path):
    sink = fgs.sinks.JSONL(tmp_path / "stats.jsonl")
    with pytest.raises(TypeError, match=r"sinks must be a list of sinks; pass \[JSONL\(...\)\]"):
        fgs.Monitor(make_model(), sinks=sink)
    sink.close()


def test_model_without_parameters_is_rejected():
    with pytest.raises(ValueError, match="no parameters"):
        fgs.Monitor(torch.nn.ReLU())


def train_with(optimizer_type, spiked_group: int | None, steps: int = 12, spike_step: int = 9) -> list:
    """A 3-layer model, one param group per Linear, trained by ``optimizer_type`` with the Monitor attached
    (track grad and update); at ``spike_step`` the lr of ``spiked_group`` (all groups for -1, none for None)
    is ×30 for that one step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 2))
    groups = [{"params": model[i].parameters()} for i in (0, 2, 4)]
    optimizer = optimizer_type(groups, lr=1e-3)
    monitor = fgs.Monitor(model, track=("grad", "update"), alert_config=AlertConfig(warmup=3))
    monitor.attach(optimizer)
    for step in range(1, steps + 1):
        backward(model, seed=step)
        spiked = []
        if step == spike_step and spiked_group is not None:
            spiked = optimizer.param_groups if spiked_group == -1 else [optimizer.param_groups[spiked_group]]
        for group in spiked:
            group["lr"] *= 30
        optimizer.step()
        for group in spiked:
            group["lr"] /= 30
    monitor.close()
    return list(monitor.history)


@pytest.mark.parametrize("optimizer_type", [torch.optim.Adam, torch.optim.Adamax],
                         ids=["copy-free", "copying"])
@pytest.mark.parametrize("spiked_group, layers", [(1, ["2.weight", "2.bias"]),
                                                  (-1, ["0.weight", "0.bias", "2.weight", "2.bias",
                                                        "4.weight", "4.bias"])])
def test_update_spike_alert_names_the_layers_whose_lr_spiked(optimizer_type, spiked_group, layers):
    records = train_with(optimizer_type, spiked_group)
    spikes = {r.step: sorted(a.layer for a in r.alerts if a.kind == "update_spike") for r in records}
    assert spikes[10] == sorted(layers)  # record 10 holds the update of optimizer step 9
    assert not any(found for step, found in spikes.items() if step != 10)
    alert = next(a for a in records[9].alerts if a.kind == "update_spike")
    assert alert.value == pytest.approx(records[9].update_ratio[records[9].stats["update"].names.index(
        alert.layer)].item())
    assert f"'{alert.layer}'" in alert.message and "running mean" in alert.message


@pytest.mark.parametrize("optimizer_type", [torch.optim.Adam, torch.optim.Adamax],
                         ids=["copy-free", "copying"])
def test_no_update_spike_without_the_lr_spike(optimizer_type):
    records = train_with(optimizer_type, spiked_group=None)
    assert [a for r in records for a in r.alerts if a.kind == "update_spike"] == []


def test_update_spike_alert_works_without_grad_and_stays_on_the_device():
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    monitor = fgs.Monitor(model, track="update", alert_config=AlertConfig(warmup=2)).attach(optimizer)
    for step in range(1, 8):
        backward(model, seed=step)
        optimizer.param_groups[0]["lr"] = 1.0 if step == 6 else 0.01
        optimizer.step()
    record = monitor.history[-1]
    assert isinstance(record.alert_flags.flags["update_spike"], torch.Tensor)
    assert "alerts" not in record.__dict__
    assert {a.kind for a in record.alerts} == {"update_spike"}
    assert {a.layer for a in record.alerts} == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_alert_running_means_update_in_place():
    """The running means keep their addresses from step to step (a captured CUDA graph replays into the same
    state) and hold the EMA of the gradient norms."""
    from fastgradstats.monitoring.alerts import AlertTracker

    tracker = AlertTracker()
    generator = torch.Generator().manual_seed(0)
    steps = [fgs.tensor_stats([torch.randn(10, generator=generator), torch.randn(5, generator=generator)],
                              names=["a", "b"]) for _ in range(3)]
    tracker.update(1, steps[0])
    history = tracker.grad_l2
    addresses = history.mean.data_ptr(), history.seen.data_ptr()
    for step, stats in enumerate(steps[1:], 2):
        tracker.update(step, stats)
    assert (history.mean.data_ptr(), history.seen.data_ptr()) == addresses
    assert history.seen.tolist() == [3, 3]
    decay, want = tracker.config.ema_decay, steps[0].l2.double()
    for stats in steps[1:]:
        want = decay * want + (1 - decay) * stats.l2.double()
    torch.testing.assert_close(history.mean, want)
