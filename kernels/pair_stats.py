"""Fused pairwise statistics: Σa'b', Σa'², Σb'², Σ(a-b)² of many layer pairs in two launches per dtype group.

a' = a - o and b' = b - o for an optional origin o, formed in registers (never materialised). Stage 1 (one
program per chunk of a) accumulates in float32 and writes one float64 row of partials per chunk; stage 2 is
the shared fixed-order merge (:mod:`.merge`), so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgradstats.rows import PAIR_K

from .chunking import chunk_span, edge_block
from .merge import merge_chunk_rows
from .segments import segment_table
from .tensor_stats import DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_SIZE, NUM_WARPS, TL_DTYPES, check_sizes


@triton.jit
def _load(base, offs, shift, mask, FULL: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """float32 values of base[offs + shift]: unmasked and hinted 16-byte aligned for full aligned blocks."""
    ptrs = base + (offs + shift)
    if FULL:
        if ALIGNED:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, 16), BLOCK)
        values = tl.load(ptrs)
    else:
        values = tl.load(ptrs, mask=mask, other=0.0)
    return values.to(tl.float32)


@triton.jit
def _accumulate(
    a_base, b_base, o_base, b_shift, o_shift, offs, mask, dot, aa, bb, dd,
    HAS_ORIGIN: tl.constexpr, ALIGNED: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Fold one block into the accumulators; masked-off lanes load zeros, which add nothing."""
    a = _load(a_base, offs, 0, mask, FULL, True, BLOCK)
    b = _load(b_base, offs, b_shift, mask, FULL, ALIGNED, BLOCK)
    diff = a - b
    if HAS_ORIGIN:
        o = _load(o_base, offs, o_shift, mask, FULL, ALIGNED, BLOCK)
        a -= o
        b -= o
    return dot + a * b, aa + a * a, bb + b * b, dd + diff * diff


@triton.jit
def _pair_chunk_kernel(
    tensor_table, chunk_table, partials,
    A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, HAS_ORIGIN: tl.constexpr,
    ALIGNED: tl.constexpr, TABLE_STRIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    NUM_FIELDS: tl.constexpr,
):
    """Stage 1: one chunk → one row (n, Σa'b', Σa'², Σb'², Σ(a-b)²) of partials."""
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(chunk_table + 2 * pid)
    chunk_start = tl.load(chunk_table + 2 * pid + 1)
    entry = tensor_table + TABLE_STRIDE * tensor
    a_base = tl.load(entry).to(tl.pointer_type(A_DTYPE))
    head = tl.load(entry + 1)
    numel = tl.load(entry + 2)
    b_base = tl.load(entry + 4).to(tl.pointer_type(B_DTYPE))
    b_shift = tl.load(entry + 5) - head
    o_base = b_base
    o_shift = b_shift
    if HAS_ORIGIN:
        o_base = tl.load(entry + 6).to(tl.pointer_type(O_DTYPE))
        o_shift = tl.load(entry + 7) - head

    lo_idx, hi_idx, first_full, last_full = chunk_span(chunk_start, head, numel, CHUNK, BLOCK)

    dot = tl.zeros([BLOCK], tl.float32)
    aa = tl.zeros([BLOCK], tl.float32)
    bb = tl.zeros([BLOCK], tl.float32)
    dd = tl.zeros([BLOCK], tl.float32)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for block in range(first_full, last_full):  # full blocks, as in tensor_stats
        dot, aa, bb, dd = _accumulate(
            a_base, b_base, o_base, b_shift, o_shift, block * BLOCK + lanes, None, dot, aa, bb, dd,
            HAS_ORIGIN, ALIGNED, True, BLOCK)
    for edge in tl.static_range(2):  # the partial blocks at either end of the chunk
        offs, mask = edge_block(edge, lo_idx, hi_idx, first_full, last_full, lanes, BLOCK)
        dot, aa, bb, dd = _accumulate(
            a_base, b_base, o_base, b_shift, o_shift, offs, mask, dot, aa, bb, dd,
            HAS_ORIGIN, ALIGNED, False, BLOCK)

    row = partials + pid * NUM_FIELDS  # field order of fastgradstats.rows: PAIR_N, DOT, AA, BB, DD
    tl.store(row + 0, (hi_idx - lo_idx).to(tl.float64))
    tl.store(row + 1, tl.sum(dot, 0).to(tl.float64))
    tl.store(row + 2, tl.sum(aa, 0).to(tl.float64))
    tl.store(row + 3, tl.sum(bb, 0).to(tl.float64))
    tl.store(row + 4, tl.sum(dd, 0).to(tl.float64))


def pair_rows(
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    origin: list[torch.Tensor] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Pair rows float64 [L, PAIR_K] of 1-D tensors a[i], b[i] (origin[i]) on one device, in matching order.

    Two launches per (a dtype, b dtype, origin dtype) group, the first skipped when the group is empty.
    """
    check_sizes(chunk_size, block_size)
    device = a[0].device
    rows = torch.empty(len(a), PAIR_K, dtype=torch.float64, device=device)
    groups: dict[tuple, list[int]] = {}
    for layer in range(len(a)):
        key = (a[layer].dtype, b[layer].dtype, None if origin is None else origin[layer].dtype)
        groups.setdefault(key, []).append(layer)
    for (a_dtype, b_dtype, o_dtype), layers in groups.items():
        others = ([b[i] for i in layers],) + (() if origin is None else ([origin[i] for i in layers],))
        table = segment_table([a[i] for i in layers], layers, chunk_size, others)
        partials = torch.empty(table.num_chunks, PAIR_K, dtype=torch.float64, device=device)
        if table.num_chunks:
            _pair_chunk_kernel[(table.num_chunks,)](
                table.tensors, table.chunks, partials,
                A_DTYPE=TL_DTYPES[a_dtype], B_DTYPE=TL_DTYPES[b_dtype], O_DTYPE=TL_DTYPES[o_dtype or a_dtype],
                HAS_ORIGIN=origin is not None, ALIGNED=table.aligned, TABLE_STRIDE=table.tensors.shape[1],
                CHUNK=chunk_size, BLOCK=block_size, NUM_FIELDS=PAIR_K, num_warps=NUM_WARPS,
            )
        merge_chunk_rows(table, partials, rows, PAIR_K)
    return rows
