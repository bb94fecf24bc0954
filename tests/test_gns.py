"""GradientNoiseScale: the two-batch-size estimators of |G|² and tr(Σ) (McCandlish et al. 2018, A.1) against
analytic values and per-example gradients."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

import fastgradstats as fgs


def _accumulate(model, gns, micro_batches, loss_fn):
    """One step of gradient accumulation with the usual convention: each micro-batch loss divided by k."""
    model.zero_grad(set_to_none=True)
    for x, y in micro_batches:
        (loss_fn(model(x), y) / len(micro_batches)).backward()
        gns.micro_step()
    return gns.step()


def _squared_error(prediction, y):
    return 0.5 * (prediction.squeeze(-1) - y).pow(2).mean()


def test_linear_regression_matches_analytic_noise_scale():
    """Linear regression y = x·w* + ε, x ~ N(0, I_d), ε ~ N(0, σ²), per-example loss ½(x·w − y)², at a fixed
    w = w* + δ. The per-example gradient is g = x(x·δ − ε), so

        G = E[g] = E[xxᵀ]δ − E[xε] = δ                                  ⇒ |G|² = |δ|²
        E[ggᵀ] = E[xxᵀ(xᵀδ)²] + σ²I = |δ|²I + 2δδᵀ + σ²I   (Isserlis)
        tr(Σ) = tr E[ggᵀ] − |G|² = (d + 1)|δ|² + dσ²

    With d = 8, σ = 1, |δ| = 1: |G|² = 1, tr(Σ) = 17, B_simple = 17. Micro-batches b = 16, k = 4 (B = 64),
    300 steps: the EMA ratio within ±15% and the per-step estimates unbiased (their means within ±8%)."""
    d, sigma, b, k, steps = 8, 1.0, 16, 4, 300
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(d, 1, bias=False)
    w_star = torch.randn(d, generator=generator)
    delta = torch.randn(d, generator=generator)
    delta /= delta.norm()
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    gns = fgs.GradientNoiseScale(model, batch_size=b)
    g2_steps, trace_steps = [], []
    for _ in range(steps):
        batches = []
        for _ in range(k):
            x = torch.randn(b, d, generator=generator)
            batches.append((x, x @ w_star + sigma * torch.randn(b, generator=generator)))
        estimate = _accumulate(model, gns, batches, _squared_error)
        g2_steps.append(estimate.g2_step)
        trace_steps.append(estimate.trace_step)
    g2_true, trace_true = 1.0, (d + 1) + d * sigma**2
    assert estimate.b_simple.item() == pytest.approx(trace_true / g2_true, rel=0.15)
    assert estimate.g2.item() == pytest.approx(g2_true, rel=0.15)
    assert estimate.trace.item() == pytest.approx(trace_true, rel=0.15)
    assert torch.stack(g2_steps).mean().item() == pytest.approx(g2_true, rel=0.08)
    assert torch.stack(trace_steps).mean().item() == pytest.approx(trace_true, rel=0.08)


class _Block(torch.nn.Module):
    """A transformer-like MLP block on [batch, tokens, width]: pre-LayerNorm residual MLP, pooled head."""

    def __init__(self, width=8, hidden=16, classes=4):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        x = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return self.head(x.mean(dim=-2))


def _per_example_grads(model, x, y):
    """{name: [n, *shape]} gradients of each example's own cross-entropy loss."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _transformer_run(steps, b=16, k=4, tokens=4, seed=0):
    """Our estimates and, for the same batches of a fixed _Block, the per-example gradients
    {name: [steps, k·b, numel]} (one vmap over all steps: the parameters do not change). Labels are sampled
    from a sharp random teacher, so that B = k·b is above B_simple and 120 steps average it well."""
    torch.manual_seed(seed)
    model, teacher = _Block(), _Block()
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(steps, k * b, tokens, model.up.in_features, generator=generator)
    with torch.no_grad():
        y = torch.distributions.Categorical(logits=8 * teacher(x.flatten(0, 1))).sample().view(steps, k * b)
    gns = fgs.GradientNoiseScale(model, batch_size=b)
    ours = [_accumulate(model, gns, list(zip(x[step].split(b), y[step].split(b))),
                        torch.nn.functional.cross_entropy) for step in range(steps)]
    per_example = _per_example_grads(model, x.flatten(0, 1), y.flatten())
    return gns, ours, {name: g.view(steps, k * b, -1) for name, g in per_example.items()}


