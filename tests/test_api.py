"""The public calls: argument errors that name the culprit, backend choice, layer naming, result layout."""

import pytest
import torch
from conftest import DEVICE, NATIVE

import fastgradstats as fgs
from fastgradstats.backends import native_backend
from fastgradstats.dispatch import resolve_backend

FIELDS = ("numel", "sum", "mean", "std", "l1", "l2", "linf", "min", "max", "zeros", "nonfinite")
COUNT_FIELDS = ("numel", "zeros", "nonfinite")


def layers(device=DEVICE):
    torch.manual_seed(0)
    return [torch.randn(3, 5, device=device), torch.randn(7, device=device), torch.zeros(0, device=device)]


class Net(torch.nn.Module):
    """Parameters registered in an order the forward pass does not follow, one frozen, one unused."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 2)
        self.unused = torch.nn.Linear(2, 2)
        self.body = torch.nn.Linear(3, 4)
        self.frozen = torch.nn.Parameter(torch.ones(4))
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(self.body(x) * self.frozen)


def trained_net():
    torch.manual_seed(0)
    net = Net().to(DEVICE)
    net(torch.randn(5, 3, device=DEVICE)).square().sum().backward()
    return net


# --- bad tensors --------------------------------------------------------------------------------------------


def test_non_tensor_item_names_its_layer():
    with pytest.raises(TypeError, match="layer 'bias' is a float"):
        fgs.tensor_stats([torch.ones(2), 1.5], names=["weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_unsupported_dtype_names_its_layer_and_dtype(dtype):
    with pytest.raises(TypeError, match=rf"layer '1' has dtype {dtype}"):
        fgs.tensor_stats([torch.ones(2), torch.ones(2, dtype=dtype)])


def test_sparse_tensor_names_its_layer():
    with pytest.raises(TypeError, match="layer 'w' has layout torch.sparse_coo"):
        fgs.tensor_stats([torch.eye(3).to_sparse()], names=["w"])


@pytest.mark.parametrize("tensors", [torch.ones(3), "weights", 3.0, None])
def test_a_single_tensor_or_non_sequence_is_rejected(tensors):
    with pytest.raises(TypeError, match="tensors must be a sequence of tensors, got"):
        fgs.tensor_stats(tensors)


def test_tensors_on_different_devices_name_both_layers():
    with pytest.raises(ValueError, match="layer 'b' is on meta but layer 'a' is on cpu"):
        fgs.tensor_stats([torch.ones(2), torch.ones(2, device="meta")], names=["a", "b"])


# --- bad names ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["a"], ["a", "b", "c", "d"], []])
def test_names_of_the_wrong_length(names):
    with pytest.raises(ValueError, match=rf"{len(names)} names for 3 tensors"):
        fgs.tensor_stats(layers(), names=names)


def test_duplicated_name_is_named():
    with pytest.raises(ValueError, match="layer name 'w' appears more than once"):
        fgs.tensor_stats(layers(), names=["w", "b", "w"])


def test_non_string_name_is_named():
    with pytest.raises(TypeError, match="layer names must be str, got 7"):
        fgs.tensor_stats(layers(), names=["w", 7, "b"])


# --- bad histogram and backend arguments --------------------------------------------------------------------


@pytest.mark.parametrize("hist", ["log", "Linear", "histc", 2])
def test_unknown_hist_is_named(hist):
    with pytest.raises(ValueError, match=rf"hist must be None, 'log2' or 'linear', got {hist!r}"):
        fgs.tensor_stats(layers(), hist=hist)


@pytest.mark.parametrize("bins", [0, -3, 2.5, True])
def test_linear_bins_must_be_a_positive_int(bins):
    with pytest.raises(ValueError, match=rf"bins must be an int >= 1, got {bins!r}"):
        fgs.tensor_stats(layers(), hist="linear", bins=bins)


def test_min_exp_above_max_exp():
    with pytest.raises(ValueError, match=r"min_exp \(3\) must be <= max_exp \(2\)"):
        fgs.tensor_stats(layers(), hist="log2", min_exp=3, max_exp=2)


@pytest.mark.parametrize(("min_exp", "max_exp"), [(-127, 0), (0, 128)])
def test_log2_exponents_outside_float32_normal_range(min_exp, max_exp):
    with pytest.raises(ValueError, match=rf"min_exp={min_exp}, max_exp={max_exp}"):
        fgs.tensor_stats(layers(), hist="log2", min_exp=min_exp, max_exp=max_exp)


def test_non_int_exponents():
    with pytest.raises(TypeError, match="min_exp and max_exp must be ints"):
        fgs.tensor_stats(layers(), hist="log2", min_exp=-10.0)


@pytest.mark.parametrize("bad_range", [(1.0, 1.0), (2.0, -2.0), (0.0, float("inf")), (float("nan"), 1.0),
                                       (0.0, 1e-46), (1.0, 1.0 + 1e-9), (-1e39, 0.0), (0.0, 3.5e38)])
def test_linear_range_must_be_finite_with_lo_below_hi_in_float32(bad_range):
    with pytest.raises(ValueError, match=r"range must (be finite|have lo < hi) in float32"):
        fgs.tensor_stats(layers(), hist="linear", range=bad_range)


@pytest.mark.parametrize("bad_range", [1.0, (1.0,), ("a", 2.0)])
def test_linear_range_must_be_two_numbers(bad_range):
    with pytest.raises(ValueError, match="range must be two numbers"):
        fgs.tensor_stats(layers(), hist="linear", range=bad_range)


@pytest.mark.parametrize("backend", ["cuda", "Torch", "numpy", ""])
def test_unknown_backend_is_named(backend):
    expected = rf"backend must be None, 'torch', 'native' or 'triton', got {backend!r}"
    with pytest.raises(ValueError, match=expected):
        fgs.tensor_stats(layers(), backend=backend)


def test_unknown_backend_is_rejected_even_without_tensors():
    expected = "backend must be None, 'torch', 'native' or 'triton', got 'trition'"
    with pytest.raises(ValueError, match=expected):
        fgs.tensor_stats([], backend="trition")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    pytest.importorskip("fastgradstats.kernels")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError,
                       match=r"backend 'triton' needs CUDA tensors \(got cpu\) or TRITON_INTERPRET=1"):
        fgs.tensor_stats(layers("cpu"), backend="triton")


# --- backend choice -----------------------------------------------------------------------------------------


def test_auto_backend_on_cpu_is_native(monkeypatch):
    monkeypatch.delenv("FASTGRADSTATS_BACKEND", raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "native"


def test_auto_backend_on_cpu_is_torch_without_a_compiler(monkeypatch):
    monkeypatch.delenv("FASTGRADSTATS_BACKEND", raising=False)
    monkeypatch.setattr(native_backend, "available", lambda: False)
    assert resolve_backend(None, torch.device("cpu")) == "torch"


def test_native_backend_without_a_compiler_says_why(monkeypatch):
    monkeypatch.setattr(native_backend, "available", lambda: False)
    monkeypatch.setattr(native_backend, "unavailable_reason", lambda: "no C compiler found")
    with pytest.raises(ValueError, match="backend 'native' is unavailable: no C compiler found"):
        fgs.tensor_stats(layers("cpu"), backend="native")


def test_native_backend_needs_cpu_tensors():
    with pytest.raises(ValueError, match=r"backend 'native' needs CPU tensors, got meta"):
        resolve_backend("native", torch.device("meta"))


def test_empty_backend_variable_means_auto(monkeypatch):
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", "")
    assert resolve_backend(None, torch.device("cpu")) == "native"


def test_backend_variable_selects_the_triton_kernels(monkeypatch):
    kernels = pytest.importorskip("fastgradstats.kernels")
    calls = []
    original = kernels.raw_rows

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "raw_rows", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", "triton")
    stats = fgs.tensor_stats(layers("cpu"), hist="log2")
    assert calls == [3]
    reference = fgs.tensor_stats(layers("cpu"), hist="log2", backend="torch")
    assert calls == [3]
    torch.testing.assert_close(stats.l2, reference.l2)
    assert torch.equal(stats.hist, reference.hist)


def test_backend_variable_is_validated(monkeypatch):
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="got 'bogus'"):
        fgs.tensor_stats(layers())


def test_backend_argument_overrides_the_variable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", "triton")
    with pytest.raises(ValueError, match="backend 'triton' needs"):
        fgs.tensor_stats(layers("cpu"))
    assert fgs.tensor_stats(layers("cpu"), backend="torch").l2.shape == (3,)


# --- grad_stats and param_stats -----------------------------------------------------------------------------


def test_grad_stats_follows_named_parameters_and_skips_params_without_grad():
    net = trained_net()
    stats = fgs.grad_stats(net)
    expected = [(name, p.grad) for name, p in net.named_parameters() if p.grad is not None]
    assert stats.names == ["head.weight", "head.bias", "body.weight", "body.bias"]
    assert stats.names == [name for name, _ in expected]
    assert len(stats) == 4
    torch.testing.assert_close(stats.l2, torch.stack([g.norm() for _, g in expected]))
    torch.testing.assert_close(stats.numel, torch.tensor([g.numel() for _, g in expected], device=DEVICE))


def test_grad_stats_takes_named_parameter_pairs():
    net = trained_net()
    from_pairs = fgs.grad_stats(net.named_parameters())
    from_module = fgs.grad_stats(net)
    assert from_pairs.names == from_module.names
    assert torch.equal(from_pairs.rows, from_module.rows)


def test_grad_stats_before_backward_is_empty():
    stats = fgs.grad_stats(Net())
    assert len(stats) == 0 and stats.names == []
    assert stats.total.numel.item() == 0 and stats.total.l2.item() == 0.0


def test_grad_stats_takes_a_parameter_iterator_named_by_position_among_all_parameters():
    net = trained_net()
    stats = fgs.grad_stats(net.parameters())
    assert stats.names == ["1", "2", "5", "6"]  # frozen (0) and unused (3, 4) have no grad
    assert torch.equal(stats.rows, fgs.grad_stats(net).rows)


def test_param_stats_takes_a_parameter_iterator_named_by_position():
    net = trained_net()
    stats = fgs.param_stats(net.parameters())
    assert stats.names == ["0", "1", "2", "3", "4", "5", "6"]
    assert torch.equal(stats.rows, fgs.param_stats(net).rows)


def test_param_stats_takes_a_list_of_tensors_named_by_position():
    stats = fgs.param_stats(layers())
    assert stats.names == ["0", "1", "2"]
    assert torch.equal(stats.rows, fgs.tensor_stats(layers()).rows)


@pytest.mark.parametrize("call", [fgs.grad_stats, fgs.param_stats])
def test_mixing_parameters_and_named_pairs_is_rejected(call):
    net = trained_net()
    mixed = [net.head.weight, ("head.bias", net.head.bias)]
    expected = rf"{call.__name__}: expected parameters or \(name, parameter\) pairs, not a mix of both"
    with pytest.raises(TypeError, match=expected):
        call(mixed)


@pytest.mark.parametrize("call", [fgs.grad_stats, fgs.param_stats])
def test_stats_of_a_tensor_or_bad_items_are_rejected(call):
    expected = rf"{call.__name__}: expected an nn.Module, parameters or \(name, parameter\) pairs"
    with pytest.raises(TypeError, match=rf"{expected}, got Tensor"):
        call(torch.ones(3))
    with pytest.raises(TypeError, match=rf"{expected}, got an item of type float"):
        call([torch.ones(3), 1.5])
    with pytest.raises(TypeError, match=rf"{expected}, got an item of type tuple"):
        call([(3, torch.ones(3))])


def test_param_stats_covers_every_parameter():
    net = trained_net()
    stats = fgs.param_stats(net, hist="log2")
    named = list(net.named_parameters())
    assert stats.names == [name for name, _ in named]
    assert len(stats) == 7
    torch.testing.assert_close(stats.l2, torch.stack([p.detach().norm() for _, p in named]))
    torch.testing.assert_close(stats.mean, torch.stack([p.detach().mean() for _, p in named]))
    assert stats.rows.grad_fn is None


def test_default_names_and_len():
    stats = fgs.tensor_stats(layers())
    assert stats.names == ["0", "1", "2"]
    assert len(stats) == 3


@pytest.mark.parametrize("backend", ["torch", NATIVE, "triton"])
def test_statistics_of_tensors_that_require_grad_are_not_tracked_by_autograd(backend):
    """Statistics are read-only: no graph (which would keep float64 copies of the data alive with the
    result)."""
    if backend == "triton":
        pytest.importorskip("fastgradstats.kernels")
    weight = torch.nn.Parameter(torch.randn(4, 3, device=DEVICE))
    stats = fgs.tensor_stats([weight], hist="log2", backend=backend)
    assert not stats.rows.requires_grad
    assert not stats.l2.requires_grad and not stats.total.l2.requires_grad


# --- result layout ------------------------------------------------------------------------------------------

# "meta" runs the torch backend without data: any field computed on, or copied to, the CPU would show up here.
RESULT_DEVICES = sorted({DEVICE, "meta"})


@pytest.mark.parametrize("device", RESULT_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fields_are_on_the_input_device_with_documented_dtypes_and_shapes(device, dtype):
    tensors = [t.to(device, dtype) for t in layers("cpu")]
    backend = "torch" if device == "meta" else None
    stats = fgs.tensor_stats(tensors, hist="log2", backend=backend)
    for source, shape in ((stats, (3,)), (stats.total, ())):
        for field in FIELDS:
            value = getattr(source, field)
            assert value.device == torch.device(device), field
            assert value.shape == shape, field
            assert value.dtype == (torch.int64 if field in COUNT_FIELDS else torch.float32), field
    assert stats.hist.shape == (3, 64) and stats.hist.dtype == torch.int64
    assert stats.hist_edges.shape == (65,) and stats.hist_edges.dtype == torch.float32
    assert stats.total.hist.shape == (64,) and stats.total.hist.dtype == torch.int64
    assert stats.total.hist_edges.shape == (65,)
    assert {t.device for t in (stats.hist, stats.hist_edges, stats.total.hist)} == {torch.device(device)}


@pytest.mark.parametrize("device", RESULT_DEVICES)
def test_linear_histogram_layout(device):
    tensors = [t.to(device) for t in layers("cpu")]
    backend = "torch" if device == "meta" else None
    stats = fgs.tensor_stats(tensors, hist="linear", bins=10, backend=backend)
    assert stats.hist.shape == (3, 10) and stats.hist.dtype == torch.int64
    assert stats.hist_edges.shape == (3, 11) and stats.hist_edges.dtype == torch.float32
    assert stats.total.hist.shape == (10,) and stats.total.hist_edges.shape == (11,)
    assert {t.device for t in (stats.hist, stats.hist_edges, stats.total.hist, stats.total.hist_edges)} == {
        torch.device(device)
    }


def test_log2_histogram_bins_follow_the_exponent_range():
    stats = fgs.tensor_stats(layers(), hist="log2", min_exp=-4, max_exp=3)
    assert stats.hist.shape == (3, 8)
    torch.testing.assert_close(stats.hist_edges.cpu(), 2.0 ** torch.arange(-4, 5, dtype=torch.float32))


def test_no_histogram_by_default():
    stats = fgs.tensor_stats(layers())
    assert stats.hist is None and stats.hist_edges is None and stats.total.hist is None


def test_empty_call_has_empty_fields_and_zero_totals():
    stats = fgs.tensor_stats([], hist="log2")
    assert len(stats) == 0
    assert stats.l2.shape == (0,) and stats.hist.shape == (0, 64)
    assert stats.total.l2.shape == () and stats.total.l2.item() == 0.0
    assert stats.total.numel.item() == 0
    assert stats.total.hist.sum().item() == 0
