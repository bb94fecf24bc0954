"""Gradient noise scale B_simple = tr(Σ)/|G|² from gradient accumulation (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training", appendix A.1).

With micro-batches of b examples accumulated into a step of B = k·b examples, the squared norm of a
mean gradient over n examples has expectation E|G_n|² = |G|² + tr(Σ)/n, where G is the true gradient and Σ
the covariance of the per-example gradients. Two batch sizes give two equations and the unbiased estimators

    |G|²_est  = (B·|G_B|² − b·|G_b|²) / (B − b)
    tr(Σ)_est = (|G_b|² − |G_B|²) / (1/b − 1/B)

with |G_B|² the squared norm of the accumulated (mean) gradient and |G_b|² the mean over the k micro-batches
of their own gradients' squared norms. Both are linear in the squared norms, so they are computed per layer
and summed for the global values.

Micro-batch i's own gradient is k·(A_i − A_{i−1}), A_i the accumulated ``.grad`` after its backward (each
micro-batch loss divided by k, as HF Trainer and Lightning do). ‖A_i − A_{i−1}‖² is ``pair_stats(A_i,
A_{i−1}).dist²``, read without forming the difference; A_{i−1} is one kept copy of the gradients.

Per-rank form (a ``DistributedDataParallel`` model): W ranks each backpropagate a local batch of b examples,
so B = W·b. |G_b|² is the mean over ranks of the squared norm of each rank's local gradient, read in a DDP
communication hook from the bucket before it is all-reduced (then DDP's default all-reduce runs unchanged);
|G_B|² is that of the all-reduced (averaged) ``.grad`` after backward. The same estimators with k = W; the
[L] local sums and |G_B|² are averaged over the ranks in one all-reduce of 2·L floats, so every rank gets the
same estimate. No gradient copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .api import tensor_stats
from .pairs import pair_stats


@dataclass
class NoiseScale:
    """The estimate after one ``GradientNoiseScale.step()``. All fields are float32 tensors on the gradients'
    device (0-d, or [L] for ``layer_*``, L = len(names)); reading them is the only host sync.

    Fields:
        b_simple: EMA(tr(Σ)) / EMA(|G|²), global (ratio of the two EMAs below; inf or negative while
            the |G|² EMA is not yet positive, NaN for 0/0).
        g2, trace: bias-corrected EMAs of the |G|² and tr(Σ) estimators, global.
        g2_step, trace_step: this step's unbiased estimates, before averaging (noisy; |G|² may be < 0).
        layer_b_simple, layer_g2, layer_trace: the same per layer (a layer that never had a grad has 0 and
            a NaN B_simple).
        names: the layer names (parameters that require grad).
        step: how many steps have been averaged, this one included.
    """

    b_simple: torch.Tensor
    g2: torch.Tensor
    trace: torch.Tensor
    g2_step: torch.Tensor
    trace_step: torch.Tensor
    layer_b_simple: torch.Tensor
    layer_g2: torch.Tensor
    layer_trace: torch.Tensor
    names: list[str]
    step: int

    def to_dict(self) -> dict:
        """Plain Python floats, copied to the host at once (one sync): ``{"b_simple", "g2", "trace",
        "g2_step", "trace_step", "layers": {name: {"b_simple", "g2", "trace"}}}``. Non-finite values stay
        ``nan`` / ``inf`` (JSON writes them as ``NaN`` / ``Infinity``)."""
        scalars = torch.stack([self.b_simple, self.g2, self.trace, self.g2_step, self.trace_step])
        values = torch.cat([scalars.float(), self.layer_b_simple.float(), self.layer_g2.float(),
                            self.layer_trace.float()]).tolist()
        b_simple, g2, trace, g2_step, trace_step = values[:5]
        count = len(self.names)
        layer_b_simple, layer_g2, layer_trace = (values[5 + i * count:5 + (i + 1) * count] for i in range(3))
        layers = {name: {"b_simple": layer_b_simple[i], "g2": layer_g2[i], "trace": layer_trace[i]}
                  for i, name in enumerate(self.names)}
        return {"b_simple": b_simple, "g2": g2, "trace": trace, "g2_step": g2_step, "trace_step": trace_step,
                "layers": layers}


class GradientNoiseScale:
    """The simple gradient noise scale B_simple = tr(Σ)/|G|² of a model trained with gradient accumulation,
    or of a ``DistributedDataParallel`` model from its ranks' local gradients (per-rank form).

    Args:
        model: the model (its parameters with ``requires_grad`` are the layers, named by
            ``named_parameters()``; frozen ones are left out). A ``DistributedDataParallel`` model selects the
            per-rank form: layers named as in ``ddp_model.module``, parameters DDP ignores left out.
        batch_size: b, the examples per micro-batch. A step of k micro-batches has B = k·b examples. Per-rank
            form: the examples each rank backpropagates per step (B = W·b over W ranks).
        ema: decay β of the exponential moving averages (default 0.95, about 40 steps of memory: the
            effective number of averaged steps is (1 + β)/(1 − β) = 39). Both estimators are averaged
            separately, bias-corrected as in Adam, and B_simple is the ratio of the two averages — not an
            average of per-step ratios: a single step's |G|² estimate is noisy, often near zero or
            negative when B is well below B_simple, so per-step ratios are heavy-tailed and biased
            (E[X/Y] ≠ E[X]/E[Y]), while the ratio of the averages converges to tr(Σ)/|G|².
        backend: passed to ``pair_stats`` / ``tensor_stats``.

    Convention: each micro-batch loss is divided by the number of micro-batches k, so the accumulated
    ``.grad`` is the mean gradient over B examples; gradients are zeroed (or set to None) before the first
    micro-batch of each step. Call ``micro_step()`` after each micro-batch's backward and ``step()`` after
    the last ``micro_step()`` (it uses the norms recorded there, so gradient clipping in between does not
    change the estimate). k may change from step to step; k = 1 (B = b) leaves the estimators undefined.

    Memory: one copy of the gradients (A_{i−1}, in their dtype) for the parameters that get one, kept
    between steps, plus a few [L] float32 accumulators. No host sync: the sums stay device tensors.

    Noise: a step's |G|² estimate has a spread of the order of tr(Σ)/B, so when B ≪ B_simple single steps
    are dominated by noise; the EMA averages about (1 + β)/(1 − β) steps. The README gives measured
    accuracies. A parameter whose grad is None in a micro-step contributes a zero gradient to it. Non-finite
    gradients make the EMAs non-finite from then on: skip ``step()`` on steps an AMP GradScaler skips.

    Per-rank form (``DistributedDataParallel``, W ≥ 2 ranks): construct it on every rank before the first
    backward it should measure; it registers a DDP communication hook that adds the squared norms of the
    bucket's local gradients (per layer, before DDP divides and all-reduces them) to [L] sums, then returns
    DDP's default ``allreduce_hook``, so the gradients are reduced as without it. DDP takes one communication
    hook: a model that already has one is refused, and registering another afterwards fails in DDP. Call
    ``step()`` on every rank after each backward that all-reduces (it makes one all-reduce of 2·L floats on
    DDP's process group; the hook's cost is one norm per bucket); ``micro_step()`` is not used and raises
    ``RuntimeError``. Each rank's loss is the mean over its local batch (DDP's averaged gradient is then the
    mean over B). Gradient accumulation: run the micro-batches before the last one under
    ``ddp_model.no_sync()`` (each loss divided by k), so the bucket holds the local accumulated gradient, and
    pass b = the examples per rank per step; a step whose gradients were all-reduced more than once
    (accumulation without ``no_sync``) raises in ``step()``. Memory: no gradient copy, a few [L] float32
    vectors.

    Not covered: FSDP2 with deferred gradient sync, where accumulated gradients are local until the last
    micro-batch, and a per-rank form for FSDP2 (its gradients are reduce-scattered, not DDP buckets).

    Example::

        gns = fgs.GradientNoiseScale(model, batch_size=8)
        for step in range(steps):
            optimizer.zero_grad()
            for x, y in micro_batches:                 # k micro-batches of 8 examples
                (loss_fn(model(x), y) / k).backward()
                gns.micro_step()
            estimate = gns.step()
            optimizer.step()
            estimate.b_simple                          # 0-d tensor on the device

        # per-rank form: W ranks, 8 examples each
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        gns = fgs.GradientNoiseScale(ddp_model, batch_size=8)
        for x, y in loader:                            # this rank's batch of 8
            optimizer.zero_grad()
            loss_fn(ddp_model(x), y).backward()
            estimate = gns.step()                      # the same on every rank
            optimizer.step()
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, ema: float = 0.95,
                 backend: str | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"GradientNoiseScale: model must be an nn.Module, got {type(model).__name__}")
        ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError("GradientNoiseScale: batch_size must be an int >= 1 (examples per "
                             f"micro-batch), got {batch_size!r}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"GradientNoiseScale: ema must be in [0, 1), got {ema!r}")
        if ddp is None:
            named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        else:
            ignored = getattr(ddp, "parameters_to_ignore", set())
            named = [(name, p) for name, p in ddp.module.named_parameters()
                     if p.requires_grad and name not in ignored]
        if not named:
            raise ValueError("GradientNoiseScale: the model has no parameter that requires grad")
        self.names = [name for name, _ in named]
        self.batch_size = batch_size
        self.ema = ema
        self.backend = backend
        self._params = [p for _, p in named]
        self._previous: list[torch.Tensor | None] = [None] * len(named)
        self._seen = [False] * len(named)
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._micro_steps = 0
        self._steps = 0
        self._diff_sq: torch.Tensor | None = None   # [L] Σ_i ‖A_i − A_{i−1}‖² over this step's micro-steps
        self._now_sq: torch.Tensor | None = None    # [L] ‖A_i‖² at the latest micro-step
        self._ema_g2: torch.Tensor | None = None    # [L] uncorrected EMAs
        self._ema_trace: torch.Tensor | None = None
        self._ddp = ddp
        if ddp is not None:
            self._attach(ddp)

    def _attach(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        """Per-rank form: register the communication hook that records the local gradients' squared norms."""
        self._group = ddp.process_group
        self._world = dist.get_world_size(self._group)
        if self._world < 2:
            raise ValueError("GradientNoiseScale: a DistributedDataParallel model over 1 rank has B == b, so "
                             "the estimators are undefined; the per-rank form needs at least 2 ranks")
        if getattr(ddp, "_comm_hooks", None):
            raise ValueError("GradientNoiseScale: this DistributedDataParallel model already has a "
                             "communication hook, and DDP takes only one; the per-rank form registers its "
                             "own (recording the local gradients' norms, then DDP's default all-reduce)")
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self._allreduce_hook = allreduce_hook
        self._position = {id(p): i for i, p in enumerate(self._params)}
        self._reductions = [0] * len(self._params)   # bucket all-reduces per layer since the last step()
        ddp.register_comm_hook(self._group, self._comm_hook)

    def _comm_hook(self, state, bucket):
        """DDP communication hook: the bucket holds this rank's local gradients; add their squared norms to
        the local sums, then DDP's default all-reduce (divide by W, sum)."""
        positions, grads = [], []
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            i = self._position.get(id(p))
            if i is not None:
                positions.append(i)
                grads.append(grad)
        if grads:
            if self._diff_sq is None:
                self._diff_sq = torch.zeros(len(self._params), dtype=torch.float32, device=grads[0].device)
                self._now_sq = torch.zeros_like(self._diff_sq)
            stats = tensor_stats(grads, [self.names[i] for i in positions], backend=self.backend)
            self._diff_sq.index_add_(0, self._index(positions), stats.l2.square())
            for i in positions:
                self._reductions[i] += 1
        # Queued after the norms above (same stream): allreduce_hook divides the buffer in place.
        return self._allreduce_hook(state, bucket)

    def micro_step(self) -> None:
        """Record the gradient of the micro-batch just backpropagated; call after each backward. Not used
        with a ``DistributedDataParallel`` model (raises ``RuntimeError``): there the communication hook
        records the local gradients."""
        if self._ddp is not None:
            raise RuntimeError(
                "GradientNoiseScale.micro_step: not used with a DistributedDataParallel model; the per-rank "
                "form records the local gradients in DDP's communication hook. Call only step() after the "
                "backward that all-reduces (with accumulation: the micro-batches before it under no_sync(), "
                "batch_size = examples per rank per step)")
        seen, new = [], []
        for i, p in enumerate(self._params):
            if p.grad is None:
                if self._seen[i]:
                    raise RuntimeError(
                        f"GradientNoiseScale.micro_step: the grad of '{self.names[i]}' was cleared between "
                        "micro-steps; zero the gradients only before the first micro-batch of a step")
                continue
            (seen if self._seen[i] else new).append(i)
        if not seen and not new:
            raise RuntimeError("GradientNoiseScale.micro_step: no parameter has a .grad; call it after "
                               "each micro-batch's backward()")
        if self._diff_sq is None:
            device = self._params[(seen + new)[0]].grad.device
            self._diff_sq = torch.zeros(len(self._params), dtype=torch.float32, device=device)
            self._now_sq = torch.zeros_like(self._diff_sq)
        if seen:
            pairs = pair_stats([self._params[i].grad for i in seen], [self._previous[i] for i in seen],
                               [self.names[i] for i in seen], backend=self.backend)
            index = self._index(seen)
            self._diff_sq.index_add_(0, index, pairs.dist.square())
            self._now_sq.index_copy_(0, index, pairs.a_l2.square())
        if new:
            stats = tensor_stats([self._params[i].grad for i in new], [self.names[i] for i in new],
                                 backend=self.backend)
            index = self._index(new)
            self._diff_sq.index_add_(0, index, stats.l2.square())
            self._now_sq.index_copy_(0, index, stats.l2.square())
        for i in seen + new:
            grad = self._params[i].grad.detach()
            if self._previous[i] is None or self._previous[i].shape != grad.shape:
                self._previous[i] = grad.clone()
            else:
                self._previous[i].copy_(grad)
            self._seen[i] = True
        self._micro_steps += 1

    def step(self) -> NoiseScale:
        """Close the step: this step's estimates, the EMAs updated and B_simple. Call after the last
        ``micro_step()`` of the step (before or after ``optimizer.step()``). With a
        ``DistributedDataParallel`` model: after the backward that all-reduced the gradients, on every rank
        (it makes one all-reduce of 2·L floats)."""
        if self._ddp is not None:
            return self._ddp_step()
        k = self._micro_steps
        if k == 0:
            raise RuntimeError("GradientNoiseScale.step: no micro_step() since the last step(); call "
                               "micro_step() after each micro-batch's backward, then step()")
        if k == 1:
            self._reset_step()
            raise ValueError(
                "GradientNoiseScale.step: only 1 micro-batch in this step, so B == b and the estimators "
                "(B|G_B|² − b|G_b|²)/(B − b) and (|G_b|² − |G_B|²)/(1/b − 1/B) are undefined; accumulate "
                "at least 2 micro-batches per step")
        small = k * self._diff_sq     # |G_b|²: mean over micro-batches of ‖k·(A_i − A_{i−1})‖²
        large = self._now_sq          # |G_B|²
        estimate = self._estimate(small, large, k)
        self._reset_step()
        return estimate

    def _estimate(self, small: torch.Tensor, large: torch.Tensor, k: int) -> NoiseScale:
        """This step's estimators from the [L] |G_b|² and |G_B|² (B = k·b), the EMAs updated."""
        layer_g2_step = (k * large - small) / (k - 1)
        layer_trace_step = (small - large) * (self.batch_size * k / (k - 1))
        if self._ema_g2 is None:
            self._ema_g2 = torch.zeros_like(layer_g2_step)
            self._ema_trace = torch.zeros_like(layer_trace_step)
        self._ema_g2.mul_(self.ema).add_(layer_g2_step, alpha=1 - self.ema)
        self._ema_trace.mul_(self.ema).add_(layer_trace_step, alpha=1 - self.ema)
        self._steps += 1
        correction = 1 - self.ema ** self._steps
        layer_g2 = self._ema_g2 / correction
        layer_trace = self._ema_trace / correction
        g2, trace = layer_g2.sum(), layer_trace.sum()
        return NoiseScale(
            b_simple=trace / g2, g2=g2, trace=trace,
            g2_step=layer_g2_step.sum(), trace_step=layer_trace_step.sum(),
            layer_b_simple=layer_trace / layer_g2, layer_g2=layer_g2, layer_trace=layer_trace,
            names=list(self.names), step=self._steps,
        )

    def _ddp_step(self) -> NoiseScale:
        """Per-rank form: |G_b|² the mean over ranks of the local gradients' squared norms (recorded by the
        hook), |G_B|² that of the all-reduced ``.grad``; both averaged over ranks in one all-reduce, so that
        every rank gets the same estimate."""
        if not any(self._reductions):
            raise RuntimeError("GradientNoiseScale.step: no gradient was all-reduced by DDP since the last "
                               "step(); call step() after the backward that synchronizes the gradients")
        twice = [self.names[i] for i, count in enumerate(self._reductions) if count > 1]
        if twice:
            self._reductions = [0] * len(self._params)
            self._diff_sq.zero_()
            raise RuntimeError(
                f"GradientNoiseScale.step: the gradients of {twice[:3]} were all-reduced more than once "
                "since the last step(), so the bucket held accumulated, partly reduced gradients; with "
                "gradient accumulation run the micro-batches before the last under ddp_model.no_sync() and "
                "pass batch_size = examples per rank per step")
        positions = [i for i, p in enumerate(self._params) if p.grad is not None]
        large = torch.zeros_like(self._diff_sq)
        if positions:
            stats = tensor_stats([self._params[i].grad for i in positions],
                                 [self.names[i] for i in positions], backend=self.backend)
            large.index_copy_(0, self._index(positions), stats.l2.square())
        sums = torch.cat([self._diff_sq, large])
        dist.all_reduce(sums, group=self._group)
        sums /= self._world
        count = len(self._params)
        small, large = sums[:count], sums[count:]
        estimate = self._estimate(small, large, self._world)
        self._reductions = [0] * len(self._params)
        self._diff_sq.zero_()
        return estimate

    def _reset_step(self) -> None:
        self._micro_steps = 0
        self._seen = [False] * len(self._params)
        self._diff_sq.zero_()
        self._now_sq.zero_()

    def _index(self, positions: list[int]) -> torch.Tensor:
        """Device index of these layer positions, cached so that steady-state steps copy nothing to it."""
        key = tuple(positions)
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(positions, dtype=torch.long, device=self._diff_sq.device)
        return self._index_cache[key]
