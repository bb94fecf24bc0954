"""Monitor: per-layer gradient health every N steps, with alerts, history and logging sinks.

    monitor = fgs.Monitor(model, every=10, track=("grad", "update"), sinks=[fgs.sinks.JSONL("stats.jsonl")])
    monitor.attach(optimizer)          # or call monitor.step() after each backward, before optimizer.step()
    ...
    monitor.close()

What ``track`` can hold, and the memory each choice keeps (besides the statistics themselves):

* ``"grad"``: gradient statistics of the parameters that have a ``.grad`` (TensorStats). No copy.
* ``"param"``: statistics of the parameter values (TensorStats). No copy.
* ``"update"``: per layer ‖Δθ‖ and ‖Δθ‖/‖θ‖ of the optimizer step before a tracked step (PairStats of θ
  against θ one step earlier). Attached to torch.optim.Adam, AdamW or SGD (and without ``split``), θ one
  step earlier is rebuilt from the optimizer's state right after that step (:mod:`fastgradstats.optim`):
  no copy, and the layers are the parameters the optimizer has state for. Otherwise keeps a copy of the
  parameters from the step before each tracked step.
* ``"optim"``: :func:`~fastgradstats.optim.optimizer_stats` of the attached optimizer (OptimizerStats: its
  state tensors and the last update), taken right after the step before a tracked step. Needs ``attach``;
  no copy.
* ``"grad_cos"``: cosine (and distance) between this step's gradient and the last tracked one (PairStats).
  Keeps a copy of the gradients between tracked steps.
* ``"init"``: distance and cosine of the weights from those at the first step (PairStats). Keeps a copy of
  the initial parameters.

Alerts (``alerts=True``): the gradient alerts on "grad" and ``update_spike`` (a layer's ‖Δθ‖/‖θ‖ far above its
running mean, see :mod:`fastgradstats.monitoring.alerts`) on "update", either path.

Statistics stay on the device; alerts are device-side flags until read, so a step syncs with the host only
when a sink writes it or the caller reads ``record.alerts``. ``record.to_dict()`` copies everything the record
holds (every tracked kind, its histograms and the alerts) to the host in one device-to-host copy, once: the
sinks of a record share that copy.

Compiled training (``compiled=True``, "grad" and "param" only): the statistics are computed inside the
user's compiled step by :meth:`Monitor.compute` (custom ops, no graph break with ``fullgraph=True``), and
``monitor.step(stats=...)`` records them outside it: alerts, history and sinks, with one host copy::

    monitor = fgs.Monitor(model, every=10, sinks=[fgs.sinks.JSONL("stats.jsonl")], compiled=True)

    @torch.compile(fullgraph=True)   # with torch._dynamo.config.trace_autograd_ops = True
    def forward_backward(x, y, with_stats: bool):
        loss_fn(model(x), y).backward()
        return monitor.compute() if with_stats else None   # one graph per value of with_stats

    for x, y in loader:
        monitor.step(stats=forward_backward(x, y, monitor.next_tracked))
        optimizer.step()          # torch.optim breaks graphs on purpose: outside the compiled step
        optimizer.zero_grad()
"""

from __future__ import annotations

import collections
import functools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Self

import torch

from ..api import grad_stats, param_stats
from ..dispatch import resolve_backend
from ..hist import HistSpec
from ..optim import OptimizerStats, optimizer_stats, rebuilds_update, update_pair_stats
from ..pairs import pair_stats
from ..results import LayerStats, PairStats, TensorStats, host_snapshot
from ..split import Split, split_parts
from .alerts import Alert, AlertConfig, AlertFlags, AlertTracker

TRACK_CHOICES = ("grad", "param", "update", "grad_cos", "init", "optim")
COMPILED_TRACK_CHOICES = ("grad", "param")  # what Monitor.compute() can take inside a compiled step


