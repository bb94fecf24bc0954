"""``fastgradstats demo``: train a tiny transformer on CPU with a Monitor attached and write a report folder.

The model is a randomly initialised 2-layer GPT-2 (d=64, 121k parameters; a small MLP when transformers is not
installed), trained with AdamW and gradient clipping on a synthetic stream that repeats one random 16-token
pattern with a quarter of its tokens replaced by noise, so the loss falls visibly and then levels off (as in
real training, the gradients stay alive). Nothing is downloaded. The report folder holds:

* ``stats.jsonl``: one line per tracked step (gradient, weight, update and init statistics, alerts);
* ``gradient_flow.png``, ``log2_heatmap.png``, ``norms.png``: the three plots (needs matplotlib);
* ``tensorboard/``: the same statistics as TensorBoard scalars and histograms (needs tensorboard);

and a summary is printed at the end: the layers with the largest and smallest gradients, and any alerts.

Each run starts a fresh report: in an existing folder, the files an earlier run wrote there (``stats.jsonl``,
the three plots, the TensorBoard event files in ``tensorboard/``) are removed first, so the statistics and the
TensorBoard log hold this run only. Other files in the folder are left alone.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastgradstats as fgs

VOCAB = 256
SEQ_LEN = 32
BATCH = 8
PERIOD = 16
NOISE = 0.25  # fraction of tokens replaced by random ones
MAX_NORM = 1.0
TRACK = ("grad", "param", "update", "init")
REPORT_FILES = ("stats.jsonl", "gradient_flow.png", "log2_heatmap.png", "norms.png")
TENSORBOARD_EVENTS = "tensorboard/events.out.tfevents.*"


def run(steps: int = 300, every: int = 10, out: str | Path = "fastgradstats-demo", seed: int = 0,
        backend: str | None = None) -> fgs.Monitor:
    """Train for ``steps`` steps, tracking every ``every``-th, and write a fresh report to ``out`` (see
    :func:`start_report`)."""
    out = start_report(out)
    torch.manual_seed(seed)
    model, description = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = torch.randperm(VOCAB)[:PERIOD].repeat(SEQ_LEN // PERIOD + 2)
    sinks, notes = _sinks(out)
    monitor = fgs.Monitor(model, every=every, track=TRACK, sinks=sinks, backend=backend)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{description}, {num_params:,} parameters: {steps} steps of AdamW on a noisy repeating "
          f"{PERIOD}-token pattern, statistics every {every} steps -> {out}/")

    started = time.perf_counter()
    progress = _Progress(steps)
    for _ in range(steps):
        offsets = torch.randint(PERIOD, (BATCH,)).tolist()
        tokens = torch.stack([stream[o : o + SEQ_LEN + 1] for o in offsets])
        noise = torch.rand(tokens.shape) < NOISE
        tokens = torch.where(noise, torch.randint(VOCAB, tokens.shape), tokens)
        loss = next_token_loss(model, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the gradients as the loss made them (monitor.attach(optimizer) would see them clipped)
        monitor.step()
        fgs.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        progress.update(loss.item())
    progress.close()
    monitor.close()
    elapsed = time.perf_counter() - started
    notes += _plots(monitor, out)
    print(summary(monitor, elapsed, notes))
    return monitor


def start_report(out: str | Path) -> Path:
    """The report folder ``out``, created if missing, without the files an earlier run wrote there
    (REPORT_FILES and the TensorBoard event files), so that a run never appends to another run's statistics
    or TensorBoard log. Other files are kept. Raises OSError when the folder cannot be created or cleared."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = [out / name for name in REPORT_FILES if (out / name).exists()]
    previous += sorted(out.glob(TENSORBOARD_EVENTS))
    for path in previous:
        path.unlink()
    if previous:
        print(f"{out}/ held an earlier report: removed its {len(previous)} files, starting afresh")
    return out


def build_model() -> tuple[torch.nn.Module, str]:
    """A tiny GPT-2 from a config (random init), or a small MLP next-token model without transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        mlp = torch.nn.Sequential(
            torch.nn.Embedding(VOCAB, 64), torch.nn.Linear(64, 256), torch.nn.GELU(),
            torch.nn.Linear(256, VOCAB),
        )
        return mlp, "MLP (transformers is not installed)"
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config), "GPT-2 (2 layers, d=64)"


def next_token_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (logits from either model)."""
    output = model(tokens[:, :-1])
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def summary(monitor: fgs.Monitor, elapsed: float, notes: list[str]) -> str:
    """The closing text: timing, largest and smallest gradients of the last tracked step, alerts, notes."""
    records = [r for r in monitor.history if "grad" in r.stats]
    lines = [f"\n{monitor.steps} steps in {elapsed:.1f} s, {len(monitor.history)} tracked"]
    if records:
        last = records[-1].stats["grad"]
        order = last.l2.argsort(descending=True).tolist()
        l2 = last.l2.tolist()
        lines.append(f"largest gradients at step {records[-1].step}: "
                     + ", ".join(f"{last.names[i]} {l2[i]:.3g}" for i in order[:3]))
        lines.append("smallest: " + ", ".join(f"{last.names[i]} {l2[i]:.3g}" for i in order[-3:]))
        lines.append(f"global gradient norm {last.total.l2.item():.3g}, update/weight ratio (median over "
                     f"layers) {records[-1].update_ratio.median().item():.3g}"
                     if "update" in records[-1].stats
                     else f"global gradient norm {last.total.l2.item():.3g}")
    alerts = [alert for record in monitor.history for alert in record.alerts]
    counts = collections.Counter(alert.kind for alert in alerts)
    lines.append("alerts: " + (", ".join(f"{n} {kind}" for kind, n in counts.items()) if alerts else "none"))
    lines += [f"  step {alert.step}: {alert.message}" for alert in alerts[:5]]
    return "\n".join(lines + notes)


def _sinks(out: Path) -> tuple[list, list[str]]:
    sinks, notes = [fgs.sinks.JSONL(out / "stats.jsonl")], [f"wrote {out / 'stats.jsonl'}"]
    try:
        sinks.append(fgs.sinks.TensorBoard(out / "tensorboard"))
        notes.append(f"wrote {out / 'tensorboard'}/ (tensorboard --logdir {out / 'tensorboard'})")
    except ImportError:
        notes.append("no TensorBoard log: pip install tensorboard")
    return sinks, notes


def _plots(monitor: fgs.Monitor, out: Path) -> list[str]:
    try:
        from fastgradstats import plots
    except ImportError:
        return ["no plots: pip install matplotlib"]
    records = [r for r in monitor.history if "grad" in r.stats]
    if not records:
        return []
    largest = records[-1].stats["grad"].names[int(records[-1].stats["grad"].l2.argmax())]
    try:
        plots.gradient_flow(records[-1].stats["grad"], path=out / "gradient_flow.png")
        plots.log2_heatmap(records, largest, path=out / "log2_heatmap.png")
        plots.norms_over_time(records, path=out / "norms.png")
    except ImportError:
        return ["no plots: pip install matplotlib"]
    return [f"wrote {out}/gradient_flow.png, log2_heatmap.png ({largest}), norms.png"]


class _Progress:
    """A tqdm progress bar showing the loss, or a line every 10% without tqdm."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(self, loss: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update()
        elif self.done % max(1, self.total // 10) == 0 or self.done == self.total:
            print(f"step {self.done}/{self.total}  loss {loss:.4f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
