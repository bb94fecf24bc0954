"""Sinks: what JSONL, TensorBoard and Wandb write for Monitor records, read back with each tool's own
reader."""

import json
import math
import re
import sys

import pytest
import torch

import fastgradstats as fgs
from fastgradstats.monitoring.alerts import KINDS as ALERT_KINDS
from fastgradstats.monitoring.sinks import SCALAR_FIELDS, layer_tag, scalars

TRACK = ("grad", "param", "update", "grad_cos", "init")
STEPS = 4


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def run_monitor(sinks: list, hist: str = "log2", steps: int = STEPS, tamper=None) -> list:
    """SGD steps on a tiny model with a Monitor tracking every kind; closes the monitor (and the sinks)."""
    model = make_model()
    monitor = fgs.Monitor(model, hist=hist, track=TRACK, sinks=sinks)
    records = []
    for step in range(1, steps + 1):
        generator = torch.Generator().manual_seed(step)
        model.zero_grad()
        model(torch.randn(16, 4, generator=generator)).pow(2).mean().backward()
        if tamper is not None:
            tamper(model)
        records.append(monitor.step())
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    monitor.close()
    return records


def layer_hist(stats, i: int) -> tuple[list[int], list[float]]:
    """Counts and edges of layer ``i`` of a TensorStats (edges shared by all layers for log2)."""
    edges = stats.hist_edges if stats.hist_edges.dim() == 1 else stats.hist_edges[i]
    return stats.hist[i].tolist(), edges.tolist()


# JSONL


def test_jsonl_writes_each_record_as_one_json_line(tmp_path):
    path = tmp_path / "stats.jsonl"
    records = run_monitor([fgs.sinks.JSONL(path)])
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [record.to_dict() for record in records]
    assert all({"step", "grad", "alerts"} <= json.loads(line).keys() for line in lines)


def test_jsonl_creates_parent_dirs_and_appends(tmp_path):
    path = tmp_path / "runs" / "a" / "stats.jsonl"
    run_monitor([fgs.sinks.JSONL(path)], steps=2)
    run_monitor([fgs.sinks.JSONL(path)], steps=3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 1, 2, 3]


def test_jsonl_writes_nan_as_python_json_does(tmp_path):
    path = tmp_path / "stats.jsonl"

    def poison(model):
        model[0].weight.grad[0, 0] = float("nan")

    run_monitor([fgs.sinks.JSONL(path)], steps=1, tamper=poison)
    line = path.read_text()
    assert "NaN" in line
    assert math.isnan(json.loads(line)["grad"]["layers"]["0.weight"]["l2"])


def test_jsonl_unwritable_path_raises_naming_it(tmp_path):
    regular_file = tmp_path / "not_a_dir"
    regular_file.write_text("")
    path = regular_file / "stats.jsonl"
    with pytest.raises(OSError, match=re.escape(str(path))):
        fgs.sinks.JSONL(path)


def test_jsonl_write_after_close_opens_the_file_again_and_appends(tmp_path):
    path = tmp_path / "stats.jsonl"
    sink = fgs.sinks.JSONL(path)
    run_monitor([sink], steps=2)
    assert sink.closed
    run_monitor([sink], steps=1)  # a host reusing its sinks, as a second Lightning fit does
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 1]


# TensorBoard


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_scalars_equal_our_stats(tmp_path):
    records = run_monitor([fgs.sinks.TensorBoard(tmp_path)])
    events = read_events(tmp_path)
    expected_tags = set().union(*(scalars(record) for record in records))
    assert set(events.Tags()["scalars"]) == expected_tags
    for tag, (kind, i) in {"grad.l2.0/weight": ("grad", 0), "param.l2.2/bias": ("param", 3)}.items():
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        assert logged == [(r.step, r.stats[kind].l2[i].item()) for r in records]
    ratios = [(event.step, event.value) for event in events.Scalars("update.ratio.0/weight")]
    assert ratios == [(r.step, r.update_ratio[0].item()) for r in records if r.update_ratio is not None]
    totals = [event.value for event in events.Scalars("grad/l2")]
    assert totals == [r.stats["grad"].total.l2.item() for r in records]
    assert [event.value for event in events.Scalars("alerts/dead")] == [0.0] * STEPS
    assert [event.value for event in events.Scalars("alerts/count")] == [0.0] * STEPS