@dataclass
class StepRecord:
    """What one tracked step produced: ``stats[kind]`` for each tracked kind that had data, and the alerts.

    stats["grad"], stats["param"]: TensorStats; stats["update"], stats["grad_cos"], stats["init"]: PairStats
    (a = now, b = the earlier tensors; ``ratio`` = ‖a - b‖ / ‖b‖); stats["optim"]: OptimizerStats. All
    tensors are on the model's device.
    """

    step: int
    stats: dict[str, LayerStats] = field(default_factory=dict)
    alert_flags: AlertFlags | None = None

    @functools.cached_property
    def alerts(self) -> list[Alert]:
        """The alerts of this step (reading them syncs with the device once; none after ``to_dict``)."""
        return [] if self.alert_flags is None else self.alert_flags.materialize()

    @functools.cached_property
    def alert_count(self) -> torch.Tensor | None:
        """int64 0-d tensor on the device: the number of alerts of this step (no sync); None when alerts are
        not computed."""
        return None if self.alert_flags is None else self.alert_flags.count()

    @property
    def update_ratio(self) -> torch.Tensor | None:
        """float32 [L] ‖Δθ‖ / ‖θ_before‖ per layer (the update-to-weight ratio, ``stats["update"].ratio``),
        when "update" was recorded."""
        update = self.stats.get("update")
        return None if update is None else update.ratio

    def to_dict(self) -> dict:
        """Plain Python values: ``{"step", kind: stats.to_dict() for each kind, "alerts": [alert fields],
        "alert_count": len(alerts), or None when alerts are not computed}``.

        The first call copies every tensor of the record (each kind's fields, totals, histograms and edges,
        and the alerts' flags and values) to the host in one device-to-host copy (:func:`host_snapshot`) and
        keeps the host copies; each call builds a new dict from them, so sinks writing the same record share
        one copy and may each edit the dict they get.
        """
        self._copy_to_host()
        result: dict = {"step": self.step}
        for kind, stats in self.stats.items():
            result[kind] = stats.to_dict()
        result["alerts"] = [dict(alert.__dict__) for alert in self.alerts]
        result["alert_count"] = None if self.alert_flags is None else len(self.alerts)
        return result

    def _copy_to_host(self) -> None:
        """One host snapshot of every result not yet on the host (their ``cpu()`` twins) and of the alerts
        not yet materialized; nothing when all are."""
        owners = [stats for stats in self._results() if stats._host_twin is None]
        values = [stats._snapshot_values() for stats in owners]
        materialized = self.alert_flags is None or "alerts" in self.__dict__
        alert_tensors = [] if materialized else self.alert_flags.tensors()
        host = iter(host_snapshot([t for owned in values for t in owned.values()] + alert_tensors))
        for stats, owned in zip(owners, values):
            stats._adopt_host({key: next(host) for key in owned})
        if alert_tensors:
            self.__dict__["alerts"] = self.alert_flags.materialize(list(host))

    def _results(self) -> list[LayerStats]:
        """Every TensorStats and PairStats of the record, once each (those inside OptimizerStats included:
        its update pairs may also be stats["update"])."""
        results: dict[int, LayerStats] = {}
        for stats in self.stats.values():
            inner = [stats]
            if isinstance(stats, OptimizerStats):
                inner = [*stats.states.values()]
                if stats.has_update:
                    inner += [stats.update, stats.update_pairs]
            results.update((id(result), result) for result in inner if result is not None)
        return list(results.values())


