"""🤗 Transformers: ``FastGradStatsTrainerCallback`` runs a :class:`~fastgradstats.Monitor` on the Trainer.

    from fastgradstats.integrations.transformers import FastGradStatsTrainerCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    stats = FastGradStatsTrainerCallback(every=50, track=("grad", "update"), trainer=trainer)
    trainer.add_callback(stats)
    trainer.train()
    trainer.state.log_history  # [..., {"grad/l2": 3.1, "grad/linf": 0.2, ..., "epoch": 0.4, "step": 51}, ...]
    stats.monitor.history[-1].stats["grad"].table()

Logging. With ``trainer=`` each tracked step is logged through ``trainer.log`` right after the Trainer counts
the optimizer step (``on_step_end``), so the statistics land where the Trainer's own metrics do: one entry of
``state.log_history`` at that step, every ``report_to`` target (TensorBoard, W&B, ..., which prefix the keys
with ``train/`` as they do the Trainer's own ``train/grad_norm``) and the console. The
keys are the whole-model scalars of :func:`fastgradstats.monitoring.sinks.scalars` (``grad/l2``, the global
gradient norm, ``grad/linf``, ..., ``update/ratio``, ``alerts/{kind}``, ``alerts/count``) and, with
``log_layers=True``, every layer's too (``grad.l2.transformer.h.3/attn.c_attn.weight``). ``every`` sets how
often, independently of ``logging_steps``. Records are numbered as the Trainer counts: ``record.step`` is the
``state.global_step`` the optimizer step reaches (1 for the first), the ``step`` of the Trainer's log entry
that holds its ``loss`` and ``grad_norm``.

When: before clipping. The Trainer clips (``max_grad_norm``, default 1.0) right after the last backward of an
optimizer step, before any callback event, and logs the norm from before clipping as ``grad_norm``. So the
Monitor steps at the end of that backward pass (a hook on the parameters' gradient accumulation, once the
autograd engine has finished the pass, on the micro-batch the Trainer marks as the one that syncs): the
statistics are those of the gradients as backward left them, all ``gradient_accumulation_steps``
micro-batches summed and not yet clipped, and ``grad/l2`` equals the Trainer's ``grad_norm``. One record per
tracked optimizer step; ``every`` counts optimizer steps. Training steps that call ``backward`` more than once
per micro-batch are not supported (the first pass would be recorded).

Mixed precision: bf16 gradients need no loss scaling, so the above holds. With ``fp16=True`` on a GPU the
gradients are still multiplied by the GradScaler's scale when backward ends; the callback then steps the
Monitor in ``on_pre_optimizer_step`` instead, after the Trainer has unscaled and clipped them, and warns when
``max_grad_norm > 0``: norms are then capped at ``max_grad_norm`` (and "exploding" alerts muted), while
per-layer proportions, zero counts and histogram shapes survive. (Without ``trainer=`` the callback cannot
see the scaler and takes ``fp16=True`` to mean one.)

The Monitor is created in ``on_train_begin`` on the ``model`` the Trainer passes (layers are its parameter
names) and closed in ``on_train_end``, which closes its sinks; they open again if a later ``train()`` writes
to them. ``.monitor`` and its history stay readable afterwards.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Sequence

import torch

from ..monitoring.monitor import Monitor, StepRecord
from ..monitoring.sinks import scalars

try:
    import transformers
    from accelerate.state import GradientState
except ImportError:
    raise ImportError(
        "fastgradstats.integrations.transformers needs transformers and accelerate: "
        'pip install "fastgradstats[all]"'
    ) from None


class FastGradStatsTrainerCallback(transformers.TrainerCallback):
    """A ``transformers.TrainerCallback`` running a Monitor on the Trainer's model; see the module docstring.

    Args:
        every, hist, track, sinks: as in :class:`~fastgradstats.Monitor`.
        trainer: the Trainer whose ``log`` receives the statistics of each tracked step (add the callback to
            it with ``trainer.add_callback``); None: the statistics go only to ``sinks`` and
            ``monitor.history`` (a warning says so at train begin).
        log_layers: log every layer's scalars through the Trainer too, not only the whole-model ones.
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
        *,
        trainer: transformers.Trainer | None = None,
        log_layers: bool = False,
        **monitor_kwargs,
    ) -> None:
        self.monitor_kwargs = dict(every=every, hist=hist, track=track, sinks=list(sinks), **monitor_kwargs)
        try:
            inspect.signature(Monitor).bind(None, **self.monitor_kwargs)
        except TypeError as error:
            raise TypeError(f"FastGradStatsTrainerCallback: {error} (kwargs go to Monitor)") from None
        self.trainer, self.log_layers = trainer, log_layers
        self.monitor: Monitor | None = None
        self._state: transformers.TrainerState | None = None
        self._pending: StepRecord | None = None  # recorded, not yet logged through the Trainer
        self._hooks: list = []
        self._queued = False
        self._after_clipping = False
        self._gradient_state: GradientState | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        if model is None:
            raise ValueError("FastGradStatsTrainerCallback: the Trainer passed no model to on_train_begin")
        if self.trainer is None:
            warnings.warn("FastGradStatsTrainerCallback: no trainer= given, so the statistics reach only the "
                          "sinks and monitor.history, not the Trainer's logs", stacklevel=2)
        if self.monitor is not None:
            self.monitor.close()
        self._remove_hooks()
        self.monitor = Monitor(model, **self.monitor_kwargs)
        self._state, self._pending, self._queued = state, None, False
        self._gradient_state = GradientState()  # accelerate's shared state: which micro-batch syncs
        # Gradients are loss-scaled until clipping when a GradScaler runs (fp16 on a GPU); without the trainer
        # to ask, fp16 is taken to mean one.
        scaler = self.trainer.accelerator.scaler if self.trainer is not None else None
        self._after_clipping = scaler is not None if self.trainer is not None else args.fp16
        if self._after_clipping and args.max_grad_norm > 0:
            warnings.warn(f"FastGradStatsTrainerCallback: with fp16 the gradients are loss-scaled until the "
                          f"Trainer clips them, so the statistics are taken after clipping to max_grad_norm="
                          f"{args.max_grad_norm} (norms capped)", stacklevel=2)
        if not self._after_clipping:
            self._hooks = [p.register_post_accumulate_grad_hook(self._after_accumulation)
                           for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        if self._after_clipping:
            self._pending = self.monitor.step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        record, self._pending = self._pending, None
        if record is not None and self.trainer is not None:
            should_log = control.should_log  # the Trainer's own logging of this step, decided just before
            self.trainer.log(scalars(record, layers=self.log_layers))  # clears control.should_log
            control.should_log = should_log

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._remove_hooks()
        self.monitor.close()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _after_accumulation(self, parameter: torch.Tensor) -> None:
        """A parameter's gradient was accumulated: on the micro-batch that syncs, queue the Monitor's step for
        the end of this backward pass (once)."""
        if self._queued or not self._gradient_state.sync_gradients:
            return
        self._queued = True
        # The autograd engine's final callbacks, as DDP's reducer uses them; queued again from the first run,
        # so it runs after every callback queued during the pass (DDP's gradient reduction among them).
        torch.autograd.Variable._execution_engine.queue_callback(self._queue_last)

    def _queue_last(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self._queued = False
        self._pending = self.monitor.step(self._state.global_step + 1)