def test_scalars_cover_every_tracked_kind_and_field_per_block_and_whole_model():
    record = run_monitor([], steps=2)[-1]
    layers = ("0/weight", "0/bias", "2/weight", "2/bias")  # nn.Sequential: the block is the module's index
    expected = {f"{kind}.{field}.{layer}" for kind, fields in SCALAR_FIELDS.items() for field in fields
                for layer in layers}
    expected |= {f"{kind}/{field}" for kind, fields in SCALAR_FIELDS.items() for field in fields}
    expected |= {f"alerts/{kind}" for kind in ("nonfinite", "dead", "vanishing", "exploding", "update_spike")}
    assert set(scalars(record)) == expected | {"alerts/count"}
    whole_model = {tag for tag in expected | {"alerts/count"} if "." not in tag}
    assert set(scalars(record, layers=False)) == whole_model


def test_layer_tags_group_one_statistic_of_one_block():
    tags = {
        ("grad", "l2", "transformer.h.3.attn.c_attn.weight"): "grad.l2.transformer.h.3/attn.c_attn.weight",
        ("update", "ratio", "model.layers.10.mlp.experts[7]"): "update.ratio.model.layers.10/mlp.experts[7]",
        ("grad", "l2", "transformer.wte.weight"): "grad.l2/transformer.wte.weight",
        ("grad", "hist", "total"): "grad.hist/total",
        ("grad", "l2", "layers.0"): "grad.l2/layers.0",  # a number that ends the name starts no block
    }
    assert {args: layer_tag(*args) for args in tags} == tags


class WithATotal(torch.nn.Module):
    """A model with a parameter literally named "total"."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.total = torch.nn.Parameter(torch.randn(5))
        self.linear = torch.nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.total).square().mean()


def test_a_layer_named_total_does_not_overwrite_the_whole_model_total(tmp_path):
    model = WithATotal()
    monitor = fgs.Monitor(model, sinks=[fgs.sinks.TensorBoard(tmp_path)])
    model(torch.randn(4, 5, generator=torch.Generator().manual_seed(1))).backward()
    record = monitor.step()
    monitor.close()
    events = read_events(tmp_path)
    assert [event.value for event in events.Scalars("grad/l2")] == [record.stats["grad"].total.l2.item()]
    assert [event.value for event in events.Scalars("grad.l2/total")] == [record.stats["grad"].l2[0].item()]
    assert record.stats["grad"].total.l2 != record.stats["grad"].l2[0]


@pytest.mark.parametrize("hist", ["log2", "linear"])
def test_tensorboard_histograms_hold_our_counts(tmp_path, hist):
    records = run_monitor([fgs.sinks.TensorBoard(tmp_path)], hist=hist)
    events = read_events(tmp_path)
    for kind in ("grad", "param"):
        for i, name in enumerate(records[0].stats[kind].names):
            logged = events.Histograms(layer_tag(kind, "hist", name))
            assert [event.step for event in logged] == [r.step for r in records]
            for event, record in zip(logged, records):
                counts, edges = layer_hist(record.stats[kind], i)
                value = event.histogram_value
                assert sum(value.bucket) == value.num == sum(counts)
                assert set(value.bucket_limit) <= set(edges[1:])
        assert len(events.Histograms(f"{kind}/hist")) == STEPS


def test_tensorboard_log2_histogram_sums_are_of_the_binned_absolute_values(tmp_path):
    model = make_model()
    monitor = fgs.Monitor(model, sinks=[fgs.sinks.TensorBoard(tmp_path)])
    model(torch.randn(16, 4, generator=torch.Generator().manual_seed(1))).pow(2).mean().backward()
    monitor.step()
    monitor.close()
    grad = model[0].weight.grad.double()
    value = read_events(tmp_path).Histograms("grad.hist.0/weight")[0].histogram_value
    assert value.sum == pytest.approx(grad.abs().sum().item(), rel=1e-5)
    assert value.sum_squares == pytest.approx(grad.square().sum().item(), rel=1e-5)
    assert value.sum > abs(grad.sum().item())  # |x|, not x: the gradient has both signs


def test_tensorboard_skips_empty_histograms(tmp_path):
    def zero_first_bias(model):
        model[0].bias.grad.zero_()

    run_monitor([fgs.sinks.TensorBoard(tmp_path)], steps=1, tamper=zero_first_bias)
    histograms = read_events(tmp_path).Tags()["histograms"]
    assert "grad.hist.0/bias" not in histograms
    assert "grad.hist.0/weight" in histograms


def test_tensorboard_flushes_but_does_not_close_a_given_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    run_monitor([fgs.sinks.TensorBoard(writer)], steps=2)
    assert len(read_events(tmp_path).Scalars("grad/l2")) == 2
    writer.add_scalar("after", 1.0, 3)  # still open
    writer.close()


def test_tensorboard_write_after_close_logs_to_a_new_event_file_in_the_same_directory(tmp_path):
    sink = fgs.sinks.TensorBoard(tmp_path)
    first = run_monitor([sink], steps=2)
    second = run_monitor([sink], steps=1)  # a host reusing its sinks, as a second Lightning fit does
    logged = [(event.step, event.value) for event in read_events(tmp_path).Scalars("grad/l2")]
    assert logged == [(r.step, r.stats["grad"].total.l2.item()) for r in first + second]


def test_tensorboard_rejects_what_is_not_a_writer():
    with pytest.raises(TypeError, match="SummaryWriter"):
        fgs.sinks.TensorBoard(42)


# Wandb


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """The wandb module, kept offline and out of the home directory."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DIR": tmp_path, "WANDB_CACHE_DIR": tmp_path / "cache",
                        "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(name, str(value))
    return pytest.importorskip("wandb")


