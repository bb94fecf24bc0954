"""fgs.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ on identical copies of the same gradients."""

import math

import pytest
import torch
from conftest import DEVICE, NATIVE

import fastgradstats as fgs

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,)]
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
}


@pytest.fixture(params=["torch", NATIVE, "triton"])
def backend(request, monkeypatch):
    """Run the fused norm on each backend (clip_grad_norm_ takes the backend from the environment)."""
    if request.param == "triton":
        pytest.importorskip("fastgradstats.kernels")
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", request.param)
    return request.param


def make_params(dtype=torch.float32, scale=0.5, seed=0, shapes=SHAPES):
    """Parameters with gradients of several shapes, plus one parameter without a gradient (third)."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(DEVICE, dtype))
        p.grad = (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)
        params.append(p)
    params.insert(2, torch.nn.Parameter(torch.ones(4, device=DEVICE, dtype=dtype)))
    return params


def copy_params(params):
    copies = []
    for p in params:
        copy = torch.nn.Parameter(p.detach().clone())
        copy.grad = None if p.grad is None else p.grad.clone()
        copies.append(copy)
    return copies


def clip_both(params, *args, **kwargs):
    """(fgs result, torch result, fgs-clipped params, torch-clipped params) for copies of ``params``."""
    ours, theirs = copy_params(params), copy_params(params)
    ours_norm = fgs.clip_grad_norm_(ours, *args, **kwargs)
    theirs_norm = torch.nn.utils.clip_grad_norm_(theirs, *args, **kwargs)
    return ours_norm, theirs_norm, ours, theirs


def assert_grads_close(ours, theirs, **tolerance):
    for a, b in zip(ours, theirs):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, equal_nan=True, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, "inf", 1.0, 3])
@pytest.mark.parametrize("max_norm", [1.0, 100.0])
def test_matches_torch(backend, dtype, norm_type, max_norm):
    params = make_params(dtype)
    ours_norm, theirs_norm, ours, theirs = clip_both(params, max_norm, norm_type)
    assert ours_norm.dtype == theirs_norm.dtype == dtype
    assert ours_norm.shape == theirs_norm.shape == ()
    assert ours_norm.device == theirs_norm.device
    torch.testing.assert_close(ours_norm, theirs_norm, **TOLERANCE[dtype])
    assert_grads_close(ours, theirs, **TOLERANCE[dtype])


def test_gradients_are_actually_clipped(backend):
    params = make_params(scale=10.0)
    total_norm = fgs.clip_grad_norm_(params, 1.0)
    assert total_norm > 10
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    torch.testing.assert_close(after, torch.tensor(1.0, device=DEVICE), rtol=1e-5, atol=0)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_norm_of_the_order_asked_for(backend, norm_type):
    params = make_params()
    grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    expected = torch.linalg.vector_norm(grads.double(), norm_type).float()
    torch.testing.assert_close(fgs.clip_grad_norm_(params, 1.0, norm_type), expected)


def test_inf_norm_is_exact(backend):
    params = make_params(torch.bfloat16)
    ours_norm, theirs_norm, _, _ = clip_both(params, 1.0, math.inf)
    assert torch.equal(ours_norm, theirs_norm)


def test_mixed_dtypes_promote_like_torch(backend):
    params = make_params(torch.float32) + make_params(torch.bfloat16, seed=1)
    ours_norm, theirs_norm, ours, theirs = clip_both(params, 1.0)
    assert ours_norm.dtype == theirs_norm.dtype == torch.float32
    torch.testing.assert_close(ours_norm, theirs_norm, **TOLERANCE[torch.bfloat16])
    assert_grads_close(ours, theirs, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
def test_nonfinite_gradient_raises_like_torch(backend, bad, norm_type):
    params = make_params()
    params[0].grad[1, 2] = bad
    ours, theirs = copy_params(params), copy_params(params)
    with pytest.raises(RuntimeError) as ours_error:
        fgs.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as theirs_error:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, error_if_nonfinite=True)
    assert str(ours_error.value) == str(theirs_error.value)
    assert_grads_close(ours, params, rtol=0, atol=0)  # nothing was scaled


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nonfinite_gradient_without_error_scales_like_torch(backend, bad, norm_type):
    params = make_params()
    params[0].grad[1, 2] = bad
    ours_norm, theirs_norm, ours, theirs = clip_both(params, 1.0, norm_type, error_if_nonfinite=False)
    torch.testing.assert_close(ours_norm, theirs_norm, equal_nan=True)
    assert not ours_norm.isfinite()
    assert_grads_close(ours, theirs)


def test_finite_gradients_do_not_raise(backend):
    params = make_params()
    ours_norm, theirs_norm, _, _ = clip_both(params, 1.0, error_if_nonfinite=True)
    torch.testing.assert_close(ours_norm, theirs_norm, **TOLERANCE[torch.float32])


def test_parameters_without_grad_are_skipped_and_left_alone(backend):
    params = make_params()
    ours_norm, theirs_norm, ours, _ = clip_both(params, 1.0)
    torch.testing.assert_close(ours_norm, theirs_norm, **TOLERANCE[torch.float32])
    assert ours[2].grad is None


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_empty_gradients_count_as_zero_like_torch(backend, norm_type):
    params = make_params(shapes=[(0,), *SHAPES, (0, 3)])
    ours_norm, theirs_norm, ours, theirs = clip_both(params, 1.0, norm_type)
    torch.testing.assert_close(ours_norm, theirs_norm, **TOLERANCE[torch.float32])
    assert_grads_close(ours, theirs, **TOLERANCE[torch.float32])


def test_empty_gradients_with_inf_norm(backend):
    """torch's foreach path refuses the inf norm of an empty tensor; the fused norm just ignores it."""
    with_empty = make_params(shapes=[(0,), *SHAPES])
    ours = copy_params(with_empty)
    ours_norm = fgs.clip_grad_norm_(ours, 1.0, math.inf)
    theirs = copy_params([p for p in with_empty if p.numel()])
    assert torch.equal(ours_norm, torch.nn.utils.clip_grad_norm_(theirs, 1.0, math.inf))
    assert_grads_close([p for p in ours if p.numel()], theirs, rtol=0, atol=0)


