"""Framework callbacks on CPU: Lightning's FastGradStatsCallback, 🤗 FastGradStatsTrainerCallback."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

import fastgradstats as fgs
from fastgradstats.integrations.lightning import FastGradStatsCallback
from fastgradstats.integrations.transformers import FastGradStatsTrainerCallback

# Lightning's own pytree helper trips a torch deprecation; nothing here can act on it.
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated")

needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="transformers.Trainer needs accelerate>=1.1 (not in the [dev] extras)",
)


# ---------------------------------------------------------------- Lightning


class TinyRegression(pl.LightningModule):
    """Two linear layers on random data; remembers each optimizer step's gradients (before any clipping)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        self.grads_per_step: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_before_optimizer_step(self, optimizer) -> None:  # runs after the callbacks' hook, before clipping
        self.grads_per_step.append({name: p.grad.clone() for name, p in self.named_parameters()})


def fit(callback: FastGradStatsCallback, max_steps: int = 6, module=None, **trainer_kwargs):
    """Trains ``module`` (a new TinyRegression by default) for ``max_steps`` optimizer steps on 6 batches an
    epoch; returns (trainer, module)."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=generator), torch.randn(24, 2, generator=generator)
    data = torch.utils.data.TensorDataset(x, y)
    module = TinyRegression() if module is None else module
    trainer_kwargs = {"logger": False, **trainer_kwargs}
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback], **trainer_kwargs,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return trainer, module


def test_lightning_callback_tracks_every_nth_optimizer_step_and_closes():
    callback = FastGradStatsCallback(every=2)
    fit(callback)
    assert callback.monitor.steps == 6
    assert [record.step for record in callback.monitor.history] == [0, 2, 4]  # the Trainer's global_step
    assert callback.monitor.closed


class LossLogging(TinyRegression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)
        return loss


def test_lightning_sinks_number_steps_as_lightnings_own_loggers(tmp_path):
    path = tmp_path / "stats.jsonl"
    callback = FastGradStatsCallback(sinks=[fgs.sinks.JSONL(path)])
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    fit(callback, max_steps=4, module=LossLogging(), logger=logger, log_every_n_steps=1)
    header, *rows = Path(logger.log_dir, "metrics.csv").read_text().splitlines()
    lightning_steps = [int(row.split(",")[header.split(",").index("step")]) for row in rows]  # of the losses
    our_steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert our_steps == lightning_steps == [0, 1, 2, 3]


def test_lightning_second_fit_with_the_same_callback_writes_to_the_same_sinks(tmp_path):
    path = tmp_path / "stats.jsonl"
    callback = FastGradStatsCallback(sinks=[fgs.sinks.JSONL(path), fgs.sinks.TensorBoard(tmp_path / "tb")])
    fit(callback, max_steps=3)
    first_monitor = callback.monitor
    fit(callback, max_steps=2)  # a second stage: a new Trainer, the same callback and sinks
    assert callback.monitor is not first_monitor and callback.monitor.closed
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 0, 1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("grad/l2")] == [0, 1, 2, 0, 1]


def test_lightning_grad_stats_are_those_of_the_unclipped_gradients():
    callback = FastGradStatsCallback()
    _, module = fit(callback, gradient_clip_val=1e-3)
    stats = callback.monitor.history[-1].stats["grad"]
    last_grads = module.grads_per_step[-1]
    assert stats.names == [name for name, _ in module.named_parameters()]
    want = torch.stack([torch.linalg.vector_norm(last_grads[name]) for name in stats.names])
    torch.testing.assert_close(stats.l2, want)
    assert stats.total.l2 > 1e-3  # not yet clipped to gradient_clip_val


def test_lightning_nonfinite_alert_names_the_layer_it_came_from():
    callback = FastGradStatsCallback()
    module = TinyRegression()
    module.net[2].bias.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    fit(callback, max_steps=1, module=module, gradient_clip_val=1.0)
    alerts = callback.monitor.history[0].alerts
    assert [(alert.kind, alert.layer) for alert in alerts] == [("nonfinite", "net.2.bias")]


def test_lightning_counts_optimizer_steps_under_gradient_accumulation():
    callback = FastGradStatsCallback()
    _, module = fit(callback, max_steps=3, accumulate_grad_batches=2)
    assert len(callback.monitor.history) == len(module.grads_per_step) == 3


def test_lightning_logs_global_grad_l2_and_alert_count():
    callback = FastGradStatsCallback()
    trainer, _ = fit(callback)
    last = callback.monitor.history[-1]
    torch.testing.assert_close(trainer.callback_metrics["fastgradstats/grad_l2"], last.stats["grad"].total.l2)
    assert trainer.callback_metrics["fastgradstats/alerts"].item() == last.to_dict()["alert_count"] == 0


def test_lightning_logged_alert_count_is_the_records():
    callback = FastGradStatsCallback()
    module = TinyRegression()
    module.net[2].bias.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    trainer, _ = fit(callback, max_steps=1, module=module)
    record = callback.monitor.history[0]
    assert trainer.callback_metrics["fastgradstats/alerts"].item() == record.to_dict()["alert_count"] > 0


def test_lightning_callback_rejects_unknown_monitor_arguments():
    with pytest.raises(TypeError, match="FastGradStatsCallback"):
        FastGradStatsCallback(evrey=3)


# ---------------------------------------------------------------- 🤗 Transformers


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences, labels = inputs (causal LM)."""

    def __init__(self, size: int = 16, length: int = 8, vocab: int = 32) -> None:
        self.ids = torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class GradRecorder(transformers.TrainerCallback):
    """Keeps the gradients each on_pre_optimizer_step sees (it runs after the callback under test)."""

    def __init__(self) -> None:
        self.model = None
        self.grads_per_step: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads_per_step.append({name: p.grad.clone() for name, p in self.model.named_parameters()})


