"""Where Monitor writes its records: JSON lines, TensorBoard, Weights & Biases.

    monitor = fgs.Monitor(model, track=("grad", "update"),
                          sinks=[fgs.sinks.JSONL("runs/stats.jsonl"), fgs.sinks.TensorBoard("runs/tb")])

A sink is any object with ``write(record)`` and ``close()``; Monitor calls ``write`` on every tracked step and
``close`` from ``Monitor.close()``. Every sink reads the one host snapshot of a record, ``record.to_dict()``
(copied from the device once and shared by all sinks), and computes no statistic itself, so JSONL,
TensorBoard and W&B carry the same numbers. ``close()`` flushes and releases the file or writer; a later
``write`` opens it again and appends, as hosts expect of their loggers (Lightning closes them at the end of
each ``fit`` and writes to them again in the next one).

Tags (TensorBoard) and keys (W&B) are the same. Both tools group charts by the tag's first path component,
so that component is chosen to hold one small, related set of charts:

    {kind}/{field}                  the whole model: grad/l2 (the global gradient norm), update/ratio
    {kind}/hist                     the whole model's histogram
    alerts/{alert}, alerts/count    how many alerts of each kind fired, and of all kinds
    {kind}.{field}.{block}/{rest}   a layer in a numbered block: grad.l2.transformer.h.3/attn.c_attn.weight
    {kind}.{field}/{layer}          a layer outside numbered blocks: grad.l2/transformer.wte.weight
    {kind}.hist.{block}/{rest}      a layer's histogram (hist in place of the field; also outside blocks)

A layer's block is its name up to the first component that is a number (``transformer.h.3``,
``model.layers.0``, ``0`` in an ``nn.Sequential``), ``rest`` what follows. So each category holds one
statistic of one block (the 12 parameters of a GPT-2 block; the 4 outside blocks share ``grad.l2``), and the
whole-model values of a kind sit in one short category. Tags cannot collide: a layer's first component always
carries ``.{field}``, a whole-model one never does, so a parameter named ``total`` is ``grad.l2/total``, apart
from ``grad/l2``. Kinds are ``grad``, ``param``, ``update``, ``grad_cos``, ``init`` (fields
:data:`SCALAR_FIELDS`; ``update/ratio`` is ‖Δθ‖ / ‖θ‖), and ``optim.{key}`` for each optimizer
state key and ``optim.update`` (:data:`OPTIM_SCALAR_FIELDS`): ``optim.exp_avg/l2``,
``optim.update.ratio.model.layers.0/mlp.w1.weight``.

Split layers (``split=``, MoE experts) with more than ``summarize_splits`` parts (default 16; True: every
split layer, False: none) are written as their :meth:`~fastgradstats.results.LayerStats.split_summary`
instead of one entry per part, so the number of keys stays capped: the parts leave ``layers`` (with their
histograms) and the split layer's tag for the ranking field, ``l2`` (grad, param) or ``dist`` (update,
grad_cos, init), carries the summary below it: ``{tag}/cv``, ``{tag}/dead``, ``{tag}/nonfinite``,
``{tag}/smallest/{i}`` and ``{tag}/largest/{i}`` (the i-th smallest / largest value, i < k) with
``.../{i}/part`` (that part's index: the part is ``{layer}[{index}]``). JSONL writes the same summaries under
``{kind}["splits"]``.

Gradient noise scale estimates (``GradientNoiseScale.step()`` results) go to the same sinks with
:func:`log_noise_scale`: JSONL writes ``{"step": s, "gns": estimate.to_dict()}`` as one line, TensorBoard and
Weights & Biases the scalars ``gns/{field}`` (b_simple, g2, trace, g2_step, trace_step) and the per-layer
b_simple, g2 and trace under the layer tags above (``gns.b_simple.{block}/{rest}``), see
:func:`noise_scale_scalars`.
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
    "grad": ("l2", "linf", "mean", "mean_abs", "std", "nonfinite", "zeros"),
    "param": ("l2", "std"),
    "update": ("dist", "ratio"),
    "grad_cos": ("cos", "dist", "ratio"),
    "init": ("cos", "dist", "ratio"),
}
"""The per-layer and whole-model fields each tracked kind contributes as scalars (``ratio`` is ‖a − b‖/‖b‖:
‖Δθ‖/‖θ_before‖ for update, the relative change of the gradient for grad_cos, ‖θ − θ₀‖/‖θ₀‖ for init)."""
OPTIM_SCALAR_FIELDS = ("l2", "linf", "ratio")
"""The fields of ``record.stats["optim"]`` (OptimizerStats) written for each state key and ``update`` as kind
``optim.{key}`` (``ratio``, of the update only: ‖Δθ‖ / ‖θ_before‖)."""
NOISE_SCALE_FIELDS = ("b_simple", "g2", "trace", "g2_step", "trace_step")
"""The global fields of a NoiseScale written as ``gns/{field}``; the per-layer b_simple, g2 and trace go under
layer tags (``gns.b_simple.{block}/{rest}``)."""


def layer_tag(kind: str, field: str, layer: str) -> str:
    """The tag (TensorBoard) and key (W&B) of one layer's ``field``: ``{kind}.{field}.{block}/{rest}`` for a
    layer inside a numbered block, ``{kind}.{field}/{layer}`` otherwise (see the module docstring).

        layer_tag("grad", "l2", "transformer.h.3.attn.weight")  # grad.l2.transformer.h.3/attn.weight
        layer_tag("grad", "l2", "lm_head.weight")               # grad.l2/lm_head.weight
    """
    parts = layer.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return f"{kind}.{field}.{'.'.join(parts[:i + 1])}/{'.'.join(parts[i + 1:])}"
    return f"{kind}.{field}/{layer}"


def total_tag(kind: str, field: str) -> str:
    """The tag and key of a whole-model value: ``{kind}/{field}`` (``grad/l2``: the global gradient norm)."""
    return f"{kind}/{field}"


class JSONL:
    """Appends one JSON object per record to ``path``: ``record.to_dict()``, one line each.

    Parent directories are created. Each line is serialized in full, then written with one write and flushed,
    so a record that fails to serialize leaves nothing behind. Non-finite values are written as Python's
    ``json`` writes them (``NaN``, ``Infinity``, ``-Infinity``): ``json.loads`` reads them back, strict JSON
    parsers (``jq``, JavaScript's ``JSON.parse``) do not. ``close()`` closes the file; a later write opens it
    again (appending).

    Split layers with more than ``summarize_splits`` parts are written as ``{kind}["splits"][layer]``, the
    layer's ``split_summary(k)``, and their parts left out of ``{kind}["layers"]`` (see the module docstring).

    Raises OSError naming ``path`` when the file cannot be opened or written.

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
        except OSError as error:
            raise _path_error(self.path, error) from error
        self._file = None
        self._open()

    @property
    def closed(self) -> bool:
        """True between ``close()`` and the next write."""
        return self._file is None

    def write(self, record: StepRecord) -> None:
        """Append ``record`` as one line."""
        self._write_line(snapshot(record, self.summarize_splits, self.k))

    def write_noise_scale(self, step: int, estimate: NoiseScale, layers: bool = True) -> None:
        """Append ``{"step": step, "gns": estimate.to_dict()}`` as one line (one sync); without ``layers``
        the per-layer dict is left out."""
        data = estimate.to_dict()
        if not layers:
            del data["layers"]
        self._write_line({"step": step, "gns": data})

    def _open(self) -> None:
        try:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as error:
            raise _path_error(self.path, error) from error

    def _write_line(self, data: dict) -> None:
        line = json.dumps(data) + "\n"
        if self._file is None:
            self._open()
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as error:
            raise _path_error(self.path, error) from error

    def close(self) -> None:
        """Close the file (a later write opens it again). Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoard:
    """Logs scalars, histograms and alert counts of each record to TensorBoard at ``global_step=record.step``,
    under the tags of the module docstring.

    Args:
        log_dir_or_writer: a directory (a ``SummaryWriter`` is created there, closed by ``close()`` and
            created again, as a new event file in the same directory, by a later write) or an existing
            ``torch.utils.tensorboard.SummaryWriter`` (``close()`` only flushes it).
        summarize_splits, k: split layers written as summaries (see the module docstring).

    Histograms go through ``add_histogram_raw`` from our own counts and edges, without recomputation:
    bucket_limits are the upper edges of the buckets from the first to the last non-empty one, min and max
    the outer edges of that span, num the counted values, sum and sum_squares those of the binned quantity
    (``hist_sum``, ``hist_sum_squares``: of |x| for log2 histograms, whose power-of-two buckets are of |x| on
    TensorBoard's linear axis). Layers whose histogram counted nothing are skipped.

        sink = fgs.sinks.TensorBoard("runs/tb")  # tags grad/l2, grad.l2.0/weight, grad.hist.0/weight, ...
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
            self.log_dir = os.fspath(log_dir_or_writer)
            self._new_writer = SummaryWriter
            self.writer = SummaryWriter(log_dir=self.log_dir)
        else:
            needed = ("add_scalar", "add_histogram_raw", "flush")
            if not all(callable(getattr(log_dir_or_writer, name, None)) for name in needed):
                raise TypeError(
                    "TensorBoard sink: expected a log directory or a SummaryWriter, "
                    f"got {log_dir_or_writer!r}"
                )
            self.log_dir = None
            self.writer = log_dir_or_writer
        self.owns_writer = self.log_dir is not None
        self.closed = False

    def write(self, record: StepRecord) -> None:
        """Add the scalars, histograms and alert counts of ``record``."""
        writer = self._open_writer()
        data = snapshot(record, self.summarize_splits, self.k)
        for tag, value in scalars(record, data).items():
            writer.add_scalar(tag, value, global_step=record.step)
        for hist in _histograms(data):
            writer.add_histogram_raw(
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
        writer = self._open_writer()
        for tag, value in noise_scale_scalars(estimate, layers).items():
            writer.add_scalar(tag, value, global_step=step)

    def _open_writer(self) -> SummaryWriter:
        if self.closed and self.owns_writer:
            self.writer = self._new_writer(log_dir=self.log_dir)
        self.closed = False
        return self.writer

    def close(self) -> None:
        """Close the writer this sink created (a later write creates a new one), or flush the one it was
        given. Idempotent."""
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

    Keys are the TensorBoard sink's tags; histograms are ``wandb.Histogram(np_histogram=(counts, edges))``
    over the non-empty span of our buckets. The row is left open (no commit), so metrics you log at the same
    step join it; W&B drops rows logged at a step lower than the run's current one, so log your own metrics
    against the same step count as the Monitor's. The sink never owns the run: ``close()`` leaves it open and
    later writes still log to it.

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

    def write(self, record: StepRecord) -> None:
        """Log the scalars, histograms and alert counts of ``record``."""
        data = snapshot(record, self.summarize_splits, self.k)
        payload: dict[str, Any] = dict(scalars(record, data))
        for hist in _histograms(data):
            payload[hist.tag] = self._histogram(np_histogram=(hist.counts, hist.edges))
        self.run.log(payload, step=record.step)

    def write_noise_scale(self, step: int, estimate: NoiseScale, layers: bool = True) -> None:
        """Log :func:`noise_scale_scalars` of ``estimate`` at ``step`` (one sync; the row is left open like
        ``write``'s, so a Monitor record of the same step joins it)."""
        self.run.log(noise_scale_scalars(estimate, layers), step=step)

    def close(self) -> None:
        """Nothing to release: the run belongs to its owner, who finishes it."""


def snapshot(record: StepRecord, summarize_splits: bool | int = SUMMARIZE_SPLITS, k: int = 3) -> dict:
    """What every sink writes of ``record``: ``record.to_dict()`` (the shared host snapshot, not modified),
    with the parts of each split layer that ``summarize_splits`` selects left out of ``{kind}["layers"]`` and
    the layer's ``split_summary(k)`` in ``{kind}["splits"]``."""
    data = record.to_dict()
    summarized = dict(data)
    for kind, stats in record.stats.items():
        chosen = splits_to_summarize(stats.splits, summarize_splits, "sink")
        if not chosen:
            continue
        parts = {stats.names[row] for name in chosen for row in stats.splits[name]}
        layers = {name: values for name, values in data[kind]["layers"].items() if name not in parts}
        summarized[kind] = {**data[kind], "layers": layers, "splits": stats.split_summary(k, layers=chosen)}
    return summarized


def scalars(record: StepRecord, data: dict | None = None, summarize_splits: bool | int = SUMMARIZE_SPLITS,
            k: int = 3, layers: bool = True) -> dict[str, float]:
    """The flat scalars of ``record`` that TensorBoard and Wandb log, under the tags of the module docstring.

    For the fields of :data:`SCALAR_FIELDS`: ``{kind}/{field}`` (whole model) and, with ``layers``, the layer
    tags (:func:`layer_tag`) and the summaries of split layers with more than ``summarize_splits`` parts;
    the same for optimizer statistics (:data:`OPTIM_SCALAR_FIELDS`); ``alerts/{alert}`` and ``alerts/count``
    when alerts are tracked. ``data`` is the record's :func:`snapshot`, when the caller already has it.

        scalars(record)["grad/l2"]                    # the global gradient norm
        scalars(record)["grad.l2.0/weight"]           # layer 0.weight's
    """
    data = snapshot(record, summarize_splits, k) if data is None else data
    values: dict[str, float] = {}
    for kind, fields in SCALAR_FIELDS.items():
        if kind in data:
            values.update(_kind_scalars(kind, fields, data[kind]["total"], data[kind]["layers"], layers))
            if layers:
                for layer, summary in data[kind].get("splits", {}).items():
                    values.update(_summary_scalars(layer_tag(kind, summary["field"], layer), summary))
    if "optim" in data:
        values.update(_optim_scalars(data["optim"], layers))
    if record.alert_flags is not None:
        kinds = [alert["kind"] for alert in data["alerts"]]
        values.update({f"alerts/{kind}": kinds.count(kind) for kind in ALERT_KINDS})
        values["alerts/count"] = data["alert_count"]
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
    ``to_dict()``, is given): ``gns/{field}`` for :data:`NOISE_SCALE_FIELDS` and, with ``layers``, the layer
    tags of b_simple, g2 and trace (``gns.b_simple.{block}/{rest}``, see :func:`layer_tag`).

        noise_scale_scalars(gns.step())["gns/b_simple"]  # the EMA noise scale
    """
    data = estimate.to_dict() if data is None else data
    values = {total_tag("gns", field): data[field] for field in NOISE_SCALE_FIELDS}
    if layers:
        for layer, fields in data["layers"].items():
            values.update({layer_tag("gns", field, layer): value for field, value in fields.items()})
    return values


def _kind_scalars(kind: str, fields: tuple[str, ...], total: dict, layers: dict[str, dict],
                  with_layers: bool) -> dict[str, float]:
    """The whole-model scalars of one kind and, ``with_layers``, those of each layer."""
    values = {total_tag(kind, field): total[field] for field in fields if field in total}
    if with_layers:
        for layer, stats in layers.items():
            values.update({layer_tag(kind, field, layer): stats[field] for field in fields if field in stats})
    return values


def _optim_scalars(optim: dict, layers: bool) -> dict[str, float]:
    """The scalars of an OptimizerStats' ``to_dict()`` (layers named ``{key}/{layer}``, a total per key), as
    kind ``optim.{key}``."""
    per_key: dict[str, dict[str, dict]] = {key: {} for key in optim["totals"]}
    for name, stats in optim["layers"].items():
        key, layer = name.split("/", 1)
        per_key[key][layer] = stats
    values = {}
    for key, key_layers in per_key.items():
        values.update(_kind_scalars(f"optim.{key}", OPTIM_SCALAR_FIELDS, optim["totals"][key], key_layers,
                                    layers))
    return values


def _summary_scalars(tag: str, summary: dict) -> dict[str, float]:
    """One split layer's summary as flat scalars below its layer ``tag`` (part names as their indices)."""
    values = {f"{tag}/{key}": summary[key] for key in ("cv", "dead", "nonfinite")}
    for end in ("smallest", "largest"):
        for i, entry in enumerate(summary[end]):
            values[f"{tag}/{end}/{i}"] = entry["value"]
            values[f"{tag}/{end}/{i}/part"] = entry["part"]
    return values


@dataclass
class _Histogram:
    """One layer's histogram over its non-empty span: counts [n], edges [n + 1], and the Σ and Σ of squares
    of the binned quantity."""

    tag: str
    counts: list[int]
    edges: list[float]
    sum: float
    sum_squares: float


def _check_summary_args(summarize_splits: bool | int, k: int, caller: str) -> None:
    splits_to_summarize({}, summarize_splits, caller)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{caller}: k must be an int >= 1, got {k!r}")


def _histograms(data: dict) -> Iterator[_Histogram]:
    """The non-empty histograms of every layer and whole model in ``data`` (a :func:`snapshot`)."""
    for kind in SCALAR_FIELDS:
        if kind not in data:
            continue
        entries = [(layer_tag(kind, "hist", layer), stats) for layer, stats in data[kind]["layers"].items()]
        entries.append((total_tag(kind, "hist"), data[kind]["total"]))
        for tag, stats in entries:
            if "hist" not in stats:
                continue
            counts, edges = stats["hist"], stats["hist_edges"]
            filled = [i for i, count in enumerate(counts) if count > 0]
            if not filled:
                continue
            first, last = filled[0], filled[-1]
            yield _Histogram(tag, counts[first:last + 1], edges[first:last + 2], stats["hist_sum"],
                             stats["hist_sum_squares"])


def _path_error(path: Path, error: OSError) -> OSError:
    """``error`` again (same errno, so the same OSError subclass), with a message that names ``path``."""
    message = f"JSONL sink: cannot write {path}: {error.strerror or error}"
    return OSError(error.errno, message) if error.errno is not None else OSError(message)
