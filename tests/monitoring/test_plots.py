"""Plots: each returns a Figure, saves a readable PNG, names bad inputs, copes with NaN and zero gradients."""

import sys

import numpy as np
import pytest
import torch

import fastgradstats as fgs

pytest.importorskip("matplotlib")
import matplotlib.image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fastgradstats import results
from fastgradstats.monitoring import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 4


def tiny_model(hidden=6, depth=2):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, hidden)]
    for _ in range(depth - 1):
        layers += [torch.nn.Tanh(), torch.nn.Linear(hidden, hidden)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 1))


def run_monitor(model, steps=STEPS, hist="log2", poison=None):
    """Train ``model`` for ``steps`` with a Monitor; ``poison(model)`` edits the last step's gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = fgs.Monitor(model, hist=hist, track=("grad",))
    for step in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 3)).square().mean().backward()
        if poison is not None and step == steps - 1:
            poison(model)
        monitor.step()
        optimizer.step()
    monitor.close()
    return list(monitor.history)


def nan_in_first_weight(model):
    model[0].weight.grad[0, 0] = float("nan")


def zero_last_bias(model):
    model[-1].bias.grad.zero_()


@pytest.fixture(scope="module")
def records():
    return run_monitor(tiny_model())


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def legend_labels(fig):
    return [text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()]


def test_gradient_flow_returns_figure_and_saves_png(records, tmp_path):
    fig = plots.gradient_flow(records[-1].stats["grad"], path=tmp_path / "flow.png")
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == records[-1].stats["grad"].names
    assert fig.axes[0].get_yscale() == "log"
    assert "total l2 = " in fig.axes[0].get_title()
    assert_png(tmp_path / "flow.png")


def test_gradient_flow_bars_are_the_mean_abs_linf_and_l2_fields(records):
    stats = records[-1].stats["grad"]
    fig = plots.gradient_flow(stats)
    bars = [[bar.get_height() for bar in container] for container in fig.axes[0].containers]
    for heights, field in zip(bars, ("mean_abs", "linf", "l2")):
        np.testing.assert_allclose(heights, getattr(stats, field).double().numpy())


def test_plots_reuse_the_host_copy_that_writing_the_record_made(monkeypatch):
    record = run_monitor(tiny_model(), steps=1)[0]
    copies = []
    real_to_host = results.to_host
    monkeypatch.setattr(results, "to_host", lambda packed: copies.append(packed) or real_to_host(packed))
    record.to_dict()  # what a sink does
    plots.gradient_flow(record.stats["grad"])
    plots.log2_heatmap([record], "0.weight")
    plots.norms_over_time([record])
    assert len(copies) == 1


def test_log2_heatmap_returns_figure_and_saves_png(records, tmp_path):
    fig = plots.log2_heatmap(records, "0.weight", path=tmp_path / "heat.png")
    assert isinstance(fig, Figure)
    assert "'0.weight'" in fig.axes[0].get_title()
    assert_png(tmp_path / "heat.png")


def test_norms_over_time_returns_figure_and_saves_png(records, tmp_path):
    fig = plots.norms_over_time(records, path=tmp_path / "norms.png")
    assert isinstance(fig, Figure)
    assert legend_labels(fig) == [*records[0].stats["grad"].names, "total"]
    assert fig.axes[0].get_yscale() == "log"
    assert_png(tmp_path / "norms.png")


def test_path_none_writes_nothing(records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plots.gradient_flow(records[0].stats["grad"])
    assert list(tmp_path.iterdir()) == []


def test_log2_heatmap_has_one_column_per_step_and_counts_every_finite_nonzero(records):
    fig = plots.log2_heatmap(records, "0.weight")
    counts = fig.axes[0].collections[0].get_array()
    assert counts.shape[1] == STEPS
    assert counts.sum(axis=0).tolist() == [r.stats["grad"].numel[0].item() for r in records]


def test_log2_heatmap_accepts_tensor_stats_and_the_total(records):
    stats = [record.stats["grad"] for record in records]
    assert isinstance(plots.log2_heatmap(stats, "total"), Figure)
    assert isinstance(plots.log2_heatmap(stats[0], "3.bias"), Figure)


def test_log2_heatmap_unknown_layer_raises_naming_it(records):
    with pytest.raises(ValueError, match="unknown layer 'decoder.weight'"):
        plots.log2_heatmap(records, "decoder.weight")


def test_log2_heatmap_linear_histogram_raises():
    records = run_monitor(tiny_model(), steps=2, hist="linear")
    with pytest.raises(ValueError, match="not a log2 histogram"):
        plots.log2_heatmap(records, "0.weight")


def test_log2_heatmap_reads_the_histogram_kind_not_the_edges():
    stats = fgs.tensor_stats([torch.tensor([1.0, 1.5])], ["x"], hist="linear", bins=1, range=(1.0, 2.0))
    assert stats.hist_edges[0].tolist() == [1.0, 2.0]  # edges that look like the log2 bin [2^0, 2^1)
    with pytest.raises(ValueError, match="is a linear histogram, not a log2 histogram"):
        plots.log2_heatmap(stats, "x")


def test_log2_heatmap_without_histogram_raises():
    records = run_monitor(tiny_model(), steps=1, hist=None)
    with pytest.raises(ValueError, match="no histogram"):
        plots.log2_heatmap(records, "0.weight")


def test_log2_heatmap_missing_kind_raises_naming_it(records):
    with pytest.raises(ValueError, match=r"no record has stats\['param'\]"):
        plots.log2_heatmap(records, "0.weight", kind="param")


@pytest.mark.parametrize("plot", [lambda r: plots.log2_heatmap(r, "0.weight"), plots.norms_over_time])
def test_empty_records_raise(plot):
    with pytest.raises(ValueError, match="no records"):
        plot([])


def test_gradient_flow_without_layers_raises():
    with pytest.raises(ValueError, match="no layers"):
        plots.gradient_flow(fgs.tensor_stats([], []))


def test_gradient_flow_rejects_a_step_record(records):
    with pytest.raises(TypeError, match="expected TensorStats"):
        plots.gradient_flow(records[0])


def test_norms_over_time_unknown_layer_raises_naming_it(records):
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['nope'\]"):
        plots.norms_over_time(records, layers=["0.weight", "nope"])


def test_norms_over_time_unknown_field_raises_naming_it(records):
    with pytest.raises(ValueError, match="no field 'l3'"):
        plots.norms_over_time(records, field="l3")


def test_norms_over_time_chosen_layers_and_signed_field_use_a_linear_axis(records):
    fig = plots.norms_over_time(records, layers="3.bias", field="mean")
    assert legend_labels(fig) == ["3.bias", "total"]
    assert fig.axes[0].get_yscale() == "linear"


def test_norms_over_time_defaults_to_the_eight_largest_last_values():
    records = run_monitor(tiny_model(depth=6), steps=2)
    stats = records[-1].stats["grad"]
    assert len(stats) > 8
    largest = set(stats.l2.argsort(descending=True)[:8].tolist())
    expected = [name for i, name in enumerate(stats.names) if i in largest]
    assert legend_labels(plots.norms_over_time(records)) == [*expected, "total"]


def test_nan_gradient_still_plots_and_is_marked(tmp_path):
    records = run_monitor(tiny_model(), poison=nan_in_first_weight)
    stats = records[-1].stats["grad"]
    assert stats.nonfinite[0].item() == 1
    flow = plots.gradient_flow(stats, path=tmp_path / "flow.png")
    assert "NaN/Inf (1 layer)" in legend_labels(flow)
    assert flow.axes[0].get_xticklabels()[0].get_color() == plots.NONFINITE_COLOR
    heat = plots.log2_heatmap(records, "0.weight", path=tmp_path / "heat.png")
    assert "NaN/Inf" in heat.axes[0].get_title()
    norms = plots.norms_over_time(records, path=tmp_path / "norms.png")
    assert "NaN/Inf" in legend_labels(norms)
    for name in ("flow", "heat", "norms"):
        assert_png(tmp_path / f"{name}.png")


def test_nan_layer_is_among_the_default_lines():
    records = run_monitor(tiny_model(depth=6), steps=2, poison=nan_in_first_weight)
    assert "0.weight" in legend_labels(plots.norms_over_time(records))


def test_all_zero_gradient_layer_still_plots(tmp_path):
    records = run_monitor(tiny_model(), poison=zero_last_bias)
    flow = plots.gradient_flow(records[-1].stats["grad"], path=tmp_path / "flow.png")
    assert "all zero (1 layer)" in legend_labels(flow)
    plots.log2_heatmap(records, "3.bias")
    assert_png(tmp_path / "flow.png")


def test_missing_matplotlib_raises_install_hint(records, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "fastgradstats\[plots\]"'):
        plots.gradient_flow(records[0].stats["grad"])


# split_heatmap: per-part (MoE expert) statistics over steps


def expert_records(steps=STEPS, poison=False):
    """Monitor records of a [6, 3, 2] expert stack split into 6 parts (part 4 gets no gradient)."""
    torch.manual_seed(0)
    experts = torch.nn.Parameter(torch.randn(6, 3, 2))
    model = torch.nn.ParameterDict({"experts": experts})
    monitor = fgs.Monitor(model, track=("grad", "param"), split={"experts": 6})
    for step in range(steps):
        model.zero_grad()
        (experts[[0, 1, 2, 3, 5]] * torch.randn(5, 3, 2)).sum().backward()
        if poison and step == steps - 1:
            experts.grad[1, 0, 0] = float("nan")
        monitor.step()
    monitor.close()
    return list(monitor.history)


def test_split_heatmap_data_equals_the_per_part_values_of_each_record(tmp_path):
    records = expert_records()
    fig = plots.split_heatmap(records, "experts", path=tmp_path / "experts.png")
    cells = fig.axes[0].collections[0].get_array()
    expected = torch.stack([r.stats["grad"].group("experts").l2 for r in records], dim=1).double().numpy()
    assert cells.shape == (6, STEPS)
    assert (cells.data == expected).all()
    assert cells.mask[4].all() and not cells.mask[[0, 1, 2, 3, 5]].any()  # zero part: left uncoloured
    assert "grey: zero" in fig.axes[0].get_title()
    assert fig.axes[1].get_yscale() == "log"  # the colour bar
    assert_png(tmp_path / "experts.png")


def test_split_heatmap_signed_field_of_params_is_linear_and_accepts_stats():
    records = expert_records(steps=2)
    stats = [r.stats["param"] for r in records]
    fig = plots.split_heatmap(stats, "exp", field="mean")
    assert fig.axes[1].get_yscale() == "linear"
    assert (fig.axes[0].collections[0].get_array().data[:, 0] == stats[0].group("experts").mean.numpy()).all()


def test_split_heatmap_marks_nan_parts():
    records = expert_records(poison=True)
    fig = plots.split_heatmap(records, "experts")
    markers = fig.axes[0].collections[1].get_offsets()
    assert markers.tolist() == [[records[-1].step, 1.0]]
    assert "NaN/Inf (1 cells)" in fig.axes[0].get_title()


def test_split_heatmap_bad_name_or_field_raises(records):
    experts = expert_records(steps=1)
    with pytest.raises(KeyError, match="split layers: \\['experts'\\]"):
        plots.split_heatmap(experts, "router")
    with pytest.raises(ValueError, match="no field 'l3'"):
        plots.split_heatmap(experts, "experts", field="l3")
    with pytest.raises(KeyError, match="no split layer"):
        plots.split_heatmap(records, "0.weight")


def spiked_update_records(steps=10, spike_step=7):
    """A Monitor tracking grad and update, attached to Adam, whose lr is ×30 at optimizer step
    ``spike_step``."""
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = fgs.Monitor(model, track=("grad", "update"), alert_config=fgs.AlertConfig(warmup=3))
    monitor.attach(optimizer)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        model(torch.randn(8, 3)).square().mean().backward()
        optimizer.param_groups[0]["lr"] = 3e-2 if step == spike_step else 1e-3
        optimizer.step()
    monitor.close()
    return list(monitor.history)


def test_update_ratio_over_time_plots_each_layers_ratio_and_marks_spikes(tmp_path):
    records = spiked_update_records()
    fig = plots.update_ratio_over_time(records, path=tmp_path / "ratio.png")
    assert_png(tmp_path / "ratio.png")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    updated = [r for r in records if r.update_ratio is not None]
    names = updated[0].stats["update"].names
    assert set(lines) == {*names, "total"}
    assert list(lines[names[0]].get_xdata()) == [r.step for r in updated]
    np.testing.assert_allclose(lines[names[0]].get_ydata(), [r.update_ratio[0].item() for r in updated])
    total_ratios = [r.stats["update"].total.ratio.item() for r in updated]
    np.testing.assert_allclose(lines["total"].get_ydata(), total_ratios)
    assert ax.get_yscale() == "log"
    assert "update_spike" in legend_labels(fig)
    spikes = [r.step for r in records if any(a.kind == "update_spike" for a in r.alerts)]
    assert spikes == [8]


def test_update_ratio_over_time_without_update_or_with_an_unknown_layer_raises(records):
    with pytest.raises(ValueError, match=r"no record has stats\['update'\]"):
        plots.update_ratio_over_time(records)
    with pytest.raises(ValueError, match="unknown layer"):
        plots.update_ratio_over_time(spiked_update_records(steps=3), layers="nope")


def noise_scale_estimates(steps=12):
    """GradientNoiseScale.step() results of a small linear regression (b = 4, k = 3)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    gns = fgs.GradientNoiseScale(model, batch_size=4)
    estimates = []
    for _ in range(steps):
        model.zero_grad()
        for _ in range(3):
            x = torch.randn(4, 4)
            ((model(x).squeeze(-1) - x[:, 0]).pow(2).mean() / 3).backward()
            gns.micro_step()
        estimates.append(gns.step())
    return estimates


