"""The ``fastgradstats`` command.

    fastgradstats demo [--steps 30] [--every 10] [--seed 0] [--backend torch|triton]
    fastgradstats bench [--workload NAME ...] [--family NAME ...] [--repeats N] [--device cpu|cuda]
                        [--backend torch|triton] [--results PATH] [--no-save]

``demo`` trains a tiny randomly initialised GPT-2 (a small MLP when transformers is not installed) on the CPU
with AdamW, on a synthetic stream that repeats one random 16-token pattern, so the loss visibly falls. Every
step clips the gradients with :func:`fastgradstats.clip_grad_norm_` and prints the loss and the gradient norm;
every ``--every`` steps it also prints the per-layer table of :func:`fastgradstats.grad_stats` and the log2
histogram of all gradients. Nothing is downloaded.

``bench`` times the statistics against the usual PyTorch baselines on model-shaped random tensors and appends
the rows to a JSON-lines results file; see :mod:`fastgradstats.bench`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fastgradstats as fgs
from fastgradstats import bench
from fastgradstats.dispatch import resolve_backend

VOCAB = 256
SEQ_LEN = 32
BATCH = 8
PERIOD = 16
MAX_NORM = 1.0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastgradstats`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fastgradstats", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a tiny model on CPU and print gradient statistics")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    demo.add_argument("--every", type=int, default=10, help="print statistics every N steps (default 10)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default 0)")
    demo.add_argument("--backend", choices=["torch", "triton"], default=None,
                      help="statistics backend (default: automatic)")
    bench_parser = commands.add_parser("bench", help="time the statistics against the usual PyTorch code")
    bench_parser.add_argument("--workload", action="append", choices=list(bench.WORKLOADS),
                              help="tensor shapes to measure, repeatable (default: gpt2-small on the CPU; "
                                   "gpt2-small, 1b, 7b and many-small on CUDA; tiny is for smoke tests)")
    bench_parser.add_argument("--family", action="append", choices=list(bench.FAMILIES),
                              help="statistic family, repeatable (default: all)")
    bench_parser.add_argument("--repeats", type=int, default=None,
                              help="timed calls per candidate; the median is reported (default 5 on CPU, "
                                   "20 on CUDA)")
    bench_parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench_parser.add_argument("--backend", choices=["torch", "triton"], default=None,
                              help="statistics backend (default: automatic)")
    bench_parser.add_argument("--results", default=str(bench.DEFAULT_RESULTS),
                              help=f"JSON-lines file to append the rows to (default {bench.DEFAULT_RESULTS})")
    bench_parser.add_argument("--no-save", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_bench(bench_parser, args)
    if args.steps < 1 or args.every < 1:
        demo.error("--steps and --every must be >= 1")
    try:
        resolve_backend(args.backend, torch.device("cpu"))
    except ValueError as error:  # e.g. --backend triton without TRITON_INTERPRET=1 (the demo runs on the CPU)
        demo.error(str(error))
    run_demo(args.steps, args.every, args.seed, args.backend)
    return 0


def run_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check the ``bench`` options, then run :func:`fastgradstats.bench.run`."""
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        parser.error(str(error))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    try:
        resolve_backend(args.backend, device)
    except ValueError as error:
        parser.error(str(error))
    bench.run(args.workload, args.family, repeats=args.repeats, device=device, backend=args.backend,
              results=None if args.no_save else args.results)
    return 0


def run_demo(steps: int, every: int, seed: int, backend: str | None) -> None:
    """Train for ``steps`` steps, printing the loss and the gradient statistics every ``every`` steps."""
    torch.manual_seed(seed)
    model, description = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = torch.randperm(VOCAB)[:PERIOD].repeat(SEQ_LEN // PERIOD + 2)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{description}, {num_params:,} parameters; {steps} steps of AdamW on a repeating {PERIOD}-token pattern")

    start = time.perf_counter()
    for step in range(1, steps + 1):
        offsets = torch.randint(PERIOD, (BATCH,)).tolist()
        tokens = torch.stack([stream[o : o + SEQ_LEN + 1] for o in offsets])
        loss = next_token_loss(model, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        report = step % every == 0 or step == steps
        if report:  # before clipping: the gradients as the loss produced them
            stats = fgs.grad_stats(model, hist="log2", backend=backend)
        total_norm, clip_stats = fgs.clip_grad_norm_(model.parameters(), MAX_NORM, return_stats=True)
        optimizer.step()
        print(f"step {step:4d}  loss {loss.item():.4f}  grad norm {total_norm.item():.4f} "
              f"(clipped to {MAX_NORM})  max |grad| {clip_stats.total.linf.item():.3g}")
        if report:
            print(stats.table())
            print(log2_sparkline(stats.total.hist, stats.total.hist_edges), end="\n\n")
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s")


def log2_sparkline(counts: torch.Tensor, edges: torch.Tensor) -> str:
    """One line drawing a log2 histogram [B] over its non-empty bins (edges [B + 1] are powers of two)."""
    nonzero = counts.nonzero().flatten().tolist()
    if not nonzero:
        return "log2 |grad| histogram: every gradient is zero or non-finite"
    first, last = nonzero[0], nonzero[-1]
    shown = counts[first : last + 1].tolist()
    bars = "".join(" .:-=+*#@"[-(-8 * c // max(shown))] for c in shown)
    low, high = (int(e) for e in edges[[first, last + 1]].log2().tolist())
    return f"log2 |grad| histogram, all layers: 2^{low} |{bars}| 2^{high}"


def build_model() -> tuple[torch.nn.Module, str]:
    """A tiny GPT-2 from a config (random init), or a small MLP next-token model without transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        mlp = torch.nn.Sequential(
            torch.nn.Embedding(VOCAB, 64), torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, VOCAB)
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


if __name__ == "__main__":
    raise SystemExit(main())
