"""Statistics inside torch.compile: the custom ops (opcheck), no graph break with fullgraph=True for every
public statistics call and a clip step in a train step, on every CPU backend, with the eager results.

Most compiled checks use the "aot_eager" backend (Dynamo + AOTAutograd, where the ops are traced and where
graph breaks come from, in about a second); Inductor compiles a few (slow on a small CPU) to show it keeps the
ops and gives the same results.
"""

import copy

import pytest
import torch
from conftest import NATIVE
from torch._dynamo.backends.common import aot_autograd

import fastgradstats as fgs
from fastgradstats import dispatch, ops
from fastgradstats.hist import HistSpec

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not dispatch.triton_available(),
                                                         reason="needs triton (interpreted on the CPU)"))
BACKENDS = ["torch", NATIVE, TRITON]
HISTS = [pytest.param({}, id="no-hist"), pytest.param({"hist": "log2"}, id="log2"),
         pytest.param({"hist": "linear", "bins": 7}, id="linear"),
         pytest.param({"hist": "linear", "bins": 5, "range": (-1.0, 0.5)}, id="linear-range")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def env_backend(monkeypatch):
    """Set FASTGRADSTATS_BACKEND (clip_grad_norm_ takes no backend argument)."""
    def choose(name):
        monkeypatch.setenv("FASTGRADSTATS_BACKEND", name)
    return choose


def layers(seed=0, nan=True):
    """Small odd-sized layers: a transposed weight, a bfloat16 one, zeros, a NaN (unless not ``nan``: opcheck
    compares without equal_nan), an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    with_nan = torch.randn(9, generator=g)
    with_nan[3] = float("nan") if nan else 0.0
    with_zeros = torch.randn(6, 5, generator=g)
    with_zeros[::2] = 0
    return [torch.randn(7, 3, generator=g).t(), torch.randn(33, generator=g).bfloat16(), with_zeros,
            with_nan, torch.empty(0), torch.randn(4, 4, generator=g, dtype=torch.float64) + 10]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def assert_same(compiled, eager):
    """Outputs of a compiled and an eager call agree: same structure and dtypes, values within 1e-5
    relative (integers exactly), NaN where eager has NaN."""
    compiled, eager = torch.utils._pytree.tree_leaves(compiled), torch.utils._pytree.tree_leaves(eager)
    assert len(compiled) == len(eager)
    for got, want in zip(compiled, eager):
        assert got.dtype == want.dtype and got.shape == want.shape, (got, want)
        if want.dtype.is_floating_point:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-30, equal_nan=True)
        else:
            assert torch.equal(got, want), (got, want)


def assert_compiles(fn, *args, backend="aot_eager"):
    """fn(*args) has no graph break (Dynamo's explain) and compiled with fullgraph=True gives eager's
    results. Returns the compiled outputs."""
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert_same(compiled, fn(*args))
    return compiled


def tensor_fields(stats):
    fields = [getattr(stats, f) for f in stats.FIELDS] + [getattr(stats.total, f) for f in stats.FIELDS]
    if stats.hist is not None:
        fields += [stats.hist, stats.hist_edges, stats.total.hist, stats.total.hist_edges, stats.hist_sum]
    return fields


def pair_fields(stats):
    return [getattr(stats, f) for f in stats.FIELDS] + [getattr(stats.total, f) for f in stats.FIELDS]


# --- the ops ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hist", HISTS)
def test_opcheck_raw_stats(backend, hist):
    spec = HistSpec.make(hist.get("hist"), hist.get("bins", 64), hist.get("range"))
    lo, hi = (None, None) if spec is None or spec.range is None else spec.range
    args = (layers(nan=False), backend, None if spec is None else spec.kind, 0 if spec is None else spec.bins,
            0 if spec is None else spec.min_exp, 0 if spec is None else spec.max_exp, lo, hi)
    torch.library.opcheck(torch.ops.fastgradstats.raw_stats.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_origin", [False, True])
def test_opcheck_pair_rows(backend, with_origin):
    a, b, origin = (layers(seed, nan=False) for seed in range(3))
    torch.library.opcheck(torch.ops.fastgradstats.pair_rows.default,
                          (a, b, origin if with_origin else None, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ops_give_the_eager_rows(backend):
    tensors = layers()
    spec = HistSpec.make("linear", 7)
    raw = dispatch.raw_stats(tensors, spec, backend)
    rows, hist, total = torch.ops.fastgradstats.raw_stats(tensors, backend, "linear", 7, spec.min_exp,
                                                          spec.max_exp, None, None)
    torch.testing.assert_close(rows, raw.rows, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(hist, raw.hist) and torch.equal(total, raw.total_hist)
    a, b = layers(0), layers(1)
    assert torch.equal(torch.ops.fastgradstats.pair_rows(a, b, None, backend).nan_to_num(),
                       dispatch.layer_pair_rows(a, b, None, backend).nan_to_num())


def test_eager_calls_do_not_go_through_the_ops(monkeypatch):
    """Eager calls launch the kernels directly (launch counts, no dispatcher overhead)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through a custom op")

    monkeypatch.setattr(ops, "raw_stats", refuse)
    monkeypatch.setattr(ops, "pair_rows", refuse)
    assert fgs.tensor_stats(layers(), hist="log2").total.numel == 109
    assert fgs.pair_stats(layers(0), layers(1)).total.numel == 109


def test_aot_autograd_keeps_the_ops_in_the_graph():
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    def f(a, b):
        return fgs.tensor_stats(a, hist="log2").total.l2, fgs.pair_stats(a, b).total.cos

    torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=keep))(layers(0), layers(1))
    targets = {node.target for gm in graphs for node in gm.graph.nodes}
    assert torch.ops.fastgradstats.raw_stats.default in targets
    assert torch.ops.fastgradstats.pair_rows.default in targets


