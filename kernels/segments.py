"""Device-side segment tables: one launch covers many tensors of one (device, dtype) group.

Element i of a tensor is addressed as ``base + (head + i) * itemsize``, where ``base`` is the tensor's
address rounded down to 16 bytes and ``head`` the elements skipped by the rounding. Chunks are aligned
``chunk_size``-element windows of that padded index space, so every full block a kernel reads is 16-byte
aligned and loads vectorize. Empty tensors own no chunk but keep their slot (and their output row).

Pairs of lists (a, b, optional origin) share one chunking, made from the first list; the other lists' base and
head ride along in the tensor rows. All offsets and sizes are int64: a single tensor may hold more than 2^31
elements.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

ALIGN_BYTES = 16
TENSOR_FIELDS = 4  # base address, head, numel, output row; then (base address, head) per further list


@dataclass(frozen=True)
class SegmentTable:
    """int64 device tensors describing T tensors cut into C chunks.

    tensors: [T, 4 + 2 * len(others)] (base address, head, numel, output row, then base and head per
        other list).
    chunks: [C, 2] (tensor index, first padded index of the chunk).
    chunk_offsets: [T + 1]; tensor t owns chunks chunk_offsets[t] : chunk_offsets[t + 1].
    aligned: every other list's heads equal the first list's, so its full blocks are 16-byte aligned too.
    host: on CUDA, the pinned host buffer the table was copied from, kept as long as the table: a table built
        while a CUDA graph is captured is copied again by every replay, from this buffer.
    """

    tensors: torch.Tensor
    chunks: torch.Tensor
    chunk_offsets: torch.Tensor
    num_tensors: int
    num_chunks: int
    aligned: bool
    host: torch.Tensor | None = None


def segment_table(
    flats: list[torch.Tensor], out_rows: list[int], chunk_size: int,
    others: tuple[list[torch.Tensor], ...] = (),
) -> SegmentTable:
    """The table of 1-D tensors ``flats`` (one device and dtype) whose results go to rows ``out_rows``.

    ``others``: further lists (one dtype each) read element by element alongside ``flats`` (pair statistics).
    """
    lists = (flats, *others)
    key = tuple(tuple((t.data_ptr(), t.numel()) for t in tensors) for tensors in lists)
    itemsizes = tuple(tensors[0].element_size() for tensors in lists)
    return _cached_table(key, tuple(out_rows), itemsizes, chunk_size, flats[0].device)


def _base_and_head(key: tuple[tuple[int, int], ...], itemsize: int) -> tuple[np.ndarray, np.ndarray]:
    addresses = np.array([address for address, _ in key], dtype=np.int64)
    misalignment = addresses % ALIGN_BYTES
    if np.any(misalignment % itemsize):
        raise ValueError("fastgradstats: a tensor's address is not a multiple of its element size")
    return addresses - misalignment, misalignment // itemsize


@functools.lru_cache(maxsize=64)
def _cached_table(
    key: tuple[tuple[tuple[int, int], ...], ...],
    out_rows: tuple[int, ...],
    itemsizes: tuple[int, ...],
    chunk_size: int,
    device: torch.device,
) -> SegmentTable:
    bases, heads = _base_and_head(key[0], itemsizes[0])
    numels = np.array([numel for _, numel in key[0]], dtype=np.int64)
    chunks_per_tensor = np.where(numels > 0, -(-(heads + numels) // chunk_size), 0)
    chunk_offsets = np.concatenate([[0], np.cumsum(chunks_per_tensor)]).astype(np.int64)
    num_chunks = int(chunk_offsets[-1])

    columns = [bases, heads, numels, np.array(out_rows, dtype=np.int64)]
    aligned = True
    for other_key, itemsize in zip(key[1:], itemsizes[1:]):
        other_bases, other_heads = _base_and_head(other_key, itemsize)
        columns += [other_bases, other_heads]
        aligned = aligned and bool(np.all(other_heads == heads))
    tensors = np.stack(columns, axis=1)
    num_tensors = len(numels)
    chunk_tensor = np.repeat(np.arange(num_tensors, dtype=np.int64), chunks_per_tensor)
    chunk_index = np.arange(num_chunks, dtype=np.int64) - chunk_offsets[chunk_tensor]
    chunks = np.stack([chunk_tensor, chunk_index * chunk_size], axis=1)

    packed = host = torch.from_numpy(np.concatenate([tensors.ravel(), chunks.ravel(), chunk_offsets]))
    if device.type == "cuda":  # pinned + non_blocking: the copy does not sync the host with the device
        host = host.pin_memory()
        packed = host.to(device, non_blocking=True)
    tensor_end = tensors.size
    chunk_end = tensor_end + num_chunks * 2
    return SegmentTable(
        tensors=packed[:tensor_end].view(num_tensors, tensors.shape[1]),
        chunks=packed[tensor_end:chunk_end].view(num_chunks, 2),
        chunk_offsets=packed[chunk_end:],
        num_tensors=num_tensors,
        num_chunks=num_chunks,
        aligned=aligned,
        host=host if device.type == "cuda" else None,
    )
