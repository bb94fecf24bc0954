"""GPU-only checks (skipped without CUDA): the Triton kernels on CUDA tensors against the torch backend, no
host sync in any statistics or clipping call, and a single tensor of more than 2^31 elements."""

import contextlib

import pytest
import torch
from conftest import requires_cuda

import fastgradstats as fgs
from fastgradstats import launches
from fastgradstats.dense import is_dense
from fastgradstats.dispatch import resolve_backend

pytestmark = [pytest.mark.gpu, requires_cuda]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
COUNT_FIELDS = ("numel", "zeros", "nonfinite")
EXACT_FIELDS = ("min", "max", "linf")
HISTOGRAMS = [
    pytest.param(None, {}, id="no-hist"),
    pytest.param("log2", {}, id="log2"),
    pytest.param("log2", {"min_exp": -20, "max_exp": 3}, id="log2-clamped"),
    pytest.param("linear", {"bins": 37}, id="linear"),
    pytest.param("linear", {"bins": 16, "range": (-1.0, 1.0)}, id="linear-range"),
]


@pytest.fixture(autouse=True)
def automatic_backend(monkeypatch):
    """Calls without ``backend=`` must pick the Triton kernels for CUDA tensors."""
    pytest.importorskip("fastgradstats.kernels")
    monkeypatch.delenv("FASTGRADSTATS_BACKEND", raising=False)


