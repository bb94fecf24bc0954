"""Compile every kernel variant the package launches (:func:`.roofline.variants`) for a GPU architecture
without a GPU and read the PTX.

``python -m fastgradstats.kernels.ptx_check [--arch 90]`` prints, per kernel variant, its global load widths,
whether its full blocks load 16 bytes per instruction (``ld.global.v4``) and whether anything spills to local
memory. Must run without ``TRITON_INTERPRET`` (the interpreter has no compiler).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import merge, roofline


@dataclass
class PtxReport:
    name: str
    loads: list[str]
    vectorized: bool  # a 16-byte global load is present
    spills: bool  # local memory is used
    streams_data: bool  # reads tensor data (must vectorize); the merge kernel reads only small partial rows

    @property
    def ok(self) -> bool:
        return not self.spills and (self.vectorized or not self.streams_data)

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "CHECK"
        return (f"{verdict:5} {self.name:48} vector16={self.vectorized!s:5} spills={self.spills!s:5} "
                f"{' '.join(self.loads)}")


def check(arch: int = 90) -> list[PtxReport]:
    """Compile each variant for sm_<arch> and report on its PTX."""
    reports = []
    for name, kernel, run_time_sig, constexprs, num_warps in roofline.variants():
        signature = {**run_time_sig, **{key: "constexpr" for key in constexprs}}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs={})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps})
        ptx = compiled.asm["ptx"]
        loads = sorted(set(re.findall(r"ld\.global[.\w]*", ptx)))
        sixteen_bytes = any(re.search(r"\.v4\.[bf]32|\.v2\.[bf]64", load) for load in loads)
        reports.append(PtxReport(name, loads, sixteen_bytes, ".local" in ptx,
                                 kernel is not merge._merge_kernel))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    reports = check(parser.parse_args(argv).arch)
    for report in reports:
        print(report)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
