"""Reading checkpoints tensor by tensor and chunk by chunk: state_dicts, ``.safetensors`` (sliced, so one
chunk of a tensor is in memory at a time) and ``.pt`` / ``.bin`` files (memory-mapped ``torch.load``)."""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

Checkpoint = Mapping[str, torch.Tensor] | str | os.PathLike

# safetensors dtype names of the floating-point tensors we read; other dtypes (integers, bool) are skipped.
SAFETENSORS_FLOAT_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

class Source:
    """One checkpoint (or the external centre): its tensors' shapes and dtypes, and reads of row ranges."""

    def __init__(self, label: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype | None]):
        self.label = label
        self.shapes = shapes  # every tensor, in the checkpoint's order
        self.dtypes = dtypes  # None: not floating-point (skipped)

    def floating(self) -> list[str]:
        return [key for key, dtype in self.dtypes.items() if dtype is not None]

    def nbytes(self, key: str) -> int:
        return math.prod(self.shapes[key]) * self.dtypes[key].itemsize

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of ``key`` along dim 0 (the whole tensor when 0-d), flattened."""
        raise NotImplementedError


class MappingSource(Source):
    def __init__(self, label: str, tensors: Mapping):
        tensors = {key: t for key, t in tensors.items() if isinstance(t, torch.Tensor)}
        super().__init__(label, {key: tuple(t.shape) for key, t in tensors.items()},
                         {key: t.dtype if t.is_floating_point() else None for key, t in tensors.items()})
        self.tensors = tensors

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        tensor = self.tensors[key].detach()
        return (tensor if tensor.dim() == 0 else tensor[start:stop]).reshape(-1)


class SafetensorsSource(Source):
    def __init__(self, label: str, path: str, stack: ExitStack):
        from safetensors import safe_open

        self.path = path
        try:
            handle = stack.enter_context(safe_open(path, framework="pt"))
            self.slices = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
            shapes = {key: tuple(s.get_shape()) for key, s in self.slices.items()}
            dtypes = {key: SAFETENSORS_FLOAT_DTYPES.get(s.get_dtype()) for key, s in self.slices.items()}
        except Exception as error:  # safetensors raises its own SafetensorError for a bad header
            raise ValueError(f"trajectory_map: cannot read checkpoint '{path}': {error}") from error
        super().__init__(label, shapes, dtypes)

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        try:
            piece = self.slices[key][...] if not self.shapes[key] else self.slices[key][start:stop]
        except Exception as error:
            raise ValueError(f"trajectory_map: cannot read '{key}' from checkpoint '{self.path}': {error}") \
                from error
        return piece.reshape(-1)


def open_checkpoint(item: Checkpoint, label: str, stack: ExitStack) -> Source:
    if isinstance(item, Mapping):
        return MappingSource(label, item)
    if not isinstance(item, (str, os.PathLike)):
        raise TypeError(f"trajectory_map: a checkpoint must be a state_dict or a path, "
                        f"got {type(item).__name__}")
    path = os.fspath(item)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"trajectory_map: no checkpoint file '{path}'")
    if path.endswith(".safetensors"):
        return SafetensorsSource(label, path, stack)
    try:
        loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as error:  # truncated or corrupt archives raise RuntimeError, pickle errors, ...
        raise ValueError(f"trajectory_map: cannot read checkpoint '{path}': {error}") from error
    if not isinstance(loaded, Mapping):
        raise TypeError(f"trajectory_map: checkpoint '{path}' holds a {type(loaded).__name__}, "
                        "not a state_dict")
    return MappingSource(label, loaded)


def checkpoint_labels(items: list) -> list[str]:
    """File names for paths (relative to their common folder when names repeat), the index for state_dicts."""
    paths = {i: os.path.abspath(os.fspath(item))
             for i, item in enumerate(items) if not isinstance(item, Mapping)}
    labels = [Path(paths[i]).name if i in paths else str(i) for i in range(len(items))]
    if len(set(labels)) < len(labels) and len(paths) > 1:
        root = os.path.commonpath(list(paths.values()))
        labels = [os.path.relpath(paths[i], root) if i in paths else labels[i] for i in range(len(items))]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    return labels


def select_keys(rows: list[Source], keys: Sequence[str] | None,
                 exclude: str | Sequence[str] | None) -> list[str]:
    """The keys to compare (see ``trajectory_map``), with the key-set and shape checks."""
    patterns = [re.compile(p) for p in ([exclude] if isinstance(exclude, str) else (exclude or []))]
    if isinstance(keys, str):
        keys = [keys]
    kept = [key for key in (rows[0].floating() if keys is None else dict.fromkeys(keys))
            if not any(p.search(key) for p in patterns)]
    first = rows[0]
    if keys is None:
        for row in rows[1:]:
            floating = [key for key in row.floating() if not any(p.search(key) for p in patterns)]
            only_first = [key for key in kept if key not in set(floating)]
            only_row = [key for key in floating if key not in set(kept)]
            if only_first or only_row:
                key, having, lacking = ((only_first[0], first, row) if only_first
                                        else (only_row[0], row, first))
                raise ValueError(f"trajectory_map: '{key}' is in checkpoint '{having.label}' but not in "
                                 f"'{lacking.label}'; pass keys= or exclude= to choose the tensors")
    else:
        present = []
        for key in kept:
            lacking = [row.label for row in rows if row.dtypes.get(key) is None]
            if lacking:
                warnings.warn(f"trajectory_map: skipping '{key}', which is missing (or not floating-point) "
                              f"in checkpoint(s) {', '.join(repr(label) for label in lacking)}", stacklevel=3)
            else:
                present.append(key)
        kept = present
    for key in kept:
        for row in rows[1:]:
            if row.shapes[key] != first.shapes[key]:
                raise ValueError(f"trajectory_map: '{key}' has shape {first.shapes[key]} in checkpoint "
                                 f"'{first.label}' but {row.shapes[key]} in '{row.label}'")
    if not kept:
        raise ValueError("trajectory_map: no floating-point tensors to compare")
    return kept
