"""TensorStats and PairStats: per-layer statistics as device tensors, derived from raw rows.

Rows from the Triton kernels are derived by one finalize kernel (every field of every layer and of the total
at once, so reading a field is a view); rows from the other backends lazily by :func:`~.rows.derive`.
Every derived number a consumer shows (monitor, sinks, plots, integrations) is a field here.

Reaching the host: :func:`host_snapshot` packs any set of device tensors into one byte buffer on the device
and copies it with one :func:`to_host` call; ``stats.cpu()`` (and so ``to_dict``, ``table`` and
``split_summary``) copies every tensor of a result that way once and keeps the host copy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Self

import torch

from .hist import HistSpec, linear_edges, linear_ranges, log2_edges
from .rows import (
    RawStats,
    derive,
    derive_hist_sums,
    derive_pair,
    l2_norm,
    linf_norm,
    merge_pair_rows,
    merge_rows,
)

SUMMARIZE_SPLITS = 16
"""By default, table() and the sinks summarise a split layer with more than this many parts."""


def to_host(packed: torch.Tensor) -> torch.Tensor:
    """The one device-to-host copy of a snapshot: ``packed`` (uint8 [bytes], on any device) on the CPU
    (itself when it is there already)."""
    return packed.cpu()


def host_snapshot(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Host copies of ``tensors`` (any shapes and dtypes, bool included) in one device-to-host copy per
    device they are on (one in practice): their bytes are packed into one uint8 buffer on the device (a
    ``torch.cat``, widest dtypes first so every piece stays aligned), copied by :func:`to_host`, and viewed
    back as tensors of the original shapes and dtypes (views of that host buffer, contiguous). No sync
    before the copy.

        grad_l2, alert_flag = host_snapshot([stats.l2, flags["dead"]])   # one copy, two host tensors
    """
    host: list[torch.Tensor | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        indices = sorted(indices, key=lambda i: -tensors[i].element_size())
        pieces = [_bytes(tensors[i]) for i in indices]
        packed = to_host(torch.cat(pieces))
        start = 0
        for i, piece in zip(indices, pieces):
            end = start + piece.numel()
            host[i] = packed[start:end].view(tensors[i].dtype).view(tensors[i].shape)
            start = end
    return host


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """uint8 [bytes] of ``t``'s elements in row-major order (a view when ``t`` is contiguous)."""
    flat = t.detach().reshape(-1).contiguous()
    if flat.numel() <= 1:  # a one-element view may keep any stride, which view(uint8) refuses
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8)


