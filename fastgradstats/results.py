"""TensorStats and PairStats: per-layer statistics as device tensors, derived from raw rows.

Rows from the Triton kernels are derived by one finalize kernel (every field of every layer and of the total
at once, so reading a field is a view); rows from the other backends lazily by :func:`~.rows.derive`.
"""

from __future__ import annotations

import functools
import math
import re

import torch

from .hist import HistSpec, linear_edges, linear_ranges, log2_edges
from .rows import RawStats, derive, derive_pair, l2_norm, linf_norm, merge_pair_rows, merge_rows


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

    def __init__(self, rows: torch.Tensor, names: list[str], total: LayerStats | None = None,
                 derived: dict[str, torch.Tensor] | None = None) -> None:
        self.rows = rows
        self.names = names
        self._total = total
        self.splits: dict[str, range] = {}  # split layer name -> its parts' row indices (see split=)
        if derived is not None:  # already derived (by the finalize kernel): no lazy derivation
            self.__dict__["_derived"] = derived

    @staticmethod
    def _derive(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @functools.cached_property
    def _derived(self) -> dict[str, torch.Tensor]:
        return self._derive(self.rows)

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
        """Plain Python values: ``{"layers": {name: {field: value}}, "total": {field: value}}``.

        This is the call that syncs with the device (copies of the raw rows to the host).
        """
        host = self._on_host()
        result = {"layers": {name: host._layer_dict(i) for i, name in enumerate(self.names)}, "total": None}
        if self._total is not None:
            result["total"] = self._total._on_host()._layer_dict(0)
        return result

    def _on_host(self) -> LayerStats:
        return type(self)(self.rows.cpu(), self.names, derived=self._host_derived())

    def _host_derived(self) -> dict[str, torch.Tensor]:
        """The derived fields copied to the host (the very values the device fields hold)."""
        return {name: value.cpu() for name, value in self._derived.items()}

    def _layer_dict(self, i: int) -> dict:
        index = () if self.rows.dim() == 1 else (i,)
        return {field: self._derived[field][index].item() for field in self.FIELDS}

    def table(self) -> str:
        """A readable per-layer table with a total line (syncs, like ``to_dict``)."""
        data = self.to_dict()
        lines = list(data["layers"].items())
        if data["total"] is not None:
            lines.append(("total", data["total"]))
        width = max([len("layer")] + [len(name) for name, _ in lines])
        header = f"{'layer':<{width}} " + " ".join(f"{f:>11}" for f in self.TABLE_FIELDS)
        body = [f"{name:<{width}} " + " ".join(_cell(v[f]) for f in self.TABLE_FIELDS) for name, v in lines]
        return "\n".join([header, *body])


class TensorStats(LayerStats):
    """Statistics of L layers. Every field is a tensor of shape [L] on the input device (0-d for ``total``).

    numel, zeros, nonfinite: int64 counts (nonfinite counts NaN and ±Inf).
    sum, mean, std (population), l1, l2, linf (max |x|), min, max: float32, accumulated in float32 within
    chunks and float64 across them. NaN in a layer makes these NaN; Inf makes l1/l2/linf inf.
    hist: int64 [L, B] or None; hist_edges: float32 [B + 1] (log2) or [L, B + 1] (linear).
    total: the same statistics over all layers together (global norm, global histogram).
    """

    numel = _Derived()
    sum = _Derived()
    mean = _Derived()
    std = _Derived()
    l1 = _Derived()
    l2 = _Derived()
    linf = _Derived()
    min = _Derived()
    max = _Derived()
    zeros = _Derived()
    nonfinite = _Derived()

    FIELDS = ("numel", "sum", "mean", "std", "l1", "l2", "linf", "min", "max", "zeros", "nonfinite")
    TABLE_FIELDS = ("numel", "l2", "mean", "std", "min", "max", "linf", "zeros", "nonfinite")
    _derive = staticmethod(derive)

    def __init__(
        self,
        rows: torch.Tensor,
        names: list[str],
        hist: torch.Tensor | None = None,
        hist_edges: torch.Tensor | None = None,
        total: TensorStats | None = None,
        derived: dict[str, torch.Tensor] | None = None,
        norms: torch.Tensor | None = None,
    ) -> None:
        super().__init__(rows, names, total, derived)
        self.hist = hist
        self.hist_edges = hist_edges
        self._norms = norms

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
            ranges = linear_ranges(spec, rows)
            hist, edges = raw.hist, linear_edges(ranges[:-1], spec.bins)
            total_hist = raw.hist.sum(0) if raw.total_hist is None else raw.total_hist
            total_edges = linear_edges(ranges[-1], spec.bins)
        total = cls(merge_rows(rows), ["total"], total_hist, total_edges)
        return cls(rows, names, hist, edges, total)

    @classmethod
    def _finalized(cls, raw: RawStats, names: list[str], spec: HistSpec | None) -> TensorStats:
        """from_raw for rows of the Triton kernels: one finalize launch derives everything."""
        from fastgradstats.kernels.finalize import finalize_tensor_stats

        out = finalize_tensor_stats(raw.rows, raw.hist, raw.total_hist, spec)
        edges = total_edges = out["edges"]
        if spec is not None and spec.kind == "linear":
            ranges = linear_ranges(spec, raw.rows)
            edges, total_edges = linear_edges(ranges[:-1], spec.bins), linear_edges(ranges[-1], spec.bins)
        total = cls(out["total_row"], ["total"], out["total_hist"], total_edges, derived=out["total"],
                    norms=out["total_norms"])
        return cls(raw.rows, names, raw.hist, edges, total, derived=out["layers"])

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
        total = TensorStats(merge_rows(self.rows[rows]), ["total"], total_hist, total_edges)
        derived = {field: value[rows] for field, value in self._derived.items()}
        return TensorStats(self.rows[rows], self.names[rows], hist, edges, total, derived=derived)

    def _on_host(self) -> TensorStats:
        return TensorStats(self.rows.cpu(), self.names, _cpu(self.hist), _cpu(self.hist_edges),
                           derived=self._host_derived())

    def _layer_dict(self, i: int) -> dict:
        """Histograms appear as "hist" (list of int) and "hist_edges" (list of float) when present."""
        values = super()._layer_dict(i)
        if self.hist is not None:
            index = () if self.rows.dim() == 1 else (i,)
            values["hist"] = self.hist[index].tolist()
            edges = self.hist_edges if self.hist_edges.dim() == 1 else self.hist_edges[i]
            values["hist_edges"] = edges.tolist()
        return values


class PairStats(LayerStats):
    """Statistics of L layer pairs (a, b), measured from an origin o when one is given: a' = a - o,
    b' = b - o.

    Fields, tensors of shape [L] on the input device (0-d for ``total``): numel (int64), dot (Σa'b'), a_l2,
    b_l2 (norms of a', b'), cos (dot / (max(a_l2, 1e-8) · max(b_l2, 1e-8)), as F.cosine_similarity), dist
    (‖a - b‖, from the differences themselves), all float32. ``total`` treats all layers as one flat vector.
    """

    numel = _Derived()
    dot = _Derived()
    a_l2 = _Derived()
    b_l2 = _Derived()
    cos = _Derived()
    dist = _Derived()

    FIELDS = ("numel", "dot", "a_l2", "b_l2", "cos", "dist")
    TABLE_FIELDS = FIELDS
    _derive = staticmethod(derive_pair)

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

    def _slice(self, rows: slice) -> PairStats:
        derived = {field: value[rows] for field, value in self._derived.items()}
        total = PairStats(merge_pair_rows(self.rows[rows]), ["total"])
        return PairStats(self.rows[rows], self.names[rows], total, derived=derived)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def _cell(value: float) -> str:
    if isinstance(value, int):
        return f"{value:>11d}"
    return f"{value:>11.4g}" if math.isfinite(value) else f"{value!s:>11}"
