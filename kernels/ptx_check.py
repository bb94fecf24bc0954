"""Compile every kernel variant for a GPU architecture without a GPU and read the PTX.

``python -m fastgradstats.kernels.ptx_check [--arch 90]`` prints, per kernel variant, its global load widths,
whether its full blocks load 16 bytes per instruction (``ld.global.v4``) and whether anything spills to local
memory. Must run without ``TRITON_INTERPRET`` (the interpreter has no compiler).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import merge, pair_stats, tensor_stats

CHUNK, BLOCK = tensor_stats.DEFAULT_CHUNK_SIZE, tensor_stats.DEFAULT_BLOCK_SIZE


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


def _variants():
    """(name, kernel, pointer signature, constexprs, num_warps) of every specialisation we launch."""
    stats_sig = {"tensor_table": "*i64", "chunk_table": "*i64", "partials": "*fp64", "hist_out": "*i64",
                 "total_hist_out": "*i64", "ranges": "*fp32", "num_layers": "i64"}
    for dtype in (tl.float32, tl.bfloat16, tl.float16):
        for rows, hist, total in ((True, 0, False), (True, 1, False), (True, 2, False), (False, 2, True)):
            constexprs = {"DTYPE": dtype, "ACC": tl.float32, "CHUNK": CHUNK, "BLOCK": BLOCK, "NUM_FIELDS": 10,
                          "ROWS": rows, "HIST": hist, "TOTAL_HIST": total, "MIN_EXP": -48, "MAX_EXP": 15,
                          "BINS": 64, "PADDED_BINS": 64}
            yield (f"tensor_stats[{dtype}, rows={rows}, hist={hist}]", tensor_stats._chunk_kernel, stats_sig,
                   constexprs, tensor_stats.NUM_WARPS)
    pair_sig = {"tensor_table": "*i64", "chunk_table": "*i64", "partials": "*fp64"}
    for dtype in (tl.float32, tl.bfloat16):
        for has_origin in (False, True):
            constexprs = {"A_DTYPE": dtype, "B_DTYPE": dtype, "O_DTYPE": dtype, "HAS_ORIGIN": has_origin,
                          "ALIGNED": True, "TABLE_STRIDE": 8 if has_origin else 6, "CHUNK": CHUNK,
                          "BLOCK": BLOCK, "NUM_FIELDS": 5}
            yield (f"pair_stats[{dtype}, origin={has_origin}]", pair_stats._pair_chunk_kernel, pair_sig,
                   constexprs, tensor_stats.NUM_WARPS)
    merge_sig = {"tensor_table": "*i64", "chunk_offsets": "*i64", "partials": "*fp64", "rows": "*fp64"}
    constexprs = {"TABLE_STRIDE": 4, "NUM_FIELDS": 10, "FIRST_MAX_FIELD": 6, "PADDED_FIELDS": 16,
                  "MERGE": merge.MERGE_BLOCK, "CHAN": True}
    yield "merge", merge._merge_kernel, merge_sig, constexprs, 4


def check(arch: int = 90) -> list[PtxReport]:
    """Compile each variant for sm_<arch> and report on its PTX."""
    reports = []
    for name, kernel, pointer_sig, constexprs, num_warps in _variants():
        signature = {**pointer_sig, **{key: "constexpr" for key in constexprs}}
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