class Monitor:
    """Tracks a model's gradient (and weight) statistics every ``every`` steps; see the module docstring.

    Args:
        model: the nn.Module to watch (it must have parameters).
        every: track steps 1, 1 + every, 1 + 2·every, ... (counting calls of ``step()``).
        hist: histogram of the grad/param statistics: "log2" (default), "linear" or None.
        track: any of "grad", "param", "update", "grad_cos", "init", "optim".
        sinks: a list of objects with ``write(record)`` and ``close()`` (see
            :mod:`fastgradstats.monitoring.sinks`).
        alerts: compute the alerts: the gradient alerts need "grad", ``update_spike`` needs "update";
            ``alert_config`` sets their thresholds.
        history: how many records ``monitor.history`` keeps (the oldest are dropped).
        backend: statistics backend, as in ``tensor_stats``.
        split: statistics per slice (MoE experts, heads) of every tracked kind, as in ``tensor_stats``:
            ``{regex: parts}`` or ``(name, tensor) -> parts | None``.
        compiled: the statistics are computed by :meth:`compute` inside the user's compiled step and
            handed to :meth:`step` (``stats=``); ``track`` may then hold "grad" and "param" only, and
            ``attach`` is refused (the optimizer's hooks would run inside the compiled step).

    Raises TypeError or ValueError at construction for a bad argument: ``hist``, ``backend`` (checked
    against the device of the model's parameters), ``split`` (checked against the parameters' shapes) and
    ``sinks`` included.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        every: int = 1,
        hist: str | None = "log2",
        track: Sequence[str] = ("grad",),
        sinks: Iterable = (),
        alerts: bool = True,
        alert_config: AlertConfig | None = None,
        history: int = 1000,
        backend: str | None = None,
        split: Split | None = None,
        compiled: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Monitor: model must be an nn.Module, got {type(model).__name__}")
        first_parameter = next(model.parameters(), None)
        if first_parameter is None:
            raise ValueError(f"Monitor: the model ({type(model).__name__}) has no parameters")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Monitor: every must be an int >= 1, got {every!r}")
        track = (track,) if isinstance(track, str) else tuple(track)
        unknown = [kind for kind in track if kind not in TRACK_CHOICES]
        if unknown or not track:
            raise ValueError(f"Monitor: track must be a non-empty subset of {TRACK_CHOICES}, got {track!r}")
        if compiled and any(kind not in COMPILED_TRACK_CHOICES for kind in track):
            raise ValueError(f"Monitor: with compiled=True, track must be a subset of "
                             f"{COMPILED_TRACK_CHOICES} (the others keep copies between steps, outside a "
                             f"compiled step), got {track!r}")
        HistSpec.make(hist)
        resolve_backend(backend, first_parameter.device)
        named = list(model.named_parameters())
        split_parts([p for _, p in named], [name for name, _ in named], split, "Monitor")
        self.sinks = _sink_list(sinks)
        for sink in self.sinks:
            if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
                raise TypeError(f"Monitor: a sink needs write(record) and close() methods, got {sink!r}")
        self.model, self.every, self.hist, self.track, self.backend = model, every, hist, track, backend
        self.split, self.compiled = split, compiled
        watched = "grad" in track or "update" in track
        self.alert_tracker = AlertTracker(alert_config) if alerts and watched else None
        self.history: collections.deque[StepRecord] = collections.deque(maxlen=history)
        self.steps = 0
        self.closed = False
        self._hooks: list = []
        self._previous_params: list[tuple[str, torch.Tensor]] | None = None
        self._previous_grads: list[tuple[str, torch.Tensor]] | None = None
        self._initial_params: list[tuple[str, torch.Tensor]] | None = None
        self._warned_no_grads = False
        self._copy_free_update = False  # set by attach() for optimizers whose update is rebuilt from state
        self._after_step: dict[str, object] = {}  # "update", "optim": taken right after the last step

    @property
    def next_tracked(self) -> bool:
        """True when the next call of :meth:`step` is a tracked one (no sync: it counts calls)."""
        return self.steps % self.every == 0

    def compute(self) -> dict[str, TensorStats]:
        """The statistics of the tracked kinds ("grad", "param") of the model now, by kind, for a later
        ``step(stats=...)``. Changes nothing in the Monitor, makes no host sync and, inside
        ``torch.compile(fullgraph=True)``, no graph break: call it in a compiled step (see the module
        docstring) and return its result from there. Kinds without data (no gradients yet) are left out."""
        kwargs = {"hist": self.hist, "backend": self.backend, "split": self.split}
        named = list(self.model.named_parameters())
        computed = {}
        if "grad" in self.track and any(p.grad is not None for _, p in named):
            computed["grad"] = grad_stats(named, **kwargs)
        if "param" in self.track:
            computed["param"] = param_stats(named, **kwargs)
        return computed

    def step(self, step: int | None = None, *,
             stats: dict[str, TensorStats] | None = None) -> StepRecord | None:
        """Count a training step; on tracked steps compute, record, alert and write to the sinks.

        Call after ``backward()`` and before ``optimizer.step()`` (``attach`` does it for you). Returns the
        StepRecord of a tracked step, None otherwise.

        Args:
            stats: on a tracked step, the statistics to record instead of computing them: what
                :meth:`compute` returned (e.g. from inside a compiled step). Ignored on other steps.
            step: the step number to record a tracked step under (``record.step``, the sinks' step, the
                alerts' step), e.g. a trainer's global step, which may start at 0. Which calls are tracked
                does not depend on it: calls 1, 1 + every, ... of ``step()`` are, as without it. None: the
                number of calls so far (1 for the first call).

        Example::

            for global_step, batch in enumerate(loader):   # records under 0, every, 2·every, ...
                loss_fn(model(batch)).backward()
                monitor.step(global_step)
                optimizer.step()
        """
        if self.closed:
            raise RuntimeError("Monitor.step() called after close()")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"Monitor.step: step must be an int or None, got {type(step).__name__} {step!r}")
        if stats is not None and (not isinstance(stats, dict) or set(stats) - set(self.track)):
            raise ValueError(f"Monitor.step: stats= must be what compute() returned (kinds from "
                             f"{self.track}), got {stats!r}")
        tracked = self.next_tracked
        self.steps += 1
        record = self._record(self.steps if step is None else step, stats) if tracked else None
        if "update" in self.track and self.steps % self.every == 0 and not self._copy_free_update:
            self._previous_params = self._copy_params()  # the next step is tracked
        if record is not None:
            self.history.append(record)
            for sink in self.sinks:
                sink.write(record)
        return record

    def attach(self, optimizer: torch.optim.Optimizer) -> Monitor:
        """Call ``step()`` from the optimizer's step pre-hook, so the training loop need not change.

        With "update" or "optim" tracked, a step post-hook also reads the optimizer's state right after each
        step that precedes a tracked step (the update of Adam, AdamW and SGD is then rebuilt, not copied).
        """
        if self.compiled:
            raise RuntimeError("Monitor.attach: a compiled Monitor records what compute() returns; call "
                               "monitor.step(stats=...) after the compiled step instead")

        def before_optimizer_step(*_) -> None:
            self.step()

        def after_optimizer_step(*_) -> None:
            if self.closed or self.steps % self.every != 0:  # the next step is not tracked
                return
            if "optim" in self.track:
                stats = optimizer_stats(optimizer, self.model, hist=self.hist, backend=self.backend)
                self._after_step["optim"] = stats
                if self._copy_free_update:
                    self._after_step["update"] = stats.update_pairs
            elif self._copy_free_update:
                self._after_step["update"] = update_pair_stats(optimizer, self.model, self.backend)

        self._copy_free_update = ("update" in self.track and self.split is None and rebuilds_update(optimizer)
                                  and not self._copy_free_update_refused(optimizer))
        self._hooks.append(optimizer.register_step_pre_hook(before_optimizer_step))
        if "update" in self.track or "optim" in self.track:
            self._hooks.append(optimizer.register_step_post_hook(after_optimizer_step))
        return self

    def _copy_free_update_refused(self, optimizer: torch.optim.Optimizer) -> bool:
        """True when the optimizer holds a parameter the copy-free update cannot read (a DTensor, a parameter
        outside the model, an unsupported dtype): then "update" keeps the copying path."""
        model_parameters = set(self.model.parameters())
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p not in model_parameters or type(p) not in (torch.nn.Parameter, torch.Tensor):
                    return True
                if p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                    return True
        return False

    def close(self) -> None:
        """Detach from optimizers, close the sinks and drop the kept copies. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for hook in self._hooks:
            hook.remove()
        self._previous_params = self._previous_grads = self._initial_params = None
        self._after_step.clear()
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, step: int, computed: dict[str, TensorStats] | None = None) -> StepRecord:
        record = StepRecord(step)
        kwargs = {"hist": self.hist, "backend": self.backend, "split": self.split}
        named = list(self.model.named_parameters())
        if "init" in self.track and self._initial_params is None:
            self._initial_params = self._copy_params()
        if "grad" in self.track or "grad_cos" in self.track:
            grads = [(name, p.grad) for name, p in named if p.grad is not None]
            given = None if computed is None else computed.get("grad")  # .grad may be zeroed since then
            if not grads and given is None and not self._warned_no_grads:
                warnings.warn("Monitor.step(): no parameter has a gradient yet (call it after backward())",
                              stacklevel=3)
                self._warned_no_grads = True
            if (grads or given is not None) and "grad" in self.track:
                record.stats["grad"] = grad_stats(named, **kwargs) if given is None else given
                if self.alert_tracker is not None:
                    record.alert_flags = self.alert_tracker.update(step, record.stats["grad"])
            if grads and "grad_cos" in self.track:
                if self._previous_grads is not None:
                    record.stats["grad_cos"] = _pairs(grads, self._previous_grads, self.backend, self.split)
                self._previous_grads = [(name, g.detach().clone()) for name, g in grads]
        if "param" in self.track:
            given = None if computed is None else computed.get("param")
            record.stats["param"] = param_stats(named, **kwargs) if given is None else given
        params = [(name, p.detach()) for name, p in named]
        after_step, self._after_step = self._after_step, {}
        if "update" in self.track and "update" in after_step:
            record.stats["update"] = after_step["update"]
        elif "update" in self.track and self._previous_params is not None:
            record.stats["update"] = _pairs(params, self._previous_params, self.backend, self.split)
        if "update" in record.stats and self.alert_tracker is not None:
            flags = record.alert_flags or AlertFlags(step, [], {})
            record.alert_flags = self.alert_tracker.update_spikes(flags, record.stats["update"].names,
                                                                  record.update_ratio)
        if "optim" in after_step:
            record.stats["optim"] = after_step["optim"]
        if "init" in self.track:
            record.stats["init"] = _pairs(params, self._initial_params, self.backend, self.split)
        return record

    def _copy_params(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, p.detach().clone()) for name, p in self.model.named_parameters()]


def _sink_list(sinks: Iterable) -> list:
    """``sinks`` as a list, or a TypeError when one sink (or another non-iterable) came instead of a list."""
    if callable(getattr(sinks, "write", None)) and callable(getattr(sinks, "close", None)):
        raise TypeError(f"Monitor: sinks must be a list of sinks; pass [{type(sinks).__name__}(...)], "
                        "not the sink itself")
    if isinstance(sinks, str) or not isinstance(sinks, Iterable):
        raise TypeError(f"Monitor: sinks must be a list of sinks, got {type(sinks).__name__} {sinks!r}")
    return list(sinks)


def _pairs(now: list[tuple[str, torch.Tensor]], before: list[tuple[str, torch.Tensor]], backend,
           split: Split | None) -> PairStats:
    """PairStats of the layers present both now and before (a = now, b = before), matched by name."""
    return pair_stats(dict(now), dict(before), strict=False, backend=backend, split=split)