# --- every public call, compiled ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hist", HISTS)
def test_tensor_stats_compiles_without_graph_break(backend, hist):
    def f(tensors):
        return tensor_fields(fgs.tensor_stats(tensors, names=[f"w{i}" for i in range(6)], backend=backend,
                                              **hist))

    assert_compiles(f, layers())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_and_param_stats_compile_without_graph_break(backend):
    model = tiny_model()
    model(torch.randn(5, 4)).square().sum().backward()

    def f(model):
        grads = fgs.grad_stats(model, hist="log2", backend=backend)
        params = fgs.param_stats(model.parameters(), backend=backend)
        return tensor_fields(grads) + tensor_fields(params)

    assert_compiles(f, model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_stats_and_cosine_compile_without_graph_break(backend):
    model, init = tiny_model(0), tiny_model(1)

    def f(model, init, a, b, origin):
        by_name = fgs.pair_stats(model, init, backend=backend)
        lists = fgs.pair_stats(a, b, origin=origin, backend=backend)
        return (pair_fields(by_name) + pair_fields(lists)
                + [fgs.cosine_similarity(a, b, backend=backend),
                   fgs.cosine_similarity(model, init.state_dict(), origin=init, backend=backend)])

    assert_compiles(f, model, init, layers(0), layers(1), layers(2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0])
def test_clip_step_in_a_train_step_compiles_without_graph_break(backend, norm_type, env_backend):
    """forward, backward, clip with statistics, SGD update: one graph (backward traced by Dynamo)."""
    env_backend(backend)
    x, y = torch.randn(6, 4), torch.randn(6, 3)

    def step(model):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm, stats = fgs.clip_grad_norm_(model.parameters(), 0.05, norm_type, return_stats=True)
        params = list(model.parameters())
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
        return loss.detach(), norm, tensor_fields(stats)

    eager_model, compiled_model = tiny_model(), tiny_model()
    torch._dynamo.config.trace_autograd_ops, before = True, torch._dynamo.config.trace_autograd_ops
    try:
        explanation = torch._dynamo.explain(step)(copy.deepcopy(eager_model))
        assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
        torch._dynamo.reset()
        compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
        for _ in range(2):  # the second step reads the first one's update
            assert_same(compiled_step(compiled_model), step(eager_model))
            for model in (eager_model, compiled_model):
                model.zero_grad(set_to_none=True)
    finally:
        torch._dynamo.config.trace_autograd_ops = before
    for got, want in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_after_backward_compiles_without_graph_break(backend, env_backend):
    """The usual split: backward outside, clip (with statistics) and the update compiled; gradients are
    scaled in place by the compiled call as by the eager one."""
    env_backend(backend)
    eager_model, compiled_model = tiny_model(), tiny_model()
    x = torch.randn(5, 4)
    for model in (eager_model, compiled_model):
        model(x).square().sum().backward()

    def clip(model):
        norm, stats = fgs.clip_grad_norm_(model.parameters(), 0.1, return_stats=True)
        return norm, stats.l2, stats.total.l2

    compiled_clip = torch.compile(clip, fullgraph=True, backend="aot_eager")
    assert_same(compiled_clip(compiled_model), clip(eager_model))
    for got, want in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=0)