def test_wandb_logs_our_values_at_each_step(tmp_path, wandb_offline):
    run = wandb_offline.init(mode="offline", dir=tmp_path, project="fastgradstats-tests")
    try:
        records = run_monitor([fgs.sinks.Wandb()])
        run.log({"done": 1}, step=STEPS + 1)  # commits the last Monitor row
        summary = run.summary
        last = records[-1]
        assert summary["grad.l2.0/weight"] == pytest.approx(last.stats["grad"].l2[0].item())
        assert summary["update/ratio"] == pytest.approx(last.to_dict()["update"]["total"]["ratio"])
        assert summary["alerts/nonfinite"] == 0
        counts, edges = layer_hist(last.stats["grad"], 0)
        histogram = summary["grad.hist.0/weight"]
        assert sum(histogram["values"]) == sum(counts)
        assert set(histogram["bins"]) <= set(edges)
        assert summary["_step"] == last.step  # the row holding these values was logged at the record's step
    finally:
        run.finish()


def test_wandb_close_leaves_the_run_open(tmp_path, wandb_offline):
    run = wandb_offline.init(mode="offline", dir=tmp_path, project="fastgradstats-tests")
    try:
        run_monitor([fgs.sinks.Wandb(run)], steps=1)
        run.log({"after": 1.0}, step=2)  # would raise on a finished run
    finally:
        run.finish()


def test_wandb_without_a_run_raises(wandb_offline, monkeypatch):
    monkeypatch.setattr(wandb_offline, "run", None)
    with pytest.raises(RuntimeError, match="wandb.init"):
        fgs.sinks.Wandb()


@pytest.mark.parametrize(("module", "make_sink"), [
    ("wandb", lambda tmp_path: fgs.sinks.Wandb()),
    ("torch.utils.tensorboard", lambda tmp_path: fgs.sinks.TensorBoard(tmp_path)),
])
def test_missing_package_names_the_pip_extra(tmp_path, monkeypatch, module, make_sink):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=re.escape('pip install "fastgradstats[all]"')):
        make_sink(tmp_path)


# One record, every sink