def train_gpt2(tmp_path, monkeypatch, make_callback, **args_kwargs):
    """Trains a one-layer GPT-2 (random init, nothing downloaded) for 4 steps, logging every step, with the
    callback ``make_callback(trainer)`` returns; returns (trainer, callback, recorder)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    args_kwargs = {"report_to": [], **args_kwargs}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, **args_kwargs,
    )
    recorder = GradRecorder()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[recorder])
    callback = make_callback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, callback, recorder


def trainer_logs(trainer, key: str) -> dict[int, float]:
    """``key`` of each log_history entry that has it, by step."""
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry}


@needs_accelerate
def test_hf_callback_records_the_models_parameter_gradients(tmp_path, monkeypatch):
    trainer, callback, recorder = train_gpt2(
        tmp_path, monkeypatch, lambda trainer: FastGradStatsTrainerCallback(trainer=trainer),
        max_grad_norm=0.0)
    history = callback.monitor.history
    assert [record.step for record in history] == [1, 2, 3, 4]
    stats = history[-1].stats["grad"]
    assert stats.names == [name for name, _ in trainer.model.named_parameters()]
    want = torch.stack([torch.linalg.vector_norm(recorder.grads_per_step[-1][name]) for name in stats.names])
    torch.testing.assert_close(stats.l2, want)
    assert callback.monitor.closed


@needs_accelerate
def test_hf_one_record_per_optimizer_step_with_gradient_accumulation(tmp_path, monkeypatch):
    trainer, callback, recorder = train_gpt2(
        tmp_path, monkeypatch, lambda trainer: FastGradStatsTrainerCallback(trainer=trainer),
        gradient_accumulation_steps=2, max_grad_norm=0.0)
    assert len(callback.monitor.history) == len(recorder.grads_per_step) == trainer.state.global_step == 4
    stats = callback.monitor.history[-1].stats["grad"]  # both micro-batches summed
    want = torch.stack([torch.linalg.vector_norm(recorder.grads_per_step[-1][name]) for name in stats.names])
    torch.testing.assert_close(stats.l2, want)


@needs_accelerate
@pytest.mark.parametrize("max_grad_norm", [1.0, 1e-3])  # the Trainer's default, and clipping every step
def test_hf_stats_are_those_before_the_trainers_clipping(tmp_path, monkeypatch, max_grad_norm):
    trainer, callback, recorder = train_gpt2(
        tmp_path, monkeypatch, lambda trainer: FastGradStatsTrainerCallback(trainer=trainer),
        max_grad_norm=max_grad_norm)
    grad_norm = trainer_logs(trainer, "grad_norm")  # the Trainer's own, from before clipping
    ours = trainer_logs(trainer, "grad/l2")
    assert ours == pytest.approx(grad_norm, rel=1e-5)
    assert {record.step: record.stats["grad"].total.l2.item() for record in callback.monitor.history} == ours
    assert max(grad_norm.values()) > max_grad_norm  # clipping acted on some step...
    clipped = [torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in step.values()]))
               for step in recorder.grads_per_step]
    assert max(clipped) <= max_grad_norm * (1 + 1e-4)  # ...on the gradients the optimizer received


@needs_accelerate
def test_hf_statistics_reach_log_history_and_report_to_targets(tmp_path, monkeypatch):
    trainer, callback, _ = train_gpt2(
        tmp_path, monkeypatch, lambda trainer: FastGradStatsTrainerCallback(every=2, trainer=trainer),
        report_to=["tensorboard"])
    steps = [record.step for record in callback.monitor.history]
    assert list(trainer_logs(trainer, "grad/l2")) == steps == [1, 3]
    entry = next(entry for entry in trainer.state.log_history if "grad/l2" in entry)
    assert {"grad/linf", "grad/nonfinite", "alerts/count", "alerts/exploding", "epoch"} <= entry.keys()
    assert not any(key.startswith("grad.") for key in entry)  # per-layer values only with log_layers=True
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(Path(tmp_path).rglob("events.out.tfevents*")).parent))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("train/grad/l2")}  # as train/grad_norm
    assert logged == pytest.approx(trainer_logs(trainer, "grad/l2"))


@needs_accelerate
def test_hf_log_layers_logs_every_layers_scalars_under_the_sink_tags(tmp_path, monkeypatch):
    trainer, callback, _ = train_gpt2(
        tmp_path, monkeypatch,
        lambda trainer: FastGradStatsTrainerCallback(every=4, trainer=trainer, log_layers=True))
    [entry] = [entry for entry in trainer.state.log_history if "grad/l2" in entry]
    record = callback.monitor.history[0]
    expected = fgs.sinks.scalars(record)
    assert {key: entry[key] for key in expected} == expected
    assert "grad.l2.transformer.h.0/attn.c_attn.weight" in entry


@needs_accelerate
def test_hf_callback_without_a_trainer_warns_that_nothing_reaches_the_trainers_logs(tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="trainer="):
        trainer, callback, _ = train_gpt2(tmp_path, monkeypatch,
                                          lambda trainer: FastGradStatsTrainerCallback())
    assert len(callback.monitor.history) == 4
    assert trainer_logs(trainer, "grad/l2") == {}


@needs_accelerate
def test_hf_fp16_without_a_gradscaler_still_records_before_clipping(tmp_path, monkeypatch):
    trainer, _, _ = train_gpt2(  # fp16 on the CPU: autocast, no loss scaling
        tmp_path, monkeypatch, lambda trainer: FastGradStatsTrainerCallback(trainer=trainer), fp16=True)
    assert trainer.accelerator.scaler is None
    assert trainer_logs(trainer, "grad/l2") == pytest.approx(trainer_logs(trainer, "grad_norm"), rel=1e-5)


def test_hf_loss_scaled_gradients_are_recorded_after_clipping_with_a_warning():
    callback = FastGradStatsTrainerCallback()  # no trainer: fp16 is taken to mean a GradScaler
    model = torch.nn.Linear(3, 1)
    args = transformers.TrainingArguments(output_dir="unused", fp16=True, use_cpu=True, max_grad_norm=1.0)
    state = transformers.TrainerState()
    control = transformers.TrainerControl()
    with pytest.warns(UserWarning) as caught:
        callback.on_train_begin(args, state, control, model=model)
    messages = [str(warning.message) for warning in caught]
    assert any("after clipping to max_grad_norm=1.0" in message for message in messages)
    assert any("no trainer= given" in message for message in messages)
    model(torch.ones(2, 3)).sum().backward()  # no record at the end of backward
    assert len(callback.monitor.history) == 0
    callback.on_pre_optimizer_step(args, state, control)
    assert [record.step for record in callback.monitor.history] == [1]
    callback.on_train_end(args, state, control)


def test_hf_callback_rejects_unknown_monitor_arguments():
    with pytest.raises(TypeError, match="FastGradStatsTrainerCallback"):
        FastGradStatsTrainerCallback(histogram="log2")


# ---------------------------------------------------------------- missing frameworks


@pytest.mark.parametrize(
    ("module", "frameworks"),
    [
        ("lightning", ("lightning", "lightning.pytorch", "pytorch_lightning")),
        ("transformers", ("transformers",)),
    ],
)
def test_missing_framework_raises_importerror_naming_the_extra(monkeypatch, module, frameworks):
    for name in frameworks:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, f"fastgradstats.integrations.{module}")
    with pytest.raises(ImportError, match=r'pip install "fastgradstats\[all\]"'):
        importlib.import_module(f"fastgradstats.integrations.{module}")
