"""What one call launches: every torch op that would be a GPU kernel, every Triton kernel, every host sync.

On a GPU a launch costs about 4 µs whatever it does, so a statistics call is as cheap as its launch count
allows (DESIGN.md §3, "Launch count"). :func:`count_launches` counts them on any device, the CPU included
(Triton kernels then run in the interpreter, ``TRITON_INTERPRET=1``):

- **torch ops**: a ``TorchDispatchMode`` sees every ATen op the call dispatches, after autograd and the
  composite decompositions, so it sees what would run as a device kernel. Ops that move no data on the device
  are not launches (:data:`NO_LAUNCH_OPS`); a host sync (:data:`SYNC_OPS`, what ``.item()`` calls) and a copy
  between devices (a transfer, not a kernel) are counted apart.
- **Triton kernels**: every ``kernel[grid](...)`` of a ``triton.jit`` function (compiled or interpreted) goes
  through ``JITFunction.run`` or ``InterpretedFunction.run``; both are wrapped while counting. Torch ops the
  interpreter makes to move arguments are not counted.

:func:`profile_cuda_launches` counts, on a CUDA device, the kernels the GPU actually ran for one call
(``torch.profiler``), to check the first count against.

    with count_launches() as launches:
        fgs.tensor_stats(tensors, hist="log2").total.l2
    launches.total, launches.torch_ops, launches.triton, launches.syncs

``python -m fastgradstats.launches [--device cuda] [--json PATH]`` prints both counts for the calls of
:data:`CALLS`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that launch nothing on a GPU: views and metadata changes (a new tensor header over the same
# storage) and allocations (the caching allocator hands out memory without a kernel). Every other op counts
# as one launch: a ``torch.zeros`` (a fill), a ``.to(dtype)``, each ``_foreach_*`` call (one multi-tensor
# kernel, or a few for very long lists).
VIEW_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.as_strided", "aten.t", "aten.transpose", "aten.expand",
    "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.alias", "aten.detach",
    "aten.permute", "aten._reshape_alias", "aten.diagonal", "aten.narrow", "aten.split",
    "aten.split_with_sizes", "aten.unbind", "aten.unfold", "aten.view_as_real", "aten.view_as_complex",
    "aten._neg_view", "aten._conj", "aten.lift_fresh", "aten.real", "aten.imag",
})
ALLOCATION_OPS = frozenset({
    "aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.new_empty_strided",
    "aten._pin_memory", "aten.is_pinned",  # page-locked host memory: host work, no device kernel
})
# Ops that return no tensor and read no device memory: answered on the host.
HOST_OPS = frozenset({"aten.promote_types", "aten.result_type", "aten.is_same_size", "aten.sym_size",
                      "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset"})
NO_LAUNCH_OPS = VIEW_OPS | ALLOCATION_OPS | HOST_OPS
# A 0-d tensor made on the CPU from a Python number (``torch.where(c, x, 0.0)`` wraps 0.0 so): a CUDA kernel
# takes it as an argument, so it launches nothing; made on a GPU it is a fill kernel.
HOST_SCALAR_OP = "aten.scalar_tensor"
# Ops that make the host wait for the device: a scalar read (``.item()``, ``bool(t)``, ``float(t)``).
SYNC_OPS = frozenset({"aten._local_scalar_dense"})
COPY_OPS = frozenset({"aten._to_copy", "aten.copy_"})  # a transfer when source and target devices differ


@dataclass
class Launches:
    """Counts of one ``count_launches`` block.

    torch_ops: ATen op name → calls that launch a kernel on a GPU (see :data:`NO_LAUNCH_OPS`).
    triton: Triton kernel name → launches.
    syncs: host syncs: scalar reads (:data:`SYNC_OPS`) and device-to-host copies.
    transfers: copies between devices ("aten._to_copy cpu->cuda:0"), which are memcpys rather than kernels.
    """

    torch_ops: Counter = field(default_factory=Counter)
    triton: Counter = field(default_factory=Counter)
    syncs: int = 0
    transfers: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Every launch: torch ops and Triton kernels."""
        return sum(self.torch_ops.values()) + sum(self.triton.values())

    def breakdown(self) -> str:
        """One line: the total, then every op and kernel with its count, most frequent first."""
        parts = [f"{name}: {n}" for name, n in (self.triton + self.torch_ops).most_common()]
        extra = f", {self.syncs} syncs" + (f", transfers {dict(self.transfers)}" if self.transfers else "")
        return f"{self.total} launches ({', '.join(parts)}){extra}"

    def to_dict(self) -> dict:
        return {"total": self.total, "torch_ops": dict(self.torch_ops), "triton": dict(self.triton),
                "syncs": self.syncs, "transfers": dict(self.transfers)}

    def _record_op(self, name: str, args: tuple, kwargs: dict) -> None:
        if name in NO_LAUNCH_OPS or (name == HOST_SCALAR_OP and _device(kwargs.get("device")).type == "cpu"):
            return
        if name in SYNC_OPS:
            self.syncs += 1
            return
        if name in COPY_OPS:
            source, target = _copy_devices(name, args, kwargs)
            if source != target:
                self.transfers[f"{name} {source}->{target}"] += 1
                self.syncs += source.type != "cpu" and target.type == "cpu"
                return
        self.torch_ops[name] += 1


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _copy_devices(name: str, args: tuple, kwargs: dict) -> tuple[torch.device, torch.device]:
    """(source, target) devices of ``aten._to_copy(src, device=...)`` or ``aten.copy_(dst, src)``."""
    if name == "aten.copy_":
        return args[1].device, args[0].device
    return args[0].device, _device(kwargs.get("device") or args[0].device)


