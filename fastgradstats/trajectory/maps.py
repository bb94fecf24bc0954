"""Trajectory maps of checkpoint series: one pass over K checkpoints gives their Gram matrix and, from it,
cosines, distances, the mean direction similarity (MDS), the cone angle and the path length.

    tmap = fgs.trajectory_map(sorted(Path("run").glob("step*.safetensors")), center=0)
    tmap.mds, tmap.cone_angle, tmap.path_length, tmap.cos     # cos: [K, K] float64
    tmap.plot("trajectory.png")

Algorithm. For each tensor key and each range of rows along its dim 0 (``chunk_size`` elements), the K chunks
(plus the external centre's) are stacked as the rows of a float64 matrix X [R, n] on ``device``, rewritten in
place in a step basis,

    Y_0 = θ_0,   Y_t = θ_t - θ_(t-1)  (0 < t < K),   Y_K = θ_centre - θ_0  (external centre only),

and ``Y @ Y.T`` is added to one float64 Gram H [R, R] (and to the key's own H when ``per_layer``). Every
checkpoint tensor is read exactly once, one chunk at a time, so memory is about R · chunk_size · 8 bytes.
Every output is a quadratic form of H with integer coefficients: θ_i = Y_0 + ... + Y_i gives the raw dot
products ``gram`` = ⟨θ_i, θ_j⟩, θ_i - θ_c = ±(sum of the steps between c and i) the centred ones, and
‖θ_i - θ_j‖² is the sum of H over the steps between j and i.

Precision. Values are upcast to float64 exactly and the step differences are formed in float64 (exact for
float32, bfloat16 and float16 values less than 2^29 apart in magnitude). The products are accumulated in
float64: a float32 Gram would carry errors of ~1e-7·‖θ‖², which every centring subtraction amplifies. The step
basis keeps the large ‖θ‖² out of everything but ``gram`` and the raw cosines (center=None):

- ``dist`` between consecutive checkpoints, hence ``path_length``: √H_tt itself, ~1e-15 relative;
- ``dist[i, j]`` and the centred dot products: relative error ~1e-16·L²/d², where d is the distance (or
  norm) and L the path length between the checkpoints involved (their path-to-chord ratio, squared);
- the textbook formula ‖θ_i‖² + ‖θ_j‖² - 2⟨θ_i, θ_j⟩ on the raw Gram would instead err by ~1e-16·‖θ‖²/d²
  (1e-8 relative for a fine-tuning step of ‖Δθ‖ = 1e-4·‖θ‖, before float32 accumulation).

Angles come from arccos of the clamped cosine, so they resolve ~1e-7 rad at best.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..monitoring.plots import _figure, _finish, _require_matplotlib
from ..rows import cosine
from .checkpoints import Checkpoint, Source, checkpoint_labels, open_checkpoint, select_keys

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GRAM_BLOCK = 4096  # columns per block of the batched Gram matmul
MAX_ANNOTATED = 12  # the heatmap prints the cosine in each cell up to this many checkpoints
MAX_TICK_LABELS = 40


@dataclass
class TrajectoryMap:
    """What ``trajectory_map`` returns. Matrices and vectors are float64 torch tensors on the CPU.

    Fields:
        names: K checkpoint labels (file names, or "0".."K-1" for state_dicts).
        keys: the tensor names compared; numel: their total number of elements.
        center: None (raw parameters), the centre's index, or "external" (a centre outside the series).
        gram: [K, K] raw dot products ⟨θ_i, θ_j⟩ (the external centre's row is left out).
        cos: [K, K] cosine of the centred vectors θ_i - θ_c (raw θ_i when center is None), by the one rule of
            fastgradstats (:func:`fastgradstats.rows.cosine`, as ``torch.nn.functional.cosine_similarity``):
            ⟨u, v⟩ / (max(‖u‖, 1e-8) · max(‖v‖, 1e-8)), so the row and column of a zero vector, such as the
            centre itself when it is an index, are 0 (its diagonal entry too); the other diagonal entries
            are exactly 1.
        norms: [K] ‖θ_i - θ_c‖ (‖θ_i‖ when center is None).
        dist: [K, K] ‖θ_i - θ_j‖, whatever the centre.
        mds: mean of the finite off-diagonal entries of ``cos`` between non-zero vectors; mds_all: mean of
            all its finite entries between non-zero vectors, diagonal included (the paper's normalisation is
            unverified, so both are given). A zero vector has no direction, so it takes no part in them.
        cone_angle: the largest angle, in degrees, between a non-zero centred vector θ_i - θ_c (i ≠ c) and
            the final one θ_(K-1) - θ_c; NaN when the final one is zero (the centre is the final checkpoint).
        path_length: Σ_t ‖θ_(t+1) - θ_t‖.
        layers: key -> TrajectoryMap of that tensor alone, with ``per_layer=True``; otherwise None.
    """

    names: list[str]
    keys: list[str]
    numel: int
    center: int | str | None
    gram: torch.Tensor
    cos: torch.Tensor
    norms: torch.Tensor
    dist: torch.Tensor
    mds: float
    mds_all: float
    cone_angle: float
    path_length: float
    layers: dict[str, TrajectoryMap] | None = None

    def to_dict(self, gram: bool = True) -> dict:
        """Plain Python values (NaN and ±Inf as None); the per-layer entries never include their Grams."""
        fields = ["names", "keys", "numel", "center", "mds", "mds_all", "cone_angle", "path_length", "norms",
                  "cos", "dist"] + (["gram"] if gram else [])
        result = {field: _plain(getattr(self, field)) for field in fields}
        if self.layers is not None:
            result["layers"] = {key: layer.to_dict(gram=False) for key, layer in self.layers.items()}
        return result

    def to_json(self) -> str:
        """``to_dict()`` as a JSON string: everything except the per-layer Grams, NaN as null."""
        return json.dumps(self.to_dict(), allow_nan=False)

    def plot(self, path: str | os.PathLike | None = None) -> Figure:
        """Heatmap of ``cos`` (NaN cells grey) with a colorbar, the MDS and cone angle in the title and the
        checkpoint names on both axes; saved to ``path`` (PNG unless the suffix says otherwise) when given."""
        _require_matplotlib()
        from matplotlib import colormaps

        count = len(self.names)
        side = min(4.0 + 0.35 * count, 14.0)
        fig, ax = _figure((side + 1.6, side))
        cos = self.cos.numpy()
        cmap = colormaps["RdBu_r"].with_extremes(bad="lightgrey")
        image = ax.imshow(cos, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="cosine", shrink=0.85)
        ticks = list(range(0, count, math.ceil(count / MAX_TICK_LABELS)))
        ax.set_xticks(ticks, [self.names[i] for i in ticks], rotation=90, fontsize=8)
        ax.set_yticks(ticks, [self.names[i] for i in ticks], fontsize=8)
        if count <= MAX_ANNOTATED:
            for i in range(count):
                for j in range(count):
                    if math.isfinite(cos[i, j]):
                        ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if abs(cos[i, j]) > 0.6 else "black")
        ax.set_xlabel("checkpoint")
        ax.set_ylabel("checkpoint")
        if self.center is None:
            vectors = r"the parameters $\theta_i$"
        elif self.center == "external":
            vectors = r"$\theta_i - \theta_{centre}$ (external centre)"
        else:
            vectors = rf"$\theta_i - \theta_c$, c = {self.names[self.center]}"
        ax.set_title(f"Cosine of {vectors}, {count} checkpoints\nMDS {_format(self.mds)} off-diagonal "
                     f"({_format(self.mds_all)} with the diagonal), cone angle {_format(self.cone_angle)}°, "
                     f"path length {_format(self.path_length)}", fontsize=10)
        return _finish(fig, path)


def trajectory_map(
    checkpoints: Sequence[Checkpoint],
    *,
    center: int | Checkpoint | None = None,
    per_layer: bool = False,
    keys: Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    chunk_size: int = 1 << 22,
) -> TrajectoryMap:
    """Cosines, distances, MDS, cone angle and path length of a checkpoint series, reading each tensor once.

    Args:
        checkpoints: K ≥ 2 state_dicts (name -> tensor) or paths: ``.safetensors`` files are read by slices
            along dim 0 (one chunk of each checkpoint in memory); other files (``.pt``, ``.bin``) go through
            ``torch.load(mmap=True, weights_only=True)``. A file that cannot be read raises ValueError.
        center: None (raw parameters), an index into ``checkpoints`` (displacements from that checkpoint;
            0 = from initialisation; negative indices count from the end), or a state_dict / path (an extra
            row of the Gram, absent from the [K, K] outputs).
        per_layer: also a TrajectoryMap per key in ``.layers``.
        keys: the tensors to compare, in this order; one missing (or not floating-point) in some checkpoint is
            skipped with a warning. Default: the floating-point tensors of the first checkpoint, which every
            checkpoint must have (ValueError naming the key otherwise).
        exclude: regular expression(s); keys where one matches (``re.search``) are dropped, e.g. r"running_".
        progress: a tqdm bar over the bytes read (none without tqdm).
        device: where the Gram is computed (default cpu); chunks are copied there as float64.
        chunk_size: elements per checkpoint per chunk (whole rows along dim 0, at least one row).

    Non-floating tensors are skipped. Shapes must agree (ValueError naming the key and both shapes); dtypes
    may differ. A NaN or Inf in a checkpoint makes the outputs that involve it NaN. Precision: see the module
    docstring (float64 Gram in a step basis).

    Example::

        tmap = fgs.trajectory_map(["init.pt", "ep1.pt", "ep2.pt", "ep3.pt"], center=0, exclude=r"running_")
        print(tmap.mds, tmap.cone_angle, tmap.path_length)
    """
    if isinstance(checkpoints, (str, os.PathLike, Mapping)):
        raise TypeError("trajectory_map: checkpoints must be a sequence of state_dicts or paths, "
                        f"got a single {type(checkpoints).__name__}")
    items = list(checkpoints)
    count = len(items)
    if count < 2:
        raise ValueError(f"trajectory_map: needs at least 2 checkpoints, got {count}")
    if chunk_size < 1:
        raise ValueError(f"trajectory_map: chunk_size must be >= 1, got {chunk_size}")
    center_label = _center_label(center, count)
    device = torch.device("cpu" if device is None else device)
    names = checkpoint_labels(items)
    with ExitStack() as stack:
        rows = [open_checkpoint(item, names[i], stack) for i, item in enumerate(items)]
        if center_label == "external":
            rows.append(open_checkpoint(center, "centre", stack))
        selected = select_keys(rows, keys, exclude)
        total_bytes = sum(row.nbytes(key) for row in rows for key in selected)
        bar = _progress_bar(total_bytes, progress)
        largest = max(_largest_chunk(rows[0].shapes[key], chunk_size) for key in selected)
        buffer = torch.empty(len(rows) * largest, dtype=torch.float64, device=device)
        try:
            layer_grams = {key: _layer_gram(rows, key, count, buffer, chunk_size, bar) for key in selected}
        finally:
            bar.close()
    numel = {key: math.prod(rows[0].shapes[key]) for key in selected}
    result = _derive(sum(layer_grams.values()), names, selected, sum(numel.values()), center_label)
    if per_layer:
        result.layers = {key: _derive(gram, names, [key], numel[key], center_label)
                         for key, gram in layer_grams.items()}
    return result


def _center_label(center, count: int) -> int | str | None:
    """None, the centre's index in 0..K-1, or "external"."""
    if center is None:
        return None
    if isinstance(center, bool) or not isinstance(center, (int, str, os.PathLike, Mapping)):
        raise TypeError(f"trajectory_map: center must be None, an index, a state_dict or a path, "
                        f"got {type(center).__name__}")
    if not isinstance(center, int):
        return "external"
    if not -count <= center < count:
        raise IndexError(f"trajectory_map: center {center} is out of range for {count} checkpoints")
    return center % count


def _row_ranges(shape: tuple[int, ...], chunk_size: int) -> tuple[int, int, int]:
    """(rows along dim 0, elements per row, rows per chunk) of a tensor read in chunks of whole rows."""
    length = shape[0] if shape else 1
    row_numel = math.prod(shape[1:])
    return length, row_numel, max(1, chunk_size // max(row_numel, 1))


def _largest_chunk(shape: tuple[int, ...], chunk_size: int) -> int:
    length, row_numel, step = _row_ranges(shape, chunk_size)
    return min(length, step) * row_numel


def _layer_gram(rows: list[Source], key: str, count: int, buffer: torch.Tensor, chunk_size: int,
                bar) -> torch.Tensor:
    """H [R, R] of one key: Σ over chunks of Y @ Y.T, Y = the chunk rows in the step basis (see the top).

    ``buffer``: float64 scratch of at least R times the largest chunk, on the device (reused, so the pages
    are touched once per call, not once per chunk)."""
    gram = torch.zeros(len(rows), len(rows), dtype=torch.float64, device=buffer.device)
    length, row_numel, step = _row_ranges(rows[0].shapes[key], chunk_size)
    for start in range(0, length if row_numel else 0, step):
        stop = min(start + step, length)
        chunk = buffer[:len(rows) * (stop - start) * row_numel].view(len(rows), -1)
        for r, row in enumerate(rows):
            piece = row.read(key, start, stop)
            chunk[r].copy_(piece)
            bar.update(piece.numel() * piece.element_size())
        if len(rows) > count:
            chunk[count] -= chunk[0]
        for t in range(count - 1, 0, -1):
            chunk[t] -= chunk[t - 1]
        gram += _row_gram(chunk)
    return ((gram + gram.T) / 2).cpu()


def _row_gram(rows: torch.Tensor) -> torch.Tensor:
    """rows @ rows.T, as a batched matmul over blocks of GRAM_BLOCK columns summed in float64: on CPU about
    twice as fast as one matmul with a long inner dimension, and summed more accurately."""
    count, width = rows.shape
    whole = width - width % GRAM_BLOCK
    gram = rows[:, whole:] @ rows[:, whole:].T
    if whole:
        blocks = rows[:, :whole].view(count, whole // GRAM_BLOCK, GRAM_BLOCK).transpose(0, 1)
        gram += torch.bmm(blocks, blocks.transpose(1, 2)).sum(0)
    return gram


def _derive(steps_gram: torch.Tensor, names: list[str], keys: list[str], numel: int,
            center: int | str | None) -> TrajectoryMap:
    """Every output from the step-basis Gram H (integer quadratic forms; no ‖θ‖² where it is not needed)."""
    count = len(names)
    size = steps_gram.shape[0]
    coefficients = torch.zeros(size, size, dtype=torch.float64)  # θ_r = coefficients[r] · Y
    coefficients[:count, :count] = torch.ones(count, count, dtype=torch.float64).tril()
    if size > count:
        coefficients[count, [0, count]] = 1.0
    raw = coefficients[:count]
    gram = raw @ steps_gram @ raw.T
    if center is None:
        centred = gram
    else:
        shifted = raw - coefficients[count if center == "external" else center]
        centred = shifted @ steps_gram @ shifted.T
    dist2 = torch.zeros(count, count, dtype=torch.float64)
    step_block = steps_gram[1:count, 1:count]
    for j in range(count - 1):  # ‖θ_i - θ_j‖² = Σ of H over the steps j+1..i, summed directly
        dist2[j + 1:, j] = step_block[j:, j:].cumsum(0).cumsum(1).diagonal()
    dist = (dist2 + dist2.T).clamp(min=0).sqrt()
    norms = centred.diagonal().clamp(min=0).sqrt()
    cos = cosine(centred, norms[:, None], norms[None, :]).clamp(-1.0, 1.0)
    zero = norms == 0
    cos.diagonal()[~zero] = 1.0
    finite = cos.isfinite() & ~zero[:, None] & ~zero[None, :]  # a zero vector has no direction
    off_diagonal = finite & ~torch.eye(count, dtype=torch.bool)
    final = count - 1
    others = [i for i in range(count) if i != center and finite[i, final]]
    angles = torch.rad2deg(torch.arccos(cos[others, final]))
    return TrajectoryMap(
        names=list(names), keys=list(keys), numel=int(numel), center=center, gram=gram, cos=cos, norms=norms,
        dist=dist, mds=_mean(cos[off_diagonal]), mds_all=_mean(cos[finite]),
        cone_angle=float(angles.max()) if others else math.nan,
        path_length=float(dist.diagonal(1).sum()),
    )


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _plain(value):
    """Python values for JSON: tensors to lists, NaN and ±Inf to None."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _format(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "NaN"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="trajectory_map")
    return _NoBar()
