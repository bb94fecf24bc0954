"""Device-side segment tables: one launch covers many tensors of one (device, dtype) group.

Element i of a tensor is addressed as ``base + (head + i) * itemsize``, where ``base`` is the tensor's
address rounded down to 16 bytes and ``head`` the elements skipped by the rounding. Chunks are aligned
``chunk_size``-element windows of that padded index space, so every full block a kernel reads is 16-byte
aligned and loads vectorize. Empty tensors own no chunk but keep their slot (and their output row).

All offsets and sizes are int64: a single tensor may hold more than 2^31 elements.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

ALIGN_BYTES = 16
TENSOR_FIELDS = 4  # base address, head, numel, output row


@dataclass(frozen=True)
class SegmentTable:
    """int64 device tensors describing T tensors cut into C chunks.

    tensors: [T, 4] (base address, head, numel, output row).
    chunks: [C, 2] (tensor index, first padded index of the chunk).
    chunk_offsets: [T + 1]; tensor t owns chunks chunk_offsets[t] : chunk_offsets[t + 1].
    """

    tensors: torch.Tensor
    chunks: torch.Tensor
    chunk_offsets: torch.Tensor
    num_tensors: int
    num_chunks: int


def segment_table(
    flats: list[torch.Tensor], out_rows: list[int], chunk_size: int
) -> SegmentTable:
    """The table of 1-D tensors ``flats`` (same device and dtype) whose results go to rows ``out_rows``."""
    key = tuple((t.data_ptr(), t.numel()) for t in flats)
    return _cached_table(key, tuple(out_rows), flats[0].element_size(), chunk_size, flats[0].device)


@functools.lru_cache(maxsize=64)
def _cached_table(
    key: tuple[tuple[int, int], ...], out_rows: tuple[int, ...], itemsize: int, chunk_size: int, device: torch.device
) -> SegmentTable:
    addresses = np.array([address for address, _ in key], dtype=np.int64)
    numels = np.array([numel for _, numel in key], dtype=np.int64)
    misalignment = addresses % ALIGN_BYTES
    if np.any(misalignment % itemsize):
        raise ValueError("fastgradstats: a tensor's address is not a multiple of its element size")
    heads = misalignment // itemsize
    chunks_per_tensor = np.where(numels > 0, -(-(heads + numels) // chunk_size), 0)
    chunk_offsets = np.concatenate([[0], np.cumsum(chunks_per_tensor)]).astype(np.int64)
    num_chunks = int(chunk_offsets[-1])

    tensors = np.stack([addresses - misalignment, heads, numels, np.array(out_rows, dtype=np.int64)], axis=1)
    chunk_tensor = np.repeat(np.arange(len(key), dtype=np.int64), chunks_per_tensor)
    chunk_index = np.arange(num_chunks, dtype=np.int64) - chunk_offsets[chunk_tensor]
    chunks = np.stack([chunk_tensor, chunk_index * chunk_size], axis=1)

    packed = torch.from_numpy(np.concatenate([tensors.ravel(), chunks.ravel(), chunk_offsets]))
    if device.type == "cuda":  # pinned + non_blocking: the copy does not sync the host with the device
        packed = packed.pin_memory().to(device, non_blocking=True)
    num_tensors = len(key)
    tensor_end = num_tensors * TENSOR_FIELDS
    chunk_end = tensor_end + num_chunks * 2
    return SegmentTable(
        tensors=packed[:tensor_end].view(num_tensors, TENSOR_FIELDS),
        chunks=packed[tensor_end:chunk_end].view(num_chunks, 2),
        chunk_offsets=packed[chunk_end:],
        num_tensors=num_tensors,
        num_chunks=num_chunks,
    )