class _OpCounter(TorchDispatchMode):
    """Records every dispatched ATen op into one block's counts, except while a Triton kernel runs (an op
    then goes on to the enclosing blocks' modes)."""

    def __init__(self, launches: Launches) -> None:
        super().__init__()
        self.launches = launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _STATE.inside_triton == 0:
            self.launches._record_op(str(func.overloadpacket), args, kwargs)
        return func(*args, **kwargs)


class _State:
    """The open ``count_launches`` blocks and the Triton ``run`` methods wrapped while any is open."""

    def __init__(self) -> None:
        self.active: list[Launches] = []
        self.inside_triton = 0  # > 0 while a Triton launch runs (the interpreter moves arguments with torch)
        self.originals: dict[type, Callable] = {}


_STATE = _State()


def _triton_launchers() -> list[type]:
    """The classes whose ``run`` launches a ``triton.jit`` function: compiled and interpreted."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    return [JITFunction, InterpretedFunction]


def _kernel_name(kernel: object) -> str:
    fn = getattr(kernel, "fn", None)
    return getattr(fn, "__name__", None) or type(kernel).__name__


def _counted(run: Callable) -> Callable:
    def counted_run(self, *args, grid, warmup, **kwargs):
        if warmup or not _STATE.active:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        name = _kernel_name(self)
        for launches in _STATE.active:
            launches.triton[name] += 1
        _STATE.inside_triton += 1
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            _STATE.inside_triton -= 1

    counted_run.__wrapped__ = run
    return counted_run


@contextlib.contextmanager
def count_launches() -> Iterator[Launches]:
    """Count, in the block, the torch ops that launch a kernel, the Triton launches and the host syncs.

    Blocks may nest (each counts everything within it). Counts the calling thread's torch ops and every
    thread's Triton launches: count in one thread.

    Example::

        with count_launches() as launches:
            stats = fgs.tensor_stats(tensors, hist="log2")
            stats.l2, stats.total.l2
        assert launches.total <= 8 and launches.syncs == 0, launches.breakdown()
    """
    launches = Launches()
    if not _STATE.active:
        for launcher in _triton_launchers():
            _STATE.originals[launcher] = launcher.__dict__["run"]
            launcher.run = _counted(launcher.__dict__["run"])
    _STATE.active.append(launches)
    try:
        with _OpCounter(launches):
            yield launches
    finally:
        _STATE.active.remove(launches)
        if not _STATE.active:
            for launcher, run in _STATE.originals.items():
                launcher.run = run
            _STATE.originals.clear()


@dataclass
class DeviceLaunches:
    """What the GPU ran for one call, from ``torch.profiler``: kernel, memcpy and memset names → count."""

    kernels: Counter
    memcpys: Counter
    memsets: Counter

    @property
    def total(self) -> int:
        """Kernels only (memcpys and memsets are copies, not launches)."""
        return sum(self.kernels.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "kernels": dict(self.kernels), "memcpys": dict(self.memcpys),
                "memsets": dict(self.memsets)}


def device_launches(events) -> DeviceLaunches:
    """Sort the device-side events of ``torch.profiler`` (``prof.events()``) into kernels, memcpys and
    memsets; host-side events (including the ``cudaLaunchKernel`` calls) are left out."""
    from torch.autograd import DeviceType

    found = DeviceLaunches(Counter(), Counter(), Counter())
    for event in events:
        if event.device_type != DeviceType.CUDA:
            continue
        kind = (found.memcpys if event.name.startswith("Memcpy")
                else found.memsets if event.name.startswith("Memset") else found.kernels)
        kind[event.name] += 1
    return found


def profile_cuda_launches(fn: Callable[[], object], warmup: int = 1) -> DeviceLaunches:
    """The kernels a CUDA device ran for one call of ``fn()``, after ``warmup`` calls (compilation and
    caches stay out), as ``torch.profiler`` records them."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return device_launches(prof.events())


