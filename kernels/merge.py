"""Stage 2 of every statistics family: merge each tensor's chunk rows, in chunk order, into its output row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .segments import SegmentTable

MERGE_BLOCK = 32  # chunk rows merged per step


@triton.jit
def _merge_kernel(
    tensor_table, chunk_offsets, partials, rows,
    TABLE_STRIDE: tl.constexpr, NUM_FIELDS: tl.constexpr, FIRST_MAX_FIELD: tl.constexpr,
    PADDED_FIELDS: tl.constexpr, MERGE: tl.constexpr,
):
    """One program per tensor: fields before FIRST_MAX_FIELD add, the others take the maximum (float64)."""
    tensor = tl.program_id(0).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + tensor)
    end_chunk = tl.load(chunk_offsets + tensor + 1)
    out_row = tl.load(tensor_table + TABLE_STRIDE * tensor + 3)

    fields = tl.arange(0, PADDED_FIELDS)
    in_row = (fields < NUM_FIELDS)[None, :]
    acc_sum = tl.zeros([MERGE, PADDED_FIELDS], tl.float64)
    acc_max = tl.full([MERGE, PADDED_FIELDS], float("-inf"), tl.float64)
    for start in range(first_chunk, end_chunk, MERGE):
        chunk = start + tl.arange(0, MERGE).to(tl.int64)
        mask = (chunk < end_chunk)[:, None] & in_row
        values = tl.load(partials + chunk[:, None] * NUM_FIELDS + fields[None, :], mask=mask, other=0.0)
        acc_sum += values
        acc_max = tl.maximum(acc_max, tl.where(mask, values, float("-inf")))
    merged = tl.where(fields >= FIRST_MAX_FIELD, tl.max(acc_max, 0), tl.sum(acc_sum, 0))
    tl.store(rows + out_row * NUM_FIELDS + fields, merged, mask=fields < NUM_FIELDS)


def merge_chunk_rows(table: SegmentTable, partials: torch.Tensor, rows: torch.Tensor, first_max: int) -> None:
    """Write rows[out_row] of every tensor in ``table`` from its chunk rows in ``partials`` [C, K] (one
    launch)."""
    num_fields = rows.shape[1]
    _merge_kernel[(table.num_tensors,)](
        table.tensors, table.chunk_offsets, partials, rows,
        TABLE_STRIDE=table.tensors.shape[1], NUM_FIELDS=num_fields, FIRST_MAX_FIELD=first_max,
        PADDED_FIELDS=triton.next_power_of_2(num_fields), MERGE=MERGE_BLOCK, num_warps=4,
    )
