"""Optimizer-state statistics and the statistics of the last update, read from the optimizer's own state.

    stats = fgs.optimizer_stats(optimizer, model)   # after optimizer.step(), before zero_grad()
    stats["exp_avg"].l2                              # per-layer norms of Adam's first moment
    stats.update.l2, stats.update_ratio              # ‖Δθ‖ and ‖Δθ‖ / ‖θ_before‖ of the step just taken

The update Δθ = θ_after - θ_before is rebuilt from θ_after (the parameters now), the state and the
hyperparameters, chunk by chunk: per chunk of ``UPDATE_CHUNK_SIZE`` elements, θ_before is formed in a
reusable float32 buffer (float64 for float64 parameters), rounded to the parameter's dtype (θ_before was a
value of that dtype, so this recovers it exactly unless the recomputation lands within its own rounding error
of a rounding boundary: then Δθ is off by one unit in the last place of θ), and Δθ = θ_after - θ_before is
summed into raw rows by the chosen backend; chunk rows merge per layer by Chan's formula. Extra memory is a
few chunk buffers, never a copy of the parameters.

Update formulas (state and hyperparameters as left by the step; ``step`` is the state's step count t, m, v
the moments, u the Adam step):

* Adam / AdamW: u = -lr / (1 - β1^t) · m / (sqrt(v̂) / sqrt(1 - β2^t) + eps), with v̂ = max_exp_avg_sq under
  amsgrad, else exp_avg_sq; maximize only flips the gradient that went into m, so u is unchanged.
  Adam's L2 weight decay is inside m: θ_before = θ_after - u, no gradient needed. Decoupled decay (AdamW,
  or Adam(decoupled_weight_decay=True)): θ_after = θ_before·(1 - lr·wd) + u, so
  θ_before = (θ_after - u) / (1 - lr·wd).
* SGD with momentum, without nesterov: θ_before = θ_after + lr·buf (decay and dampening are inside buf).
* SGD with nesterov, or without momentum: θ_before = (θ_after + lr·(s·g + μ·buf)) / (1 - lr·wd), with
  s = -1 under maximize, buf = 0 without momentum. This needs the gradient g of the step still in ``.grad``
  (call before ``zero_grad()``); ValueError otherwise.

The for-loop, foreach and fused implementations apply the same formulas (in a different order of rounding),
so they share this reconstruction. Tensor-valued ``lr``, betas and ``step`` (capturable) are used as tensors
on the device, without a host sync. Assumed: the last step updated every parameter that has state (true when
every parameter gets a gradient every step) and was not skipped (e.g. by a GradScaler that found an Inf).
Other optimizers raise NotImplementedError from ``stats.update``; ``Monitor(track="update")`` measures any
optimizer by keeping a copy of the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import dispatch
from .api import SUPPORTED_DTYPES, tensor_stats
from .backends import torch_backend
from .dense import flat_elements
from .hist import HistSpec, linear_ranges
from .results import PairStats, TensorStats
from .rows import PAIR_K, RawStats, empty_rows, merge_rows

UPDATE_CHUNK_SIZE = torch_backend.DEFAULT_CHUNK_SIZE
SUPPORTED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)

Scalar = float | torch.Tensor


class OptimizerStats:
    """Statistics of an optimizer's state tensors, one TensorStats per state key, and of its last update.

    ``stats[key]``: TensorStats over the parameters whose state holds a tensor ``key`` of their shape
    (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ...); ``stats.keys()`` lists them.
    ``stats.update``: TensorStats of Δθ = θ_after - θ_before of the last step (see the module docstring).
    ``stats.update_pairs``: PairStats of (a = θ_after, b = θ_before) per layer (dist = ‖Δθ‖).
    ``stats.update_ratio``: float32 [L] ‖Δθ‖ / ‖θ_before‖; ``stats.update_ratio_total``: the same over all
    layers (0-d). All tensors stay on the parameters' device.
    """

    def __init__(self, states: dict[str, TensorStats], update: TensorStats | None = None,
                 update_pairs: PairStats | None = None, update_error: Exception | None = None) -> None:
        self.states = states
        self._update, self._update_pairs, self._update_error = update, update_pairs, update_error
        self.splits: dict[str, range] = {}  # no split layers (what sinks read of every recorded kind)

    def __getitem__(self, key: str) -> TensorStats:
        if key not in self.states:
            raise KeyError(f"optimizer_stats: no state tensor {key!r}; state keys: {list(self.states)}")
        return self.states[key]

    def __contains__(self, key: object) -> bool:
        return key in self.states

    def keys(self) -> list[str]:
        """The state keys that have statistics, in the order first met in the optimizer's state."""
        return list(self.states)

    @property
    def has_update(self) -> bool:
        """True when the last update could be rebuilt (supported optimizer, gradient present if needed)."""
        return self._update_error is None

    @property
    def update(self) -> TensorStats:
        """Per-layer statistics of the last step's Δθ; raises why it could not be rebuilt, if it could not."""
        if self._update_error is not None:
            raise self._update_error
        return self._update

    @property
    def update_pairs(self) -> PairStats:
        """Per-layer PairStats of θ_after (a) and θ_before (b): dist = ‖Δθ‖; a_l2, b_l2 the weight norms."""
        self.update  # noqa: B018 (raises the reason when there is no update)
        return self._update_pairs

    @property
    def update_ratio(self) -> torch.Tensor:
        """float32 [L] ‖Δθ‖ / ‖θ_before‖ per layer (inf or NaN where θ_before is zero)."""
        pairs = self.update_pairs
        return pairs.dist / pairs.b_l2

    @property
    def update_ratio_total(self) -> torch.Tensor:
        """float32 0-d ‖Δθ‖ / ‖θ_before‖ over all layers together."""
        total = self.update_pairs.total
        return total.dist / total.b_l2

    def __repr__(self) -> str:
        update = f", update of {len(self._update)} layers" if self._update is not None else ""
        return f"OptimizerStats(keys={self.keys()}{update})"

    def to_dict(self) -> dict:
        """Plain Python values (syncs), shaped as the other statistics' ``to_dict`` so sinks can read it:
        ``{"layers": {"key/layer": fields}, "total": None, "totals": {key: fields}}``, with the keys of the
        state and "update" (its layers and total also carry "ratio")."""
        layers: dict[str, dict] = {}
        totals: dict[str, dict] = {}
        kinds = dict(self.states)
        if self._update is not None:
            kinds["update"] = self._update
        for kind, stats in kinds.items():
            data = stats.to_dict()
            layers.update({f"{kind}/{name}": values for name, values in data["layers"].items()})
            totals[kind] = data["total"]
        if self._update is not None:
            pairs = self._update_pairs.cpu()  # the host copy (shared with a Monitor record's snapshot)
            for name, ratio in zip(self._update.names, (pairs.dist / pairs.b_l2).tolist()):
                layers[f"update/{name}"]["ratio"] = ratio
            totals["update"]["ratio"] = (pairs.total.dist / pairs.total.b_l2).tolist()
        return {"layers": layers, "total": None, "totals": totals}


