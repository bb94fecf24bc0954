"""Training-health alerts computed on the device: flags stay tensors until someone reads them (one sync).

Per layer, on every tracked step, from the gradient statistics: ``nonfinite`` (NaN/Inf in the gradient),
``dead`` (an all-zero gradient), ``vanishing`` (l2 below an absolute floor, or far below the layer's own
running mean), ``exploding`` (l2 far above its running mean). From the update statistics
(``Monitor(track="update")``):
``update_spike`` (the update ratio ‖Δθ‖/‖θ‖ far above its running mean, as a learning-rate spike or a burst in
Adam's first moment gives). Each running mean is an EMA of the layer's finite, non-zero values, kept on the
device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..results import TensorStats, host_snapshot

GRAD_KINDS = ("nonfinite", "dead", "vanishing", "exploding")
KINDS = (*GRAD_KINDS, "update_spike")


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds of the alerts (defaults suit typical training; all are per layer)."""

    vanishing_floor: float = 1e-12  # l2 below this is vanishing, always
    vanishing_ratio: float = 1e-3  # l2 below this fraction of the running mean is vanishing (after warmup)
    exploding_ratio: float = 10.0  # l2 above this multiple of the running mean is exploding (after warmup)
    warmup: int = 5  # tracked steps of a layer before history-based alerts can fire
    ema_decay: float = 0.9  # weight of the past in the running mean of the gradient l2
    update_spike_ratio: float = 10.0  # update ratio above this multiple of its running mean is a spike
    update_ema_decay: float = 0.9  # weight of the past in the running mean of the update ratio


@dataclass(frozen=True)
class Alert:
    """One alert: what happened (``kind``, one of KINDS) in which layer, with the value that triggered it."""

    step: int
    kind: str
    layer: str
    value: float
    message: str


@dataclass
class AlertFlags:
    """Device-side outcome of one step: bool [L] per kind and the values they refer to (``l2`` float32,
    ``running_mean`` float64, ``nonfinite`` int64, ``update_ratio`` and ``update_running_mean`` float64).

    ``flags[kind]`` for the gradient kinds is over ``names`` (l2, running_mean and nonfinite too);
    ``flags["update_spike"]``, when the update was recorded, is over ``update_names`` (update_ratio and
    update_running_mean too).
    """

    step: int
    names: list[str]
    flags: dict[str, torch.Tensor]
    l2: torch.Tensor | None = None
    running_mean: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None
    update_names: list[str] = field(default_factory=list)
    update_ratio: torch.Tensor | None = None
    update_running_mean: torch.Tensor | None = None

    def count(self) -> torch.Tensor:
        """int64 0-d tensor on the flags' device: how many alerts there are (flagged layers summed over the
        kinds), without a sync (0 on the CPU when there are no flags at all)."""
        flags = list(self.flags.values())
        if not flags:
            return torch.zeros((), dtype=torch.int64)
        return torch.stack([flag.sum() for flag in flags]).sum()

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors :meth:`materialize` reads, in the order it expects their host copies."""
        grad = [self.flags[k] for k in GRAD_KINDS if k in self.flags]
        if grad:
            grad += [self.l2, self.running_mean, self.nonfinite]
        if "update_spike" in self.flags:
            grad += [self.flags["update_spike"], self.update_ratio, self.update_running_mean]
        return grad

    def materialize(self, host: list[torch.Tensor] | None = None) -> list[Alert]:
        """The alerts as Python objects. ``host``: host copies of :meth:`tensors` (from a snapshot the caller
        made); when None, they are copied here (one device-to-host copy)."""
        host = host_snapshot(self.tensors()) if host is None else host
        grad = [k for k in GRAD_KINDS if k in self.flags]
        alerts = []
        if grad:
            l2, mean, nonfinite = (t.tolist() for t in host[len(grad):len(grad) + 3])
        for flag, kind in zip(host, grad):
            for i in _flagged(flag):
                name = self.names[i]
                if kind == "nonfinite":
                    value = float(nonfinite[i])
                    text = f"{nonfinite[i]} NaN/Inf values in the gradient of '{name}'"
                elif kind == "dead":
                    value, text = 0.0, f"the gradient of '{name}' is all zeros"
                else:
                    value = l2[i]
                    text = f"gradient norm of '{name}' is {l2[i]:.3g} ({kind}; running mean {mean[i]:.3g})"
                alerts.append(Alert(self.step, kind, name, value, text))
        if "update_spike" in self.flags:
            spike, ratio, mean = host[-3], host[-2].tolist(), host[-1].tolist()
            for i in _flagged(spike):
                name = self.update_names[i]
                text = (f"update ratio ‖Δθ‖/‖θ‖ of '{name}' is {ratio[i]:.3g}, {ratio[i] / mean[i]:.3g}× its "
                        f"running mean {mean[i]:.3g} (update_spike)")
                alerts.append(Alert(self.step, "update_spike", name, ratio[i], text))
        return alerts


def _flagged(flag: torch.Tensor) -> list[int]:
    """Indices where the host bool [L] ``flag`` is set."""
    return [i for i, value in enumerate(flag.tolist()) if value]


class RunningMean:
    """Each named layer's EMA of a per-layer value on the device, and how many usable values it has seen.

    ``mean``: float64 [L], NaN where nothing was seen; ``seen``: int64 [L]. Layers are matched by name, so the
    set and order of layers may change between steps (host-side indices only).
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.names: list[str] = []
        self.mean: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def fold(self, names: list[str], values: torch.Tensor, usable: torch.Tensor) -> None:
        """Blend the ``usable`` entries of ``values`` (float64 [L], over ``names``) into the means, in place:
        while the layers stay the same, ``mean`` and ``seen`` keep their addresses, so a CUDA graph that
        captured a step replays into the same state."""
        self.align(names, values.device)
        first = self.mean.isnan()
        blended = self.decay * self.mean + (1 - self.decay) * values
        self.mean.copy_(torch.where(usable, torch.where(first, values, blended), self.mean))
        self.seen.add_(usable.long())

    def align(self, names: list[str], device: torch.device) -> None:
        """Carry the state of layers that were seen before over to the order of ``names``."""
        if names == self.names and self.mean is not None:
            return
        mean = torch.full((len(names),), float("nan"), dtype=torch.float64, device=device)
        seen = torch.zeros(len(names), dtype=torch.int64, device=device)
        if self.mean is not None:
            old = {name: i for i, name in enumerate(self.names)}
            pairs = [(i, old[name]) for i, name in enumerate(names) if name in old]
            if pairs:
                new_index = torch.tensor([i for i, _ in pairs], device=device)
                old_index = torch.tensor([j for _, j in pairs], device=device)
                mean[new_index] = self.mean[old_index]
                seen[new_index] = self.seen[old_index]
        self.names, self.mean, self.seen = list(names), mean, seen