def test_noise_scale_over_time_plots_the_estimates_and_saves_png(tmp_path):
    estimates = noise_scale_estimates()
    fig = plots.noise_scale_over_time(estimates, path=tmp_path / "gns.png")
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    assert_png(tmp_path / "gns.png")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    [line] = ax.lines
    ema = np.array([e.b_simple.item() for e in estimates])
    assert np.array_equal(line.get_xdata(), [e.step for e in estimates])
    np.testing.assert_array_equal(line.get_ydata(), np.where(ema > 0, ema, np.nan))
    raw = np.array([e.trace_step.item() / e.g2_step.item() for e in estimates])
    kept = raw > 0
    [points] = ax.collections
    np.testing.assert_allclose(points.get_offsets(), np.column_stack([np.arange(1, 13)[kept], raw[kept]]),
                               rtol=1e-6)
    assert points.get_alpha() < 0.5  # faint


def test_noise_scale_over_time_leaves_out_nonpositive_values_and_takes_steps():
    import dataclasses

    estimates = noise_scale_estimates(3)
    estimates[1] = dataclasses.replace(estimates[1], g2_step=torch.tensor(-1.0),
                                       b_simple=torch.tensor(float("inf")))
    fig = plots.noise_scale_over_time(estimates, steps=[10, 20, 30])
    ax = fig.axes[0]
    assert list(ax.lines[0].get_xdata()) == [10, 20, 30]
    assert np.isnan(ax.lines[0].get_ydata()[1])
    assert list(ax.collections[0].get_offsets()[:, 0]) == [10, 30]
    assert "1 per-step estimates" in ax.get_title() and "1 EMA values" in ax.get_title()


def test_noise_scale_over_time_bad_inputs_raise(records):
    with pytest.raises(ValueError, match="no estimates"):
        plots.noise_scale_over_time([])
    with pytest.raises(ValueError, match="2 steps for 3 estimates"):
        plots.noise_scale_over_time(noise_scale_estimates(3), steps=[1, 2])
    with pytest.raises(TypeError, match="StepRecord"):
        plots.noise_scale_over_time(records)