def optimizer_stats(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module | None = None,
    *,
    hist: str | None = None,
    backend: str | None = None,
) -> OptimizerStats:
    """Statistics of every state tensor of ``optimizer`` and of the update its last step applied.

    Args:
        optimizer: any ``torch.optim.Optimizer``; the update is rebuilt for Adam, AdamW and SGD.
        model: names the layers by ``model.named_parameters()``; without it a parameter is
            ``"group{g}.{i}"`` (its param group and index there).
        hist: None, "log2" or "linear" (64 bins over each layer's range), as in ``tensor_stats``.
        backend: statistics backend, as in ``tensor_stats``.

    Returns:
        OptimizerStats: ``stats[key]`` TensorStats per state key, ``stats.update``, ``stats.update_ratio``.
        When the update cannot be rebuilt (another optimizer, or a missing gradient that the formula needs),
        reading ``stats.update`` raises NotImplementedError or ValueError saying why; ``stats.has_update``
        tells beforehand.

    Call it after ``optimizer.step()`` (and, for SGD without momentum or with nesterov, before
    ``zero_grad()``). Example::

        optimizer.step()
        stats = fgs.optimizer_stats(optimizer, model, hist="log2")
        stats["exp_avg_sq"].max, stats.update.l2, stats.update_ratio_total
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer_stats: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    spec = HistSpec.make(hist)
    named = _named_optimizer_parameters(optimizer, model)
    by_key: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p, _ in named:
        for key, value in optimizer.state.get(p, {}).items():
            if (key != "step" and isinstance(value, torch.Tensor) and value.shape == p.shape
                    and value.dtype in SUPPORTED_DTYPES):
                by_key.setdefault(key, []).append((name, value.detach()))
    states = {key: tensor_stats([t for _, t in pairs], [name for name, _ in pairs], hist=hist,
                                backend=backend)
              for key, pairs in by_key.items()}
    try:
        plan = _update_plan(optimizer, named)
    except (NotImplementedError, ValueError) as error:
        return OptimizerStats(states, update_error=error)
    update, pairs = update_stats(plan, spec, backend)
    return OptimizerStats(states, update, pairs)


def _named_optimizer_parameters(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None
                                ) -> list[tuple[str, torch.Tensor, dict]]:
    """(name, parameter, param group) for every parameter of the optimizer, in group order."""
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimizer_stats: model must be an nn.Module or None, got {type(model).__name__}")
    names = {} if model is None else {p: name for name, p in model.named_parameters()}
    named = []
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if model is not None and p not in names:
                raise ValueError(f"optimizer_stats: parameter {i} of param group {g} "
                                 f"(shape {tuple(p.shape)}) is not a parameter of the model "
                                 f"({type(model).__name__})")
            named.append((names[p] if model is not None else f"group{g}.{i}", p, group))
    return named


@dataclass
class _LayerUpdate:
    """How to rebuild θ_before of one parameter: its name, the parameter, and the rule."""

    name: str
    param: torch.Tensor
    rule: _StepRule


def _update_plan(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor, dict]]
                 ) -> list[_LayerUpdate]:
    """The rule of every parameter the last step updated, or NotImplementedError / ValueError saying why the
    update cannot be rebuilt."""
    kind = type(optimizer)
    if kind not in SUPPORTED_OPTIMIZERS:
        raise NotImplementedError(
            f"optimizer_stats: the update of {kind.__name__} cannot be rebuilt from its state (supported: "
            f"{', '.join(k.__name__ for k in SUPPORTED_OPTIMIZERS)}); Monitor(track='update') measures it "
            "by keeping a copy of the parameters")
    plan = []
    for name, p, group in named:
        state = optimizer.state.get(p, {})
        if p.dtype not in SUPPORTED_DTYPES:
            raise NotImplementedError(f"optimizer_stats: layer '{name}' has dtype {p.dtype}; the update is "
                                      "rebuilt for float32, bfloat16, float16 and float64 parameters")
        _check_not_dtensor(name, p)
        if kind is torch.optim.SGD:
            rule = _sgd_rule(name, p, group, state)
        elif "exp_avg" in state:
            rule = _AdamRule(name, p, group, state, kind is torch.optim.AdamW)
        else:
            rule = None  # never stepped (no gradient yet): not updated
        if rule is not None:
            plan.append(_LayerUpdate(name, p, rule))
    return plan


def _check_not_dtensor(name: str, p: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return
    if isinstance(p, DTensor):
        raise NotImplementedError(f"optimizer_stats: layer '{name}' is a DTensor; the update of sharded "
                                  "parameters is not rebuilt yet (use Monitor(track='update'))")


def _scalar(value: Scalar) -> Scalar:
    """A hyperparameter as a Python float, or as a tensor when it lives on an accelerator (no sync)."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.device.type == "cpu" else value.detach().reshape(())
    return float(value)