def make_layers(dtype, seed=0):
    """Layers that stress the kernels: many chunks, odd sizes, a transposed and a strided view, an empty and a
    0-d tensor, zeros, NaN and ±Inf, tiny (fp16-subnormal) and large values, a mean far from zero."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device=DEVICE) * scale).to(dtype)

    with_zeros = randn(5003)
    with_zeros[::7] = 0
    with_inf = randn(999)
    with_inf[10], with_inf[11] = float("inf"), float("-inf")
    with_nan = randn(77)
    with_nan[5] = float("nan")
    return [
        randn(300_001, scale=0.01),
        randn(129, 257).t(),
        torch.empty(0, device=DEVICE, dtype=dtype),
        with_zeros,
        randn(64, 64)[:, ::2],
        with_inf,
        torch.full((), 3.0, device=DEVICE, dtype=dtype),
        with_nan,
        randn(1000, scale=1e-6),
        randn(1000, scale=1e3),
        randn(70_000, scale=0.01) + 1,
    ]


def assert_within(actual, expected, tolerance, field):
    """Elementwise |actual - expected| <= tolerance, where NaN matches NaN and equal infinities match."""
    ok = ((actual - expected).abs() <= tolerance) | (actual == expected) | (actual.isnan() & expected.isnan())
    assert ok.all(), f"{field}: {actual.tolist()} != {expected.tolist()}"


def assert_same_stats(fused, reference):
    """Counts, extremes and histograms exactly; sums, norms and moments to float32 accumulation accuracy."""
    for field in (*COUNT_FIELDS, *EXACT_FIELDS):
        assert_within(getattr(fused, field), getattr(reference, field), 0, field)
    mean_abs = reference.l1 / reference.numel.clamp_min(1)
    rms = reference.l2 / reference.numel.clamp_min(1).sqrt()
    assert_within(fused.sum, reference.sum, 1e-5 * reference.l1 + 1e-30, "sum")
    assert_within(fused.mean, reference.mean, 1e-5 * mean_abs + 1e-30, "mean")
    assert_within(fused.l1, reference.l1, 1e-5 * reference.l1, "l1")
    assert_within(fused.l2, reference.l2, 1e-5 * reference.l2, "l2")
    assert_within(fused.std, reference.std, 1e-4 * reference.std + 1e-6 * rms, "std")
    assert (fused.hist is None) == (reference.hist is None)
    if reference.hist is not None:
        assert torch.equal(fused.hist, reference.hist)
        assert torch.equal(fused.hist_edges, reference.hist_edges)


@contextlib.contextmanager
def sync_is_an_error():
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def read_every_field(stats):
    """Touch every derived field (they are computed lazily) and the histograms, without leaving the device."""
    for source in (stats, stats.total):
        for field in (*COUNT_FIELDS, *EXACT_FIELDS, "sum", "mean", "std", "l1", "l2"):
            getattr(source, field)
        _ = source.hist, source.hist_edges


def grad_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 10))
    model = model.to(DEVICE, dtype)
    model(torch.randn(32, 48, device=DEVICE, dtype=dtype)).float().square().mean().backward()
    return model


# --- Triton on CUDA equals the torch backend ----------------------------------------------------------------


def test_auto_backend_on_cuda_is_triton():
    assert resolve_backend(None, torch.device(DEVICE)) == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("hist", "hist_kwargs"), HISTOGRAMS)
def test_triton_equals_torch_backend(dtype, hist, hist_kwargs):
    layers = make_layers(dtype)
    fused = fgs.tensor_stats(layers, hist=hist, backend="triton", **hist_kwargs)
    reference = fgs.tensor_stats(layers, hist=hist, backend="torch", **hist_kwargs)
    assert fused.rows.device == layers[0].device
    assert_same_stats(fused, reference)
    assert_same_stats(fused.total, reference.total)


@pytest.mark.parametrize(("hist", "hist_kwargs"), HISTOGRAMS)
def test_triton_equals_torch_backend_on_mixed_dtypes(hist, hist_kwargs):
    layers = [t for seed, dtype in enumerate(DTYPES) for t in make_layers(dtype, seed)]
    fused = fgs.tensor_stats(layers, hist=hist, backend="triton", **hist_kwargs)
    reference = fgs.tensor_stats(layers, hist=hist, backend="torch", **hist_kwargs)
    assert_same_stats(fused, reference)
    assert_same_stats(fused.total, reference.total)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_stats_and_clipping_on_cuda_match_torch(dtype):
    model = grad_model(dtype)
    tolerance = {"rtol": 1e-5, "atol": 0} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-5}
    stats = fgs.grad_stats(model, hist="log2")
    assert_same_stats(stats, fgs.grad_stats(model, hist="log2", backend="torch"))
    grads = [p.grad for p in model.parameters()]
    torch.testing.assert_close(stats.total.l2, torch.nn.utils.get_total_norm(grads).float(), **tolerance)

    theirs = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for copy, grad in zip(theirs, grads):
        copy.grad = grad.clone()
    ours_norm = fgs.clip_grad_norm_(model.parameters(), 0.01)
    torch.testing.assert_close(ours_norm, torch.nn.utils.clip_grad_norm_(theirs, 0.01), **tolerance)
    for p, copy in zip(model.parameters(), theirs):
        torch.testing.assert_close(p.grad, copy.grad, **tolerance)


# --- no host sync -------------------------------------------------------------------------------------------


def test_sync_debug_mode_catches_a_sync():
    with pytest.raises(RuntimeError, match="synchroniz"), sync_is_an_error():
        torch.ones(1, device=DEVICE).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("hist", "hist_kwargs"), HISTOGRAMS)
def test_tensor_stats_does_not_sync(dtype, hist, hist_kwargs):
    layers = [t for t in make_layers(dtype) if is_dense(t)]  # a strided view is copied: new address each call
    # compiles the kernels, caches the segment table
    warm = fgs.tensor_stats(layers, hist=hist, **hist_kwargs)
    read_every_field(warm)
    with sync_is_an_error():
        stats = fgs.tensor_stats(layers, hist=hist, **hist_kwargs)
        read_every_field(stats)
    assert_same_stats(stats, warm)


def test_stats_of_new_tensors_do_not_sync():
    """A cold segment-table cache (new addresses) builds the table on the host and copies it without a
    sync."""
    fgs.tensor_stats(make_layers(torch.float32, seed=1), hist="log2")
    layers = [torch.randn(1000 + i, device=DEVICE) for i in range(7)]
    with sync_is_an_error():
        stats = fgs.tensor_stats(layers, hist="log2")
        read_every_field(stats)
    torch.testing.assert_close(stats.l2, torch.stack([t.norm() for t in layers]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_and_param_stats_do_not_sync(dtype):
    model = grad_model(dtype)
    for call in (fgs.grad_stats, fgs.param_stats):
        read_every_field(call(model, hist="log2"))
    with sync_is_an_error():
        for call in (fgs.grad_stats, fgs.param_stats):
            read_every_field(call(model, hist="log2"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0])
@pytest.mark.parametrize("return_stats", [False, True])
def test_clip_grad_norm_does_not_sync(dtype, norm_type, return_stats):
    model = grad_model(dtype)
    fgs.clip_grad_norm_(model.parameters(), 1e-3, norm_type, return_stats=return_stats)
    with sync_is_an_error():
        result = fgs.clip_grad_norm_(model.parameters(), 1e-3, norm_type, return_stats=return_stats)
        if return_stats:
            read_every_field(result[1])
    total_norm = result[0] if return_stats else result
    assert total_norm.device.type == "cuda" and total_norm.dtype == dtype


# --- more than 2^31 elements --------------------------------------------------------------------------------


def test_single_tensor_over_2_31_elements():
    numel = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < numel * 2 + (2 << 30):
        pytest.skip(f"needs about {(numel * 2 + (2 << 30)) / 2**30:.1f} GiB free GPU memory, "
                    f"{free / 2**30:.1f} free")
    before, after = torch.randn(1000, device=DEVICE), torch.randn(3, 333, device=DEVICE)
    big = torch.ones(numel, device=DEVICE, dtype=torch.bfloat16)
    big[0], big[2**31], big[2**31 + 5], big[-1] = -3.0, 4.0, 0.0, 0.5  # extremes and a zero past 2^31

    stats = fgs.tensor_stats([before, big, after], names=["before", "big", "after"], hist="log2", min_exp=-4,
                             max_exp=4, backend="triton")
    torch.cuda.synchronize()
    assert stats.numel[1].item() == numel
    assert stats.zeros[1].item() == 1 and stats.nonfinite[1].item() == 0
    assert (stats.min[1].item(), stats.max[1].item(), stats.linf[1].item()) == (-3.0, 4.0, 4.0)
    expected_hist = [0] * 9
    expected_hist[0 + 4] = numel - 4  # the ones
    expected_hist[1 + 4] += 1  # -3
    expected_hist[2 + 4] += 1  # 4
    expected_hist[-1 + 4] += 1  # 0.5
    assert stats.hist[1].tolist() == expected_hist
    sum_of_squares = (numel - 4) + 9 + 16 + 0.25
    assert stats.l2[1].item() == pytest.approx(sum_of_squares**0.5, rel=1e-6)
    assert stats.sum[1].item() == pytest.approx(numel - 4 - 3 + 4 + 0.5, rel=1e-6)

    reference = fgs.tensor_stats([before, after], hist="log2", min_exp=-4, max_exp=4, backend="torch")
    for fused_row, reference_row in ((0, 0), (2, 1)):  # the layers around the big one keep their own rows
        assert torch.equal(stats.hist[fused_row], reference.hist[reference_row])
        torch.testing.assert_close(stats.l2[fused_row], reference.l2[reference_row])
        assert stats.numel[fused_row] == reference.numel[reference_row]


# --- the tensors' device, not the current one ---------------------------------------------------------------


def test_calls_on_cuda_1_while_cuda_0_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    second = torch.device("cuda", 1)
    layers = [t.to(second) for t in make_layers(torch.float32) + make_layers(torch.bfloat16, seed=1)]
    others = [t.to(second) for t in make_layers(torch.float32, seed=2) + make_layers(torch.bfloat16, seed=3)]
    with torch.cuda.device(0):
        stats = fgs.tensor_stats(layers, hist="log2", backend="triton")
        linear = fgs.tensor_stats(layers, hist="linear", backend="triton")
        pairs = fgs.pair_stats(layers, others, backend="triton")
        torch.cuda.synchronize(second)
    assert stats.rows.device == second and pairs.rows.device == second
    reference = fgs.tensor_stats(layers, hist="log2", backend="torch")
    assert_same_stats(stats, reference)
    assert_same_stats(stats.total, reference.total)
    assert_same_stats(linear, fgs.tensor_stats(layers, hist="linear", backend="torch"))
    pair_reference = fgs.pair_stats(layers, others, backend="torch")
    assert_within(pairs.dot, pair_reference.dot, 1e-5 * pair_reference.a_l2 * pair_reference.b_l2, "dot")


# --- every public call under set_sync_debug_mode("error") ---------------------------------------------------


def public_calls(model, layers, others):
    """Every public statistics call on CUDA tensors, each reading all it returns (device-side)."""
    monitor = fgs.Monitor(model, track=("grad", "param", "update", "grad_cos", "init"), sinks=())
    calls = {f"tensor_stats hist={hist} {kwargs}": (lambda hist=hist, kwargs=kwargs: read_every_field(
        fgs.tensor_stats(layers, hist=hist, **kwargs))) for hist, kwargs in (
        (None, {}), ("log2", {}), ("linear", {}), ("linear", {"range": (-1.0, 1.0), "bins": 16}))}
    return {
        **calls,
        "grad_stats": lambda: read_every_field(fgs.grad_stats(model, hist="log2")),
        "param_stats": lambda: read_every_field(fgs.param_stats(model.parameters(), hist="log2")),
        "pair_stats": lambda: launches.read_every_field(fgs.pair_stats(layers, others)),
        "pair_stats origin": lambda: launches.read_every_field(fgs.pair_stats(layers, others, origin=layers)),
        "cosine_similarity": lambda: fgs.cosine_similarity(layers, others),
        "clip_grad_norm_ 2": lambda: fgs.clip_grad_norm_(model.parameters(), 1e-3),
        "clip_grad_norm_ inf": lambda: fgs.clip_grad_norm_(model.parameters(), 1e-3, float("inf")),
        "clip_grad_norm_ stats": lambda: read_every_field(
            fgs.clip_grad_norm_(model.parameters(), 1e-3, return_stats=True)[1]),
        "Monitor.step": monitor.step,
    }


def test_every_public_call_runs_under_sync_debug_error():
    def two_dtypes(seed):  # without the strided view, copied (a new address, a new segment table) each call
        layers = make_layers(torch.float32, seed) + make_layers(torch.bfloat16, seed + 1)
        return [t for t in layers if is_dense(t)]

    calls = public_calls(grad_model(), two_dtypes(0), two_dtypes(2))
    for call in calls.values():  # compile, fill the caches, give the Monitor its earlier steps
        call()
        call()
    failed = {}
    for name, call in calls.items():
        try:
            with sync_is_an_error():
                call()
        except RuntimeError as error:
            failed[name] = str(error).splitlines()[0]
    assert not failed, failed


# --- inside torch.compile and CUDA graphs (issue 14) --------------------------------------------------------


def assert_same_outputs(got, want, rtol=1e-5):
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device
        if w.dtype.is_floating_point:
            torch.testing.assert_close(g, w, rtol=rtol, atol=1e-30, equal_nan=True)
        else:
            assert torch.equal(g, w)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck_on_cuda(backend):
    layers = [t for t in make_layers(torch.float32) if t.isfinite().all()]
    others = [t + 1 for t in layers]
    op = torch.ops.fastgradstats
    torch.library.opcheck(op.raw_stats.default, (layers, backend, "log2", 64, -48, 15, None, None))
    torch.library.opcheck(op.raw_stats.default, (layers, backend, "linear", 16, -48, 15, None, None))
    torch.library.opcheck(op.pair_rows.default, (layers, others, None, backend))


def test_every_public_call_compiles_on_cuda_without_graph_break():
    torch._dynamo.reset()
    model, other = grad_model(), grad_model()
    layers = [t for t in make_layers(torch.float32) if is_dense(t)]

    def f(model, other, layers):
        stats = fgs.tensor_stats(layers, hist="log2")
        grads, params = fgs.grad_stats(model, hist="linear", bins=16), fgs.param_stats(model)
        pairs = fgs.pair_stats(model, other)
        return (stats.l2, stats.total.l2, stats.hist, grads.hist, grads.total.hist, params.std, pairs.cos,
                pairs.total.dist, fgs.cosine_similarity(layers, layers))

    explanation = torch._dynamo.explain(f)(model, other, layers)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    torch._dynamo.reset()
    assert_same_outputs(torch.compile(f, fullgraph=True)(model, other, layers), f(model, other, layers))


def clip_train_step(model, x, y):
    """forward, backward into the existing .grad tensors (fixed addresses), clip with statistics, SGD."""
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad.zero_()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm, stats = fgs.clip_grad_norm_(params, 0.05, return_stats=True)
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
        return loss.detach(), norm, stats.l2, stats.total.linf

    return step


def warm_up(*steps, rounds=3):
    """Run each step ``rounds`` times on a side stream, as torch.cuda.graph wants before a capture (and so
    that the segment tables a captured step reads are cached)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(rounds):
            for step in steps:
                step()
    torch.cuda.current_stream().wait_stream(side)


