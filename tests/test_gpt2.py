"""A real model: the gradients of a tiny randomly initialised transformers GPT-2 after one backward pass."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, NATIVE

import fastgradstats as fgs

transformers = pytest.importorskip("transformers")

VOCAB = 64
BACKENDS = ["torch", NATIVE, pytest.param("triton", marks=pytest.mark.skipif(
    not fgs.dispatch.triton_available(), reason="needs triton"))]


@pytest.fixture(scope="module")
def model():
    """One layer, d=32; positions 8..15 are never used, so their embedding gradients are exact zeros."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    gpt2 = transformers.GPT2LMHeadModel(config).to(DEVICE)
    tokens = torch.randint(VOCAB, (4, 9), device=DEVICE)
    logits = gpt2(tokens[:, :-1]).logits
    F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
    return gpt2


def grads_of(model):
    return [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]


def test_every_parameter_has_a_gradient_and_tied_weights_appear_once(model):
    names = [name for name, _ in grads_of(model)]
    assert len(names) == len(list(model.parameters())) == len(set(names))
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names


@pytest.mark.parametrize("backend", BACKENDS)
def test_names_are_the_named_parameters_with_grads(model, backend):
    stats = fgs.grad_stats(model, backend=backend)
    assert stats.names == [name for name, _ in grads_of(model)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_layer_statistics_match_torch(model, backend):
    grads = [g for _, g in grads_of(model)]
    stats = fgs.grad_stats(model, backend=backend)
    torch.testing.assert_close(stats.l2, torch.stack([g.norm() for g in grads]), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats.l1, torch.stack([g.abs().sum() for g in grads]), rtol=1e-5, atol=1e-8)
    assert torch.equal(stats.linf, torch.stack([g.abs().max() for g in grads]))
    assert torch.equal(stats.max, torch.stack([g.max() for g in grads]))
    assert torch.equal(stats.min, torch.stack([g.min() for g in grads]))
    torch.testing.assert_close(stats.mean, torch.stack([g.mean() for g in grads]), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(stats.std, torch.stack([g.std(correction=0) for g in grads]),
                               rtol=1e-4, atol=1e-9)
    assert stats.numel.tolist() == [g.numel() for g in grads]
    assert stats.zeros.tolist() == [(g == 0).sum().item() for g in grads]
    assert stats.nonfinite.sum().item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_total_norm_matches_get_total_norm(model, backend):
    grads = [g for _, g in grads_of(model)]
    stats = fgs.grad_stats(model, backend=backend)
    torch.testing.assert_close(stats.total.l2, torch.nn.utils.get_total_norm(grads), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.total.linf, torch.nn.utils.get_total_norm(grads, float("inf")))
    assert stats.total.numel.item() == sum(g.numel() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log2_counts_cover_every_finite_nonzero_gradient(model, backend):
    stats = fgs.grad_stats(model, hist="log2", backend=backend)
    assert stats.zeros[stats.names.index("transformer.wpe.weight")].item() == 8 * 32  # unused positions
    torch.testing.assert_close(stats.hist.sum(1), stats.numel - stats.zeros - stats.nonfinite, rtol=0, atol=0)
    assert stats.total.hist.sum().item() == stats.total.numel.item() - stats.total.zeros.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log2_bins_match_frexp_exponents(model, backend):
    stats = fgs.grad_stats(model, hist="log2", min_exp=-30, max_exp=0, backend=backend)
    for row, (_, grad) in zip(stats.hist, grads_of(model)):
        nonzero = grad[grad != 0].float()
        # |x| = m * 2^e with m in [0.5, 1): floor(log2|x|) = e - 1
        exponents = torch.frexp(nonzero).exponent - 1
        expected = torch.bincount(exponents.clamp(-30, 0) + 30, minlength=31)
        assert torch.equal(row, expected)


def test_backends_agree(model):
    pytest.importorskip("fastgradstats.kernels")
    reference = fgs.grad_stats(model, hist="log2", backend="torch")
    fused = fgs.grad_stats(model, hist="log2", backend="triton")
    assert torch.equal(fused.hist, reference.hist)
    for field in ("numel", "zeros", "nonfinite", "min", "max", "linf"):
        assert torch.equal(getattr(fused, field), getattr(reference, field)), field
    for field in ("l1", "l2", "mean", "std"):
        torch.testing.assert_close(getattr(fused, field), getattr(reference, field), rtol=1e-4, atol=1e-9)


def test_param_stats_of_the_model(model):
    stats = fgs.param_stats(model)
    params = [p for _, p in model.named_parameters()]
    torch.testing.assert_close(stats.l2, torch.stack([p.detach().norm() for p in params]), rtol=1e-5, atol=0)


def test_frozen_parameters_are_skipped(model):
    grads = dict(fgs.grad_stats(model).to_dict()["layers"])
    wpe = model.transformer.wpe.weight
    saved, wpe.grad = wpe.grad, None
    try:
        without = fgs.grad_stats(model)
    finally:
        wpe.grad = saved
    assert "transformer.wpe.weight" not in without.names
    assert without.names == [name for name in grads if name != "transformer.wpe.weight"]


def test_clip_grad_norm_of_the_model_matches_torch(model):
    ours = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for a, b, p in zip(ours, theirs, model.parameters()):
        a.grad, b.grad = p.grad.clone(), p.grad.clone()
    total_norm, stats = fgs.clip_grad_norm_(ours, 0.1, return_stats=True)
    torch.testing.assert_close(total_norm, torch.nn.utils.clip_grad_norm_(theirs, 0.1), rtol=1e-5, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)
    assert len(stats) == len(ours)