# The calls whose launches the tests pin and the device check measures: two dtype groups, every field read.
def _layers(device: torch.device, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return [randn(300, dtype=torch.float32), randn(17, 5, dtype=torch.float32),
            randn(64, dtype=torch.bfloat16), randn(3, 7, dtype=torch.bfloat16)]


def read_every_field(stats) -> None:
    """Touch every field of a TensorStats or PairStats and of its total (fields are derived lazily)."""
    for source in (stats, stats.total):
        for name in (*source.FIELDS, "hist", "hist_edges"):
            getattr(source, name, None)


def tensor_stats_call(device: torch.device, backend: str | None = None) -> Callable[[], None]:
    """``tensor_stats(hist="log2")`` over float32 and bfloat16 layers, then every field read."""
    import fastgradstats as fgs

    layers = _layers(device, seed=0)
    return lambda: read_every_field(fgs.tensor_stats(layers, hist="log2", backend=backend))


def pair_stats_call(device: torch.device, backend: str | None = None) -> Callable[[], None]:
    """``pair_stats`` of two float32 + bfloat16 lists, then every field read."""
    import fastgradstats as fgs

    a, b = _layers(device, seed=0), _layers(device, seed=1)
    return lambda: read_every_field(fgs.pair_stats(a, b, backend=backend))


def clip_call(device: torch.device, backend: str | None = None) -> Callable[[], None]:
    """``clip_grad_norm_`` of float32 and bfloat16 gradients, scaled in place (clip takes no backend: a
    given one is set as ``FASTGRADSTATS_BACKEND`` during the call)."""
    import fastgradstats as fgs

    parameters = [torch.nn.Parameter(torch.zeros_like(g)) for g in _layers(device, seed=0)]
    for p, g in zip(parameters, _layers(device, seed=2)):
        p.grad = g

    def call() -> None:
        with _backend_variable(backend):
            fgs.clip_grad_norm_(parameters, 1e-3)

    return call


@contextlib.contextmanager
def _backend_variable(backend: str | None) -> Iterator[None]:
    previous = os.environ.get("FASTGRADSTATS_BACKEND")
    if backend is not None:
        os.environ["FASTGRADSTATS_BACKEND"] = backend
    try:
        yield
    finally:
        if backend is not None:
            if previous is None:
                del os.environ["FASTGRADSTATS_BACKEND"]
            else:
                os.environ["FASTGRADSTATS_BACKEND"] = previous


CALLS: dict[str, Callable[..., Callable[[], None]]] = {
    "tensor_stats log2, 2 dtypes, every field": tensor_stats_call,
    "pair_stats, 2 dtypes, every field": pair_stats_call,
    "clip_grad_norm_, 2 dtypes": clip_call,
}


def measure(device: torch.device, backend: str | None = None, warmup: int = 1) -> dict[str, dict]:
    """Launches of each call of :data:`CALLS` on ``device`` (after ``warmup`` calls): counted from the
    dispatched ops and Triton launches, and on CUDA also as profiled kernels."""
    results = {}
    for name, make in CALLS.items():
        call = make(device, backend)
        for _ in range(warmup):
            call()
        with count_launches() as launches:
            call()
        results[name] = {"counted": launches.to_dict(), "breakdown": launches.breakdown()}
        if device.type == "cuda":
            results[name]["profiled"] = profile_cuda_launches(call, warmup=0).to_dict()
    return results


def main(argv: list[str] | None = None) -> int:
    """Print the launches of every call of :data:`CALLS`; ``--json PATH`` also writes them."""
    parser = argparse.ArgumentParser(prog="python -m fastgradstats.launches", description=main.__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="statistics backend (default: automatic)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = measure(device, args.backend)
    for name, result in results.items():
        print(f"{name}: {result['breakdown']}")
        if "profiled" in result:
            profiled = result["profiled"]
            print(f"    profiled on {device}: {profiled['total']} kernels {profiled['kernels']}, "
                  f"memcpys {profiled['memcpys']}, memsets {profiled['memsets']}")
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"device": str(device), "backend": args.backend, "calls": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