def test_cuda_graph_replays_a_clip_step_with_statistics():
    """torch.cuda.graph captures the whole step (Triton kernels, segment table cached by the warm-up) and
    its replays match eager steps; capturing builds no new segment table."""
    from fastgradstats.kernels.segments import _cached_table

    eager_model, graph_model = grad_model(), grad_model()
    x, y = torch.randn(32, 48, device=DEVICE), torch.randn(32, 10, device=DEVICE)
    eager_step, graph_step = clip_train_step(eager_model, x, y), clip_train_step(graph_model, x, y)
    warm_up(graph_step, eager_step)
    misses = _cached_table.cache_info().misses
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = graph_step()
    assert _cached_table.cache_info().misses == misses
    for _ in range(3):
        graph.replay()
        assert_same_outputs(captured, eager_step())
    for got, want in zip(graph_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_cuda_graph_replays_the_alert_flags_with_a_clip_step():
    """The Monitor's device-side alerts (AlertTracker: running means updated in place) captured with a clip
    step: every replay raises the flags and keeps the running means of the same eager steps."""
    from fastgradstats.monitoring.alerts import AlertConfig, AlertTracker

    config = AlertConfig(warmup=1, exploding_ratio=1.0)  # above its running mean counts: flags vary per step
    x, y = torch.randn(32, 48, device=DEVICE), torch.randn(32, 10, device=DEVICE)

    def alert_step(model, tracker):
        params = list(model.parameters())

        def step():
            for p in params:
                p.grad.zero_()
            torch.nn.functional.mse_loss(model(x), y).backward()
            norm, stats = fgs.clip_grad_norm_(params, 0.05, return_stats=True)
            flags = tracker.update(0, stats)
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
            return norm, flags.flags["exploding"], flags.flags["vanishing"], flags.running_mean, flags.count()

        return step

    eager_tracker, graph_tracker = AlertTracker(config), AlertTracker(config)
    eager_step, graph_step = alert_step(grad_model(), eager_tracker), alert_step(grad_model(), graph_tracker)
    warm_up(graph_step, eager_step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = graph_step()
    for _ in range(4):
        graph.replay()
        assert_same_outputs(captured, eager_step())
    assert_same_outputs([graph_tracker.grad_l2.mean, graph_tracker.grad_l2.seen],
                        [eager_tracker.grad_l2.mean, eager_tracker.grad_l2.seen])


def test_reduce_overhead_compile_of_a_clip_step_matches_eager():
    """torch.compile(mode="reduce-overhead") (CUDA graph trees) of clip + statistics + update, the gradients
    marked static (their addresses are fixed, as the segment table wants)."""
    torch._dynamo.reset()
    eager_model, compiled_model = grad_model(), grad_model()
    for p in compiled_model.parameters():
        torch._dynamo.mark_static_address(p.grad)

    def clip(model):
        params = list(model.parameters())
        norm, stats = fgs.clip_grad_norm_(params, 0.05, return_stats=True)
        grads = fgs.grad_stats(model, hist="log2")
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
        return norm, stats.l2, grads.hist, grads.total.l2

    compiled = torch.compile(clip, fullgraph=True, mode="reduce-overhead")
    for _ in range(4):
        assert_same_outputs([t.clone() for t in compiled(compiled_model)], clip(eager_model))
    for got, want in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