class FakeRun:
    """Stands in for a wandb run: keeps what ``log`` receives."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, payload: dict, step: int) -> None:
        self.logged.append((step, payload))


def tagged_values(line: dict) -> dict[str, float]:
    """The scalars a JSONL line holds, under the documented tags: whole model, each layer, alerts."""
    values = {}
    for kind, fields in SCALAR_FIELDS.items():
        for field in fields:
            values[f"{kind}/{field}"] = line[kind]["total"][field]
            values.update({layer_tag(kind, field, name): stats[field]
                           for name, stats in line[kind]["layers"].items()})
    for kind in ALERT_KINDS:
        values[f"alerts/{kind}"] = sum(alert["kind"] == kind for alert in line["alerts"])
    values["alerts/count"] = line["alert_count"]
    return values


def test_jsonl_tensorboard_and_wandb_carry_the_same_numbers_for_a_record(tmp_path):
    pytest.importorskip("wandb")
    path, run = tmp_path / "stats.jsonl", FakeRun()
    sinks = [fgs.sinks.JSONL(path), fgs.sinks.TensorBoard(tmp_path / "tb"), fgs.sinks.Wandb(run)]
    record = run_monitor(sinks, steps=2)[-1]
    line = json.loads(path.read_text().splitlines()[-1])
    expected = tagged_values(line)
    assert line["update"]["total"]["ratio"] == expected["update/ratio"]  # JSONL has the totals too

    events = read_events(tmp_path / "tb")
    last_events = {tag: events.Scalars(tag)[-1] for tag in events.Tags()["scalars"]}
    assert {event.step for event in last_events.values()} == {record.step}
    as_float32 = {tag: torch.tensor(value, dtype=torch.float32).item() for tag, value in expected.items()}
    assert {tag: event.value for tag, event in last_events.items()} == as_float32

    step, payload = run.logged[-1]
    assert step == record.step
    assert {key: value for key, value in payload.items() if isinstance(value, (int, float))} == expected

    for kind in ("grad", "param"):
        for name, stats in [*line[kind]["layers"].items(), ("", line[kind]["total"])]:
            tag = layer_tag(kind, "hist", name) if name else f"{kind}/hist"
            histogram = events.Histograms(tag)[-1].histogram_value
            assert (histogram.num, histogram.sum, histogram.sum_squares) == (
                sum(stats["hist"]), stats["hist_sum"], stats["hist_sum_squares"])
            assert sum(payload[tag].histogram) == sum(stats["hist"])


# Split layers (MoE experts): summaries instead of one entry per part


PARTS = 20


class Experts(torch.nn.Module):
    """A stack of 20 experts [20, 3, 4] of which 5..19 receive no gradient, and a router."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = torch.nn.Parameter(torch.randn(PARTS, 3, 4))
        self.router = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.router(x) @ self.experts[:5].sum(0)).square().mean()


def run_experts(sinks: list, steps: int = 2) -> list:
    model = Experts()
    monitor = fgs.Monitor(model, track=("grad", "update"), split={"experts": PARTS}, sinks=sinks)
    records = []
    for step in range(1, steps + 1):
        model.zero_grad()
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).backward()
        records.append(monitor.step())
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    monitor.close()
    return records


def summary_keys(summary: dict, prefix: str) -> dict[str, float]:
    """The scalars the TensorBoard and W&B sinks log for one split summary."""
    values = {f"{prefix}/{key}": summary[key] for key in ("cv", "dead", "nonfinite")}
    for end in ("smallest", "largest"):
        for i, entry in enumerate(summary[end]):
            values[f"{prefix}/{end}/{i}"], values[f"{prefix}/{end}/{i}/part"] = entry["value"], entry["part"]
    return values


def test_jsonl_writes_split_summaries_instead_of_the_parts(tmp_path):
    path = tmp_path / "stats.jsonl"
    records = run_experts([fgs.sinks.JSONL(path)])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line, record in zip(lines, records):
        assert list(line["grad"]["layers"]) == ["router.weight", "router.bias"]
        assert line["grad"]["splits"] == record.stats["grad"].split_summary(3)
        assert line["grad"]["splits"]["experts"]["dead"] == PARTS - 5
        assert line["grad"]["total"] == record.to_dict()["grad"]["total"]
    assert lines[1]["update"]["splits"]["experts"]["field"] == "dist"
    assert lines[1]["update"]["splits"]["experts"]["dead"] == PARTS - 5  # experts without gradient: unmoved