class _Derived:
    """A statistic read from the lazily derived fields (computed once, on the rows' device, without sync)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, stats: LayerStats | None, owner: type | None = None):
        return self if stats is None else stats._derived[self.name]


class LayerStats:
    """What TensorStats and PairStats share: raw rows [L, K] (or [K] for a total), names, a total, printing.

    Subclasses set FIELDS (derived statistics, in to_dict order), TABLE_FIELDS and ``_derive``.
    """

    FIELDS: tuple[str, ...] = ()
    TABLE_FIELDS: tuple[str, ...] = ()
    RANK_FIELD = ""  # the field split_summary ranks parts by

    def __init__(self, rows: torch.Tensor, names: list[str], total: LayerStats | None = None,
                 derived: dict[str, torch.Tensor] | None = None) -> None:
        self.rows = rows
        self.names = names
        self._total = total
        self.splits: dict[str, range] = {}  # split layer name -> its parts' row indices (see split=)
        self._host_twin: LayerStats | None = None  # cpu()'s result, once made
        self._derived_fields = derived  # None until first read, unless derived already (finalize kernel)

    def _derive(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def _derived(self) -> dict[str, torch.Tensor]:
        """The derived fields, computed on first read (a plain attribute, not ``functools.cached_property``,
        whose lock Dynamo cannot trace: results are read inside ``torch.compile`` too)."""
        if self._derived_fields is None:
            self._derived_fields = self._derive(self.rows)
        return self._derived_fields

    @property
    def total(self):
        """Statistics of all layers together (0-d fields)."""
        if self._total is None:
            raise AttributeError(f"this {type(self).__name__} is already a total")
        return self._total

    def __len__(self) -> int:
        return len(self.names)

    def group(self, pattern_or_name: str):
        r"""The [parts] rows of one layer split with ``split=``, as statistics of ``parts`` layers named
        ``name[i]``: views of these fields (nothing is recomputed), with a ``total`` over the parts (the whole
        tensor's statistics).

        ``pattern_or_name`` is a split layer's name, or a regular expression that ``re.search`` finds in
        exactly one split layer's name; anything else raises KeyError naming the split layers.

        Example::

            stats = fgs.grad_stats(model, split={r"experts\.w1": 64})
            stats.group(r"layers\.3\.experts\.w1").l2     # [64] per-expert gradient norms
        """
        if pattern_or_name in self.splits:
            name = pattern_or_name
        else:
            try:
                matches = [name for name in self.splits if re.search(pattern_or_name, name)]
            except re.error as error:
                raise ValueError(f"group: {pattern_or_name!r} is not a valid regular expression: "
                                 f"{error}") from None
            if len(matches) != 1:
                found = "no split layer" if not matches else f"{len(matches)} split layers"
                raise KeyError(f"group: {pattern_or_name!r} matches {found}; "
                               f"split layers: {list(self.splits)}")
            name = matches[0]
        parts = self.splits[name]
        return self._slice(slice(parts.start, parts.stop))

    def _slice(self, rows: slice) -> LayerStats:
        """Layers ``rows`` as statistics of their own (views of the fields, total merged from their rows)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} layers on {self.rows.device})"

    def to_dict(self) -> dict:
        """Plain Python values: ``{"layers": {name: {field: value}}, "total": {field: value}}`` (ints for
        the int64 counts, floats for the rest).

        This is the call that syncs with the device: it reads :meth:`cpu`, so every number of the result
        reaches the host in one copy, once; each call builds a new dict from that host copy.
        """
        host = self.cpu()
        layers = host._columns()
        result = {"layers": {name: {key: values[i] for key, values in layers.items()}
                             for i, name in enumerate(self.names)}, "total": None}
        if host._total is not None:
            result["total"] = {key: values[0] for key, values in host._total._columns().items()}
        return result

    def _columns(self) -> dict[str, list]:
        """What ``to_dict`` shows of each layer of this host result: key -> a value per layer."""
        return {field: self._derived[field].reshape(-1).tolist() for field in self.FIELDS}

    def cpu(self) -> Self:
        """These statistics with every tensor on the host: rows, derived fields (and histograms) of the
        layers and of the total, copied in one device-to-host copy (:func:`host_snapshot`) the first time
        and kept (later calls return the same object; a result on the CPU is copied once too). Nothing else
        syncs: reading the device fields never does."""
        if self._host_twin is None:
            values = self._snapshot_values()
            self._adopt_host(dict(zip(values, host_snapshot(list(values.values())))))
        return self._host_twin

    def _snapshot_values(self) -> dict[str, torch.Tensor]:
        """The device tensors :meth:`cpu` copies, by key: this object's own, then the total's ("total/...").

        Callers that copy several results at once (``StepRecord.to_dict``) pack these and hand the host
        copies to :meth:`_adopt_host`."""
        values = self._own_values()
        if self._total is not None:
            values.update({f"total/{key}": value for key, value in self._total._own_values().items()})
        return values

    def _own_values(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows, **self._derived}

    def _adopt_host(self, host: dict[str, torch.Tensor]) -> None:
        """Keep the host copies ``host`` of :meth:`_snapshot_values` as this result's :meth:`cpu` twin."""
        own = {key: value for key, value in host.items() if not key.startswith("total/")}
        total = None
        if self._total is not None:
            prefix = len("total/")
            total = self._total._host_copy({key[prefix:]: value for key, value in host.items()
                                            if key.startswith("total/")}, None)
            self._total._host_twin = total
        self._host_twin = self._host_copy(own, total)

    def _host_copy(self, values: dict[str, torch.Tensor], total: LayerStats | None) -> Self:
        """A result like this one built from host copies ``values`` of :meth:`_own_values` (its own twin)."""
        twin = self._from_values(values, total)
        twin.splits = self.splits
        twin._host_twin = twin
        return twin

    def _from_values(self, values: dict[str, torch.Tensor], total: LayerStats | None) -> Self:
        return type(self)(values.pop("rows"), self.names, total, derived=values)

    def _dead(self, derived: dict[str, torch.Tensor]) -> torch.Tensor:
        """bool [L]: the layers that count as dead in :meth:`split_summary`."""
        raise NotImplementedError

    def split_summary(self, k: int = 3, field: str | None = None,
                      layers: Iterable[str] | None = None) -> dict[str, dict]:
        r"""A short summary of each layer split with ``split=``, instead of one row per part (reads
        :meth:`cpu`: syncs once, or not at all after ``to_dict``).

        For each split layer (all of them, or those named in ``layers``), in order::

            {"parts": 64, "field": "l2", "cv": 0.41, "dead": 2, "nonfinite": 0,
             "smallest": [{"part": 6, "name": "experts.w1[6]", "value": 0.0}, ...],   # ascending
             "largest": [{"part": 3, "name": "experts.w1[3]", "value": 12.5}, ...]}   # descending

        ``field`` ranks the parts: ``l2`` for TensorStats, ``dist`` for PairStats (‖a − b‖) by default; any
        field of :attr:`FIELDS` may be given. ``smallest``/``largest`` hold the min(k, parts) parts with the
        smallest and largest values (ties by part index; the two lists overlap when parts < 2k). NaN ranks
        above +inf, so NaN parts come first in ``largest`` and are always reported. ``cv`` is the
        coefficient of variation of the parts' values, population std / |mean|: NaN when a part is NaN or
        ±Inf, or when the mean is 0. ``nonfinite`` counts the parts whose value is NaN or ±Inf. ``dead``
        counts the dead parts: for TensorStats, non-empty parts with only zeros (``zeros == numel``, as the
        Monitor's dead alert); for PairStats, non-empty parts where a − b is all zero (``dist == 0``: the
        part did not move).

        Raises ValueError for k < 1 or an unknown field, KeyError for a name in ``layers`` that is not a
        split layer.

        Example::

            stats = fgs.grad_stats(model, split={r"experts\.w\d": 64})
            stats.split_summary(k=2)["layers.0.experts.w1"]["largest"][0]["name"]   # the largest expert
        """
        field = self.RANK_FIELD if field is None else field
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"split_summary: k must be an int >= 1, got {k!r}")
        if field not in self.FIELDS:
            raise ValueError(f"split_summary: {type(self).__name__} has no field {field!r}; "
                             f"choose one of {self.FIELDS}")
        names = list(self.splits) if layers is None else list(layers)
        unknown = [name for name in names if name not in self.splits]
        if unknown:
            raise KeyError(f"split_summary: {unknown} are not split layers; "
                           f"split layers: {list(self.splits)}")
        if not names:
            return {}
        derived = self.cpu()._derived
        values = derived[field].to(torch.float64).tolist()
        dead = self._dead(derived).tolist()
        return {name: self._summary_of(self.splits[name], values, dead, field, k) for name in names}

    def _summary_of(self, rows: range, values: list[float], dead: list[bool], field: str, k: int) -> dict:
        part_values = [values[row] for row in rows]
        ranks = [_rank(value) for value in part_values]  # NaN above +inf
        order = sorted(range(len(rows)), key=lambda i: ranks[i])
        descending = sorted(range(len(rows)), key=lambda i: (-ranks[i][0], -ranks[i][1]))

        def entries(parts: list[int]) -> list[dict]:
            return [{"part": i, "name": self.names[rows[i]], "value": part_values[i]} for i in parts]

        return {"parts": len(rows), "field": field, "cv": _coefficient_of_variation(part_values),
                "dead": sum(dead[row] for row in rows),
                "nonfinite": sum(not math.isfinite(value) for value in part_values),
                "smallest": entries(order[:k]), "largest": entries(descending[:k])}

    def table(self, summarize_splits: bool | int = SUMMARIZE_SPLITS, k: int = 3) -> str:
        """A readable per-layer table with a total line (syncs, like ``to_dict``).

        ``summarize_splits``: which layers split with ``split=`` are shown as a summary block (a line with
        the :meth:`split_summary` of the layer, then the rows of its ``k`` smallest and ``k`` largest parts,
        in ascending order) instead of one row per part: True every split layer, False none, an int n those
        with more than n parts (default 16).
        """
        data = self.to_dict()
        summaries = self.split_summary(k, layers=splits_to_summarize(self.splits, summarize_splits, "table"))
        rows: list[tuple[str, dict] | str] = []
        skipped: set[int] = set()
        for name, parts in self.splits.items():
            if name in summaries:
                skipped.update(parts)
        summary_at = {self.splits[name].start: name for name in summaries}
        for i, (name, values) in enumerate(data["layers"].items()):
            if i in summary_at:
                rows.extend(_summary_rows(summary_at[i], summaries[summary_at[i]], data["layers"]))
            if i not in skipped:
                rows.append((name, values))
        if data["total"] is not None:
            rows.append(("total", data["total"]))
        width = max([len("layer")] + [len(row[0]) for row in rows if isinstance(row, tuple)])
        header = f"{'layer':<{width}} " + " ".join(f"{f:>11}" for f in self.TABLE_FIELDS)
        body = [row if isinstance(row, str) else
                f"{row[0]:<{width}} " + " ".join(_cell(row[1][f]) for f in self.TABLE_FIELDS) for row in rows]
        return "\n".join([header, *body])


