"""The ``optim`` family of ``fastgradstats bench``: update and optimizer-state statistics of AdamW, ours
against the copy-based way and a Composer-style per-parameter loop, time and extra peak memory in the same
run.

The workload's shapes become parameters (gradients and AdamW state filled by one real step). Candidates,
each a part run before ``optimizer.step()`` and a part run after it:

* ``ours``: ``fgs.optimizer_stats(optimizer)``, after the step: every statistic of ``exp_avg``, ``exp_avg_sq``
  and of the update Δθ rebuilt from the state, with ‖Δθ‖/‖θ‖ (no copy).
* ``copy-diff``: ``p.detach().clone()`` of every parameter before the step; after it, per layer
  ``(p - copy).norm()``, ``copy.norm()`` and ``torch._foreach_norm`` of both state lists.
* ``composer-loop``: what Composer's ``DecoupledAdamW.report_per_parameter_metrics`` does after the step: per
  parameter, the step tensor ``lr / bc1 · m / (sqrt(v) / sqrt(bc2) + eps)`` materialised, then the norms
  of it, of m, v and the parameter.

Extra peak memory: each candidate runs in a fresh subprocess (so no candidate inherits another's high-water
mark), with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that glibc returns every large freed block to the
system (resident memory then follows the live tensors). On Linux the subprocess resets its peak resident size
(writing 5 to ``/proc/self/clear_refs``) and reads ``VmRSS`` / ``VmHWM`` from ``/proc/self/status``: the extra
peak is the high-water mark over the candidate's before-part, then (reset after the optimizer step, whose own
temporaries are not the candidate's) over its after-part, above the resident size before the before-part,
so memory the candidate holds across the step (the copy) counts. On CUDA the same from
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. Elsewhere memory is not measured
(None).
Time: the median over ``repeats`` steps of the before-part plus the after-part (the step itself not timed).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fastgradstats as fgs

from .workloads import Workload

OPTIM_FAMILY = "optim"
CANDIDATES = ("ours", "copy-diff", "composer-loop")
MMAP_THRESHOLD = 65536  # bytes: glibc serves (and returns) every larger block with mmap
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.1
Before = Callable[[list[torch.Tensor], torch.optim.Optimizer], object]
After = Callable[[list[torch.Tensor], torch.optim.Optimizer, object], object]


def adamw_problem(shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype, device: torch.device
                  ) -> tuple[list[torch.Tensor], torch.optim.AdamW]:
    """Parameters of ``shapes`` (randn · 0.02), gradients (randn · 1e-3) and AdamW (for-loop) whose state one
    real step has filled."""
    generator = torch.Generator(device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype, device=device, generator=generator) * 0.02)
              for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=dtype, device=device, generator=generator).mul_(1e-3)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, foreach=False)
    optimizer.step()
    return params, optimizer


def nothing_before(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    return None


def ours_after(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, held: object) -> object:
    stats = fgs.optimizer_stats(optimizer)
    return stats.update, stats.update_ratio


def copy_before(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def copy_diff_after(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, held: object) -> object:
    update = [(p.detach() - before).norm() for p, before in zip(params, held)]
    ratio = [norm / before.norm() for norm, before in zip(update, held)]
    states = [optimizer.state[p] for p in params]
    return (update, ratio, torch._foreach_norm([s["exp_avg"] for s in states]),
            torch._foreach_norm([s["exp_avg_sq"] for s in states]))


def composer_after(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, held: object) -> object:
    metrics = []
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state[p]
            step = float(state["step"])
            bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
            step_tensor = state["exp_avg"].div(denom).mul_(group["lr"] / bias_correction1)
            update_norm, param_norm = step_tensor.norm(), p.detach().norm()
            metrics.append((update_norm, state["exp_avg"].norm(), state["exp_avg_sq"].norm(), param_norm,
                            update_norm / param_norm))
    return metrics


PARTS: dict[str, tuple[Before, After]] = {
    "ours": (nothing_before, ours_after),
    "copy-diff": (copy_before, copy_diff_after),
    "composer-loop": (nothing_before, composer_after),
}


class PeakMemory:
    """Resident (CPU, Linux) or allocated (CUDA) bytes now, and the peak since the last ``reset``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = device.type == "cuda" or _reset_linux_peak()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_linux_peak()

    def now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_bytes("VmHWM")


def _reset_linux_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"optim bench: no {key} in /proc/self/status")


def measure(candidate: str, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype, device: torch.device,
            repeats: int, warmup: int) -> dict:
    """Time and extra peak memory of one candidate (run this in a fresh process: see the module docstring)."""
    before, after = PARTS[candidate]
    params, optimizer = adamw_problem(shapes, dtype, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(warmup + repeats):
        sync()
        began = time.perf_counter()
        held = before(params, optimizer)
        sync()
        spent = time.perf_counter() - began
        optimizer.step()
        sync()
        began = time.perf_counter()
        result = after(params, optimizer, held)
        sync()
        times.append((spent + time.perf_counter() - began) * 1e3)
        del held, result
    memory = PeakMemory(device)
    extra_peak = None
    if memory.available:
        memory.reset()
        start = memory.now()
        held = before(params, optimizer)
        peak_before = memory.peak() - start
        optimizer.step()
        memory.reset()
        result = after(params, optimizer, held)
        extra_peak = max(peak_before, memory.peak() - start)
        del held, result
    return {"ms": statistics.median(times[warmup:]), "extra_peak_bytes": extra_peak}


def measure_in_subprocess(candidate: str, workload: Workload, device: torch.device, repeats: int,
                          warmup: int) -> dict:
    """``measure`` in a fresh Python process (``{"error": ...}`` when it fails)."""
    request = {"candidate": candidate, "shapes": workload.shapes, "dtype": str(workload.dtype).removeprefix(
        "torch."), "device": str(device), "repeats": repeats, "warmup": warmup}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run([sys.executable, "-m", "fastgradstats.bench.optim_memory", json.dumps(request)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"error": f"{candidate} failed in its subprocess: {lines[-1]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    request = json.loads(argv[0])
    shapes = tuple(tuple(shape) for shape in request["shapes"])
    result = measure(request["candidate"], shapes, getattr(torch, request["dtype"]),
                     torch.device(request["device"]), request["repeats"], request["warmup"])
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
