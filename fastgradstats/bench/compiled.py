"""The ``compiled`` family of ``fastgradstats bench``: what statistics cost inside a compiled training step.

One small train step (an MLP of :data:`DEPTH` Linear + GELU layers of width :data:`WIDTH` on a batch of
:data:`BATCH`: forward, backward, SGD update), compiled with ``torch.compile(fullgraph=True)`` (backward
traced by Dynamo, ``trace_autograd_ops``), timed with and without statistics; the statistics are
``fgs.clip_grad_norm_(..., return_stats=True)`` and ``fgs.grad_stats(model, hist="log2")``, as a monitored
run would take them. The same two steps eager are the other baselines. Each step is compiled before it is
timed (tens of seconds on a small CPU), then timed as the median of ``repeats`` calls after ``warmup``
(CUDA events on a GPU). The overhead of the statistics is the difference between the first two rows.
On a CPU, the OpenMP threads of Inductor's kernels spin for a while after each parallel region and take the
cores from the native backend's threads: ``OMP_WAIT_POLICY=PASSIVE`` shows the statistics' own cost (one
``fastgradstats::raw_stats`` call over this model's 1.05M gradients: about 3.9 ms spinning, 1.1 ms passive,
on a 2-core machine).

    python -m fastgradstats.bench.compiled [--device cuda] [--dtype bfloat16] [--repeats 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastgradstats as fgs

COMPILED_FAMILY = "compiled"
WIDTH, DEPTH, BATCH = 512, 4, 64
NUM_TENSORS = 2 * DEPTH  # a weight and a bias per layer
MAX_NORM, LEARNING_RATE = 1.0, 1e-3
# candidate -> (compiled, with statistics); the first is ours
CANDIDATES = {"ours": (True, True), "compiled-step": (True, False), "eager+stats": (False, True),
              "eager-step": (False, False)}


def model_name() -> str:
    return f"mlp-{WIDTH}x{DEPTH}"


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, stats: bool) -> Callable[[], list]:
    """One SGD step of ``model`` on (x, y), clipping and taking gradient statistics when ``stats``."""
    params = list(model.parameters())

    def step() -> list:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        out = [loss.detach()]
        if stats:
            norm, clip_stats = fgs.clip_grad_norm_(params, MAX_NORM, return_stats=True)
            grads = fgs.grad_stats(model, hist="log2")
            out += [norm, clip_stats.l2, grads.hist, grads.total.linf]
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-LEARNING_RATE)
        for p in params:
            p.grad = None
        return out

    return step


def call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``fn()`` in ms (CUDA events between synchronizes on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def measure(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 20, warmup: int = 3
            ) -> dict[str, float]:
    """Median ms of one step of each of :data:`CANDIDATES`: compiled ones are compiled first, then each
    candidate runs ``warmup`` steps, then the candidates take turns, one timed step each, ``repeats`` times
    (so a machine that slows down mid-run slows every candidate alike)."""
    torch.manual_seed(0)
    layers = [m for _ in range(DEPTH) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU())]
    model = torch.nn.Sequential(*layers).to(device=device, dtype=dtype)
    x = torch.randn(BATCH, WIDTH, device=device, dtype=dtype)
    y = torch.randn(BATCH, WIDTH, device=device, dtype=dtype)
    before = torch._dynamo.config.trace_autograd_ops
    torch._dynamo.config.trace_autograd_ops = True
    try:
        steps = {}
        for name, (compiled, stats) in CANDIDATES.items():
            step = train_step(model, x, y, stats)
            steps[name] = torch.compile(step, fullgraph=True) if compiled else step
            for _ in range(max(1, warmup)):  # the first call of a compiled step compiles it
                steps[name]()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                times[name].append(call_ms(step, device))
        return {name: statistics.median(values) for name, values in times.items()}
    finally:
        torch._dynamo.config.trace_autograd_ops = before


def report(times: dict[str, float], device: torch.device, dtype: torch.dtype) -> dict:
    """The measurement as one record: times, and the statistics' overhead in the compiled and eager step."""
    return {"family": COMPILED_FAMILY, "model": model_name(), "batch": BATCH, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "ms": times,
            "compiled_overhead_ms": times["ours"] - times["compiled-step"],
            "compiled_overhead": times["ours"] / times["compiled-step"] - 1,
            "eager_overhead_ms": times["eager+stats"] - times["eager-step"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="append the record as a JSON line to this file")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    record = report(measure(device, dtype, args.repeats, args.warmup), device, dtype)
    print(f"{model_name()} train step (batch {BATCH}, {record['dtype']}) on {device}, "
          f"median of {args.repeats}")
    for name, ms in record["ms"].items():
        print(f"  {name:<18} {ms:10.3f} ms")
    print(f"  statistics in the compiled step: +{record['compiled_overhead_ms']:.3f} ms "
          f"({100 * record['compiled_overhead']:+.1f}%); eager: +{record['eager_overhead_ms']:.3f} ms")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
