"""🤗 Transformers: ``FastGradStatsTrainerCallback`` runs a :class:`~fastgradstats.Monitor` on the Trainer.

    from fastgradstats.integrations.transformers import FastGradStatsTrainerCallback

    stats = FastGradStatsTrainerCallback(every=50, track=("grad", "update"))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[stats])
    trainer.train()
    stats.monitor.history[-1].stats["grad"].table()

The Monitor is created in ``on_train_begin`` on the ``model`` the Trainer passes (layers are its parameter
names) and stepped in ``on_pre_optimizer_step``, the one event that sees the gradients after the last backward
of an optimizer step and before ``optimizer.step()`` and ``zero_grad()``. What follows from that:

* Gradient accumulation: the event fires once per optimizer step, after all ``gradient_accumulation_steps``
  micro-batches are summed, so ``every`` counts optimizer steps and there is one record per tracked optimizer
  step. ``record.step`` counts the optimizer steps of this ``train()`` call (from scratch, it equals the
  Trainer's ``state.global_step`` once that step is done).
* Clipping: before this event the Trainer clips (``max_grad_norm > 0``, default 1.0) or, with
  ``max_grad_norm=0``, measures the norm with ``clip_grad_norm_(..., max_norm=inf)``; both multiply every
  gradient by ``min(1, max_norm / total_norm)``. So the statistics are those of the gradients the optimizer
  applies: with clipping, norms are capped (which mutes "exploding" alerts) while per-layer proportions,
  zero counts and histogram shapes survive; a NaN/Inf in any layer makes that factor NaN (or 0), so it
  spreads to every layer's gradient and the "nonfinite" alert flags them all, not the layer it came from.
  Mixed-precision gradients are already unscaled here.

The Monitor is closed in ``on_train_end``, which closes its sinks, so a callback serves one ``train()`` call;
``.monitor`` and its history stay readable afterwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

from ..monitoring.monitor import Monitor

try:
    import transformers
except ImportError:
    raise ImportError(
        'fastgradstats.integrations.transformers needs transformers: pip install "fastgradstats[all]"'
    ) from None


class FastGradStatsTrainerCallback(transformers.TrainerCallback):
    """A ``transformers.TrainerCallback`` running a Monitor on the Trainer's model; see the module docstring.

    Args:
        every, hist, track, sinks: as in :class:`~fastgradstats.Monitor`.
        **monitor_kwargs: the other Monitor arguments (alerts, alert_config, history, backend).

    Attributes:
        monitor: the Monitor of the current (or last) ``train()``; None before the first.
    """

    def __init__(
        self,
        every: int = 1,
        hist: str | None = "log2",
        track: Sequence[str] = ("grad",),
        sinks: Iterable = (),
        **monitor_kwargs,
    ) -> None:
        if not hasattr(transformers.TrainerCallback, "on_pre_optimizer_step"):
            raise ImportError(
                f"FastGradStatsTrainerCallback needs the on_pre_optimizer_step event, which transformers "
                f"{transformers.__version__} lacks: pip install -U transformers"
            )
        self.monitor_kwargs = dict(every=every, hist=hist, track=track, sinks=list(sinks), **monitor_kwargs)
        try:
            inspect.signature(Monitor).bind(None, **self.monitor_kwargs)
        except TypeError as error:
            raise TypeError(f"FastGradStatsTrainerCallback: {error} (kwargs go to Monitor)") from None
        self.monitor: Monitor | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        if model is None:
            raise ValueError("FastGradStatsTrainerCallback: the Trainer passed no model to on_train_begin")
        if self.monitor is not None:
            self.monitor.close()
        self.monitor = Monitor(model, **self.monitor_kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.monitor.step()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.monitor.close()
