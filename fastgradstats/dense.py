"""Reading a tensor's elements without copying it: statistics do not depend on element order."""

from __future__ import annotations

import torch


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill a gap-free, non-overlapping span of its storage (any dim order)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_elements(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of t's elements in storage order.

    A view for contiguous and other dense tensors (e.g. a transposed weight); tensors with gaps or overlaps
    (slices with steps, expanded tensors) are copied with ``contiguous()``, the one case that allocates.
    """
    if t.numel() == 0 or t.is_contiguous():
        return t.reshape(-1)
    if is_dense(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t.contiguous().view(-1)
