"""The ``fastgradstats bench`` command: our statistics against the usual PyTorch code, on real model shapes.

For each workload (a list of tensor shapes filled with ``randn * 1e-3``, the scale of real gradients) and each
statistic family, it times our call, the baselines people write today and a read floor (one ``torch.sum`` over
a single buffer of the same bytes), all in the same run. Every row reports the median time, the bytes read
(Σ numel × itemsize over the lists the family reads), GB/s, the fraction of the read floor (floor time / time)
and, for our rows, the speedup over each baseline of the family, the kernel launches per call (Triton backend)
and the host syncs per call (CUDA). Rows are printed as a table and appended as JSON lines to a results file.

    fastgradstats bench                                  # gpt2-small on the CPU; all workloads on CUDA
    fastgradstats bench --workload 7b --family pair --repeats 50
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fastgradstats as fgs
from fastgradstats.dispatch import resolve_backend

from .workloads import DEFAULT_WORKLOADS, GRADIENT_SCALE, WORKLOADS, Workload

DEFAULT_RESULTS = Path("benchmarks/results/results.jsonl")
LINEAR_BINS = 64
TRAJECTORY_CHECKPOINTS = 4


# Candidates: each is called as fn(a, b) with two lists of the workload's tensors (only pairs read b).
def norm_loop(a: list[torch.Tensor], b: list[torch.Tensor]) -> object:
    """Per-layer norms with a Python loop of ``t.norm()``."""
    return [t.norm() for t in a]


def foreach_norm(a: list[torch.Tensor], b: list[torch.Tensor]) -> object:
    """Per-layer norms with ``torch._foreach_norm``, the global norm from them with ``get_total_norm``."""
    norms = torch._foreach_norm(a)
    return norms, torch.nn.utils.get_total_norm(norms)


def wandb_loop(a: list[torch.Tensor], b: list[torch.Tensor]) -> object:
    """What ``wandb.watch`` does per tensor: min and max ``.item()`` (two syncs) and a 64-bin ``torch.histc``
    (after a float32 copy of half-precision tensors, as wandb makes)."""
    hists = []
    for t in a:
        x = t if t.dtype in (torch.float32, torch.float64) else t.float()
        lo, hi = x.min().item(), x.max().item()
        hists.append(torch.histc(x, bins=LINEAR_BINS, min=lo, max=hi))
    return hists


def cat_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> object:
    """The global cosine of the concatenated, flattened lists with ``F.cosine_similarity``."""
    flat_a, flat_b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return F.cosine_similarity(flat_a, flat_b, dim=0)


def cosine_loop(a: list[torch.Tensor], b: list[torch.Tensor]) -> object:
    """Per-layer cosines with a Python loop of ``F.cosine_similarity``."""
    return [F.cosine_similarity(x.flatten(), y.flatten(), dim=0) for x, y in zip(a, b)]


def checkpoint_series(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """TRAJECTORY_CHECKPOINTS state_dicts alternating between the two lists (no copies): what reading a
    checkpoint series costs."""
    names = [str(i) for i in range(len(a))]
    return [dict(zip(names, a if k % 2 == 0 else b)) for k in range(TRAJECTORY_CHECKPOINTS)]


def flatten_gram(a: list[torch.Tensor], b: list[torch.Tensor]) -> object:
    """The usual trajectory Gram: every checkpoint flattened with ``parameters_to_vector`` into one [K, N]
    matrix (K × N values in memory at once), then ``X @ X.T``."""
    flat = torch.stack([torch.nn.utils.parameters_to_vector(c.values()) for c in checkpoint_series(a, b)])
    return flat @ flat.T


BASELINES: dict[str, Callable[[list[torch.Tensor], list[torch.Tensor]], object]] = {
    "norm-loop": norm_loop,
    "foreach-norm": foreach_norm,
    "wandb-loop": wandb_loop,
    "cat-cosine": cat_cosine,
    "cosine-loop": cosine_loop,
    "flatten-gram": flatten_gram,
}
FAMILIES: dict[str, tuple[str, ...]] = {  # family -> its baselines
    "stats+log2": ("norm-loop", "foreach-norm", "wandb-loop"),
    "stats": ("norm-loop", "foreach-norm"),
    "linear-hist": ("wandb-loop",),
    "pair": ("cat-cosine", "cosine-loop"),
    "trajectory": ("flatten-gram",),
}
LISTS_READ = {"pair": 2, "trajectory": TRAJECTORY_CHECKPOINTS}  # lists of the workload read per call
OURS, FLOOR = "ours", "read-floor"


def ours(family: str, backend: str | None) -> Callable[[list[torch.Tensor], list[torch.Tensor]], object]:
    """Our call for a family: ``fgs.tensor_stats`` with the family's histogram, ``fgs.pair_stats`` or
    ``fgs.trajectory_map`` (centred at the first checkpoint, its Gram on the tensors' device)."""
    if family == "pair":
        return lambda a, b: fgs.pair_stats(a, b, backend=backend)
    if family == "trajectory":
        return lambda a, b: fgs.trajectory_map(checkpoint_series(a, b), center=0, progress=False,
                                               device=a[0].device)
    hist = {"stats+log2": "log2", "stats": None, "linear-hist": "linear"}[family]
    return lambda a, b: fgs.tensor_stats(a, hist=hist, bins=LINEAR_BINS, backend=backend)


@dataclass
class Row:
    """One measured candidate of one family on one workload (``ms`` is None when it failed: see ``error``)."""

    workload: str
    family: str
    candidate: str
    ms: float | None
    bytes: int
    gb_per_s: float | None
    floor_fraction: float | None
    speedups: dict[str, float] = field(default_factory=dict)  # ours only: baseline ms / our ms
    baseline_ms: dict[str, float | None] = field(default_factory=dict)  # ours only
    launches: int | None = None  # ours with the Triton backend: kernel launches per call
    host_syncs: int | None = None  # ours on CUDA: synchronizing CUDA calls per call
    error: str | None = None


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup`` calls.

    On CUDA each call is timed with CUDA events, with a synchronize before and after it.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            with torch.cuda.device(device):  # events record on the device's current stream
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


class _CountingKernel:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](...)`` launches it and counts one."""

    def __init__(self, kernel, counter: list[int]) -> None:
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counter[0] += 1
            return launch(*args, **kwargs)

        return counted


@contextlib.contextmanager
def counting_launches() -> Iterator[list[int]]:
    """Within the block, ``counter[0]`` counts the launches of every fastgradstats Triton kernel."""
    from fastgradstats.kernels import merge, pair_stats, tensor_stats

    counter = [0]
    kernels = [(tensor_stats, "_chunk_kernel"), (pair_stats, "_pair_chunk_kernel"), (merge, "_merge_kernel")]
    originals = [getattr(module, name) for module, name in kernels]
    try:
        for (module, name), kernel in zip(kernels, originals):
            setattr(module, name, _CountingKernel(kernel, counter))
        yield counter
    finally:
        for (module, name), kernel in zip(kernels, originals):
            setattr(module, name, kernel)


def count_launches(fn: Callable[[], object]) -> int:
    """Triton kernel launches made by one call of ``fn``."""
    with counting_launches() as counter:
        fn()
    return counter[0]


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronizing CUDA calls made by one call of ``fn`` (seen by ``set_sync_debug_mode("warn")``); None
    off CUDA."""
    if device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def free_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CUDA), or available physical memory (CPU on Linux); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def read_floor(num_bytes: int, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
    """The read-floor call: one ``torch.sum`` over a single buffer of ``num_bytes`` bytes (written here, so
    that its pages are real memory)."""
    buffer = torch.empty(num_bytes // dtype.itemsize, dtype=dtype, device=device).fill_(GRADIENT_SCALE)
    return functools.partial(torch.sum, buffer)


class Timings:
    """Median times on one workload, each measured once: a baseline shared by families, the floor of a size.

    A measurement that raises a RuntimeError (out of memory included) is kept as (None, the error message).
    """

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.measured: dict[str, tuple[float | None, str | None]] = {}

    def time(self, key: str, fn: Callable[[], object]) -> tuple[float | None, str | None]:
        """(median ms of ``fn()``, None), or (None, error)."""
        return self._once(key, lambda: median_ms(fn, self.device, self.repeats, self.warmup))

    def floor(self, num_bytes: int, dtype: torch.dtype) -> tuple[float | None, str | None]:
        """(read floor ms of ``num_bytes``, None), or (None, error)."""
        return self._once(f"{FLOOR} {num_bytes}", lambda: median_ms(
            read_floor(num_bytes, dtype, self.device), self.device, self.repeats, self.warmup))

    def _once(self, key: str, measure: Callable[[], float]) -> tuple[float | None, str | None]:
        if key not in self.measured:
            try:
                self.measured[key] = measure(), None
            except RuntimeError as error:
                self.measured[key] = None, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return self.measured[key]


def family_rows(
    workload: Workload, family: str, a: list[torch.Tensor], b: list[torch.Tensor], timings: Timings,
    backend: str | None,
) -> list[Row]:
    """Rows of one family: ours (with launches and host syncs), the family's baselines, the read floor."""
    num_bytes = workload.num_bytes * LISTS_READ.get(family, 1)
    floor_ms, floor_error = timings.floor(num_bytes, workload.dtype)

    def row(candidate: str, ms: float | None, error: str | None) -> Row:
        return Row(workload.name, family, candidate, ms, num_bytes,
                   gb_per_s=None if ms is None else num_bytes / ms / 1e6,
                   floor_fraction=None if ms is None or floor_ms is None else floor_ms / ms, error=error)

    call = functools.partial(ours(family, backend), a, b)
    our_row = row(OURS, *timings.time(f"{OURS} {family}", call))
    if our_row.ms is not None:
        if resolve_backend(backend, timings.device) == "triton":
            our_row.launches = count_launches(call)
        our_row.host_syncs = count_host_syncs(call, timings.device)
    baseline_rows = [row(name, *timings.time(name, functools.partial(BASELINES[name], a, b)))
                     for name in FAMILIES[family]]
    for baseline in baseline_rows:
        our_row.baseline_ms[baseline.candidate] = baseline.ms
        if baseline.ms is not None and our_row.ms is not None:
            our_row.speedups[baseline.candidate] = baseline.ms / our_row.ms
    return [our_row, *baseline_rows, row(FLOOR, floor_ms, floor_error)]


def bench_workload(
    workload: Workload, families: Sequence[str], device: torch.device, backend: str | None, repeats: int,
    warmup: int,
) -> list[Row]:
    """Rows of every family on ``workload`` (b, the second list, only for the families that read it)."""
    a = workload.tensors(device, seed=0)
    b = workload.tensors(device, seed=1) if set(LISTS_READ) & set(families) else []
    timings = Timings(device, repeats, warmup)
    return [row for family in families for row in family_rows(workload, family, a, b, timings, backend)]


def environment(device: torch.device, backend: str | None) -> dict[str, str]:
    """What a result depends on besides the workload: date, commit, device, versions and the backend used."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "backend": resolve_backend(backend, device),
    }


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the checkout holding this package, or "unknown"."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its CPU count and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor()
    if not model and Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else ""
    return f"{model or platform.machine()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"


def save_rows(rows: Sequence[Row], env: dict[str, str], path: str | Path, **extra: object) -> None:
    """Append one JSON line per row ({env, extra, row fields}) to ``path``, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as results:
        for row in rows:
            results.write(json.dumps({**env, **extra, **asdict(row)}) + "\n")


def format_table(workload: Workload, rows: Sequence[Row], env: dict[str, str], repeats: int) -> str:
    """A readable table of one workload's rows; "ours ×" is how many times faster ours is than that row."""
    lines = [
        (f"{workload.name}: {len(workload.shapes)} tensors, {workload.numel:,} elements of "
         f"{_dtype_name(workload.dtype)} ({workload.num_bytes / 1e6:,.1f} MB per list) on {env['device']}, "
         f"backend {env['backend']}, median of {repeats}"),
        (f"{'family':<12} {'candidate':<13} {'ms':>10} {'GB/s':>8} {'of floor':>9} {'ours ×':>9} "
         f"{'launches':>9} {'syncs':>6}"),
    ]
    ours_by_family = {row.family: row for row in rows if row.candidate == OURS}
    previous_family = None
    for row in rows:
        our_row = ours_by_family.get(row.family)
        speedup = None if our_row is None else our_row.speedups.get(row.candidate)
        cells = [
            row.family if row.family != previous_family else "",
            row.candidate,
            _cell(row.ms, ",.3f") if row.error is None else "failed",
            _cell(row.gb_per_s, ".2f"),
            _cell(row.floor_fraction, ".3g"),
            _cell(speedup, ".3g", "x"),
            _cell(row.launches, "d"),
            _cell(row.host_syncs, "d"),
        ]
        line = f"{cells[0]:<12} {cells[1]:<13} {cells[2]:>10} {cells[3]:>8} {cells[4]:>9} {cells[5]:>9} " \
               f"{cells[6]:>9} {cells[7]:>6}"
        lines.append(line.rstrip() + (f"  {row.error}" if row.error else ""))
        previous_family = row.family
    return "\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def run(
    workloads: Sequence[str | Workload] | None = None,
    families: Sequence[str] | None = None,
    *,
    repeats: int | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
    results: str | Path | None = DEFAULT_RESULTS,
    warmup: int | None = None,
) -> list[Row]:
    """Benchmark ``workloads`` × ``families``, print a table per workload and append the rows to ``results``.

    Defaults: every family; on CUDA (the default device when available) gpt2-small, 1b, 7b and many-small with
    20 repeats after 3 warm-up calls, on the CPU gpt2-small with 5 repeats after 1. A workload that needs more
    than the free memory (2 lists, plus 2 per list a family reads) is skipped. ``results=None`` saves nothing.

    Example::

        rows = run(["gpt2-small"], ["stats+log2"], repeats=3, results=None)
        rows[0].ms, rows[0].speedups["foreach-norm"]
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    if on_cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    families = list(families or FAMILIES)
    repeats = repeats or (20 if on_cuda else 5)
    warmup = warmup if warmup is not None else (3 if on_cuda else 1)
    env = environment(device, backend)
    rows: list[Row] = []
    for workload in workloads or DEFAULT_WORKLOADS["cuda" if on_cuda else "cpu"]:
        workload = WORKLOADS[workload] if isinstance(workload, str) else workload
        needed = workload.num_bytes * (2 + max([LISTS_READ.get(f, 0) for f in families]) * 2)
        free = free_bytes(device)
        if free is not None and needed > free:
            print(f"{workload.name}: skipped, needs about {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB free\n")
            continue
        workload_rows = bench_workload(workload, families, device, backend, repeats, warmup)
        print(format_table(workload, workload_rows, env, repeats), end="\n\n", flush=True)
        if results is not None:
            save_rows(workload_rows, env, results, dtype=_dtype_name(workload.dtype),
                      tensors=len(workload.shapes), repeats=repeats)
        rows += workload_rows
        if on_cuda:
            torch.cuda.empty_cache()
    return rows