class AlertTracker:
    """Keeps each layer's running mean of the gradient l2 and of the update ratio on the device and flags
    every tracked step."""

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config or AlertConfig()
        self.grad_l2 = RunningMean(self.config.ema_decay)
        self.update_ratio = RunningMean(self.config.update_ema_decay)

    def update(self, step: int, stats: TensorStats) -> AlertFlags:
        """Flags for gradient statistics ``stats``; then folds their l2 into the running means (no sync)."""
        history = self.grad_l2
        history.align(stats.names, stats.l2.device)
        config = self.config
        l2 = stats.l2.double()
        warm = history.seen >= config.warmup
        usable = l2.isfinite() & (l2 > 0)
        flags = {
            "nonfinite": stats.nonfinite > 0,
            "dead": (stats.numel > 0) & (stats.zeros == stats.numel),
            "vanishing": (stats.numel > 0)
            & ((l2 < config.vanishing_floor) | (warm & (l2 < config.vanishing_ratio * history.mean))),
            "exploding": warm & usable & (l2 > config.exploding_ratio * history.mean),
        }
        flags["vanishing"] &= ~flags["dead"]
        result = AlertFlags(step, list(stats.names), flags, stats.l2, history.mean.clone(), stats.nonfinite)
        history.fold(stats.names, l2, usable)
        return result

    def update_spikes(self, flags: AlertFlags, names: list[str], ratio: torch.Tensor) -> AlertFlags:
        """Add ``update_spike`` to ``flags``: the layers whose update ratio ``ratio`` ([L] over ``names``,
        ‖Δθ‖/‖θ‖) exceeds ``update_spike_ratio`` × its running mean after ``warmup`` updates; then fold the
        ratios into the running means (no sync). Returns ``flags``."""
        history = self.update_ratio
        history.align(names, ratio.device)
        ratio = ratio.double()
        usable = ratio.isfinite() & (ratio > 0)
        warm = history.seen >= self.config.warmup
        flags.flags["update_spike"] = warm & usable & (ratio > self.config.update_spike_ratio * history.mean)
        flags.update_names, flags.update_ratio = list(names), ratio
        flags.update_running_mean = history.mean.clone()
        history.fold(names, ratio, usable)
        return flags