def _decay_factor(lr: Scalar, weight_decay: float, name: str) -> Scalar:
    """1 - lr·wd, the factor weight decay multiplies θ_before by; ValueError when it is 0 (θ_before lost)."""
    factor = 1 - lr * weight_decay
    if not isinstance(factor, torch.Tensor) and factor == 0:
        raise ValueError(f"optimizer_stats: layer '{name}' has lr * weight_decay == 1, which zeroes the "
                         "weights: θ_before cannot be rebuilt")
    return factor


Rounding = Callable[[torch.Tensor], torch.Tensor]


class _StepRule:
    """The last step of one parameter, chunk by chunk, in the working dtype.

    ``terms`` fills two buffers with what the step added that does not depend on θ_before (the Adam step u,
    or -lr·buf; for rules that need the gradient: s·g and buf); ``inverse`` rebuilds θ_before from θ_after;
    ``forward`` replays the step on a candidate θ_before, rounding to the parameter's dtype where torch's
    step does (``rnd``), which lets a low-precision θ_before be checked against θ_after.
    """

    def terms(self, start: int, stop: int, first: torch.Tensor, second: torch.Tensor, rnd: Rounding) -> None:
        raise NotImplementedError

    def inverse(self, after: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                out: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, before: torch.Tensor, first: torch.Tensor, second: torch.Tensor, out: torch.Tensor,
                rnd: Rounding) -> None:
        raise NotImplementedError