def test_compiled_code_follows_the_backend_environment(env_backend):
    """The op resolves its backend when it runs, as an eager call does."""
    env_backend("torch")
    f = torch.compile(lambda ts: fgs.tensor_stats(ts).l2, fullgraph=True, backend="aot_eager")
    f(layers())
    env_backend("nonsense")
    with pytest.raises(ValueError, match="backend must be"):
        f(layers())


def test_group_is_refused_inside_compile():
    class FakeReducer:
        pass

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(tensors):
        return dispatch.raw_stats(tensors, None, None, FakeReducer()).rows

    with pytest.raises(Exception, match="sharded tensors"):
        f(layers())


# --- Inductor -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_inductor_keeps_the_ops_and_gives_the_eager_results(backend):
    from torch._inductor.utils import run_and_get_code

    model, init = tiny_model(0), tiny_model(1)
    model(torch.randn(5, 4)).square().sum().backward()

    def f(model, init):
        grads = fgs.grad_stats(model, hist="log2", backend=backend)
        pairs = fgs.pair_stats(model, init, backend=backend)
        return tensor_fields(grads) + pair_fields(pairs)

    compiled, codes = run_and_get_code(torch.compile(f, fullgraph=True), model, init)
    assert_same(compiled, f(model, init))
    code = "\n".join(codes)
    assert "fastgradstats.raw_stats" in code and "fastgradstats.pair_rows" in code


@pytest.mark.skipif(not dispatch.triton_available(), reason="needs triton (interpreted on the CPU)")
def test_compiled_triton_calls_reuse_the_cached_segment_table():
    """The op runs on real tensors: the first call builds the table of their addresses, later calls (and
    CUDA-graph replays, whose addresses are fixed) reuse it."""
    from fastgradstats.kernels.segments import _cached_table

    tensors = [t for t in layers(nan=False) if t.is_contiguous()]
    f = torch.compile(lambda ts: fgs.tensor_stats(ts, backend="triton", hist="log2").total.l2, fullgraph=True,
                      backend="aot_eager")
    first = f(tensors)
    misses = _cached_table.cache_info().misses
    assert torch.equal(f(tensors), first)
    assert _cached_table.cache_info().misses == misses


def test_a_compiled_function_may_return_the_results():
    """Results made inside the compiled region come out as TensorStats/PairStats, read on the host after."""
    def f(a, b):
        return fgs.tensor_stats(a, hist="log2"), fgs.pair_stats(a, b)

    a, b = layers(0, nan=False), layers(1, nan=False)
    stats, pairs = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b)
    eager_stats, eager_pairs = f(a, b)
    assert isinstance(stats, fgs.TensorStats) and isinstance(pairs, fgs.PairStats)
    assert stats.to_dict()["layers"]["1"]["numel"] == 33
    assert_same(tensor_fields(stats) + pair_fields(pairs),
                tensor_fields(eager_stats) + pair_fields(eager_pairs))


def test_split_compiles_without_graph_break():
    def f(tensors):
        stats = fgs.tensor_stats(tensors, names=["w", "v"], split={"w": 3})
        return stats.l2, stats.group("w").l2, stats.group("w").std, stats.group("w").total.l2

    assert_compiles(f, [torch.randn(6, 5), torch.randn(7)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_shapes_recompile_with_dynamic_sizes_and_stay_correct(backend):
    """The fake implementations depend on the number of tensors and bins only, so the dynamic-shape
    recompile that new sizes trigger traces them too."""
    f = torch.compile(lambda ts: tensor_fields(fgs.tensor_stats(ts, hist="log2", backend=backend)),
                      fullgraph=True, backend="aot_eager")
    for sizes in ((5, 7), (9, 4), (13, 2)):
        tensors = [torch.randn(*sizes), torch.randn(sizes[0] * 3)]
        assert_same(f(tensors), tensor_fields(fgs.tensor_stats(tensors, hist="log2", backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_inputs_that_require_grad(backend):
    """Parameters as they are (requires_grad): the outputs are non-differentiable, so opcheck's autograd
    checks pass and a backward through them fails loudly."""
    params = [t.float().requires_grad_() for t in layers(nan=False)]
    others = [t.detach() + 1 for t in params]
    torch.library.opcheck(torch.ops.fastgradstats.raw_stats.default,
                          (params, backend, "log2", 64, -48, 15, None, None))
    torch.library.opcheck(torch.ops.fastgradstats.pair_rows.default, (params, others, None, backend))
    rows, _, _ = torch.ops.fastgradstats.raw_stats(params, backend, None, 0, 0, 0, None, None)
    assert not rows.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        rows.sum().backward()