def test_sinks_below_the_threshold_write_every_part(tmp_path):
    path = tmp_path / "stats.jsonl"
    records = run_experts([fgs.sinks.JSONL(path, summarize_splits=PARTS)], steps=1)
    line = json.loads(path.read_text())
    assert line == records[0].to_dict()
    assert f"grad.l2/experts[{PARTS - 1}]" in scalars(records[0], summarize_splits=False)


def test_tensorboard_and_jsonl_carry_the_same_summary_with_capped_keys(tmp_path):
    path = tmp_path / "stats.jsonl"
    records = run_experts([fgs.sinks.JSONL(path, k=2), fgs.sinks.TensorBoard(tmp_path / "tb", k=2)])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    events = read_events(tmp_path / "tb")
    tags = set(events.Tags()["scalars"])
    assert not any("experts[" in tag for tag in tags)
    assert len([tag for tag in tags if tag.startswith("grad.") and "experts" in tag]) == 3 + 4 * 2
    for kind, field in (("grad", "l2"), ("update", "dist")):
        expected = summary_keys(lines[-1][kind]["splits"]["experts"], f"{kind}.{field}/experts")
        for tag, value in expected.items():
            logged = events.Scalars(tag)[-1]
            assert logged.step == records[-1].step
            assert logged.value == pytest.approx(value, rel=1e-6, nan_ok=True), tag
    assert "grad.hist/experts[0]" not in events.Tags()["histograms"]
    assert "grad.hist/router.weight" in events.Tags()["histograms"]


def test_wandb_logs_the_same_summary_as_jsonl(tmp_path, wandb_offline):
    path = tmp_path / "stats.jsonl"
    run = wandb_offline.init(mode="offline", dir=tmp_path, project="fastgradstats-tests")
    try:
        records = run_experts([fgs.sinks.JSONL(path), fgs.sinks.Wandb()])
        run.log({"done": 1}, step=records[-1].step + 1)
        last = json.loads(path.read_text().splitlines()[-1])
        expected = summary_keys(last["grad"]["splits"]["experts"], "grad.l2/experts")
        assert {key: run.summary[key] for key in expected} == pytest.approx(expected, nan_ok=True)
        assert "grad.l2/experts[0]" not in run.summary.keys()  # noqa: SIM118 (wandb summaries have no __contains__)
    finally:
        run.finish()


@pytest.mark.parametrize("make_sink", [
    lambda tmp_path, **kw: fgs.sinks.JSONL(tmp_path / "s.jsonl", **kw),
    lambda tmp_path, **kw: fgs.sinks.TensorBoard(tmp_path, **kw),
])
def test_sinks_reject_a_bad_summary_threshold_or_k(tmp_path, make_sink):
    with pytest.raises(ValueError, match="summarize_splits"):
        make_sink(tmp_path, summarize_splits="many")
    with pytest.raises(ValueError, match="k must be"):
        make_sink(tmp_path, k=0)


