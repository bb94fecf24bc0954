"""Plots of gradient statistics: per-layer gradient flow, log2 histograms over steps, norms over steps, the
update-to-weight ratio over steps, the gradient noise scale over steps, and per-part (MoE expert) statistics
of a split layer over steps.

    from fastgradstats.monitoring import plots
    fig = plots.gradient_flow(fgs.grad_stats(model), path="flow.png")
    fig = plots.log2_heatmap(monitor.history, "blocks.0.attn.w_q.weight", path="w_q.png")
    fig = plots.norms_over_time(monitor.history, path="norms.png")
    fig = plots.update_ratio_over_time(monitor.history, path="update_ratio.png")
    fig = plots.noise_scale_over_time(estimates, path="gns.png")   # GradientNoiseScale.step() results
    fig = plots.split_heatmap(monitor.history, "layers.0.experts.w1", path="experts.png")

Each function returns a ``matplotlib.figure.Figure`` drawn on the non-interactive Agg canvas (pyplot's global
state is never touched) and, when ``path`` is given, saves it there (PNG unless the suffix names another
format matplotlib writes). matplotlib is imported only when a plot is made:
``pip install "fastgradstats[plots]"``.
Plots only read fields of the results (``mean_abs``, ``ratio``, ``spec``, ...), from ``stats.cpu()``: each
record's statistics reach the host in one copy, shared with the sinks that wrote it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..gns import NoiseScale
from ..hist import HistSpec
from ..results import LayerStats, TensorStats
from .monitor import StepRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Fields that cannot be negative: plotted on a log axis (zeros left out). Signed fields get a linear axis.
NONNEGATIVE_FIELDS = ("numel", "l1", "l2", "linf", "std", "zeros", "nonfinite", "mean_abs", "a_l2", "b_l2",
                      "dist", "ratio")
MAX_DEFAULT_LINES = 8
NONFINITE_COLOR = "tab:red"
MIN_SHOWN_BINS = 8  # log2_heatmap trims empty exponents, but shows at least this many
FP16_SMALLEST_EXP = -24  # fp16's smallest subnormal: smaller |values| flush to zero in fp16


def gradient_flow(stats: TensorStats, path: str | os.PathLike | None = None) -> Figure:
    """Bars of mean |g| (mean_abs), max |g| (linf) and l2 per layer on a log axis, titled with the total l2.

    A layer with NaN/Inf values (``nonfinite`` > 0 or a non-finite statistic) is shaded with red hatching and
    marked with a red x (its tick label turns red); an all-zero layer gets a grey circle on the bottom axis.
    Both appear in the legend when present. Raises ValueError when ``stats`` has no layers.

    Example::

        loss.backward()
        plots.gradient_flow(fgs.grad_stats(model), path="flow.png")
    """
    if not isinstance(stats, TensorStats):
        raise TypeError(f"gradient_flow: expected TensorStats (e.g. record.stats['grad']), "
                        f"got {type(stats).__name__}")
    if len(stats) == 0:
        raise ValueError("gradient_flow: the statistics have no layers")
    _require_matplotlib()
    names = list(stats.names)
    host = stats.cpu()
    mean_abs, linf, l2 = _host(host.mean_abs), _host(host.linf), _host(host.l2)
    nonfinite = _host(host.nonfinite)
    total_l2 = float(_host(_total(host).l2)[0])
    series = {"mean |g|": mean_abs, "max |g|": linf, "l2": l2}
    bad = (nonfinite > 0) | ~np.isfinite(l2) | ~np.isfinite(linf)
    zero = ~bad & (linf == 0)

    num_layers = len(names)
    label_size = float(np.clip(11 - num_layers / 12, 5, 9))
    longest = max(len(name) for name in names)
    width = float(np.clip(2.5 + 0.42 * num_layers, 7, 32))
    height = 4.0 + 0.0075 * label_size * min(longest, 60)  # room for the rotated names
    fig, ax = _figure((width, height))
    ax.set_yscale("log")
    x = np.arange(num_layers)
    bar_width = 0.8 / len(series)
    colors = ("tab:blue", "tab:orange", "tab:green")
    for k, ((label, values), color) in enumerate(zip(series.items(), colors)):
        shown = np.where(np.isfinite(values) & (values > 0), values, np.nan)
        ax.bar(x + (k - 1) * bar_width, shown, bar_width, label=label, color=color)
    _set_log_limits(ax, np.concatenate(list(series.values())))

    bottom_axis = ax.get_xaxis_transform()  # x in data, y in axes fraction
    if bad.any():
        for i in np.flatnonzero(bad):
            ax.axvspan(i - 0.45, i + 0.45, facecolor="none", edgecolor=NONFINITE_COLOR, hatch="///", lw=0)
        ax.scatter(x[bad], np.full(bad.sum(), 0.96), marker="x", s=60, color=NONFINITE_COLOR, zorder=5,
                   transform=bottom_axis, clip_on=False, label=f"NaN/Inf ({_layers(bad.sum())})")
    if zero.any():
        ax.scatter(x[zero], np.full(zero.sum(), 0.03), marker="o", s=30, color="grey", zorder=5,
                   transform=bottom_axis, clip_on=False, label=f"all zero ({_layers(zero.sum())})")

    ax.set_xticks(x, names, rotation=60, ha="right", rotation_mode="anchor", fontsize=label_size)
    for tick, is_bad in zip(ax.get_xticklabels(), bad):
        if is_bad:
            tick.set_color(NONFINITE_COLOR)
    ax.set_xlim(-0.6, num_layers - 0.4)
    ax.set_ylabel("|g| (log scale)")
    ax.grid(axis="y", which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    bars_first = sorted(range(len(labels)), key=lambda k: labels[k] not in series)
    ax.legend([handles[k] for k in bars_first], [labels[k] for k in bars_first], loc="upper left",
              bbox_to_anchor=(1.01, 1), fontsize=9)
    ax.set_title(f"Gradient flow: {_layers(num_layers)}, total l2 = {_format(total_l2)}")
    return _finish(fig, path)


def log2_heatmap(
    records_or_stats: Sequence[StepRecord] | Sequence[TensorStats] | TensorStats,
    layer: str,
    kind: str = "grad",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Heatmap of one layer's log2 histogram over steps: x = step, y = |value| exponent, colour = count (log).

    ``records_or_stats``: StepRecords (their ``stats[kind]``, at ``record.step``; records without ``kind`` are
    skipped) or TensorStats (at steps 0, 1, ...). ``layer``: a layer name, or "total" for the histogram of all
    layers together (unless a layer has that name). Rows with no counts are trimmed; the lowest and highest
    bins also count the values beyond them (see :mod:`fastgradstats.hist`); NaN/Inf and zeros are never
    counted, and steps with NaN/Inf in the layer are marked with a red x. A dashed line shows fp16's smallest
    subnormal. Raises ValueError when there are no statistics, the layer is missing at some step, or the
    histogram is absent or not log2.

    Example::

        monitor = fgs.Monitor(model, hist="log2")
        ...
        plots.log2_heatmap(monitor.history, "fc1.weight", path="fc1.png")
    """
    steps, all_stats = _stats_over_steps(records_or_stats, kind, "log2_heatmap")
    counts, nonfinite, exponents = [], [], None
    for step, stats in zip(steps, all_stats):
        if not isinstance(stats, TensorStats):
            raise TypeError(f"log2_heatmap: stats[{kind!r}] at step {step} is a {type(stats).__name__}, "
                            "which has no histogram")
        hist, spec, layer_nonfinite = _layer_hist(stats.cpu(), layer, step)
        step_exponents = _log2_exponents(spec, layer, step)
        if exponents is not None and not np.array_equal(step_exponents, exponents):
            raise ValueError(f"log2_heatmap: the log2 bins of '{layer}' change at step {step}")
        exponents = step_exponents
        counts.append(hist)
        nonfinite.append(layer_nonfinite)
    counts = np.stack(counts, axis=1).astype(np.float64)  # [bins, steps]

    used = np.flatnonzero(counts.sum(axis=1) > 0)
    first, last = (used[0], used[-1]) if used.size else (0, len(exponents) - 1)
    pad = max(1, (MIN_SHOWN_BINS - (last - first + 1) + 1) // 2)  # some context around a narrow histogram
    first, last = max(first - pad, 0), min(last + pad, len(exponents) - 1)
    y_edges = np.arange(exponents[first], exponents[last] + 2)
    shown = np.ma.masked_equal(counts[first:last + 1], 0)

    _require_matplotlib()
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    height = float(np.clip(2.5 + 0.16 * len(y_edges), 4, 10))
    fig, ax = _figure((9, height))
    norm = LogNorm(vmin=1, vmax=max(float(counts.max()), 2.0))
    mesh = ax.pcolormesh(_step_edges(np.asarray(steps, dtype=np.float64)), y_edges, shown, norm=norm,
                         cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="count (log scale)")
    ax.set_facecolor("whitesmoke")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=14, integer=True))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda e, _: f"$2^{{{int(e)}}}$"))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    clamped_bins = ((0, "also counts smaller |values|"), (len(exponents) - 1, "also counts larger |values|"))
    for clamped_bin, note in clamped_bins:
        if first <= clamped_bin <= last and counts[clamped_bin].any():
            ax.text(0.99, exponents[clamped_bin] + 0.5, f"{note} ", transform=ax.get_yaxis_transform(),
                    ha="right", va="center", fontsize=8, color="dimgrey")
    if exponents[first] <= FP16_SMALLEST_EXP <= exponents[last]:
        ax.axhline(FP16_SMALLEST_EXP, color="tab:red", ls="--", lw=1)
        ax.text(0.01, FP16_SMALLEST_EXP, "fp16 smallest subnormal $2^{-24}$",
                transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=8, color="tab:red",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    bad_steps = np.asarray(steps)[np.asarray(nonfinite) > 0]
    if bad_steps.size:
        ax.scatter(bad_steps, np.full(bad_steps.size, 1.0), marker="x", s=50, color=NONFINITE_COLOR,
                   transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
    if not used.size:
        ax.text(0.5, 0.5, "no finite non-zero values", transform=ax.transAxes, ha="center", color="dimgrey")
    ax.set_xlabel("step")
    ax.set_ylabel(f"|{kind}| (log2 bin lower edge)")
    title = f"log2 histogram of {kind} '{layer}' over {len(steps)} steps"
    if bad_steps.size:
        title += f"\nred x: {bad_steps.size} step(s) with NaN/Inf, which the histogram does not count"
    ax.set_title(title)
    return _finish(fig, path)


def norms_over_time(
    records: Sequence[StepRecord],
    layers: Sequence[str] | str | None = None,
    kind: str = "grad",
    field: str = "l2",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Lines of ``stats[kind].<field>`` over the recorded steps for some layers and the total (black, dashed).

    ``layers``: names to plot; by default all of them, or the 8 with the largest last value when there
    are more (a layer whose last value is NaN/Inf ranks first). Non-negative fields (l2, linf, l1, std, ...)
    use a log axis and leave zeros out; signed fields (mean, min, ...) a linear one. Steps with NaN/Inf values
    are marked with red x at the top of the axes. Records without ``kind`` are skipped.
    Raises ValueError for no records, an unknown field or an unknown layer.

    Example::

        plots.norms_over_time(monitor.history, field="linf", path="linf.png")
    """
    steps, all_stats = _stats_over_steps(records, kind, "norms_over_time", records_only=True)
    if field not in all_stats[0].FIELDS:
        raise ValueError(f"norms_over_time: stats[{kind!r}] has no field {field!r}; "
                         f"choose one of {all_stats[0].FIELDS}")
    names = list(dict.fromkeys(name for stats in all_stats for name in stats.names))
    values = np.full((len(steps), len(names)), np.nan)
    present = np.zeros(values.shape, dtype=bool)
    column = {name: j for j, name in enumerate(names)}
    totals = np.empty(len(steps))
    for t, stats in enumerate(all_stats):
        columns = [column[name] for name in stats.names]
        host = stats.cpu()
        values[t, columns], present[t, columns] = _host(getattr(host, field)), True
        totals[t] = _host(getattr(_total(host), field))[0]

    return _lines_over_steps(steps, names, values, present, totals, layers, field in NONNEGATIVE_FIELDS,
                             f"stats[{kind!r}]", field, f"{kind} {field}", "norms_over_time", path)


def update_ratio_over_time(
    records: Sequence[StepRecord],
    layers: Sequence[str] | str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Lines of the update-to-weight ratio ‖Δθ‖/‖θ‖ per layer (``stats["update"].ratio``) over the recorded
    steps, with the ratio over all layers (``.total.ratio``, black, dashed), on a log axis; steps where the
    ``update_spike``
    alert fired for a plotted layer get a red triangle on its line.

    ``records``: StepRecords of a Monitor tracking "update" (records without it are skipped). ``layers``:
    names to plot; by default all, or the 8 with the largest last ratio when there are more. Raises
    ValueError for no records or an unknown layer.

    Example::

        monitor = fgs.Monitor(model, track=("grad", "update")).attach(optimizer)
        ...
        plots.update_ratio_over_time(monitor.history, path="update_ratio.png")
    """
    records = [records] if isinstance(records, StepRecord) else list(records)
    steps, all_stats = _stats_over_steps(records, "update", "update_ratio_over_time", records_only=True)
    updated = [record for record in records if "update" in record.stats]
    names = list(dict.fromkeys(name for stats in all_stats for name in stats.names))
    column = {name: j for j, name in enumerate(names)}
    values = np.full((len(steps), len(names)), np.nan)
    present = np.zeros(values.shape, dtype=bool)
    totals = np.empty(len(steps))
    spikes = []  # (step index, column) of update_spike alerts
    for t, (record, stats) in enumerate(zip(updated, all_stats)):
        columns = [column[name] for name in stats.names]
        host = stats.cpu()
        values[t, columns], present[t, columns] = _host(host.ratio), True
        totals[t] = _host(host.total.ratio)[0]
        if record.alert_flags is not None and "update_spike" in record.alert_flags.flags:
            spikes += [(t, column[alert.layer]) for alert in record.alerts if alert.kind == "update_spike"]
    return _lines_over_steps(steps, names, values, present, totals, layers, True, "stats['update']",
                             "‖Δθ‖/‖θ‖", "update ratio ‖Δθ‖/‖θ‖", "update_ratio_over_time", path, spikes)


def noise_scale_over_time(
    estimates: Sequence[NoiseScale] | NoiseScale,
    steps: Sequence[int] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The gradient noise scale B_simple over steps: the EMA estimate (``estimate.b_simple``, a line) and each
    step's raw estimate tr(Σ)_step / |G|²_step (``trace_step / g2_step``, faint points), on a log axis.

    ``estimates``: the ``GradientNoiseScale.step()`` results to plot, in order. ``steps``: their x values;
    by default ``estimate.step`` (the count of steps the GradientNoiseScale has averaged). Values that are
    not finite and positive cannot be drawn on the log axis and are left out, counted in the title: a raw
    estimate whose |G|²_step ≤ 0 (common when B ≪ B_simple) or an EMA whose |G|² average is not yet positive.
    All values are copied to the host at once. Raises ValueError for no estimates or a ``steps`` of another
    length.

    Example::

        estimates = []
        for step in range(steps):
            ...                                    # micro-batches with gns.micro_step()
            estimates.append(gns.step())
        plots.noise_scale_over_time(estimates, path="gns.png")
    """
    estimates = [estimates] if isinstance(estimates, NoiseScale) else list(estimates)
    if not estimates:
        raise ValueError("noise_scale_over_time: no estimates to plot (empty sequence)")
    wrong = [type(e).__name__ for e in estimates if not isinstance(e, NoiseScale)]
    if wrong:
        raise TypeError(f"noise_scale_over_time: expected NoiseScale (GradientNoiseScale.step() results), "
                        f"got {_some(sorted(set(wrong)))}")
    x = np.asarray([e.step for e in estimates] if steps is None else list(steps))
    if x.shape != (len(estimates),):
        raise ValueError(f"noise_scale_over_time: {x.size} steps for {len(estimates)} estimates")
    rows = [torch.stack([e.b_simple, e.trace_step, e.g2_step]).float() for e in estimates]
    values = _host(torch.stack(rows)).reshape(len(estimates), 3)
    ema = values[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = values[:, 1] / values[:, 2]
    ema_shown, raw_shown = np.isfinite(ema) & (ema > 0), np.isfinite(raw) & (raw > 0)

    _require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure((10, 5))
    ax.set_yscale("log")
    ax.scatter(x[raw_shown], raw[raw_shown], s=12, color="tab:blue", alpha=0.35, linewidths=0, zorder=2,
               label="per step: tr(Σ)_step / |G|²_step")
    ax.plot(x, np.where(ema_shown, ema, np.nan), color="tab:blue", lw=2, zorder=3,
            marker="o" if len(estimates) <= 30 else None, ms=3, label="B_simple: EMA(tr Σ) / EMA(|G|²)")
    _set_log_limits(ax, np.concatenate([ema[ema_shown], raw[raw_shown]]))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.grid(alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple (examples, log scale)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    title = f"gradient noise scale B_simple over steps (last {_format(float(ema[-1]))})"
    notes = []
    if (~raw_shown).any():
        notes.append(f"{int((~raw_shown).sum())} per-step estimates ≤ 0 or not finite left out")
    if (~ema_shown).any():
        notes.append(f"{int((~ema_shown).sum())} EMA values ≤ 0 or not finite left out")
    ax.set_title(title + ("\n" + ", ".join(notes) if notes else ""))
    return _finish(fig, path)


def _lines_over_steps(
    steps: list[int], names: list[str], values: np.ndarray, present: np.ndarray, totals: np.ndarray,
    layers: Sequence[str] | str | None, log_axis: bool, source: str, ylabel: str, title: str, caller: str,
    path: str | os.PathLike | None, spikes: Sequence[tuple[int, int]] = (),
) -> Figure:
    """One line per chosen layer (values [steps, layers], present where recorded) and the total; NaN/Inf steps
    marked with red x at the top, ``spikes`` ((step index, column) pairs) with red triangles on the lines."""
    if layers is None:
        chosen = _largest_last(values, present, names, MAX_DEFAULT_LINES)
    else:
        chosen = [layers] if isinstance(layers, str) else list(layers)
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise ValueError(f"{caller}: unknown layer(s) {unknown} in {source}; known: {_some(names)}")
    column = {name: j for j, name in enumerate(names)}

    _require_matplotlib()
    fig, ax = _figure((10, 5))
    x = np.asarray(steps)
    marker = "o" if len(steps) <= 30 else None
    lines = [(name, values[:, column[name]], present[:, column[name]], {"marker": marker, "ms": 3, "lw": 1.3})
             for name in chosen]
    lines.append(("total", totals, np.ones(len(steps), dtype=bool),
                  {"color": "black", "ls": "--", "lw": 2, "marker": marker, "ms": 3}))
    if log_axis:
        ax.set_yscale("log")
    bad_steps = set()
    for label, y, recorded, style in lines:
        bad_steps.update(x[recorded & ~np.isfinite(y)].tolist())
        shown = np.where(np.isfinite(y) & ((y > 0) | (not log_axis)), y, np.nan)
        ax.plot(x, shown, label=label, **style)
    if log_axis:
        _set_log_limits(ax, np.concatenate([y for _, y, _, _ in lines]))
    shown_columns = {column[name] for name in chosen}
    marked = [(t, j) for t, j in spikes
              if j in shown_columns and np.isfinite(values[t, j]) and values[t, j] > 0]
    if marked:
        ax.scatter(x[[t for t, _ in marked]], [values[t, j] for t, j in marked], marker="^", s=60,
                   color=NONFINITE_COLOR, zorder=6, label="update_spike")
    bad_x = np.array(sorted(bad_steps))
    if bad_x.size:
        ax.scatter(bad_x, np.full(bad_x.size, 0.97), marker="x", s=50, color=NONFINITE_COLOR, zorder=5,
                   transform=ax.get_xaxis_transform(), clip_on=False, label="NaN/Inf")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.grid(alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel + (" (log scale)" if log_axis else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    shown = _layers(len(names)) if len(chosen) == len(names) else f"{len(chosen)} of {_layers(len(names))}"
    ax.set_title(f"{title} over steps ({shown} and the total)")
    return _finish(fig, path)


def split_heatmap(
    records_or_stats: Sequence[StepRecord] | Sequence[LayerStats] | LayerStats,
    name: str,
    field: str = "l2",
    kind: str = "grad",
    path: str | os.PathLike | None = None,
) -> Figure:
    r"""Heatmap of one split layer's per-part statistic over steps: x = step, y = part (expert), colour =
    ``stats[kind].group(name).<field>``.

    ``records_or_stats``: StepRecords (their ``stats[kind]``, at ``record.step``; records without ``kind``
    are skipped) or statistics (at steps 0, 1, ...) computed with ``split=``. ``name``: the split layer, or a
    regular expression that finds exactly one (as :meth:`~fastgradstats.results.LayerStats.group`).
    Non-negative fields (l2, linf, std, dist, ...) get a log colour scale, with zeros left uncoloured (light
    grey: a dead part); signed fields (mean, cos, ...) a linear one. NaN/Inf cells are left uncoloured and
    marked with a red x. Raises ValueError for no statistics, an unknown field or a number of parts that
    changes between steps, KeyError when ``name`` is not one split layer.

    Example::

        monitor = fgs.Monitor(model, split={r"experts\.w\d": 64})
        ...
        plots.split_heatmap(monitor.history, r"layers\.0\.experts\.w1", path="experts.png")
    """
    steps, all_stats = _stats_over_steps(records_or_stats, kind, "split_heatmap", stats_type=LayerStats)
    if field not in all_stats[0].FIELDS:
        raise ValueError(f"split_heatmap: stats[{kind!r}] has no field {field!r}; "
                         f"choose one of {all_stats[0].FIELDS}")
    columns = []
    for step, stats in zip(steps, all_stats):
        values = _host(getattr(stats.cpu().group(name), field))
        if columns and values.size != columns[0].size:
            raise ValueError(f"split_heatmap: '{name}' has {values.size} parts at step {step} but "
                             f"{columns[0].size} at step {steps[0]}")
        columns.append(values)
    values = np.stack(columns, axis=1)  # [parts, steps]
    log_scale = field in NONNEGATIVE_FIELDS
    nonfinite = ~np.isfinite(values)
    hidden = nonfinite | (values <= 0) if log_scale else nonfinite
    shown = np.ma.masked_where(hidden, values)

    _require_matplotlib()
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import MaxNLocator

    parts = values.shape[0]
    fig, ax = _figure((9, float(np.clip(2.5 + 0.12 * parts, 4, 12))))
    visible = values[~hidden]
    low, high = (float(visible.min()), float(visible.max())) if visible.size else (1.0, 1.0)
    if log_scale:
        norm = LogNorm(low, max(high, low * 1.0001))
    else:
        norm = Normalize(low, high if high > low else low + 1)
    mesh = ax.pcolormesh(_step_edges(np.asarray(steps, dtype=np.float64)), np.arange(parts + 1) - 0.5, shown,
                         norm=norm, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label=f"{kind} {field}" + (" (log scale)" if log_scale else ""))
    ax.set_facecolor("whitesmoke")
    bad_parts, bad_steps = np.nonzero(nonfinite)
    if bad_parts.size:
        ax.scatter(np.asarray(steps)[bad_steps], bad_parts, marker="x", s=40, color=NONFINITE_COLOR, zorder=5)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.set_ylim(parts - 0.5, -0.5)  # part 0 at the top
    ax.set_xlabel("step")
    ax.set_ylabel("part (expert)")
    layer = all_stats[0].group(name).names[0].rsplit("[", 1)[0]
    title = f"{kind} {field} of the {parts} parts of '{layer}' over {len(steps)} steps"
    notes = []
    if log_scale and (values == 0).any():
        notes.append("grey: zero")
    if bad_parts.size:
        notes.append(f"red x: NaN/Inf ({bad_parts.size} cells)")
    ax.set_title(title + ("\n" + ", ".join(notes) if notes else ""))
    return _finish(fig, path)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        message = 'fastgradstats.plots needs matplotlib: pip install "fastgradstats[plots]"'
        raise ImportError(message) from error


def _figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    """A Figure on its own Agg canvas (no pyplot), with constrained layout and one Axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _host(t: torch.Tensor) -> np.ndarray:
    """A statistic (a field of ``stats.cpu()``, or one device tensor: one copy) as a float64 numpy array of at
    least one dimension (0-d totals become [1])."""
    return t.detach().cpu().to(torch.float64).reshape(-1).numpy()


def _total(stats: LayerStats) -> LayerStats:
    try:
        return stats.total
    except AttributeError:  # already a total
        return stats


def _set_log_limits(ax: Axes, values: np.ndarray) -> None:
    """y limits of a log axis around the finite positive values, with room above for markers."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        ax.set_ylim(1e-8, 1.0)
        return
    low, high = math.log10(positive.min()), math.log10(positive.max())
    ax.set_ylim(10 ** (low - 0.5), 10 ** (high + max(0.6, 0.12 * (high - low))))


def _format(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _stats_over_steps(
    items, kind: str, caller: str, records_only: bool = False, stats_type: type = TensorStats
) -> tuple[list[int], list[LayerStats]]:
    """(steps, stats) from StepRecords (``record.stats[kind]``) or ``stats_type`` items (steps 0, 1, ...)."""
    if isinstance(items, (LayerStats, StepRecord)):
        items = [items]
    items = list(items)
    if not items:
        raise ValueError(f"{caller}: no records to plot (empty sequence)")
    if all(isinstance(item, StepRecord) for item in items):
        pairs = [(record.step, record.stats[kind]) for record in items if kind in record.stats]
        if not pairs:
            recorded = sorted({k for record in items for k in record.stats})
            raise ValueError(f"{caller}: no record has stats[{kind!r}] (recorded kinds: {recorded})")
        steps, stats = zip(*pairs)
        return list(steps), list(stats)
    if not records_only and all(isinstance(item, stats_type) for item in items):
        return list(range(len(items))), items
    expected = "StepRecords" if records_only else f"StepRecords or {stats_type.__name__}"
    found = sorted({type(item).__name__ for item in items})
    raise TypeError(f"{caller}: expected a sequence of {expected}, got items of type {found}")


def _layer_hist(stats: TensorStats, layer: str, step: int) -> tuple[np.ndarray, HistSpec | None, float]:
    """Histogram counts, spec and NaN/Inf count of ``layer`` (or of the total, for "total") at one step, from
    host statistics."""
    if stats.hist is None:
        raise ValueError(f"log2_heatmap: the statistics at step {step} have no histogram "
                         "(record with hist='log2')")
    if layer in stats.names:
        i = stats.names.index(layer)
        hist = stats.hist[i] if stats.hist.dim() == 2 else stats.hist
        return _host(hist), stats.spec, _host(stats.nonfinite)[i]
    if layer == "total":
        total = _total(stats)
        if total.hist is None:
            raise ValueError(f"log2_heatmap: the total at step {step} has no histogram")
        return _host(total.hist), total.spec, _host(total.nonfinite)[0]
    raise ValueError(f"log2_heatmap: unknown layer {layer!r} at step {step}; known: {_some(stats.names)}")


def _log2_exponents(spec: HistSpec | None, layer: str, step: int) -> np.ndarray:
    """The integer exponents e of the bins [2^e, 2^(e+1)) of a log2 ``spec``, or ValueError for another
    kind."""
    if spec is None or spec.kind != "log2":
        kind = "no" if spec is None else f"a {spec.kind}"
        raise ValueError(f"log2_heatmap: the histogram of '{layer}' at step {step} is {kind} histogram, "
                         "not a log2 histogram; record with hist='log2'")
    return np.arange(spec.min_exp, spec.max_exp + 1, dtype=np.int64)


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step: midpoints between steps, half a gap beyond the ends."""
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def _largest_last(values: np.ndarray, present: np.ndarray, names: list[str], count: int) -> list[str]:
    """All names if there are at most ``count``, else the ``count`` with the largest last recorded value
    (NaN/Inf ranks highest), in name order."""
    if len(names) <= count:
        return names
    last = np.empty(len(names))
    for j in range(len(names)):
        value = values[np.flatnonzero(present[:, j])[-1], j]
        last[j] = value if np.isfinite(value) else np.inf
    top = set(np.argsort(-last, kind="stable")[:count].tolist())
    return [name for j, name in enumerate(names) if j in top]


def _layers(count: int) -> str:
    return f"{int(count)} layer" + ("" if count == 1 else "s")


def _some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