class _AdamRule(_StepRule):
    """Adam/AdamW: θ_after = rnd(rnd(θ_before·decay) + u) (decay = 1 - lr·wd when decoupled, else 1)."""

    def __init__(self, name: str, p: torch.Tensor, group: dict, state: dict, adamw: bool) -> None:
        lr, self.eps = _scalar(group["lr"]), float(group["eps"])
        beta1, beta2 = (_scalar(beta) for beta in group["betas"])
        step = _scalar(state["step"])
        self.bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        self.neg_step_size = -lr / (1 - beta1 ** step)
        weight_decay = float(group["weight_decay"])
        self.decoupled = bool(group.get("decoupled_weight_decay", adamw)) and weight_decay != 0
        self.decay = _decay_factor(lr, weight_decay, name) if self.decoupled else 1.0
        self.fused = bool(group.get("fused"))  # the fused kernels round only the final parameter
        self.exp_avg = _aligned(state["exp_avg"], p, name)
        self.second_moment = _aligned(state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"], p, name)

    def terms(self, start, stop, first, second, rnd):
        keep = (lambda t: t) if self.fused else rnd  # for-loop and foreach round every intermediate tensor
        denom = keep(keep(keep(first.copy_(self.second_moment[start:stop]).sqrt_())
                          .div_(self.bias_correction2_sqrt)).add_(self.eps))
        torch.div(second.copy_(self.exp_avg[start:stop]), denom, out=first).mul_(self.neg_step_size)

    def inverse(self, after, first, second, out):
        torch.sub(after, first, out=out)
        if self.decoupled:
            out.div_(self.decay)

    def forward(self, before, first, second, out, rnd):
        if self.decoupled:
            torch.mul(before, self.decay, out=out)
            if not self.fused:
                rnd(out)
            out.add_(first)
        else:
            torch.add(before, first, out=out)
        rnd(out)


class _MomentumRule(_StepRule):
    """SGD with momentum, without nesterov: θ_after = rnd(θ_before - lr·buf)."""

    def __init__(self, name: str, p: torch.Tensor, lr: Scalar, buffer: torch.Tensor) -> None:
        self.lr, self.buffer = lr, _aligned(buffer, p, name)

    def terms(self, start, stop, first, second, rnd):
        first.copy_(self.buffer[start:stop]).mul_(-self.lr)

    def inverse(self, after, first, second, out):
        torch.sub(after, first, out=out)

    def forward(self, before, first, second, out, rnd):
        rnd(torch.add(before, first, out=out))


class _GradientRule(_StepRule):
    """SGD without momentum or with nesterov: d = rnd(s·g + wd·θ_before), d = rnd(d + μ·buf) under nesterov,
    θ_after = rnd(θ_before - lr·d)."""

    def __init__(self, name: str, p: torch.Tensor, group: dict, buffer: torch.Tensor | None) -> None:
        self.lr, self.weight_decay = _scalar(group["lr"]), float(group["weight_decay"])
        self.momentum = float(group["momentum"])
        self.sign = -1.0 if group["maximize"] else 1.0
        self.decay = _decay_factor(self.lr, self.weight_decay, name)
        self.grad = _aligned(p.grad, p, name)
        self.buffer = None if buffer is None else _aligned(buffer, p, name)

    def terms(self, start, stop, first, second, rnd):
        first.copy_(self.grad[start:stop]).mul_(self.sign)
        if self.buffer is not None:
            second.copy_(self.buffer[start:stop])

    def inverse(self, after, first, second, out):
        torch.add(after, first, alpha=self.lr, out=out)
        if self.buffer is not None:
            out.add_(second, alpha=self.lr * self.momentum)
        if self.weight_decay != 0:
            out.div_(self.decay)

    def forward(self, before, first, second, out, rnd):
        direction = first.clone() if self.weight_decay == 0 else rnd(torch.add(first, before,
                                                                                alpha=self.weight_decay))
        if self.buffer is not None:
            rnd(direction.add_(second, alpha=self.momentum))
        rnd(torch.sub(before, direction.mul_(self.lr), out=out))


def _sgd_rule(name: str, p: torch.Tensor, group: dict, state: dict) -> _StepRule | None:
    buffer = state.get("momentum_buffer") if float(group["momentum"]) != 0 else None
    if float(group["momentum"]) != 0 and buffer is None:
        return None  # never stepped
    if buffer is not None and not group["nesterov"]:
        return _MomentumRule(name, p, _scalar(group["lr"]), buffer)
    if p.grad is None:
        if buffer is None:
            return None  # no gradient: plain SGD skipped this parameter
        raise ValueError(f"optimizer_stats: layer '{name}' has no .grad: SGD with nesterov needs the "
                         "gradient of the last step to rebuild its update (call before zero_grad())")
    if p.grad.is_sparse:
        raise NotImplementedError(f"optimizer_stats: layer '{name}' has a sparse gradient")
    return _GradientRule(name, p, group, buffer)


def _aligned(t: torch.Tensor, p: torch.Tensor, name: str) -> torch.Tensor:
    """t's elements as a 1-D tensor in p's storage order (t has p's shape)."""
    if t.stride() != p.stride() and t.numel() > 1:
        raise NotImplementedError(f"optimizer_stats: layer '{name}': its state or gradient has strides "
                                  f"{t.stride()}, the parameter {p.stride()}; reading them side by side "
                                  "would need a copy")
    return flat_elements(t.detach())


def _chunk_updates(plan: list[_LayerUpdate], chunk_size: int
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(layer, θ_after, θ_before, Δθ) per chunk of each parameter, in the working dtype, in reused buffers
    (valid until the next chunk).

    A low-precision θ_before is the rounding of the rebuilt value to the parameter's dtype, or the neighbour
    of that rounding for which the replayed step gives θ_after exactly (when the rebuilt value fell on the
    other side of a rounding boundary, e.g. where θ crossed a power of two).
    """
    largest = min(chunk_size, max((layer.param.numel() for layer in plan), default=0))
    buffers: dict[torch.dtype, list[torch.Tensor]] = {}

    def scratch(dtype: torch.dtype, device: torch.device, count: int) -> list[torch.Tensor]:
        if dtype not in buffers:
            buffers[dtype] = [torch.empty(largest, dtype=dtype, device=device) for _ in range(count)]
        return buffers[dtype]

    for index, layer in enumerate(plan):
        param = flat_elements(layer.param.detach())
        working = torch.float64 if param.dtype == torch.float64 else torch.float32
        low_precision = param.dtype != working
        for start in range(0, param.numel(), chunk_size):
            stop = min(start + chunk_size, param.numel())
            converted, before, delta, first, second, replay = (b[: stop - start]
                                                               for b in scratch(working, param.device, 6))
            piece = param[start:stop]
            after = converted.copy_(piece) if low_precision else piece
            low = neighbour = None
            if low_precision:
                low, neighbour = (b[: stop - start] for b in scratch(param.dtype, param.device, 2))
            rnd = _rounding_through(low)
            layer.rule.terms(start, stop, first, second, rnd)
            layer.rule.inverse(after, first, second, before)
            if low_precision:
                _snap_to_dtype(layer.rule, after, before, first, second, replay, low, neighbour, rnd)
            yield index, after, before, torch.sub(after, before, out=delta)


def _rounding_through(low: torch.Tensor | None) -> Rounding:
    """Rounds a working-dtype tensor in place to the dtype of the buffer ``low`` (no-op without one)."""
    if low is None:
        return lambda t: t
    return lambda t: t.copy_(low.copy_(t))


def _snap_to_dtype(rule: _StepRule, after: torch.Tensor, before: torch.Tensor, first: torch.Tensor,
                   second: torch.Tensor, replay: torch.Tensor, low: torch.Tensor, neighbour: torch.Tensor,
                   rnd: Rounding) -> None:
    """Round the rebuilt θ_before (working dtype) to the parameter's dtype, then move the elements whose
    replayed step misses θ_after to the neighbour (one ulp up or down) that hits it, if one does."""
    rnd(before)
    rule.forward(before, first, second, replay, rnd)
    missed = replay != after
    for direction in (float("inf"), float("-inf")):
        torch.nextafter(low.copy_(before), torch.full_like(low, direction), out=neighbour)
        candidate = replay.copy_(neighbour)
        hits = torch.empty_like(after)
        rule.forward(candidate, first, second, hits, rnd)
        fixed = missed & (hits == after)
        torch.where(fixed, candidate, before, out=before)
        missed &= ~fixed


def update_pair_stats(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None,
                      backend: str | None) -> PairStats:
    """PairStats of (a = θ_after, b = θ_before) of the last step, rebuilt from the state (dist = ‖Δθ‖):
    what ``Monitor(track="update")`` records without a copy. Raises as ``OptimizerStats.update`` would."""
    plan = _update_plan(optimizer, _named_optimizer_parameters(optimizer, model))
    return update_stats(plan, None, backend, pairs_only=True)[1]


def rebuilds_update(optimizer: torch.optim.Optimizer) -> bool:
    """True when the last update of ``optimizer`` can be rebuilt from its state (a supported optimizer)."""
    return type(optimizer) in SUPPORTED_OPTIMIZERS


def update_stats(plan: list[_LayerUpdate], spec: HistSpec | None, backend: str | None,
                 chunk_size: int = UPDATE_CHUNK_SIZE, pairs_only: bool = False
                 ) -> tuple[TensorStats | None, PairStats]:
    """TensorStats of Δθ (None when ``pairs_only``) and PairStats of (θ_after, θ_before) of the layers of
    ``plan``, chunk by chunk."""
    names = [layer.name for layer in plan]
    device = plan[0].param.device if plan else torch.device("cpu")
    one_pass = spec is None or spec.kind == "log2" or spec.range is not None
    chunk_rows: list[list[torch.Tensor]] = [[] for _ in plan]
    pair_rows = torch.zeros(len(plan), PAIR_K, dtype=torch.float64, device=device)
    hist = None if spec is None else torch.zeros(len(plan), spec.bins, dtype=torch.int64, device=device)
    for layer, after, before, delta in _chunk_updates(plan, chunk_size):
        pair_rows[layer] += dispatch.pair_raw_stats([after], [before], None, backend)[0]
        if pairs_only:
            continue
        raw = dispatch.raw_stats([delta], spec if one_pass else None, backend)
        chunk_rows[layer].append(raw.rows[0])
        if raw.hist is not None:
            hist[layer] += raw.hist[0]
    pairs = PairStats.from_rows(pair_rows, names)
    if pairs_only:
        return None, pairs
    rows = empty_rows(len(plan), device)
    for layer, layer_rows in enumerate(chunk_rows):
        if layer_rows:
            rows[layer] = merge_rows(torch.stack(layer_rows))
    total_hist = None
    if not one_pass:  # a linear histogram over each layer's Δθ range: a second pass once the ranges are known
        ranges = linear_ranges(spec, rows)
        total_hist = torch.zeros(spec.bins, dtype=torch.int64, device=device)
        for layer, _, _, delta in _chunk_updates(plan, chunk_size):
            hist[layer] += torch_backend._linear_counts(delta, spec, ranges[layer])
            total_hist += torch_backend._linear_counts(delta, spec, ranges[-1])
    return TensorStats.from_raw(RawStats(rows, hist, total_hist), names, spec), pairs
