"""Framework callbacks on CPU: Lightning's FastGradStatsCallback, 🤗 FastGradStatsTrainerCallback."""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

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
    """Trains ``module`` (a new TinyRegression by default) for ``max_steps`` optimizer steps; returns
    (trainer, module)."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=generator), torch.randn(24, 2, generator=generator)
    data = torch.utils.data.TensorDataset(x, y)
    module = TinyRegression() if module is None else module
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **trainer_kwargs,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return trainer, module


def test_lightning_callback_tracks_every_nth_optimizer_step_and_closes():
    callback = FastGradStatsCallback(every=2)
    fit(callback)
    assert callback.monitor.steps == 6
    assert [record.step for record in callback.monitor.history] == [1, 3, 5]
    assert callback.monitor.closed


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
    assert trainer.callback_metrics["fastgradstats/alerts"].item() == len(last.alerts)


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


def train_gpt2(tmp_path, monkeypatch, callback, **args_kwargs):
    """Trains a one-layer GPT-2 (random init, nothing downloaded) for 4 steps; returns (trainer, recorder)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, **args_kwargs,
    )
    recorder = GradRecorder()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback, recorder]
    )
    trainer.train()
    return trainer, recorder


@needs_accelerate
def test_hf_callback_records_the_models_parameter_gradients(tmp_path, monkeypatch):
    callback = FastGradStatsTrainerCallback()
    trainer, recorder = train_gpt2(tmp_path, monkeypatch, callback, max_grad_norm=0.0)
    history = callback.monitor.history
    assert [record.step for record in history] == [1, 2, 3, 4]
    stats = history[-1].stats["grad"]
    assert stats.names == [name for name, _ in trainer.model.named_parameters()]
    want = torch.stack([torch.linalg.vector_norm(recorder.grads_per_step[-1][name]) for name in stats.names])
    torch.testing.assert_close(stats.l2, want)
    assert callback.monitor.closed


@needs_accelerate
def test_hf_one_record_per_optimizer_step_with_gradient_accumulation(tmp_path, monkeypatch):
    callback = FastGradStatsTrainerCallback()
    trainer, recorder = train_gpt2(tmp_path, monkeypatch, callback, gradient_accumulation_steps=2)
    assert len(callback.monitor.history) == len(recorder.grads_per_step) == trainer.state.global_step == 4


@needs_accelerate
def test_hf_stats_are_those_of_the_gradients_after_trainer_clipping(tmp_path, monkeypatch):
    callback = FastGradStatsTrainerCallback(every=2)
    train_gpt2(tmp_path, monkeypatch, callback, max_grad_norm=1e-3)
    assert [record.step for record in callback.monitor.history] == [1, 3]
    assert all(record.stats["grad"].total.l2 <= 1e-3 for record in callback.monitor.history)


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
