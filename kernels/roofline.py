"""Static GPU performance model: what fraction of the HBM read floor can each kernel specialization reach?

``python -m fastgradstats.kernels.roofline [--arch 90] [--json]`` compiles, on this CPU, every specialization
the package launches, disassembles each cubin with the cuobjdump bundled in Triton and prints per variant:
registers, shared memory, resident warps per SM, the steady-state loop's SASS instructions per element, its
global-load bytes per thread, the bytes in flight per SM, CTA barriers and shared atomics per element, and the
predicted fraction of the read floor on the GPUs of that architecture (DESIGN.md section 5):

    fraction     = min(1, issue bound, Little bound)
    issue bound  = (4 warp-instructions/clock x 32 / instructions per element)
                   / (bandwidth / (bytes per element x SMs x clock))
    Little bound = bytes in flight per SM / (bandwidth x 600 ns / SMs)

The specializations are discovered at run time: the backend protocol (``raw_rows``, ``linear_hist``,
``pair_rows``, run by :func:`fastgradstats.dispatch.run_raw_stats`) runs on small CPU tensors with every
Triton launch recorded instead of executed, so the model sees the constexprs, warps and options the package
passes today. It is an upper bound; a measurement on a GPU
overrides it. Must run without ``TRITON_INTERPRET`` (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from fastgradstats import kernels
from fastgradstats.dispatch import run_raw_stats
from fastgradstats.hist import HistSpec

from .pair_stats import pair_rows
from .tensor_stats import TL_DTYPES

ISSUE_PER_CLOCK = 4  # warp-instructions an SM issues per clock (four schedulers), sm_80 and sm_90
LATENCY_NS = 600  # HBM load latency under load: the Little's-law horizon
RESERVED_SMEM = 1024  # shared memory the CUDA runtime reserves per CTA on sm_80 and later
SMEM_GRANULE = 128  # shared memory is allocated per CTA in 128-byte units
PARTIAL_ROW_BYTES = 8  # kernels after stage 1 (merge) read float64 partial rows


@dataclass(frozen=True)
class SmLimits:
    registers: int  # 32-bit registers per SM
    shared_bytes: int  # shared memory per SM for CTAs
    warps: int
    ctas: int


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_ghz: float  # boost clock
    bandwidth_tbs: float  # HBM bandwidth, TB/s (datasheet)


SM_LIMITS = {
    80: SmLimits(registers=65536, shared_bytes=164 * 1024, warps=64, ctas=32),
    90: SmLimits(registers=65536, shared_bytes=228 * 1024, warps=64, ctas=32),
}
GPUS = {
    80: (Gpu("A100 SXM", 108, 1.41, 2.039),),
    90: (Gpu("H100 SXM", 132, 1.98, 3.35), Gpu("H200", 132, 1.98, 4.8)),
}

_TRITON_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                 torch.uint8: "u8", torch.bool: "i1"}


# Discovering the specializations the package launches ------------------------------------------------------

@dataclass(frozen=True)
class _Launch:
    kernel: JITFunction
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type) of the run-time arguments
    constexprs: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, object], ...]  # num_warps, ...


@dataclass(frozen=True)
class VariantSpec(_Launch):
    """One specialization: a launch, its name and the bytes it reads per element."""

    name: str  # "<family>[<dtype>]"
    family: str
    dtype: str
    bytes_per_element: int  # bytes read per element index, summed over the input lists

    @property
    def num_warps(self) -> int:
        return dict(self.options).get("num_warps", 4)


def _triton_type(name: str, value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"roofline: cannot type kernel argument {name}={value!r}")


def _record_launches(call: Callable[[], object]) -> list[_Launch]:
    """The Triton launches ``call()`` makes, recorded instead of run."""
    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
        signature, constexprs = [], []
        for param in kernel.params:
            value = bound.get(param.name, param.default)
            if param.is_constexpr or value is None:
                constexprs.append((param.name, value))
            else:
                signature.append((param.name, _triton_type(param.name, value)))
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in kernel.arg_names))
        launches.append(_Launch(kernel, tuple(signature), tuple(constexprs), options))

    original, JITFunction.run = JITFunction.run, record
    try:
        call()
    finally:
        JITFunction.run = original
    return launches


def _inputs(dtype: torch.dtype, lists: int) -> list[list[torch.Tensor]]:
    sizes = (5003, 70001, 17)  # any will do: the kernels only need to be launched
    return [[torch.ones(n, dtype=dtype) for n in sizes] for _ in range(lists)]


def _launch_plans() -> Iterator[tuple[str, torch.dtype, int, tuple[str, ...], Callable[[], object]]]:
    """(family, dtype, input lists, names of the first kernel's later launches, call) of every way the
    package launches its kernels, on every dtype it launches them for."""
    for family, spec, later in (
        ("tensor_stats", None, ()),
        ("tensor_stats_log2", HistSpec.make("log2"), ()),
        ("tensor_stats_linear", HistSpec.make("linear", range=(-1.0, 1.0)), ()),
        ("tensor_stats_ranges", HistSpec.make("linear"), ("linear_hist",)),  # ranges from the data
    ):
        for dtype in TL_DTYPES:
            yield family, dtype, 1, later, functools.partial(run_raw_stats, kernels, *_inputs(dtype, 1), spec)
    for family, lists in (("pair_stats", 2), ("pair_stats_origin", 3)):
        for dtype in TL_DTYPES:
            yield family, dtype, lists, (), functools.partial(pair_rows, *_inputs(dtype, lists))


@functools.cache
def variant_specs() -> tuple[VariantSpec, ...]:
    """Every distinct specialization the package launches: each call's first kernel by family, then the
    other kernels, named ``<kernel>_<family>[fp64]`` (a specialization keeps the first name it got)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("roofline: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    seen, first, later = set(), [], []
    for family, dtype, lists, later_names, call in _launch_plans():
        launches = _record_launches(call)
        if not launches:
            raise RuntimeError(f"roofline: {family} launched no compiled Triton kernel")
        passes = 0
        for launch in launches:
            primary = launch.kernel is launches[0].kernel
            if primary:
                names = (family, *later_names)
                name = names[passes] if passes < len(names) else f"{family}_pass{passes}"
                label, element_bytes = str(TL_DTYPES[dtype]), lists * dtype.itemsize
                passes += 1
            else:
                name = f"{launch.kernel.__name__.strip('_').removesuffix('_kernel')}_{family}"
                label, element_bytes = "fp64", PARTIAL_ROW_BYTES
            if launch not in seen:
                seen.add(launch)
                (first if primary else later).append(VariantSpec(
                    launch.kernel, launch.signature, launch.constexprs, launch.options,
                    name=f"{name}[{label}]", family=name, dtype=label, bytes_per_element=element_bytes))
    families = list(dict.fromkeys(spec.family for spec in first))
    return tuple(sorted(first, key=lambda spec: families.index(spec.family)) + later)


def variants() -> Iterator[tuple[str, JITFunction, dict[str, str], dict[str, object], int]]:
    """(name, jit function, run-time argument types, constexprs, num_warps) of every specialization the
    package launches; the name is ``<family>[<dtype>]``, e.g. ``tensor_stats_log2[bf16]``."""
    for spec in variant_specs():
        yield spec.name, spec.kernel, dict(spec.signature), dict(spec.constexprs), spec.num_warps


# Compiling and reading the SASS -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    registers: int  # per thread
    shared_bytes: int  # per CTA, with the runtime's reservation
    local_bytes: int  # per thread; > 0 means spills


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, without the predicate: "LDG.E.128"
    text: str


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")


def parse_sass(sass: str) -> list[Instruction]:
    """The instructions of a ``cuobjdump -sass`` listing of one kernel."""
    instructions = []
    for match in _SASS_LINE.finditer(sass):
        text = _PREDICATE.sub("", match.group(2))
        instructions.append(Instruction(int(match.group(1), 16), text.split()[0], text))
    return instructions


def load_bytes(opcode: str) -> int:
    """Bytes per thread of a global load (LDG.E.128: 16, .64: 8, .U16: 2, plain: 4); 0 for other opcodes."""
    parts = opcode.split(".")
    if parts[0] not in ("LDG", "LDGSTS"):
        return 0
    for modifier, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if modifier in parts:
            return size
    return 4


def steady_loop(instructions: list[Instruction]) -> tuple[list[Instruction], bool]:
    """(body, True) of the longest backward branch (a BRA to an earlier address) whose body loads from global
    memory; (the whole kernel, False) when there is none."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    best = None
    for end, ins in enumerate(instructions):
        target = re.findall(r"0x([0-9a-f]+)", ins.text)
        if ins.opcode.split(".")[0] != "BRA" or not target:
            continue
        start = index.get(int(target[-1], 16), end)
        loads = any(load_bytes(x.opcode) for x in instructions[start:end + 1])
        if start < end and loads and (best is None or end - start > best[1] - best[0]):
            best = (start, end)
    if best is None:
        return instructions, False
    return instructions[best[0]:best[1] + 1], True


def _cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("roofline: no cuobjdump in Triton's nvidia backend or on PATH")
    return found


@functools.cache
def _compiled(spec: VariantSpec, arch: int) -> tuple[bytes, int]:
    """(cubin, dynamic shared bytes) for sm_<arch>. Pointer arguments are 16-byte aligned, as Triton
    specializes them for the caching allocator's tensors."""
    signature = {**dict(spec.signature), **{name: "constexpr" for name, _ in spec.constexprs}}
    signature = {name: signature[name] for name in spec.kernel.arg_names}
    attrs = {(spec.kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, kind in spec.signature if kind.startswith("*")}
    source = ASTSource(fn=spec.kernel, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
    except Exception as error:
        raise RuntimeError(f"roofline: {spec.name} does not compile for sm_{arch}: {error}") from error
    return compiled.asm["cubin"], compiled.metadata.shared


@functools.cache
def compile_variant(spec: VariantSpec, arch: int) -> tuple[Resources, str]:
    """(resources, ``cuobjdump -sass`` listing) of a specialization compiled for sm_<arch>."""
    cubin, dynamic_shared = _compiled(spec, arch)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        listing = subprocess.run([_cuobjdump(), "-res-usage", "-sass", str(path)], capture_output=True,
                                 text=True, check=True).stdout
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|SHARED|LOCAL):(\d+)", listing)}
    # sm_90 cubins declare the runtime's 1 KB reservation as static shared memory; sm_80 cubins do not.
    shared = dynamic_shared + max(usage["SHARED"], RESERVED_SMEM)
    return Resources(usage["REG"], shared, usage["LOCAL"]), listing


# The model --------------------------------------------------------------------------------------------------

def resident_ctas(resources: Resources, num_warps: int, limits: SmLimits) -> tuple[int, str]:
    """(CTAs per SM, the resource that limits them). Registers are allocated per warp in units of 256 (a
    multiple of 8 per thread), shared memory per CTA in 128-byte units."""
    registers_per_warp = -(-resources.registers // 8) * 8 * 32
    shared = -(-resources.shared_bytes // SMEM_GRANULE) * SMEM_GRANULE
    bounds = {"registers": limits.registers // (registers_per_warp * num_warps),
              "shared": limits.shared_bytes // shared,
              "warps": limits.warps // num_warps,
              "ctas": limits.ctas}
    limiter = min(bounds, key=bounds.get)
    return bounds[limiter], limiter


def issue_bound(instructions_per_element: float, bytes_per_element: float, gpu: Gpu) -> float:
    """Elements per clock per SM the issue rate allows over those the memory delivers."""
    needed = gpu.bandwidth_tbs * 1e12 / (bytes_per_element * gpu.sms * gpu.clock_ghz * 1e9)
    return ISSUE_PER_CLOCK * 32 / instructions_per_element / needed


def little_bound(bytes_in_flight_per_sm: float, gpu: Gpu) -> float:
    """Bytes in flight per SM over those Little's law asks for (bandwidth x latency / SMs)."""
    return bytes_in_flight_per_sm / (gpu.bandwidth_tbs * 1e12 * LATENCY_NS * 1e-9 / gpu.sms)


@dataclass(frozen=True)
class Prediction:
    gpu: str
    issue_bound: float
    little_bound: float
    fraction: float  # of the read floor: min(1, issue bound, Little bound)


def predict(instructions_per_element: float, bytes_per_element: float, bytes_in_flight_per_sm: float,
            gpu: Gpu) -> Prediction:
    """The fraction of ``gpu``'s read floor a streaming loop can reach, with the two bounds behind it."""
    issue = issue_bound(instructions_per_element, bytes_per_element, gpu)
    little = little_bound(bytes_in_flight_per_sm, gpu)
    return Prediction(gpu.name, issue, little, min(1.0, issue, little))


@dataclass(frozen=True)
class VariantModel:
    name: str
    family: str
    dtype: str
    arch: int
    num_warps: int
    registers: int  # per thread
    shared_bytes: int  # per CTA
    local_bytes: int  # per thread (spills)
    ctas_per_sm: int
    warps_per_sm: int
    occupancy_limiter: str  # registers, shared, warps or ctas
    loop_found: bool  # False: the loop numbers are the whole kernel's
    loop_instructions: int  # per thread per iteration
    load_bytes_per_thread: int  # global loads per thread per iteration
    elements_per_thread: float  # of each input list per iteration
    instructions_per_element: float
    bytes_in_flight_per_sm: int
    barriers_per_iteration: int
    elements_per_cta_iteration: float
    barriers_per_element: float
    shared_atomics_per_element: float
    predictions: tuple[Prediction, ...]


def model(spec: VariantSpec, arch: int = 90) -> VariantModel:
    """The static model of one specialization compiled for sm_<arch>."""
    resources, listing = compile_variant(spec, arch)
    ctas, limiter = resident_ctas(resources, spec.num_warps, SM_LIMITS[arch])
    loop, found = steady_loop(parse_sass(listing))
    loads = sum(load_bytes(ins.opcode) for ins in loop)
    if loads == 0:
        raise ValueError(f"roofline: {spec.name} loads nothing from global memory")
    elements = loads / spec.bytes_per_element
    per_element = len(loop) / elements
    warps = ctas * spec.num_warps
    in_flight = warps * 32 * loads
    barriers = sum(ins.opcode.split(".")[0] == "BAR" for ins in loop)
    atomics = sum(ins.opcode.split(".")[0] == "ATOMS" for ins in loop)
    cta_elements = elements * 32 * spec.num_warps
    return VariantModel(
        name=spec.name, family=spec.family, dtype=spec.dtype, arch=arch, num_warps=spec.num_warps,
        registers=resources.registers, shared_bytes=resources.shared_bytes, local_bytes=resources.local_bytes,
        ctas_per_sm=ctas, warps_per_sm=warps, occupancy_limiter=limiter, loop_found=found,
        loop_instructions=len(loop), load_bytes_per_thread=loads, elements_per_thread=elements,
        instructions_per_element=per_element, bytes_in_flight_per_sm=in_flight,
        barriers_per_iteration=barriers, elements_per_cta_iteration=cta_elements,
        barriers_per_element=barriers / cta_elements, shared_atomics_per_element=atomics / elements,
        predictions=tuple(predict(per_element, spec.bytes_per_element, in_flight, gpu) for gpu in GPUS[arch]),
    )


def analyze(arch: int = 90) -> list[VariantModel]:
    """The model of every specialization the package launches, compiled for sm_<arch> (80 or 90)."""
    if arch not in SM_LIMITS:
        raise ValueError(f"roofline: no SM limits for sm_{arch}; known: {sorted(SM_LIMITS)}")
    specs = variant_specs()
    for spec in specs:  # compile one at a time, then disassemble in parallel
        _compiled(spec, arch)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(functools.partial(model, arch=arch), specs))


_LEGEND = """\
regs: per thread; smem: bytes per CTA with the runtime's 1 KB; warps: resident per SM; loop: SASS instructions
per thread in the steady-state loop (* no loop: the whole kernel); el/thr: elements of each input list per
thread per iteration; ins/el: loop instructions per element; LDG B: global-load bytes per thread per
iteration; flight: warps x 32 x LDG B per SM; bar/el: CTA barriers per iteration / elements a CTA consumes
per iteration; atoms/el: shared atomics per element; iss, mlp: the issue and Little's-law bounds; pred: the
predicted fraction of the read floor, min(1, iss, mlp)."""


def format_table(models: list[VariantModel]) -> str:
    """The models as a fixed-width table, one line per variant, then a legend."""
    gpus = [p.gpu for p in models[0].predictions]
    columns = (f"{'variant':30} {'regs':>4} {'smem':>5} {'warps':>5} {'loop':>5} {'el/thr':>6} {'ins/el':>6} "
               f"{'LDG B':>5} {'flight':>6} {'bar/el':>8} {'atoms/el':>8}")
    lines = [f"sm_{models[0].arch}".ljust(len(columns)) + "".join(f"  {f' {gpu} ':-^16}" for gpu in gpus),
             columns + "   iss   mlp  pred" * len(gpus)]
    for m in models:
        bounds = "".join(f" {p.issue_bound:>5.0%} {p.little_bound:>5.0%} {p.fraction:>5.0%}"
                         for p in m.predictions)
        lines.append(
            f"{m.name:30} {m.registers:>4} {m.shared_bytes:>5} {m.warps_per_sm:>5} "
            f"{m.loop_instructions:>4}{' ' if m.loop_found else '*'} {m.elements_per_thread:>6.3g} "
            f"{m.instructions_per_element:>6.1f} {m.load_bytes_per_thread:>5} "
            f"{m.bytes_in_flight_per_sm / 1024:>5.1f}K "
            f"{f'{m.barriers_per_iteration}/{m.elements_per_cta_iteration:.0f}':>8} "
            f"{m.shared_atomics_per_element:>8.2f}{bounds}")
    return "\n".join([*lines, "", _LEGEND])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS), help="compute capability")
    parser.add_argument("--json", action="store_true", help="print the models as JSON instead of a table")
    args = parser.parse_args(argv)
    models = analyze(args.arch)
    print(json.dumps([dataclasses.asdict(m) for m in models]) if args.json else format_table(models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
