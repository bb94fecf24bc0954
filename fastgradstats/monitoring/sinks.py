"""Where Monitor writes its records: JSON lines, TensorBoard, Weights & Biases.

    monitor = fgs.Monitor(model, track=("grad", "update"),
                          sinks=[fgs.sinks.JSONL("runs/stats.jsonl"), fgs.sinks.TensorBoard("runs/tb")])

A sink is any object with ``write(record)`` and ``close()``; Monitor calls ``write`` on every tracked step and
``close`` from ``Monitor.close()``. Writing a record syncs with the device once per tracked kind.

TensorBoard and Weights & Biases get the same flat scalar names, ``{kind}/{field}/{layer}`` and
``{kind}/{field}/total``, with the fields of :data:`SCALAR_FIELDS` (the update ratio per layer is
``update/ratio/{layer}``); ``optim/{field}/{key}/{layer}`` for optimizer statistics
(:data:`OPTIM_SCALAR_FIELDS`); ``alerts/{kind}`` counts the alerts of each kind (``update_spike`` included)
when alerts are tracked; histograms are ``{kind}/hist/{layer}`` and ``{kind}/hist/total``.

Split layers (``split=``, MoE experts) with more than ``summarize_splits`` parts (default 16; True: every
split layer, False: none) are written as their :meth:`~fastgradstats.results.LayerStats.split_summary`
instead of one entry per part, so the number of keys stays capped: the parts leave ``layers`` (with their
histograms) and ``{kind}/{field}/{layer}/...`` carries the summary, ranked by ``l2`` (grad, param) or
``dist`` (update, grad_cos, init): ``cv``, ``dead``, ``nonfinite``, ``smallest/{i}`` and ``largest/{i}``
(the i-th smallest / largest value, i < k) with ``smallest/{i}/part`` and ``largest/{i}/part`` (that part's
index: the part is ``{layer}[{index}]``). JSONL writes the same summaries under ``{kind}["splits"]``.

Gradient noise scale estimates (``GradientNoiseScale.step()`` results) go to the same sinks with
:func:`log_noise_scale`: JSONL writes ``{"step": s, "gns": estimate.to_dict()}`` as one line, TensorBoard and
Weights & Biases the scalars ``gns/{field}`` (b_simple, g2, trace, g2_step, trace_step) and
``gns/{field}/{layer}`` (b_simple, g2, trace), see :func:`noise_scale_scalars`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..results import SUMMARIZE_SPLITS, splits_to_summarize
from .alerts import KINDS as ALERT_KINDS

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from ..gns import NoiseScale
    from .monitor import StepRecord

INSTALL_HINT = 'pip install "fastgradstats[all]"'

SCALAR_FIELDS: dict[str, tuple[str, ...]] = {
    "grad": ("l2", "linf", "mean", "std", "nonfinite", "zeros"),
    "param": ("l2", "std"),
    "update": ("dist", "ratio"),
    "grad_cos": ("cos", "dist"),
    "init": ("cos", "dist"),
}
"""The per-layer and total fields each tracked kind contributes as scalars (``ratio`` is ‖Δθ‖ / ‖θ‖)."""
OPTIM_SCALAR_FIELDS = ("l2", "linf", "ratio")
"""The fields of ``record.stats["optim"]`` (OptimizerStats) written as ``optim/{field}/{key}/{layer}`` and
``optim/{field}/{key}/total`` for each state key and ``update`` (``ratio``: the update's
‖Δθ‖ / ‖θ_before‖)."""
NOISE_SCALE_FIELDS = ("b_simple", "g2", "trace", "g2_step", "trace_step")
"""The global fields of a NoiseScale written as ``gns/{field}``; the per-layer b_simple, g2 and trace are
``gns/{field}/{layer}``."""


class JSONL:
    """Appends one JSON object per record to ``path`` (``record.to_dict()``, one line each).

    Parent directories are created. Each line is serialized in full, then written with one write and flushed,
    so a record that fails to serialize leaves nothing behind. Non-finite values are written as Python's
    ``json`` writes them (``NaN``, ``Infinity``, ``-Infinity``): ``json.loads`` reads them back, strict JSON
    parsers (``jq``, JavaScript's ``JSON.parse``) do not.

    Split layers with more than ``summarize_splits`` parts are written as ``{kind}["splits"][layer]``, the
    layer's ``split_summary(k)``, and their parts left out of ``{kind}["layers"]`` (see the module docstring).

    Raises OSError naming ``path`` when the file cannot be opened (at construction) or written.

        sink = fgs.sinks.JSONL("runs/stats.jsonl")
        [json.loads(line) for line in open("runs/stats.jsonl")]  # [{"step": 1, "grad": {...}, "alerts": []}]
    """

    def __init__(self, path: str | os.PathLike, summarize_splits: bool | int = SUMMARIZE_SPLITS,
                 k: int = 3) -> None:
        _check_summary_args(summarize_splits, k, "JSONL sink")
        self.summarize_splits, self.k = summarize_splits, k
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as error:
            raise _path_error(self.path, error) from error
        self.closed = False

    def write(self, record: StepRecord) -> None:
        """Append ``record`` as one line (syncs with the device)."""
        if self.closed:
            raise RuntimeError(f"JSONL sink: write() after close() ({self.path})")
        data = _summarize_splits(record.to_dict(), record, self.summarize_splits, self.k)
        self._write_line(data)

    def write_noise_scale(self, step: int, estimate: NoiseScale, layers: bool = True) -> None:
        """Append ``{"step": step, "gns": estimate.to_dict()}`` as one line (one sync); without ``layers``
        the per-layer dict is left out."""
        if self.closed:
            raise RuntimeError(f"JSONL sink: write_noise_scale() after close() ({self.path})")
        data = estimate.to_dict()
        if not layers:
            del data["layers"]
        self._write_line({"step": step, "gns": data})

    def _write_line(self, data: dict) -> None:
        line = json.dumps(data) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as error:
            raise _path_error(self.path, error) from error

    def close(self) -> None:
        """Close the file. Idempotent."""
        self.closed = True
        self._file.close()


class TensorBoard:
    """Logs scalars, histograms and alert counts of each record to TensorBoard at ``global_step=record.step``.

    Args:
        log_dir_or_writer: a directory (a ``SummaryWriter`` is created there and closed by ``close()``) or an
            existing ``torch.utils.tensorboard.SummaryWriter`` (``close()`` only flushes it).
        summarize_splits, k: split layers written as summaries (see the module docstring).

    Histograms go through ``add_histogram_raw`` from our own counts and edges, without recomputation:
    bucket_limits are the upper edges of the buckets from the first to the last non-empty one, min and max
    the outer edges of that span, num the counted values, sum and sum_squares the layer's Σx and l2². Log2
    histograms are of |x| with power-of-two buckets on TensorBoard's linear axis. Layers whose histogram
    counted nothing are skipped.

        sink = fgs.sinks.TensorBoard("runs/tb")  # tags "grad/l2/0.weight", "grad/hist/0.weight", ...
    """

    def __init__(self, log_dir_or_writer: str | os.PathLike | SummaryWriter,
                 summarize_splits: bool | int = SUMMARIZE_SPLITS, k: int = 3) -> None:
        _check_summary_args(summarize_splits, k, "TensorBoard sink")
        self.summarize_splits, self.k = summarize_splits, k
        if isinstance(log_dir_or_writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    f"TensorBoard sink needs the tensorboard package: {INSTALL_HINT}"
                ) from error
            self.writer = SummaryWriter(log_dir=os.fspath(log_dir_or_writer))
            self.owns_writer = True
        else:
            needed = ("add_scalar", "add_histogram_raw", "flush")
            if not all(callable(getattr(log_dir_or_writer, name, None)) for name in needed):
                raise TypeError(
                    "TensorBoard sink: expected a log directory or a SummaryWriter, "
                    f"got {log_dir_or_writer!r}"
                )
            self.writer = log_dir_or_writer
            self.owns_writer = False
        self.closed = False

    def write(self, record: StepRecord) -> None:
        """Add the scalars, histograms and alert counts of ``record`` (syncs with the device)."""
        if self.closed:
            raise RuntimeError("TensorBoard sink: write() after close()")
        data = _plain(record, self.summarize_splits, self.k)
        for tag, value in scalars(record, data).items():
            self.writer.add_scalar(tag, value, global_step=record.step)
        for hist in _histograms(data):
            self.writer.add_histogram_raw(
                hist.tag,
                min=hist.edges[0],
                max=hist.edges[-1],
                num=sum(hist.counts),
                sum=hist.sum,
                sum_squares=hist.sum_squares,
                bucket_limits=hist.edges[1:],
                bucket_counts=hist.counts,
                global_step=record.step,
            )

    def write_noise_scale(self, step: int, estimate: NoiseScale, layers: bool = True) -> None:
        """Add :func:`noise_scale_scalars` of ``estimate`` at ``global_step=step`` (one sync)."""
        if self.closed:
            raise RuntimeError("TensorBoard sink: write_noise_scale() after close()")
        for tag, value in noise_scale_scalars(estimate, layers).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        """Close the writer this sink created, or flush the one it was given. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.owns_writer:
            self.writer.close()
        else:
            self.writer.flush()


class Wandb:
    """Logs each record to a Weights & Biases run as one flat dict at ``step=record.step``.

    Args:
        run: the run to log to; default the active ``wandb.run`` (RuntimeError when there is none).
        summarize_splits, k: split layers written as summaries (see the module docstring).

    Keys are those of the TensorBoard sink; histograms are ``wandb.Histogram(np_histogram=(counts, edges))``
    over the non-empty span of our buckets. The row is left open (no commit), so metrics you log at the same
    step join it; W&B drops rows logged at a step lower than the run's current one, so log your own metrics
    against the same step count as the Monitor's. ``close()`` does not finish the run (the sink never owns
    one).

        wandb.init(project="my-model")
        sink = fgs.sinks.Wandb()
    """

    def __init__(self, run: Any = None, summarize_splits: bool | int = SUMMARIZE_SPLITS, k: int = 3) -> None:
        _check_summary_args(summarize_splits, k, "Wandb sink")
        self.summarize_splits, self.k = summarize_splits, k
        try:
            import wandb
        except ImportError as error:
            raise ImportError(f"Wandb sink needs the wandb package: {INSTALL_HINT}") from error
        run = wandb.run if run is None else run
        if run is None:
            raise RuntimeError("Wandb sink: no active wandb run; call wandb.init(...) first or pass run=...")
        self.run = run
        self._histogram = wandb.Histogram
        self.closed = False

    def write(self, record: StepRecord) -> None:
        """Log the scalars, histograms and alert counts of ``record`` (syncs with the device)."""
        if self.closed:
            raise RuntimeError("Wandb sink: write() after close()")
        data = _plain(record, self.summarize_splits, self.k)
        payload: dict[str, Any] = dict(scalars(record, data))
        for hist in _histograms(data):
            payload[hist.tag] = self._histogram(np_histogram=(hist.counts, hist.edges))
        self.run.log(payload, step=record.step)

    def write_noise_scale(self, step: int, estimate: NoiseScale, layers: bool = True) -> None:
        """Log :func:`noise_scale_scalars` of ``estimate`` at ``step`` (one sync; the row is left open like
        ``write``'s, so a Monitor record of the same step joins it)."""
        if self.closed:
            raise RuntimeError("Wandb sink: write_noise_scale() after close()")
        self.run.log(noise_scale_scalars(estimate, layers), step=step)

    def close(self) -> None:
        """Stop writing; the run stays open for its owner to finish."""
        self.closed = True


def scalars(record: StepRecord, data: dict | None = None, summarize_splits: bool | int = SUMMARIZE_SPLITS,
            k: int = 3) -> dict[str, float]:
    """The flat scalars of ``record`` that TensorBoard and Wandb log (syncs unless ``data`` is given).

    ``{kind}/{field}/{layer}`` and ``{kind}/{field}/total`` for the fields of :data:`SCALAR_FIELDS`, the
    summary keys of split layers with more than ``summarize_splits`` parts (see the module docstring), and
    ``alerts/{kind}`` (the number of alerts of each kind) when alerts are tracked. ``data`` is what the sinks
    build from ``record.to_dict()`` (update's total ratio and split summaries added), when the caller already
    has it.

        scalars(record)["grad/l2/total"]  # the global gradient norm
    """
    data = _plain(record, summarize_splits, k) if data is None else data
    values: dict[str, float] = {}
    for kind, fields in SCALAR_FIELDS.items():
        if kind not in data:
            continue
        layers = {**data[kind]["layers"], "total": data[kind]["total"]}
        for field in fields:
            for layer, stats in layers.items():
                values[f"{kind}/{field}/{layer}"] = stats[field]
        for layer, summary in data[kind].get("splits", {}).items():
            values.update(_summary_scalars(f"{kind}/{summary['field']}/{layer}", summary))
    if "optim" in data:
        values.update(_optim_scalars(data["optim"]))
    if record.alert_flags is not None:
        kinds = [alert["kind"] for alert in data["alerts"]]
        values.update({f"alerts/{kind}": kinds.count(kind) for kind in ALERT_KINDS})
    return values


def log_noise_scale(sinks: Any, step: int, estimate: NoiseScale, layers: bool = True) -> None:
    """Write a gradient noise scale estimate (``GradientNoiseScale.step()``'s result) to one sink or a list of
    them at ``step``: JSONL appends ``{"step": step, "gns": estimate.to_dict()}`` as one line, TensorBoard and
    Wandb log :func:`noise_scale_scalars` (``layers``: with the per-layer values). Any sink with a
    ``write_noise_scale(step, estimate, layers)`` method is accepted; TypeError names one without it (before
    anything is written). Syncs once per sink.

        sinks = [fgs.sinks.JSONL("runs/gns.jsonl"), fgs.sinks.TensorBoard("runs/tb")]
        fgs.sinks.log_noise_scale(sinks, step, gns.step())  # TensorBoard tags gns/b_simple, gns/g2, ...
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"log_noise_scale: step must be an int, got {step!r}")
    sinks = list(sinks) if isinstance(sinks, (list, tuple)) else [sinks]
    for sink in sinks:
        if not callable(getattr(sink, "write_noise_scale", None)):
            raise TypeError(f"log_noise_scale: {type(sink).__name__} has no write_noise_scale(step, "
                            "estimate, layers); use JSONL, TensorBoard or Wandb, or give your sink one")
    for sink in sinks:
        sink.write_noise_scale(step, estimate, layers)


def noise_scale_scalars(estimate: NoiseScale, layers: bool = True,
                        data: dict | None = None) -> dict[str, float]:
    """The flat scalars of a NoiseScale that TensorBoard and Wandb log (syncs unless ``data``, its
    ``to_dict()``, is given): ``gns/{field}`` for :data:`NOISE_SCALE_FIELDS` and, with ``layers``,
    ``gns/{field}/{layer}`` for b_simple, g2 and trace.

        noise_scale_scalars(gns.step())["gns/b_simple"]  # the EMA noise scale
    """
    data = estimate.to_dict() if data is None else data
    values = {f"gns/{field}": data[field] for field in NOISE_SCALE_FIELDS}
    if layers:
        for layer, fields in data["layers"].items():
            values.update({f"gns/{field}/{layer}": value for field, value in fields.items()})
    return values


def _optim_scalars(optim: dict) -> dict[str, float]:
    """``optim/{field}/{key}/{layer}`` and ``optim/{field}/{key}/total`` of an OptimizerStats' ``to_dict()``
    (its layers are named ``{key}/{layer}``)."""
    values = {}
    entries = [*optim["layers"].items(), *((f"{key}/total", total) for key, total in optim["totals"].items())]
    for name, stats in entries:
        key, layer = name.split("/", 1)
        values.update({f"optim/{field}/{key}/{layer}": stats[field] for field in OPTIM_SCALAR_FIELDS
                       if field in stats})
    return values


def _summary_scalars(prefix: str, summary: dict) -> dict[str, float]:
    """One split layer's summary as flat scalars under ``prefix`` (part names as their indices)."""
    values = {f"{prefix}/{key}": summary[key] for key in ("cv", "dead", "nonfinite")}
    for end in ("smallest", "largest"):
        for i, entry in enumerate(summary[end]):
            values[f"{prefix}/{end}/{i}"] = entry["value"]
            values[f"{prefix}/{end}/{i}/part"] = entry["part"]
    return values


@dataclass
class _Histogram:
    """One layer's histogram over its non-empty span: counts [n], edges [n + 1], and the layer's Σx, Σx²."""

    tag: str
    counts: list[int]
    edges: list[float]
    sum: float
    sum_squares: float


def _plain(record: StepRecord, summarize_splits: bool | int, k: int) -> dict:
    """``record.to_dict()`` plus the update's total ratio ‖Δθ‖ / ‖θ‖ over all layers, with split layers of
    more than ``summarize_splits`` parts summarised."""
    data = record.to_dict()
    if "update" in record.stats:
        total = record.stats["update"].total
        data["update"]["total"]["ratio"] = (total.dist / total.a_l2).item()
    return _summarize_splits(data, record, summarize_splits, k)


def _summarize_splits(data: dict, record: StepRecord, summarize_splits: bool | int, k: int) -> dict:
    """``data`` (a ``record.to_dict()``) with the parts of each split layer that ``summarize_splits`` selects
    left out of ``data[kind]["layers"]`` and its ``split_summary(k)`` in ``data[kind]["splits"]``."""
    for kind, stats in record.stats.items():
        chosen = splits_to_summarize(stats.splits, summarize_splits, "sink")
        if not chosen:
            continue
        summaries = stats.split_summary(k, layers=chosen)
        layers = data[kind]["layers"]
        for name in chosen:
            for row in stats.splits[name]:
                del layers[stats.names[row]]
        data[kind]["splits"] = summaries
    return data


def _check_summary_args(summarize_splits: bool | int, k: int, caller: str) -> None:
    splits_to_summarize({}, summarize_splits, caller)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{caller}: k must be an int >= 1, got {k!r}")


def _histograms(data: dict) -> Iterator[_Histogram]:
    """The non-empty histograms of every layer and total in ``data`` (a ``record.to_dict()``)."""
    for kind, kind_data in data.items():
        if not isinstance(kind_data, dict):
            continue
        layers = {**kind_data["layers"], "total": kind_data["total"]}
        for layer, stats in layers.items():
            if stats is None or "hist" not in stats:
                continue
            counts, edges = stats["hist"], stats["hist_edges"]
            filled = [i for i, count in enumerate(counts) if count > 0]
            if not filled:
                continue
            first, last = filled[0], filled[-1]
            yield _Histogram(f"{kind}/hist/{layer}", counts[first:last + 1], edges[first:last + 2],
                             stats["sum"], stats["l2"] ** 2)


def _path_error(path: Path, error: OSError) -> OSError:
    """``error`` again (same errno, so the same OSError subclass), with a message that names ``path``."""
    message = f"JSONL sink: cannot write {path}: {error.strerror or error}"
    return OSError(error.errno, message) if error.errno is not None else OSError(message)
