"""Gradient-health alerts computed on the device: flags stay tensors until someone reads them (one sync).

Per layer, on every tracked step: ``nonfinite`` (NaN/Inf in the gradient), ``dead`` (an all-zero gradient),
``vanishing`` (l2 below an absolute floor, or far below the layer's own running mean), ``exploding`` (l2 far
above its running mean). The running mean is an EMA of each layer's finite, non-zero l2, kept on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .results import TensorStats

KINDS = ("nonfinite", "dead", "vanishing", "exploding")


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds of the alerts (defaults suit typical training; all are per layer)."""

    vanishing_floor: float = 1e-12  # l2 below this is vanishing, always
    vanishing_ratio: float = 1e-3  # l2 below this fraction of the running mean is vanishing (after warmup)
    exploding_ratio: float = 10.0  # l2 above this multiple of the running mean is exploding (after warmup)
    warmup: int = 5  # tracked steps of a layer before history-based alerts can fire
    ema_decay: float = 0.9  # weight of the past in the running mean


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
    """Device-side outcome of one step: bool [L] per kind and the l2 / nonfinite values they refer to."""

    step: int
    names: list[str]
    flags: dict[str, torch.Tensor]
    l2: torch.Tensor
    running_mean: torch.Tensor
    nonfinite: torch.Tensor

    def materialize(self) -> list[Alert]:
        """The alerts as Python objects (one device-to-host copy)."""
        packed = torch.stack([self.flags[k].double() for k in KINDS] + [self.l2.double(), self.running_mean,
                                                                       self.nonfinite.double()]).cpu()
        flags, (l2, mean, nonfinite) = packed[: len(KINDS)].bool(), packed[len(KINDS):].tolist()
        alerts = []
        for k, kind in enumerate(KINDS):
            for i in flags[k].nonzero().flatten().tolist():
                name = self.names[i]
                if kind == "nonfinite":
                    value = nonfinite[i]
                    text = f"{int(nonfinite[i])} NaN/Inf values in the gradient of '{name}'"
                elif kind == "dead":
                    value, text = 0.0, f"the gradient of '{name}' is all zeros"
                else:
                    value = l2[i]
                    text = f"gradient norm of '{name}' is {l2[i]:.3g} ({kind}; running mean {mean[i]:.3g})"
                alerts.append(Alert(self.step, kind, name, value, text))
        return alerts


class AlertTracker:
    """Keeps each layer's running mean of the gradient l2 on the device and flags every tracked step."""

    def __init__(self, config: AlertConfig | None = None) -> None:
        self.config = config or AlertConfig()
        self.names: list[str] = []
        self.running_mean: torch.Tensor | None = None  # float64 [L], NaN where unknown
        self.seen: torch.Tensor | None = None  # int64 [L], tracked steps with a finite non-zero l2

    def update(self, step: int, stats: TensorStats) -> AlertFlags:
        """Flags for gradient statistics ``stats``; then folds their l2 into the running means (no sync)."""
        self._align(stats.names, stats.l2.device)
        config = self.config
        l2 = stats.l2.double()
        warm = self.seen >= config.warmup
        usable = l2.isfinite() & (l2 > 0)
        flags = {
            "nonfinite": stats.nonfinite > 0,
            "dead": (stats.numel > 0) & (stats.zeros == stats.numel),
            "vanishing": (stats.numel > 0)
            & ((l2 < config.vanishing_floor) | (warm & (l2 < config.vanishing_ratio * self.running_mean))),
            "exploding": warm & usable & (l2 > config.exploding_ratio * self.running_mean),
        }
        flags["vanishing"] &= ~flags["dead"]
        result = AlertFlags(step, list(stats.names), flags, stats.l2, self.running_mean.clone(),
                            stats.nonfinite)
        first = self.running_mean.isnan()
        blended = config.ema_decay * self.running_mean + (1 - config.ema_decay) * l2
        self.running_mean = torch.where(usable, torch.where(first, l2, blended), self.running_mean)
        self.seen = self.seen + usable.long()
        return result

    def _align(self, names: list[str], device: torch.device) -> None:
        """Carry the state of layers that were seen before over to the order of ``names``
        (host-side indices)."""
        if names == self.names and self.running_mean is not None:
            return
        mean = torch.full((len(names),), float("nan"), dtype=torch.float64, device=device)
        seen = torch.zeros(len(names), dtype=torch.int64, device=device)
        if self.running_mean is not None:
            old = {name: i for i, name in enumerate(self.names)}
            pairs = [(i, old[name]) for i, name in enumerate(names) if name in old]
            if pairs:
                new_index = torch.tensor([i for i, _ in pairs], device=device)
                old_index = torch.tensor([j for _, j in pairs], device=device)
                mean[new_index] = self.running_mean[old_index]
                seen[new_index] = self.seen[old_index]
        self.names, self.running_mean, self.seen = list(names), mean, seen