def test_no_gradients_at_all_returns_zero_like_torch():
    params = [torch.nn.Parameter(torch.ones(3, device=DEVICE))]
    ours_norm, theirs_norm, _, _ = clip_both(params, 1.0)
    assert torch.equal(ours_norm, theirs_norm)
    assert ours_norm.device == theirs_norm.device


def test_no_gradients_with_return_stats_gives_empty_stats():
    total_norm, stats = fgs.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0, return_stats=True)
    assert total_norm.item() == 0.0
    assert len(stats) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_single_tensor_argument(backend, dtype):
    param = make_params(dtype)[0]
    ours, theirs = copy_params([param])[0], copy_params([param])[0]
    ours_norm = fgs.clip_grad_norm_(ours, 0.5)
    theirs_norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    torch.testing.assert_close(ours_norm, theirs_norm, **TOLERANCE[dtype])
    torch.testing.assert_close(ours.grad, theirs.grad, **TOLERANCE[dtype])


def test_generator_of_parameters(backend):
    params = make_params()
    ours, theirs = copy_params(params), copy_params(params)
    ours_norm = fgs.clip_grad_norm_((p for p in ours), 1.0)
    theirs_norm = torch.nn.utils.clip_grad_norm_((p for p in theirs), 1.0)
    torch.testing.assert_close(ours_norm, theirs_norm, **TOLERANCE[torch.float32])
    assert_grads_close(ours, theirs, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
def test_return_stats_gives_per_layer_norms_before_clipping(backend, dtype, norm_type):
    params = make_params(dtype, scale=10.0)
    before = [p.grad.clone() for p in params if p.grad is not None]
    total_norm, stats = fgs.clip_grad_norm_(params, 1.0, norm_type, return_stats=True)
    assert isinstance(stats, fgs.TensorStats)
    assert stats.names == [str(i) for i in range(len(before))]
    expected = torch.stack([torch.linalg.vector_norm(g.float()) for g in before])
    torch.testing.assert_close(stats.l2, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.total.l2, torch.linalg.vector_norm(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.numel, torch.tensor([g.numel() for g in before], device=DEVICE))
    assert total_norm.dtype == dtype
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params
                                                    if p.grad is not None]))
    assert clipped < stats.total.l2 / 5  # the gradients were scaled after the statistics were taken


def test_return_stats_total_is_the_returned_norm(backend):
    params = make_params()
    total_norm, stats = fgs.clip_grad_norm_(params, 1.0, return_stats=True)
    assert torch.equal(total_norm, stats.total.l2)


def test_foreach_false_matches_torch(backend):
    params = make_params()
    ours_norm, theirs_norm, ours, theirs = clip_both(params, 1.0, 2.0, False, False)
    torch.testing.assert_close(ours_norm, theirs_norm, **TOLERANCE[torch.float32])
    assert_grads_close(ours, theirs, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_float64_gradients_keep_a_float64_norm(backend, norm_type):
    params = make_params(torch.float64)
    ours, theirs, _, _ = clip_both(params, 1.0, norm_type)
    assert ours.dtype == theirs.dtype == torch.float64
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-13)


@pytest.mark.parametrize(("norm_type", "value"), [(2.0, 1e39), (math.inf, 2e200)])
def test_float64_norm_beyond_float32_clips_like_torch(backend, norm_type, value):
    params = make_params(torch.float64)
    params[0].grad.fill_(value)
    ours, theirs, ours_params, theirs_params = clip_both(params, 1.0, norm_type, error_if_nonfinite=True)
    assert math.isfinite(ours.item())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-13)
    assert_grads_close(ours_params, theirs_params, rtol=1e-12, atol=0)
    assert any(p.grad.abs().max() > 0 for p in ours_params if p.grad is not None)


def test_an_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator"):
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    with pytest.warns(UserWarning, match="empty generator"):
        total = fgs.clip_grad_norm_((p for p in []), 1.0)
    assert total.item() == 0.0
