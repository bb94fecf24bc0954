"""The ``fastgradstats bench`` command: our statistics against the usual PyTorch code, on real model shapes.

For each workload (a list of tensor shapes filled with ``randn * 1e-3``, the scale of real gradients) and each
statistic family, it times our call, the baselines people write today and a read floor (one ``torch.sum`` over
the buffer the workload's tensors are views of: the same bytes), all in the same run. Every row reports the
median time, the bytes read (Σ numel × itemsize over the lists the family reads), GB/s, the fraction of the
read floor (floor time / time) and, for our rows, the speedup over each baseline of the family. Every row also
has the launches of one call (torch ops and Triton kernels, counted by :mod:`fastgradstats.launches`: what a
GPU would launch, whatever the device) and, on CUDA, its host syncs. Rows are printed as a table and appended
as JSON lines to a results file. On CUDA, times come from CUDA events around each call.

    fastgradstats bench                                  # gpt2-small on the CPU; all workloads on CUDA
    fastgradstats bench --workload 7b --family pair --repeats 50
    fastgradstats bench --family optim --workload gpt2-small --workload params-1gb  # opt-in (optim_memory)
    bench.run(["1b"], dtypes=[torch.float32])            # a workload's shapes in another dtype
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fastgradstats as fgs
from fastgradstats.dispatch import resolve_backend

from ..launches import count_launches
from . import compiled, optim_memory
from .workloads import DEFAULT_WORKLOADS, WORKLOADS, Workload, storage_of

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


def slice_loop(a: list[torch.Tensor], b: list[torch.Tensor]) -> object:
    """Per-expert norms with a Python loop of ``w[i].norm()`` over each stacked (3-D) tensor's slices
    (``t.norm()`` for the other tensors)."""
    return [x.norm() for t in a for x in (t if t.dim() == 3 else (t,))]


def foreach_slices(a: list[torch.Tensor], b: list[torch.Tensor]) -> object:
    """Per-expert norms with one ``torch._foreach_norm`` over the slices ``w[i]`` of the stacked tensors (and
    the other tensors whole)."""
    return torch._foreach_norm([x for t in a for x in (t if t.dim() == 3 else (t,))])


def stacked_parts(name: str, tensor: torch.Tensor) -> int | None:
    """``split=`` for the per-expert family: every stacked (3-D) tensor, one part per slice along dim 0."""
    return tensor.shape[0] if tensor.dim() == 3 else None


BASELINES: dict[str, Callable[[list[torch.Tensor], list[torch.Tensor]], object]] = {
    "norm-loop": norm_loop,
    "foreach-norm": foreach_norm,
    "wandb-loop": wandb_loop,
    "cat-cosine": cat_cosine,
    "cosine-loop": cosine_loop,
    "flatten-gram": flatten_gram,
    "slice-loop": slice_loop,
    "foreach-slices": foreach_slices,
}
FAMILIES: dict[str, tuple[str, ...]] = {  # family -> its baselines
    "stats+log2": ("norm-loop", "foreach-norm", "wandb-loop"),
    "stats": ("norm-loop", "foreach-norm"),
    "linear-hist": ("wandb-loop",),
    "pair": ("cat-cosine", "cosine-loop"),
    "trajectory": ("flatten-gram",),
    "per-expert": ("slice-loop", "foreach-slices"),
    optim_memory.OPTIM_FAMILY: optim_memory.CANDIDATES[1:],  # time and extra peak memory: see optim_memory
    compiled.COMPILED_FAMILY: tuple(compiled.CANDIDATES)[1:],  # a compiled train step: see compiled
}
OPT_IN_FAMILIES = (optim_memory.OPTIM_FAMILY,  # run only when asked for (a subprocess per candidate)
                   compiled.COMPILED_FAMILY)  # (compiling takes tens of seconds)
DEFAULT_FAMILIES = tuple(family for family in FAMILIES if family not in OPT_IN_FAMILIES)
STACKED_FAMILIES = ("per-expert",)  # run only on workloads that have stacked (3-D) tensors
LISTS_READ = {"pair": 2, "trajectory": TRAJECTORY_CHECKPOINTS}  # lists of the workload read per call
OURS, FLOOR = "ours", "read-floor"


def ours(family: str, backend: str | None) -> Callable[[list[torch.Tensor], list[torch.Tensor]], object]:
    """Our call for a family: ``fgs.tensor_stats`` with the family's histogram (per-expert: every statistic of
    each slice of the stacked tensors, ``split=stacked_parts``), ``fgs.pair_stats`` or ``fgs.trajectory_map``
    (centred at the first checkpoint, its Gram on the tensors' device)."""
    if family == "pair":
        return lambda a, b: fgs.pair_stats(a, b, backend=backend)
    if family == "trajectory":
        return lambda a, b: fgs.trajectory_map(checkpoint_series(a, b), center=0, progress=False,
                                               device=a[0].device)
    if family == "per-expert":
        return lambda a, b: fgs.tensor_stats(a, split=stacked_parts, backend=backend)
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
    launches: int | None = None  # launches per call: torch ops and Triton kernels (fastgradstats.launches)
    launch_ops: dict[str, int] = field(default_factory=dict)  # those launches by op or kernel name
    host_syncs: int | None = None  # on CUDA: synchronizing CUDA calls per call
    error: str | None = None
    extra_peak_bytes: int | None = None  # optim family: peak memory above the training state (optim_memory)


def call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``fn()`` in milliseconds; on CUDA timed with CUDA events, with a synchronize before
    and after it."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # events record on the device's current stream
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def count_cuda_syncs(fn: Callable[[], object]) -> int:
    """Synchronizing CUDA calls made by one call of ``fn`` (seen by ``set_sync_debug_mode("warn")``)."""
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


def read_floor(lists: Sequence[list[torch.Tensor]]) -> Callable[[], None]:
    """The read-floor call: one ``torch.sum`` over each list's buffer (the workload's tensors are views into
    one buffer per list: :meth:`Workload.tensors`), so the floor reads the very bytes the candidates read."""
    buffers = [storage_of(tensors) for tensors in lists]

    def floor() -> None:
        for buffer in buffers:
            torch.sum(buffer)

    return floor


@dataclass
class Measured:
    """One candidate's numbers on one workload (all None but ``error`` when it raised)."""

    ms: float | None = None
    launches: int | None = None
    launch_ops: dict[str, int] = field(default_factory=dict)
    host_syncs: int | None = None
    error: str | None = None


class Timings:
    """Candidates measured on one workload in interleaved rounds: each is registered once (a baseline shared
    by families, the floor of a size), then :meth:`measure` times every one of them once per round, round
    after round, and keeps each one's median. A read floor that varies 2x from run to run on a busy machine
    then varies alike for the candidates beside it.

    A candidate that raises a RuntimeError (out of memory included) is kept as its error message and left
    out of the later rounds.
    """

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.candidates: dict[str, Callable[[], Callable[[], object]]] = {}
        self.measured: dict[str, Measured] = {}

    def time(self, key: str, fn: Callable[[], object]) -> str:
        """Register ``fn`` under ``key`` (once: a key already there keeps its function); returns the key."""
        self.candidates.setdefault(key, lambda: fn)
        return key

    def floor(self, lists: Sequence[list[torch.Tensor]]) -> str:
        """Register the read floor of ``lists`` (one pass over each, in turn); returns its key."""
        key = f"{FLOOR} {len(lists)}"
        self.candidates.setdefault(key, lambda: read_floor(lists))
        return key

    def measure(self) -> dict[str, Measured]:
        """Warm-up calls, then ``repeats`` interleaved rounds over every registered candidate, then the
        launches (and on CUDA the host syncs) of one more call of each."""
        calls: dict[str, Callable[[], object]] = {}
        times: dict[str, list[float]] = {}
        for key, make in self.candidates.items():
            if key not in self.measured:
                self._guard(key, lambda make=make, key=key: calls.__setitem__(key, make()))
        for key, fn in list(calls.items()):
            for _ in range(self.warmup):
                if not self._guard(key, fn):
                    del calls[key]
                    break
        for _ in range(self.repeats):
            for key, fn in list(calls.items()):
                if not self._guard(key, lambda fn=fn, key=key: times.setdefault(key, []).append(
                        call_ms(fn, self.device))):
                    del calls[key]
        for key, fn in calls.items():
            def counted(fn=fn, key=key) -> None:
                with count_launches() as launches:
                    fn()
                syncs = count_cuda_syncs(fn) if self.device.type == "cuda" else None
                self.measured[key] = Measured(statistics.median(times[key]), launches.total,
                                              dict((launches.triton + launches.torch_ops).most_common()),
                                              syncs)
            self._guard(key, counted)
        return self.measured

    def _guard(self, key: str, step: Callable[[], object]) -> bool:
        """Run ``step``; on a RuntimeError keep its message as ``key``'s measurement and return False."""
        try:
            step()
            return True
        except RuntimeError as error:
            first_line = (str(error).splitlines() or [""])[0]
            self.measured[key] = Measured(error=f"{type(error).__name__}: {first_line}")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return False


def lists_read(family: str, a: list[torch.Tensor], b: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The lists one call of ``family`` reads, in turn: a; a and b for pairs; a, b, a, b for a trajectory."""
    return [a if k % 2 == 0 else b for k in range(LISTS_READ.get(family, 1))]


def register_family(
    workload: Workload, family: str, a: list[torch.Tensor], b: list[torch.Tensor], timings: Timings,
    backend: str | None,
) -> None:
    """Register the candidates of one family: ours, the family's baselines, the read floor of its bytes."""
    timings.floor(lists_read(family, a, b))
    timings.time(f"{OURS} {family}", functools.partial(ours(family, backend), a, b))
    for name in FAMILIES[family]:
        timings.time(name, functools.partial(BASELINES[name], a, b))


def family_rows(workload: Workload, family: str, timings: Timings) -> list[Row]:
    """Rows of one family, once measured: ours (with its speedups), the family's baselines, the read
    floor."""
    num_bytes = workload.num_bytes * LISTS_READ.get(family, 1)
    floor = timings.measured[f"{FLOOR} {LISTS_READ.get(family, 1)}"]

    def row(candidate: str, measured: Measured) -> Row:
        ms = measured.ms
        return Row(workload.name, family, candidate, ms, num_bytes,
                   gb_per_s=None if ms is None else num_bytes / ms / 1e6,
                   floor_fraction=None if ms is None or floor.ms is None else floor.ms / ms,
                   launches=measured.launches, launch_ops=measured.launch_ops, host_syncs=measured.host_syncs,
                   error=measured.error)

    our_row = row(OURS, timings.measured[f"{OURS} {family}"])
    baseline_rows = [row(name, timings.measured[name]) for name in FAMILIES[family]]
    for baseline in baseline_rows:
        our_row.baseline_ms[baseline.candidate] = baseline.ms
        if baseline.ms is not None and our_row.ms is not None:
            our_row.speedups[baseline.candidate] = baseline.ms / our_row.ms
    return [our_row, *baseline_rows, row(FLOOR, floor)]


def bench_workload(
    workload: Workload, families: Sequence[str], device: torch.device, backend: str | None, repeats: int,
    warmup: int,
) -> list[Row]:
    """Rows of every family on ``workload`` (b, the second list, only for the families that read it; the
    per-expert family only when the workload has stacked, 3-D, tensors)."""
    if not any(len(shape) == 3 for shape in workload.shapes):
        families = [family for family in families if family not in STACKED_FAMILIES]
    a = workload.tensors(device, seed=0)
    b = workload.tensors(device, seed=1) if set(LISTS_READ) & set(families) else []
    timings = Timings(device, repeats, warmup)
    for family in families:
        register_family(workload, family, a, b, timings, backend)
    timings.measure()
    return [row for family in families for row in family_rows(workload, family, timings)]


def optim_rows(workload: Workload, device: torch.device, repeats: int, warmup: int) -> list[Row]:
    """Rows of the optim family: ours (with its speedups), then the copy-based and the Composer-style way,
    each measured in its own subprocess (:mod:`fastgradstats.bench.optim_memory`). ``bytes``: the
    parameters and AdamW's two moments, what ours reads."""
    num_bytes = 3 * workload.num_bytes
    rows = []
    for candidate in optim_memory.CANDIDATES:
        measured = optim_memory.measure_in_subprocess(candidate, workload, device, repeats, warmup)
        ms = measured.get("ms")
        name = OURS if candidate == "ours" else candidate
        rows.append(Row(workload.name, optim_memory.OPTIM_FAMILY, name, ms, num_bytes,
                        gb_per_s=None if ms is None else num_bytes / ms / 1e6, floor_fraction=None,
                        error=measured.get("error"), extra_peak_bytes=measured.get("extra_peak_bytes")))
    our_row = rows[0]
    for baseline in rows[1:]:
        our_row.baseline_ms[baseline.candidate] = baseline.ms
        if baseline.ms is not None and our_row.ms is not None:
            our_row.speedups[baseline.candidate] = baseline.ms / our_row.ms
    return rows


def compiled_rows(workload: Workload, device: torch.device, repeats: int, warmup: int) -> list[Row]:
    """Rows of the compiled family (:mod:`fastgradstats.bench.compiled`), in the workload's dtype: ours (a
    compiled train step with statistics, with its speedups: below 1, by the statistics' overhead), the
    same compiled step without statistics, and both steps eager. ``bytes``: the gradients the statistics
    read, twice (clip_grad_norm_ and grad_stats)."""
    times = compiled.measure(device, workload.dtype, repeats, warmup)
    width, depth = compiled.WIDTH, compiled.DEPTH
    num_bytes = 2 * depth * (width * width + width) * workload.dtype.itemsize
    rows = [Row(compiled.model_name(), compiled.COMPILED_FAMILY, OURS if name == "ours" else name, ms,
                num_bytes, gb_per_s=num_bytes / ms / 1e6, floor_fraction=None) for name, ms in times.items()]
    for baseline in rows[1:]:
        rows[0].baseline_ms[baseline.candidate] = baseline.ms
        rows[0].speedups[baseline.candidate] = baseline.ms / rows[0].ms
    return rows


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
         f"{'launches':>9} {'syncs':>6} {'extra MB':>9}"),
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
            _cell(None if row.extra_peak_bytes is None else row.extra_peak_bytes / 1e6, ",.1f"),
        ]
        line = f"{cells[0]:<12} {cells[1]:<13} {cells[2]:>10} {cells[3]:>8} {cells[4]:>9} {cells[5]:>9} " \
               f"{cells[6]:>9} {cells[7]:>6} {cells[8]:>9}"
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
    dtypes: Sequence[torch.dtype] | None = None,
) -> list[Row]:
    """Benchmark ``workloads`` × ``families``, print a table per workload and append the rows to ``results``.

    Defaults: every family but the opt-in ``optim`` (time and extra peak memory of optimizer_stats, a
    subprocess per candidate: :mod:`fastgradstats.bench.optim_memory`); on CUDA (the default device when
    available) gpt2-small, 1b, 7b and many-small with 20 repeats after 3 warm-up calls, on the CPU gpt2-small
    with 5 repeats after 1; each workload in its own dtype, or in each of ``dtypes``. A workload that needs
    more than the free memory (2 lists, plus 2 per list a family reads; 6 for optim) is skipped.
    ``results=None`` saves nothing.

    Example::

        rows = run(["gpt2-small"], ["stats+log2"], repeats=3, results=None)
        rows[0].ms, rows[0].speedups["foreach-norm"]
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    if on_cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    families = list(families or DEFAULT_FAMILIES)
    tensor_families = [family for family in families if family not in OPT_IN_FAMILIES]
    repeats = repeats or (20 if on_cuda else 5)
    warmup = warmup if warmup is not None else (3 if on_cuda else 1)
    env = environment(device, backend)
    rows: list[Row] = []
    chosen = [WORKLOADS[w] if isinstance(w, str) else w
              for w in workloads or DEFAULT_WORKLOADS["cuda" if on_cuda else "cpu"]]
    if dtypes is not None:
        chosen = [dataclasses.replace(workload, dtype=dtype) for workload in chosen for dtype in dtypes]
    for workload in chosen:
        needed = workload.num_bytes * (2 + max([LISTS_READ.get(f, 0) for f in families]) * 2)
        if optim_memory.OPTIM_FAMILY in families:
            needed = max(needed, 6 * workload.num_bytes)  # parameters, gradients, 2 moments, a copy, slack
        free = free_bytes(device)
        if free is not None and needed > free:
            print(f"{workload.name}: skipped, needs about {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB free\n")
            continue
        workload_rows = (bench_workload(workload, tensor_families, device, backend, repeats, warmup)
                         if tensor_families else [])
        if optim_memory.OPTIM_FAMILY in families:
            workload_rows += optim_rows(workload, device, repeats, warmup)
        if compiled.COMPILED_FAMILY in families:
            workload_rows += compiled_rows(workload, device, repeats, warmup)
        print(format_table(workload, workload_rows, env, repeats), end="\n\n", flush=True)
        if results is not None:
            tensor_rows = [row for row in workload_rows if row.family != compiled.COMPILED_FAMILY]
            save_rows(tensor_rows, env, results, dtype=_dtype_name(workload.dtype),
                      tensors=len(workload.shapes), repeats=repeats, timing="median of interleaved rounds")
            save_rows([row for row in workload_rows if row.family == compiled.COMPILED_FAMILY], env, results,
                      dtype=_dtype_name(workload.dtype), tensors=compiled.NUM_TENSORS, repeats=repeats,
                      timing="median of interleaved rounds")
        rows += workload_rows
        if on_cuda:
            torch.cuda.empty_cache()
    return rows


# The kernels one call of a family runs over its bytes, in turn, as kernels/roofline.py names them.
ROOFLINE_FAMILIES = {
    "stats+log2": ("tensor_stats_log2",),
    "stats": ("tensor_stats",),
    "linear-hist": ("tensor_stats", "linear_hist"),  # the rows pass, then the histogram over data ranges
    "pair": ("pair_stats",),
    "per-expert": ("tensor_stats",),
}
_ROOFLINE_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def predicted_fraction(family: str, dtype: str, models: Sequence[dict], gpu: str) -> float | None:
    """The roofline's predicted fraction of ``gpu``'s datasheet read floor for one call of ``family`` on
    ``dtype`` ("bfloat16"), from the models of ``python -m fastgradstats.kernels.roofline --json``; None
    without a model. Kernels that each read the bytes once add their times: 1 / Σ 1/fraction."""
    by_name = {(m["name"], p["gpu"]): p["fraction"] for m in models for p in m["predictions"]}
    dtype = _ROOFLINE_DTYPES.get(dtype, dtype)
    fractions = [by_name.get((f"{kernel}[{dtype}]", gpu)) for kernel in ROOFLINE_FAMILIES.get(family, ())]
    if not fractions or None in fractions:
        return None
    return 1 / sum(1 / fraction for fraction in fractions)


def roofline_table(records: Sequence[dict], models: Sequence[dict], gpu: str = "H200") -> str:
    """Our rows (JSON records of a results file) beside the roofline's prediction for ``gpu``.

    "of floor": the measured fraction of the torch.sum read floor; "of HBM": the measured GB/s over the
    datasheet bandwidth the roofline assumes; "predicted": the roofline's fraction of that bandwidth.
    """
    datasheet_gbs = _datasheet_gbs(gpu)
    lines = [f"measured vs roofline, {gpu} ({_cell(datasheet_gbs, ',.0f')} GB/s datasheet)",
             (f"{'workload':<11} {'dtype':<9} {'family':<12} {'ms':>9} {'GB/s':>8} {'of floor':>9} "
              f"{'of HBM':>7} {'predicted':>9} {'launches':>9}")]
    for r in records:
        if r["candidate"] != OURS:
            continue
        of_hbm = r["gb_per_s"] / datasheet_gbs if r["gb_per_s"] is not None and datasheet_gbs else None
        cells = (_cell(r["ms"], ",.3f"), _cell(r["gb_per_s"], ".1f"), _cell(r["floor_fraction"], ".3f"),
                 _cell(of_hbm, ".3f"), _cell(predicted_fraction(r["family"], r["dtype"], models, gpu), ".3f"),
                 _cell(r.get("launches"), "d"))
        line = f"{r['workload']:<11} {r['dtype']:<9} {r['family']:<12} " + " ".join(
            f"{cell:>{width}}" for cell, width in zip(cells, (9, 8, 9, 7, 9, 9)))
        lines.append(line + (f"  {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


FAMILY_TITLES = {
    "stats+log2": "every statistic + log2 histogram",
    "stats": "every statistic",
    "linear-hist": "linear histogram (64 bins, per-layer ranges, plus the global one)",
    "pair": "pair: dot, norms, cosine, distance (two lists)",
    "trajectory": "trajectory map of 4 checkpoints",
    "per-expert": "every statistic per expert",
}


def floor_table(records: Sequence[dict]) -> str:
    """A Markdown table of our rows (JSON records of a results file) as multiples of the read floor measured
    beside them, a line per backend, dtype and family: over the runs among ``records``, the median of our
    time, of the floor's and of their ratio, and the ratio's range when there are several runs."""
    runs: dict[tuple, list[dict]] = {}
    for r in records:
        if r["candidate"] == OURS and r.get("floor_fraction") is not None:
            runs.setdefault((r["backend"], r["dtype"], r["family"]), []).append(r)
    lines = ["| backend | dtype | family | runs | ours | read floor | × read floor |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (backend, dtype, family), rows in runs.items():
        ratios = [1 / r["floor_fraction"] for r in rows]
        ours_ms = statistics.median(r["ms"] for r in rows)
        floor_ms = statistics.median(r["ms"] * r["floor_fraction"] for r in rows)
        spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(rows) > 1 else ""
        lines.append(f"| {backend} | {dtype} | {FAMILY_TITLES.get(family, family)} | {len(rows)} | "
                     f"{ours_ms:,.1f} ms | {floor_ms:,.1f} ms | {statistics.median(ratios):.2f}×{spread} |")
    return "\n".join(lines)


def _datasheet_gbs(gpu: str) -> float | None:
    """The datasheet HBM bandwidth (GB/s) the roofline assumes for ``gpu``; None without Triton."""
    try:
        from fastgradstats.kernels.roofline import GPUS
    except ImportError:
        return None
    return next((g.bandwidth_tbs * 1e3 for gpus in GPUS.values() for g in gpus if g.name == gpu), None)
