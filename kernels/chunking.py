"""How a stage-1 program walks its chunk: full blocks unmasked, then the two partial blocks at its ends.

Indices are the segment table's padded indices (see :mod:`.segments`): element i of a tensor is index
head + i, and block b covers indices [b·BLOCK, (b + 1)·BLOCK), 16-byte aligned.
"""

import triton
import triton.language as tl


@triton.jit
def chunk_span(chunk_start, head, numel, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """(lo, hi, first_full, last_full): the chunk's elements are indices [lo, hi), its full blocks
    first_full ≤ b < last_full (none when the chunk lies within one block)."""
    lo = tl.maximum(chunk_start, head)
    hi = tl.minimum(chunk_start + CHUNK, head + numel)
    return lo, hi, (lo + BLOCK - 1) // BLOCK, hi // BLOCK


@triton.jit
def edge_block(edge: tl.constexpr, lo, hi, first_full, last_full, lanes, BLOCK: tl.constexpr):
    """(offsets, mask) of the partial block before (edge 0) or after (edge 1) the full blocks.

    Together with the full blocks they cover [lo, hi) exactly once; a mask is empty when its end is aligned.
    """
    if edge == 0:
        offs = (lo // BLOCK) * BLOCK + lanes
        mask = (offs >= lo) & (offs < tl.minimum(hi, first_full * BLOCK))
    else:
        offs = last_full * BLOCK + lanes
        mask = (offs >= tl.maximum(first_full, last_full) * BLOCK) & (offs < hi)
    return offs, mask


@triton.jit
def edge_range(edge: tl.constexpr, lo, hi, first_full, last_full, BLOCK: tl.constexpr):
    """(start, end) of the partial block before (edge 0) or after (edge 1) the full blocks: the same elements
    as :func:`edge_block`'s mask, as an index range (empty when that end is aligned)."""
    if edge == 0:
        return lo, tl.minimum(hi, first_full * BLOCK)
    return tl.maximum(first_full, last_full) * BLOCK, hi