class TensorStats(LayerStats):
    """Statistics of L layers. Every field is a tensor of shape [L] on the input device (0-d for ``total``).

    numel, zeros, nonfinite: int64 counts (nonfinite counts NaN and ±Inf).
    sum, mean, mean_abs (Σ|x| / numel), std (population), l1, l2, linf (max |x|), min, max: float32,
    accumulated in float32 within chunks and float64 across them. NaN in a layer makes these NaN; Inf makes
    l1/l2/linf/mean_abs inf; an empty layer has NaN mean, mean_abs, std, min and max.
    hist: int64 [L, B] or None; hist_edges: float32 [B + 1] (log2) or [L, B + 1] (linear); spec: the
    HistSpec that made them (``spec.kind`` "log2" or "linear"; None without a histogram).
    hist_sum, hist_sum_squares: float64 [L] (None without a histogram): Σ and Σ² of the values the histogram
    bins (Σ|x| for log2, whose bins are of |x|; Σx for linear), as TensorBoard's ``add_histogram_raw``
    wants them; NaN for a layer with NaN/Inf values (see :func:`~.rows.derive_hist_sums`).
    total: the same statistics over all layers together (global norm, global histogram).
    """

    numel = _Derived()
    sum = _Derived()
    mean = _Derived()
    mean_abs = _Derived()
    std = _Derived()
    l1 = _Derived()
    l2 = _Derived()
    linf = _Derived()
    min = _Derived()
    max = _Derived()
    zeros = _Derived()
    nonfinite = _Derived()

    FIELDS = ("numel", "sum", "mean", "std", "l1", "l2", "linf", "min", "max", "zeros", "nonfinite",
              "mean_abs")
    TABLE_FIELDS = ("numel", "l2", "mean", "std", "min", "max", "linf", "zeros", "nonfinite")
    RANK_FIELD = "l2"

    def __init__(
        self,
        rows: torch.Tensor,
        names: list[str],
        hist: torch.Tensor | None = None,
        hist_edges: torch.Tensor | None = None,
        total: TensorStats | None = None,
        derived: dict[str, torch.Tensor] | None = None,
        norms: torch.Tensor | None = None,
        spec: HistSpec | None = None,
    ) -> None:
        super().__init__(rows, names, total, derived)
        self.hist = hist
        self.hist_edges = hist_edges
        self.spec = None if hist is None else spec
        self._norms = norms

    def _derive(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        derived = derive(rows)
        if self.spec is not None:
            derived.update(derive_hist_sums(rows, self.spec.kind, self.spec.range))
        return derived

    @property
    def hist_sum(self) -> torch.Tensor | None:
        """float64 [L] Σ of the values the histogram bins (Σ|x| for log2, Σx for linear); None without one."""
        return self._derived.get("hist_sum")

    @property
    def hist_sum_squares(self) -> torch.Tensor | None:
        """float64 [L] Σx² of the values the histogram bins; None without a histogram."""
        return self._derived.get("hist_sum_squares")

    @classmethod
    def from_raw(cls, raw: RawStats, names: list[str], spec: HistSpec | None) -> TensorStats:
        """Per-layer and total statistics (with histogram edges) from a backend's raw result."""
        if raw.triton:
            return cls._finalized(raw, names, spec)
        rows = raw.rows
        hist = edges = total_hist = total_edges = None
        if spec is not None and spec.kind == "log2":
            hist, edges, total_hist = raw.hist, log2_edges(spec, rows.device), raw.hist.sum(0)
            total_edges = edges
        elif spec is not None:
            ranges = linear_ranges(spec, rows) if raw.ranges is None else raw.ranges
            hist, edges = raw.hist, linear_edges(ranges[:-1], spec.bins)
            total_hist = raw.hist.sum(0) if raw.total_hist is None else raw.total_hist
            total_edges = linear_edges(ranges[-1], spec.bins)
        total = cls(merge_rows(rows), ["total"], total_hist, total_edges, spec=spec)
        return cls(rows, names, hist, edges, total, spec=spec)

    @classmethod
    def _finalized(cls, raw: RawStats, names: list[str], spec: HistSpec | None) -> TensorStats:
        """from_raw for rows of the Triton kernels: one finalize launch derives everything."""
        from fastgradstats.kernels.finalize import finalize_tensor_stats

        out = finalize_tensor_stats(raw.rows, raw.hist, raw.total_hist, spec)
        edges = total_edges = out["edges"]
        if spec is not None and spec.kind == "linear":
            ranges = linear_ranges(spec, raw.rows) if raw.ranges is None else raw.ranges
            edges, total_edges = linear_edges(ranges[:-1], spec.bins), linear_edges(ranges[-1], spec.bins)
        total = cls(out["total_row"], ["total"], out["total_hist"], total_edges, derived=out["total"],
                    norms=out["total_norms"], spec=spec)
        return cls(raw.rows, names, raw.hist, edges, total, derived=out["layers"], spec=spec)

    @property
    def finalized(self) -> bool:
        """True when the finalize kernel derived these statistics (the Triton path)."""
        return self._norms is not None

    def total_norm(self, norm_type: float) -> torch.Tensor:
        """float64 0-d l2 (norm_type 2) or max-abs (inf) norm of all layers together, from the float64 rows
        (what clip_grad_norm_ needs; a view when the finalize kernel computed it)."""
        total = self.total
        if total._norms is not None:
            return total._norms[0 if norm_type == 2.0 else 1]
        return (l2_norm if norm_type == 2.0 else linf_norm)(total.rows)

    def __repr__(self) -> str:
        bins = "" if self.hist is None else f", bins={self.hist.shape[-1]}"
        return f"TensorStats({len(self)} layers on {self.rows.device}{bins})"

    def _slice(self, rows: slice) -> TensorStats:
        hist = edges = total_hist = total_edges = None
        if self.hist is not None:
            hist = self.hist[rows]
            if self.hist_edges.dim() == 1:  # log2: the same bins for every layer, so counts add
                edges = total_edges = self.hist_edges
                total_hist = hist.sum(0)
            else:
                edges = self.hist_edges[rows]
        total = TensorStats(merge_rows(self.rows[rows]), ["total"], total_hist, total_edges, spec=self.spec)
        derived = {field: value[rows] for field, value in self._derived.items()}
        return TensorStats(self.rows[rows], self.names[rows], hist, edges, total, derived=derived,
                           spec=self.spec)

    def _dead(self, derived: dict[str, torch.Tensor]) -> torch.Tensor:
        return (derived["numel"] > 0) & (derived["zeros"] == derived["numel"])

    def _own_values(self) -> dict[str, torch.Tensor]:
        values = super()._own_values()
        if self.hist is not None:
            values.update(hist=self.hist, hist_edges=self.hist_edges)
        return values

    def _from_values(self, values: dict[str, torch.Tensor], total: LayerStats | None) -> TensorStats:
        rows, hist, edges = values.pop("rows"), values.pop("hist", None), values.pop("hist_edges", None)
        return TensorStats(rows, self.names, hist, edges, total, derived=values, spec=self.spec)

    def _columns(self) -> dict[str, list]:
        """With a histogram, also "hist" (list of int), "hist_edges" (list of float), "hist_sum",
        "hist_sum_squares" (float) and "hist_kind" ("log2" or "linear")."""
        columns = super()._columns()
        if self.hist is not None:
            count = self.hist.shape[0] if self.hist.dim() == 2 else 1
            edges = self.hist_edges.tolist()
            columns.update(
                hist=self.hist.reshape(count, -1).tolist(),
                hist_edges=[list(edges) for _ in range(count)] if self.hist_edges.dim() == 1 else edges,
                hist_sum=self.hist_sum.reshape(-1).tolist(),
                hist_sum_squares=self.hist_sum_squares.reshape(-1).tolist(),
                hist_kind=[self.spec.kind] * count,
            )
        return columns


class PairStats(LayerStats):
    """Statistics of L layer pairs (a, b), measured from an origin o when one is given: a' = a - o,
    b' = b - o.

    Fields, tensors of shape [L] on the input device (0-d for ``total``): numel (int64), dot (Σa'b'), a_l2,
    b_l2 (norms of a', b'), cos (dot / (max(a_l2, 1e-8) · max(b_l2, 1e-8)), as F.cosine_similarity: 0 when
    a' or b' is a zero vector), dist (‖a - b‖, from the differences themselves), ratio (dist / b_l2 =
    ‖a - b‖ / ‖b'‖, relative to the reference b: the update-to-weight ratio ‖Δθ‖ / ‖θ_before‖ of Monitor's
    "update"; +inf when b' = 0 ≠ a - b, NaN when both are 0), all float32. ``total`` treats all layers as
    one flat vector.
    """

    numel = _Derived()
    dot = _Derived()
    a_l2 = _Derived()
    b_l2 = _Derived()
    cos = _Derived()
    dist = _Derived()
    ratio = _Derived()

    FIELDS = ("numel", "dot", "a_l2", "b_l2", "cos", "dist", "ratio")
    TABLE_FIELDS = FIELDS
    RANK_FIELD = "dist"

    def _derive(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return derive_pair(rows)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, names: list[str], triton: bool = False) -> PairStats:
        """Per-layer and total pair statistics from pair rows [L, PAIR_K] (``triton``: rows of the Triton
        kernels, derived by the finalize kernel in one launch)."""
        if triton:
            from fastgradstats.kernels.finalize import finalize_pair_stats

            out = finalize_pair_stats(rows)
            total = cls(out["total_row"], ["total"], derived=out["total"])
            return cls(rows, names, total, derived=out["layers"])
        return cls(rows, names, cls(merge_pair_rows(rows), ["total"]))

    def _dead(self, derived: dict[str, torch.Tensor]) -> torch.Tensor:
        return (derived["numel"] > 0) & (derived["dist"] == 0)

    def _slice(self, rows: slice) -> PairStats:
        derived = {field: value[rows] for field, value in self._derived.items()}
        total = PairStats(merge_pair_rows(self.rows[rows]), ["total"])
        return PairStats(self.rows[rows], self.names[rows], total, derived=derived)


def _cell(value: float) -> str:
    if isinstance(value, int):
        return f"{value:>11d}"
    return f"{value:>11.4g}" if math.isfinite(value) else f"{value!s:>11}"


def splits_to_summarize(splits: dict[str, range], summarize_splits: bool | int, caller: str) -> list[str]:
    """The split layers that ``summarize_splits`` (True: all, False: none, n: those with more than n parts)
    selects, in order. Raises TypeError/ValueError naming ``caller`` for anything else."""
    if isinstance(summarize_splits, bool):
        return list(splits) if summarize_splits else []
    if not isinstance(summarize_splits, int) or summarize_splits < 0:
        raise ValueError(f"{caller}: summarize_splits must be True, False or an int >= 0 (summarise split "
                         f"layers with more parts than that), got {summarize_splits!r}")
    return [name for name, parts in splits.items() if len(parts) > summarize_splits]


def _rank(value: float) -> tuple[int, float]:
    """Sort key of a part's value: NaN after every number, +inf included."""
    return (1, 0.0) if math.isnan(value) else (0, value)


def _coefficient_of_variation(values: list[float]) -> float:
    """Population std / |mean| of ``values`` (NaN for a NaN or ±Inf value, or a zero mean)."""
    if not values or not all(math.isfinite(value) for value in values):
        return math.nan
    mean = math.fsum(values) / len(values)
    if mean == 0:
        return math.nan
    variance = math.fsum((value - mean) ** 2 for value in values) / len(values)
    return math.sqrt(variance) / abs(mean)


def _summary_rows(name: str, summary: dict, layers: dict[str, dict]) -> list[tuple[str, dict] | str]:
    """A split layer's table block: a summary line, then its smallest and largest parts in ascending order
    ("..." where parts are left out)."""
    smallest = summary["smallest"]
    shown = {entry["part"] for entry in smallest}
    largest = [entry for entry in reversed(summary["largest"]) if entry["part"] not in shown]
    title = (f"{name}: {summary['parts']} parts by {summary['field']}, cv {_format(summary['cv'])}, "
             f"{summary['dead']} dead, {summary['nonfinite']} NaN/Inf; the {len(smallest)} smallest "
             f"and {len(summary['largest'])} largest:")
    rows: list[tuple[str, dict] | str] = [title]
    rows.extend((f"  {entry['name']}", layers[entry["name"]]) for entry in smallest)
    if len(smallest) + len(largest) < summary["parts"]:
        rows.append("  ...")
    rows.extend((f"  {entry['name']}", layers[entry["name"]]) for entry in largest)
    return rows


def _format(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)
