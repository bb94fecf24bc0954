"""Lightning: ``FastGradStatsCallback`` runs a :class:`~fastgradstats.Monitor` on the LightningModule.

    from fastgradstats.integrations.lightning import FastGradStatsCallback

    stats = FastGradStatsCallback(every=50, track=("grad", "update"))
    trainer = lightning.pytorch.Trainer(callbacks=[stats])
    trainer.fit(module)
    stats.monitor.history[-1].stats["grad"].table()

The Monitor is created at fit start on ``pl_module`` (layers are its parameter names) and stepped in
``on_before_optimizer_step``: gradients are final there (all ``accumulate_grad_batches`` micro-batches summed,
unscaled by the AMP GradScaler) and neither clipped (``gradient_clip_val`` acts after this hook) nor applied.
So ``every`` counts optimizer steps; under manual optimization every ``optimizer.step()`` counts, one per
optimizer. Records carry the Trainer's ``global_step`` as it stands at that hook (optimizer steps done before
this one), so the first is step 0 and the sinks number steps as Lightning's own loggers do.

At fit end (or when fit raises) the Monitor is closed, which closes its sinks as Lightning finalizes its
loggers; ``.monitor`` and its history stay readable afterwards. The next ``fit`` with the same callback starts
a new Monitor on the same sinks, which open their files again and append (see
:mod:`fastgradstats.monitoring.sinks`).

With ``log=True`` (the default) each tracked step also calls ``pl_module.log`` (on_step only) with
``fastgradstats/grad_l2`` (the global gradient l2 norm, when "grad" is tracked) and ``fastgradstats/alerts``
(``record.alert_count``, when alerts are on). Both are device tensors of the record: logging them adds no
host sync beyond what the logger itself does.

Imports ``lightning.pytorch``, else ``pytorch_lightning``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch

from ..monitoring.monitor import Monitor, StepRecord

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError(
            "fastgradstats.integrations.lightning needs Lightning (lightning.pytorch or pytorch_lightning): "
            'pip install "fastgradstats[all]"'
        ) from None


class FastGradStatsCallback(pl.Callback):
    """A Lightning Callback that runs a Monitor on the LightningModule; see the module docstring.

    Args:
        every, hist, track, sinks: as in :class:`~fastgradstats.Monitor`.
        log: log the global gradient l2 and the alert count through ``pl_module.log`` on tracked steps.
        **monitor_kwargs: the other Monitor arguments (alerts, alert_config, history, backend).

    Attributes:
        monitor: the Monitor of the current (or last) fit; None before the first fit.
    """

    def __init__(
        self,
        every: int = 1,
        hist: str | None = "log2",
        track: Sequence[str] = ("grad",),
        sinks: Iterable = (),
        *,
        log: bool = True,
        **monitor_kwargs,
    ) -> None:
        super().__init__()
        self.monitor_kwargs = dict(every=every, hist=hist, track=track, sinks=list(sinks), **monitor_kwargs)
        try:
            inspect.signature(Monitor).bind(None, **self.monitor_kwargs)
        except TypeError as error:
            raise TypeError(f"FastGradStatsCallback: {error} (keyword arguments go to Monitor)") from None
        self.log = log
        self.monitor: Monitor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()
        self.monitor = Monitor(pl_module, **self.monitor_kwargs)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        record = self.monitor.step(trainer.global_step)
        if record is not None and self.log:
            _log(pl_module, record)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.monitor is not None:
            self.monitor.close()


def _log(pl_module: pl.LightningModule, record: StepRecord) -> None:
    grad = record.stats.get("grad")
    if grad is not None:
        pl_module.log("fastgradstats/grad_l2", grad.total.l2, on_step=True, on_epoch=False)
    if record.alert_count is not None:  # Lightning logs floating-point tensors
        pl_module.log("fastgradstats/alerts", record.alert_count.float(), on_step=True, on_epoch=False)