def test_step_estimates_equal_the_per_example_formulas_per_layer():
    """|G_b|² (mean over micro-batches of their mean gradient's squared norm) and |G_B|² rebuilt from
    per-example gradients give exactly this step's |G|² and tr(Σ) estimates, per layer."""
    b, k = 16, 4
    gns, ours, reference = _transformer_run(steps=3, b=b, k=k)
    for step, estimate in enumerate(ours):
        g2_step, trace_step = [], []
        for name in gns.names:
            grads = reference[name][step]
            small = grads.view(k, b, -1).mean(1).square().sum(1).mean()
            large = grads.mean(0).square().sum()
            g2_step.append((k * large - small) / (k - 1))
            trace_step.append((small - large) / (1 / b - 1 / (k * b)))
        torch.testing.assert_close(estimate.g2_step, torch.stack(g2_step).sum(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(estimate.trace_step, torch.stack(trace_step).sum(), rtol=1e-4, atol=1e-6)
    first = ours[0]
    assert first.layer_g2.shape == (len(gns.names),) and first.step == 1


def test_transformer_noise_scale_within_25_percent_of_per_example_reference():
    """The reference for the same batches: per step, tr(Σ) as the unbiased sample covariance trace of the B
    per-example gradients and |G|² = |mean|² − tr(Σ)/B (exact for the batch, no micro-batch grouping);
    B_simple as the ratio of their means over all steps. Ours: the EMA ratio after the last step, globally and
    for the largest layer."""
    b, k, steps = 16, 4, 120
    gns, ours, reference = _transformer_run(steps=steps, b=b, k=k)
    large_batch = b * k
    trace_ref, g2_ref = {}, {}
    for name, g in reference.items():                      # g: [steps, B, numel]
        trace = (g - g.mean(1, keepdim=True)).square().sum((1, 2)) / (large_batch - 1)
        trace_ref[name] = trace.mean().item()
        g2_ref[name] = (g.mean(1).square().sum(1) - trace / large_batch).mean().item()
    b_simple_ref = sum(trace_ref.values()) / sum(g2_ref.values())
    assert ours[-1].b_simple.item() == pytest.approx(b_simple_ref, rel=0.25)
    up = gns.names.index("up.weight")
    up_ref = trace_ref["up.weight"] / g2_ref["up.weight"]
    assert ours[-1].layer_b_simple[up].item() == pytest.approx(up_ref, rel=0.25)


def test_step_before_any_micro_step_raises():
    gns = fgs.GradientNoiseScale(torch.nn.Linear(3, 1), batch_size=4)
    with pytest.raises(RuntimeError, match="no micro_step"):
        gns.step()


def test_single_micro_batch_step_is_undefined_and_resets():
    model = torch.nn.Linear(3, 1)
    gns = fgs.GradientNoiseScale(model, batch_size=4)
    model(torch.randn(4, 3)).sum().backward()
    gns.micro_step()
    with pytest.raises(ValueError, match="B == b"):
        gns.step()
    with pytest.raises(RuntimeError, match="no micro_step"):
        gns.step()


def test_micro_step_without_gradients_raises():
    gns = fgs.GradientNoiseScale(torch.nn.Linear(3, 1), batch_size=4)
    with pytest.raises(RuntimeError, match=r"no parameter has a \.grad"):
        gns.micro_step()


def test_grad_cleared_between_micro_steps_raises_naming_the_layer():
    model = torch.nn.Linear(3, 1)
    gns = fgs.GradientNoiseScale(model, batch_size=4)
    model(torch.randn(4, 3)).sum().backward()
    gns.micro_step()
    model.bias.grad = None
    with pytest.raises(RuntimeError, match="'bias' was cleared"):
        gns.micro_step()


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size"),
                                           ({"batch_size": 2.0}, "batch_size"),
                                           ({"batch_size": 4, "ema": 1.0}, "ema")])
def test_invalid_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fgs.GradientNoiseScale(torch.nn.Linear(3, 1), **kwargs)


def test_frozen_and_unused_parameters_are_skipped():
    """Frozen parameters are not layers; a parameter without a grad contributes a zero gradient (its layer
    is 0/0 = NaN) and the others are estimated as without it."""
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 1), "unused": torch.nn.Linear(3, 1),
                                 "frozen": torch.nn.Linear(3, 1)})
    model["frozen"].requires_grad_(False)
    x = torch.randn(4, 3)
    results = []
    for layers in (model, model["used"]):
        gns = fgs.GradientNoiseScale(layers, batch_size=2)
        model.zero_grad(set_to_none=True)
        for part in x.split(2):
            (model["used"](part).pow(2).mean() / 2).backward()
            gns.micro_step()
        results.append((gns.names, gns.step()))
    (names, with_unused), (_, used_only) = results
    assert names == ["used.weight", "used.bias", "unused.weight", "unused.bias"]
    assert torch.isnan(with_unused.layer_b_simple[2:]).all()
    torch.testing.assert_close(with_unused.b_simple, used_only.b_simple)


def test_to_dict_holds_the_same_values_as_plain_floats():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    gns = fgs.GradientNoiseScale(model, batch_size=4)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=generator), torch.randn(4, generator=generator))
               for _ in range(3)]
    estimate = _accumulate(model, gns, batches, _squared_error)
    data = estimate.to_dict()
    assert set(data) == {"b_simple", "g2", "trace", "g2_step", "trace_step", "layers"}
    for field in ("b_simple", "g2", "trace", "g2_step", "trace_step"):
        assert type(data[field]) is float
        assert data[field] == getattr(estimate, field).item()
    assert list(data["layers"]) == gns.names
    for i, name in enumerate(gns.names):
        assert data["layers"][name] == {"b_simple": estimate.layer_b_simple[i].item(),
                                        "g2": estimate.layer_g2[i].item(),
                                        "trace": estimate.layer_trace[i].item()}