def test_scalars_carry_the_update_ratio_spike_alerts_and_optimizer_statistics():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = fgs.Monitor(model, track=("grad", "update", "optim"),
                          alert_config=fgs.AlertConfig(warmup=2)).attach(optimizer)
    for step in range(1, 6):
        model.zero_grad()
        model(torch.randn(16, 4, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        optimizer.param_groups[0]["lr"] = 0.1 if step == 4 else 1e-3
        optimizer.step()
    monitor.close()
    record = monitor.history[-1]
    values = scalars(record)
    optim = record.stats["optim"]
    names = optim.update.names
    assert values["alerts/update_spike"] == len(names)
    assert values["update.ratio.0/weight"] == pytest.approx(record.update_ratio[0].item())
    assert values["optim.update.ratio.0/weight"] == pytest.approx(optim.update_ratio[0].item())
    assert values["optim.update/ratio"] == pytest.approx(optim.update_ratio_total.item())
    bias = names.index("2.bias")
    assert values["optim.exp_avg.l2.2/bias"] == pytest.approx(optim["exp_avg"].l2[bias].item())
    assert values["optim.exp_avg_sq/linf"] == pytest.approx(optim["exp_avg_sq"].total.linf.item())
    assert not any(key.startswith(("optim.exp_avg.ratio", "optim.exp_avg/ratio")) for key in values)


# Gradient noise scale


def noise_scale_estimates(steps: int = 3) -> list:
    """GradientNoiseScale.step() results on the tiny model (b = 4, k = 2)."""
    model = make_model()
    gns = fgs.GradientNoiseScale(model, batch_size=4)
    estimates = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        model.zero_grad()
        for _ in range(2):
            (model(torch.randn(4, 4, generator=generator)).pow(2).mean() / 2).backward()
            gns.micro_step()
        estimates.append(gns.step())
    return estimates


def test_log_noise_scale_jsonl_and_tensorboard_read_back_the_same_numbers(tmp_path):
    estimates = noise_scale_estimates()
    path = tmp_path / "gns.jsonl"
    sinks = [fgs.sinks.JSONL(path), fgs.sinks.TensorBoard(tmp_path / "tb")]
    for step, estimate in enumerate(estimates, start=1):
        fgs.sinks.log_noise_scale(sinks, step * 10, estimate)
    for sink in sinks:
        sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": step * 10, "gns": estimate.to_dict()}
                     for step, estimate in enumerate(estimates, start=1)]
    events = read_events(tmp_path / "tb")
    names = [name for name, _ in make_model().named_parameters()]
    per_layer = {layer_tag("gns", field, name) for field in ("b_simple", "g2", "trace") for name in names}
    whole_model = {f"gns/{field}" for field in fgs.sinks.NOISE_SCALE_FIELDS}
    assert set(events.Tags()["scalars"]) == whole_model | per_layer
    assert "gns.b_simple.0/weight" in per_layer
    for tag, key in {"gns/b_simple": "b_simple", "gns/g2": "g2", "gns/trace": "trace",
                     "gns/trace_step": "trace_step"}.items():
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        assert logged == [(line["step"], line["gns"][key]) for line in lines]
    logged = [event.value for event in events.Scalars("gns.b_simple.0/weight")]
    assert logged == [line["gns"]["layers"]["0.weight"]["b_simple"] for line in lines]


def test_log_noise_scale_without_layers_and_to_a_single_sink(tmp_path):
    [estimate] = noise_scale_estimates(1)
    path = tmp_path / "gns.jsonl"
    sink = fgs.sinks.JSONL(path)
    fgs.sinks.log_noise_scale(sink, 3, estimate, layers=False)
    sink.close()
    data = estimate.to_dict()
    del data["layers"]
    assert json.loads(path.read_text()) == {"step": 3, "gns": data}
    assert set(fgs.sinks.noise_scale_scalars(estimate, layers=False)) == {
        f"gns/{field}" for field in fgs.sinks.NOISE_SCALE_FIELDS}


def test_log_noise_scale_wandb_logs_the_scalars(tmp_path, wandb_offline):
    [estimate] = noise_scale_estimates(1)
    run = wandb_offline.init(mode="offline", dir=tmp_path, project="fastgradstats-tests")
    try:
        fgs.sinks.log_noise_scale([fgs.sinks.Wandb()], 5, estimate)
        run.log({"done": 1}, step=6)
        assert run.summary["gns/b_simple"] == pytest.approx(estimate.b_simple.item())
        assert run.summary["gns.g2.2/bias"] == pytest.approx(estimate.layer_g2[3].item())
    finally:
        run.finish()


def test_log_noise_scale_refuses_a_sink_without_the_method_and_writes_nothing(tmp_path):
    [estimate] = noise_scale_estimates(1)
    path = tmp_path / "gns.jsonl"
    sink = fgs.sinks.JSONL(path)
    with pytest.raises(TypeError, match="object has no write_noise_scale"):
        fgs.sinks.log_noise_scale([sink, object()], 1, estimate)
    sink.close()
    assert path.read_text() == ""
