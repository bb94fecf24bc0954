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
    PADDED_FIELDS: tl.constexpr, MERGE: tl.constexpr, CHAN: tl.constexpr,
):
    """One program per tensor: fields before FIRST_MAX_FIELD add, the others take the maximum (float64).

    CHAN (tensor rows of :mod:`fastgradstats.rows`): field M2 = 2 merges by Chan's formula,
    ΣM2_i + Σ n_i·(mean_i - mean)² with n = field 0 and mean = field 1 / n, in a second pass over the rows.
    """
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
    if CHAN:
        mean = tl.sum(tl.where(fields == 1, merged, 0.0), 0) / tl.sum(tl.where(fields == 0, merged, 0.0), 0)
        spread = tl.zeros([MERGE], tl.float64)
        for start in range(first_chunk, end_chunk, MERGE):
            chunk = start + tl.arange(0, MERGE).to(tl.int64)
            n = tl.load(partials + chunk * NUM_FIELDS, mask=chunk < end_chunk, other=0.0)
            chunk_sum = tl.load(partials + chunk * NUM_FIELDS + 1, mask=chunk < end_chunk, other=0.0)
            deviation = chunk_sum / tl.maximum(n, 1.0) - mean
            spread += tl.where(n > 0, n * deviation * deviation, 0.0)
        merged = tl.where(fields == 2, merged + tl.sum(spread, 0), merged)
    tl.store(rows + out_row * NUM_FIELDS + fields, merged, mask=fields < NUM_FIELDS)


def merge_chunk_rows(
    table: SegmentTable, partials: torch.Tensor, rows: torch.Tensor, first_max: int, *, chan: bool = False
) -> None:
    """Write rows[out_row] of every tensor in ``table`` from its chunk rows in ``partials`` [C, K] (one
    launch); ``chan=True`` for tensor rows (M2 merged by Chan's formula)."""
    num_fields = rows.shape[1]
    _merge_kernel[(table.num_tensors,)](
        table.tensors, table.chunk_offsets, partials, rows,
        TABLE_STRIDE=table.tensors.shape[1], NUM_FIELDS=num_fields, FIRST_MAX_FIELD=first_max,
        PADDED_FIELDS=triton.next_power_of_2(num_fields), MERGE=MERGE_BLOCK, CHAN=chan, num_warps=4,
    )
