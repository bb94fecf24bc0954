"""The CPU backends (pure-PyTorch, the reference, and native, compiled C) against an independent float64
numpy oracle (tests/oracle.py).

Statistics agree to 2e-5 relative (sum and mean relative to Σ|x|), min/max/linf exactly, counts and
histograms exactly; NaN/Inf/empty layers follow the contract of ``fgs.tensor_stats``.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import oracle
import pytest
import torch
from helpers import raw_stats
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgradstats as fgs
from fastgradstats.backends import torch_backend
from fastgradstats.hist import HistSpec
from fastgradstats.results import TensorStats

CPU_BACKENDS = ("torch", "native")
RAW_STATS = {name: functools.partial(raw_stats, name) for name in ("torch", "native")}
RTOL = 2e-5
NAN, INF = math.nan, math.inf
FIELDS = oracle.COUNT_FIELDS + oracle.FLOAT_FIELDS
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
ALL_DTYPES = (*LOW_PRECISION, torch.float64)
SIZES = (0, 1, 2, 3, 5, 7, 8, 13, 30, 61)
# log10 of the magnitudes drawn per dtype: x² stays finite in float32, fp16 stays below its 65504 maximum.
LOG10_MAGNITUDE = {
    torch.float32: (-30.0, 15.0),
    torch.bfloat16: (-30.0, 15.0),
    torch.float64: (-30.0, 15.0),
    torch.float16: (-7.5, 4.8),
}
# What a layer may hold besides finite non-zero values; "finite" layers get none, so totals stay finite often.
SPECIALS = {
    "finite": (),
    "zeros": (0.0, -0.0),
    "inf": (0.0, INF, -INF),
    "nan": (NAN, INF, -0.0),
}
LAYER_KINDS = ("finite", "finite", "zeros", "inf", "nan")


# ------------------------------------------------------------------------------------------ strategies


def _shapes(numel: int) -> list[tuple[int, ...]]:
    shapes = [(numel,), (1, numel)]
    shapes += [(a, numel // a) for a in (2, 3, 5) if numel % a == 0]
    return shapes + [(3, 0, 2)] if numel == 0 else shapes


@st.composite
def layer_tensors(draw, dtypes=LOW_PRECISION, kinds=LAYER_KINDS, max_log10=None, extra_values=()):
    """One tensor of an odd shape, magnitudes 10**[lo, hi] with both signs, NaN/Inf/zeros injected by kind."""
    dtype = draw(st.sampled_from(dtypes))
    numel = draw(st.sampled_from(SIZES))
    shape = draw(st.sampled_from(_shapes(numel)))
    lo, hi = LOG10_MAGNITUDE[dtype]
    hi = hi if max_log10 is None else min(hi, max_log10)
    finite = st.builds(lambda sign, e: sign * 10.0**e, st.sampled_from((-1.0, 1.0)), st.floats(lo, hi))
    specials = SPECIALS[draw(st.sampled_from(kinds))] + tuple(extra_values)
    element = st.one_of(finite, finite, finite, st.sampled_from(specials)) if specials else finite
    data = draw(st.lists(element, min_size=numel, max_size=numel))
    return torch.tensor(data, dtype=torch.float64).to(dtype).reshape(shape)


def tensor_lists(max_layers=4, **layer_kwargs):
    return st.lists(layer_tensors(**layer_kwargs), min_size=1, max_size=max_layers)


log2_exponents = st.one_of(
    st.just((-48, 15)),
    st.integers(-126, 20).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, min(lo + 90, 127)))),
)

# Ranges whose ends are exact in fp16 and bf16, so data can sit exactly on them; and arbitrary float ranges.
exact_ranges = st.tuples(
    st.sampled_from((-4.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0)),
    st.sampled_from((0.5, 1.0, 2.0, 3.0, 10.0, 1000.0)),
).map(lambda lo_width: (lo_width[0], lo_width[0] + lo_width[1]))
any_ranges = st.tuples(st.floats(-1e4, 1e4), st.floats(-3, 4)).map(lambda p: (p[0], p[0] + 10.0 ** p[1]))


# ---------------------------------------------------------------------------------------------- checks


def _at(stats: TensorStats, name: str, index: int | None) -> float:
    value = getattr(stats, name)
    return (value if index is None else value[index]).item()


def _tolerance(name: str, expected: dict) -> float:
    n, l1 = expected["numel"], expected["l1"]
    if name == "sum":
        return RTOL * l1
    if name == "mean":
        return RTOL * l1 / n
    if name == "std":
        # The 1e-7·rms term matters only for (near-)constant layers, where float64 rounding leaves ~1e-8·rms.
        return RTOL * expected["std"] + 1e-7 * expected["l2"] / math.sqrt(n)
    if name in ("l1", "l2"):
        return RTOL * expected[name]
    return 0.0  # linf, min, max are elements: exact in float32


def assert_fields_match(stats: TensorStats, index: int | None, expected: dict, where: str) -> None:
    for name in oracle.COUNT_FIELDS:
        assert _at(stats, name, index) == expected[name], f"{where}: {name}"
    for name in oracle.FLOAT_FIELDS:
        got, want = _at(stats, name, index), expected[name]
        message = f"{where}: {name} is {got!r}, oracle {want!r}"
        if math.isnan(want) or math.isinf(want):
            assert got == want or (math.isnan(want) and math.isnan(got)), message
        elif name in ("linf", "min", "max"):
            assert got == float(np.float32(want)), message
        else:
            assert abs(got - want) <= _tolerance(name, expected), message


def assert_stats_match_oracle(stats: TensorStats, tensors: list[torch.Tensor]) -> None:
    """Every field of every layer and of the total equals the float64 oracle's."""
    layers = [oracle.values(t) for t in tensors]
    assert len(stats) == len(tensors)
    for i, x in enumerate(layers):
        assert_fields_match(
            stats, i, oracle.stats(x), f"layer {i} ({tensors[i].dtype}, {tuple(tensors[i].shape)})"
        )
    assert_fields_match(stats.total, None, oracle.stats(np.concatenate([np.zeros(0), *layers])), "total")


def expected_hists(tensors: list[torch.Tensor], spec: HistSpec) -> tuple[list[np.ndarray], np.ndarray]:
    """The oracle's per-layer histograms and the histogram of all layers together."""
    layers = [oracle.values(t) for t in tensors]
    together = np.concatenate([np.zeros(0), *layers])
    if spec.kind == "log2":
        return [oracle.log2_hist(x, spec.min_exp, spec.max_exp) for x in layers], oracle.log2_hist(
            together, spec.min_exp, spec.max_exp
        )
    if spec.range is not None:
        return [oracle.linear_hist(x, spec.bins, *spec.range) for x in layers], oracle.linear_hist(
            together, spec.bins, *spec.range
        )
    per_layer = [oracle.linear_hist(x, spec.bins, *oracle.linear_range(x)) for x in layers]
    return per_layer, oracle.linear_hist(together, spec.bins, *oracle.linear_range(together))


def assert_hists_match_oracle(stats: TensorStats, tensors: list[torch.Tensor], spec: HistSpec) -> None:
    per_layer, together = expected_hists(tensors, spec)
    assert stats.hist.dtype == torch.int64 and stats.total.hist.dtype == torch.int64
    assert tuple(stats.hist.shape) == (len(tensors), spec.bins)
    for i, want in enumerate(per_layer):
        np.testing.assert_array_equal(stats.hist[i].numpy(), want, err_msg=f"layer {i} histogram")
    np.testing.assert_array_equal(stats.total.hist.numpy(), together, err_msg="total histogram")


def assert_same_results(got: TensorStats, want: TensorStats) -> None:
    """Two results of the same elements in another order: counts and histograms exact, floats to rounding."""
    for name in FIELDS:
        for a, b in (
            (getattr(got, name), getattr(want, name)),
            (getattr(got.total, name), getattr(want.total, name)),
        ):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True, msg=name)
    if want.hist is not None:
        assert torch.equal(got.hist, want.hist) and torch.equal(got.total.hist, want.total.hist)
        assert torch.equal(got.hist_edges, want.hist_edges)


# ------------------------------------------------------------------------------------------ hypothesis


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=150)
@given(tensors=tensor_lists(dtypes=ALL_DTYPES))
def test_fields_match_float64_oracle(backend, tensors):
    stats = fgs.tensor_stats(tensors, backend=backend)
    assert_stats_match_oracle(stats, tensors)


@settings(max_examples=150)
@given(
    tensors=tensor_lists(dtypes=ALL_DTYPES, max_log10=6.0),
    spec=st.one_of(
        st.just(None),
        log2_exponents.map(lambda e: HistSpec.make("log2", min_exp=e[0], max_exp=e[1])),
        st.tuples(st.integers(1, 9), st.one_of(st.none(), exact_ranges)).map(
            lambda b: HistSpec.make("linear", bins=b[0], range=b[1])
        ),
    ),
    chunk_size=st.sampled_from((1, 2, 7)),
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_chunked_raw_stats_match_float64_oracle(backend, tensors, spec, chunk_size):
    raw = RAW_STATS[backend](tensors, spec, chunk_size=chunk_size)
    stats = TensorStats.from_raw(raw, [str(i) for i in range(len(tensors))], spec)
    assert_stats_match_oracle(stats, tensors)
    if spec is not None:
        assert_hists_match_oracle(stats, tensors, spec)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=100)
@given(tensors=tensor_lists(dtypes=ALL_DTYPES), exps=log2_exponents)
def test_log2_bins_match_frexp_exponents(backend, tensors, exps):
    min_exp, max_exp = exps
    stats = fgs.tensor_stats(tensors, hist="log2", min_exp=min_exp, max_exp=max_exp, backend=backend)
    assert_hists_match_oracle(stats, tensors, HistSpec.make("log2", min_exp=min_exp, max_exp=max_exp))


@settings(max_examples=100)
@given(
    data=st.data(),
    bins=st.integers(1, 70),
    hist_range=st.one_of(exact_ranges, any_ranges),
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_hist_with_range_matches_float32_bin_formula(backend, data, bins, hist_range):
    lo, hi = hist_range
    # The range ends and midpoints are drawn as data too, to cover the edge rules.
    on_edges = (lo, hi, (lo + hi) / 2, lo + (hi - lo) / bins)
    tensors = data.draw(tensor_lists(dtypes=ALL_DTYPES, max_log10=4.5, extra_values=on_edges))
    stats = fgs.tensor_stats(tensors, hist="linear", bins=bins, range=hist_range, backend=backend)
    assert_hists_match_oracle(stats, tensors, HistSpec.make("linear", bins=bins, range=hist_range))


# Magnitudes stay below 2^24 here: constant layers of larger values have their own test (±1 lost in float32).
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=100)
@given(tensors=tensor_lists(dtypes=ALL_DTYPES, max_log10=6.0), bins=st.integers(1, 70))
def test_linear_hist_without_range_matches_float32_bin_formula(backend, tensors, bins):
    stats = fgs.tensor_stats(tensors, hist="linear", bins=bins, backend=backend)
    assert_hists_match_oracle(stats, tensors, HistSpec.make("linear", bins=bins))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=60)
@given(tensors=tensor_lists(dtypes=ALL_DTYPES, max_log10=6.0), bins=st.integers(1, 70))
def test_linear_hist_edges_span_each_layer_finite_range(backend, tensors, bins):
    stats = fgs.tensor_stats(tensors, hist="linear", bins=bins, backend=backend)
    assert stats.hist_edges.dtype == torch.float32
    assert tuple(stats.hist_edges.shape) == (len(tensors), bins + 1)
    layers = [oracle.values(t) for t in tensors]
    for edges, x in [
        *zip(stats.hist_edges, layers, strict=True),
        (stats.total.hist_edges, np.concatenate(layers)),
    ]:
        lo, hi = oracle.linear_range(x)
        assert edges[0].item() == lo
        np.testing.assert_allclose(
            edges.numpy(), np.linspace(lo, hi, bins + 1), rtol=0, atol=1e-6 * (hi - lo)
        )


@settings(max_examples=80)
@given(
    tensors=tensor_lists(dtypes=(torch.float32,), kinds=("finite", "zeros"), max_log10=6.0),
    bins=st.integers(1, 70),
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_hist_without_range_equals_torch_histc(backend, tensors, bins):
    stats = fgs.tensor_stats(tensors, hist="linear", bins=bins, backend=backend)
    for i, t in enumerate(tensors):
        assert torch.equal(stats.hist[i], torch.histc(t, bins).long()), f"layer {i}"
    assert torch.equal(
        stats.total.hist, torch.histc(torch.cat([t.reshape(-1) for t in tensors]), bins).long()
    )


@settings(max_examples=80)
@given(
    data=st.data(),
    bins=st.integers(1, 70),
    hist_range=st.one_of(exact_ranges, any_ranges),
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_hist_with_range_equals_torch_histc(backend, data, bins, hist_range):
    lo, hi = hist_range
    tensors = data.draw(
        tensor_lists(dtypes=(torch.float32,), max_log10=4.5, extra_values=(lo, hi, (lo + hi) / 2))
    )
    stats = fgs.tensor_stats(tensors, hist="linear", bins=bins, range=hist_range, backend=backend)
    for i, t in enumerate(tensors):
        assert torch.equal(stats.hist[i], torch.histc(t, bins, min=lo, max=hi).long()), f"layer {i}"
    assert torch.equal(stats.total.hist, stats.hist.sum(0))


# -------------------------------------------------------------------------------------- explicit cases


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fields_have_contract_dtypes_and_shapes(backend):
    stats = fgs.tensor_stats(
        [torch.randn(4, 3), torch.randn(5).bfloat16()], names=["a", "b"], backend=backend
    )
    assert stats.names == ["a", "b"] and len(stats) == 2
    for name in FIELDS:
        value, total = getattr(stats, name), getattr(stats.total, name)
        want = torch.int64 if name in oracle.COUNT_FIELDS else torch.float32
        assert value.dtype == want and total.dtype == want, name
        assert tuple(value.shape) == (2,) and total.dim() == 0, name
        assert value.device.type == "cpu", name
    assert stats.hist is None and stats.hist_edges is None and stats.total.hist is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_tensor_keeps_its_slot_with_zero_sums_and_nan_moments(backend):
    full = torch.tensor([1.0, -2.0, 0.0])
    tensors = [torch.empty(0), full, torch.empty(3, 0, 2, dtype=torch.bfloat16)]
    stats = fgs.tensor_stats(tensors, hist="log2", backend=backend)
    for i in (0, 2):
        assert stats.numel[i] == 0 and stats.zeros[i] == 0 and stats.nonfinite[i] == 0
        for name in ("sum", "l1", "l2", "linf"):
            assert getattr(stats, name)[i].item() == 0.0, name
        for name in ("mean", "std", "min", "max"):
            assert math.isnan(getattr(stats, name)[i].item()), name
        assert stats.hist[i].sum() == 0
    assert stats.numel[1] == 3 and stats.l1[1] == 3.0 and stats.max[1] == 1.0 and stats.min[1] == -2.0
    assert_stats_match_oracle(stats, tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hist", [None, "log2", "linear"])
def test_empty_list_gives_zero_layers(backend, hist):
    stats = fgs.tensor_stats([], hist=hist, bins=8, backend=backend)
    assert len(stats) == 0 and stats.names == []
    for name in FIELDS:
        assert tuple(getattr(stats, name).shape) == (0,), name
    total = stats.total
    assert total.numel.item() == 0 and total.zeros.item() == 0 and total.nonfinite.item() == 0
    assert total.sum.item() == 0.0 and total.l1.item() == 0.0 and total.l2.item() == 0.0
    assert total.linf.item() == 0.0
    assert all(math.isnan(getattr(total, name).item()) for name in ("mean", "std", "min", "max"))
    if hist is not None:
        bins = 64 if hist == "log2" else 8
        assert tuple(stats.hist.shape) == (0, bins)
        assert torch.equal(total.hist, torch.zeros(bins, dtype=torch.int64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_all_nan_layer_makes_float_fields_nan_and_counts_them(backend, dtype):
    tensors = [torch.full((5,), NAN, dtype=dtype), torch.ones(2, dtype=dtype)]
    for hist in ("log2", "linear"):
        stats = fgs.tensor_stats(tensors, hist=hist, bins=4, backend=backend)
        assert stats.nonfinite[0] == 5 and stats.zeros[0] == 0 and stats.numel[0] == 5
        for name in oracle.FLOAT_FIELDS:
            assert math.isnan(getattr(stats, name)[0].item()), name
            assert math.isnan(getattr(stats.total, name).item()), f"total {name}"
        assert stats.hist[0].sum() == 0 and stats.total.hist.sum() == 2
        assert_stats_match_oracle(stats, tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pos_and_neg_inf_in_one_layer_make_sum_nan_and_norms_inf(backend):
    stats = fgs.tensor_stats([torch.tensor([1.0, INF, -INF, 0.0])], hist="log2", backend=backend)
    assert all(math.isnan(getattr(stats, name)[0].item()) for name in ("sum", "mean", "std"))
    assert stats.l1[0] == INF and stats.l2[0] == INF and stats.linf[0] == INF
    assert stats.min[0] == -INF and stats.max[0] == INF
    assert stats.nonfinite[0] == 2 and stats.zeros[0] == 1
    assert stats.hist[0].sum() == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_signed_inf_makes_sum_inf_and_std_nan(backend):
    stats = fgs.tensor_stats([torch.tensor([1.0, -INF, 2.0])], backend=backend)
    assert stats.sum[0] == -INF and stats.mean[0] == -INF and math.isnan(stats.std[0].item())
    assert stats.l1[0] == INF and stats.l2[0] == INF and stats.linf[0] == INF
    assert stats.min[0] == -INF and stats.max[0] == 2.0 and stats.nonfinite[0] == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_beside_inf_makes_norms_nan(backend):
    stats = fgs.tensor_stats([torch.tensor([INF, NAN, 1.0])], backend=backend)
    assert all(math.isnan(getattr(stats, name)[0].item()) for name in oracle.FLOAT_FIELDS)
    assert stats.nonfinite[0] == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("offset", [1.0, 100.0])
def test_std_accurate_when_mean_dominates(backend, offset):
    generator = torch.Generator().manual_seed(0)
    x = offset + 1e-3 * torch.randn(30011, generator=generator)
    want = oracle.stats(oracle.values(x))
    for chunk_size in (torch_backend.DEFAULT_CHUNK_SIZE, 1000):
        stats = TensorStats.from_raw(RAW_STATS[backend]([x], chunk_size=chunk_size), ["x"], None)
        assert abs(stats.std[0].item() - want["std"]) <= RTOL * want["std"]
        assert abs(stats.mean[0].item() - want["mean"]) <= RTOL * want["mean"]


def test_std_across_chunks_accurate_when_mean_dominates_by_1e7():
    # chunk means must be exact to ~std for Chan's merge: a float32 mean alone would be off by 1e4·6e-8 ≫ std
    generator = torch.Generator().manual_seed(2)
    x = 1e4 + 1e-3 * torch.randn(100_003, generator=generator)
    want = oracle.stats(oracle.values(x))["std"]
    stats = TensorStats.from_raw(RAW_STATS["torch"]([x], chunk_size=4096), ["x"], None)
    assert abs(stats.std[0].item() - want) <= 1e-5 * want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log2_hist_of_a_tensor_counted_in_two_halves_matches_the_oracle(dtype):
    # more than SPLIT_COUNT elements: their exponent fields are counted in two halves, on two threads
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3 * torch_backend.SPLIT_COUNT + 1, generator=generator, dtype=dtype) * 1e-3
    x[::5], x[1::97], x[2::89], x[-1] = 0.0, 1e-40, NAN, -INF
    spec = HistSpec.make("log2")
    stats = fgs.tensor_stats([x], hist="log2", backend="torch")
    assert_hists_match_oracle(stats, [x], spec)
    assert_stats_match_oracle(stats, [x])


def _dense_views() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(11, 7, 5, generator=generator)
    base[3, 2, 1], base[0, 0, 0] = 0.0, 4096.0
    return {
        "transposed": base[:, :, 0].t(),
        "permuted": base.permute(2, 0, 1),
        "transposed_row_slice": base[2:9, :, 1].t(),
        "strided_slice": base[:, ::2, 0],
        "strided_3d_slice": base[1::3, :, ::2],
        "expanded": base[0, 0, :].expand(4, 5),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hist", [None, "log2", "linear"])
@pytest.mark.parametrize("view", list(_dense_views()))
def test_non_contiguous_tensor_matches_its_contiguous_copy(backend, view, hist):
    x = _dense_views()[view]
    assert not x.is_contiguous()
    copy = x.contiguous()
    stats = fgs.tensor_stats([x, x.half()], hist=hist, bins=9, backend=backend)
    assert_same_results(stats, fgs.tensor_stats([copy, copy.half()], hist=hist, bins=9, backend=backend))
    spec = HistSpec.make(hist, bins=9)
    chunked = TensorStats.from_raw(
        RAW_STATS[backend]([x, x.half()], spec, chunk_size=7), ["0", "1"], spec
    )
    assert_same_results(chunked, stats)
    assert_stats_match_oracle(stats, [copy, copy.half()])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_log2_hist_edges_are_powers_of_two(backend):
    stats = fgs.tensor_stats([torch.ones(3)], hist="log2", min_exp=-3, max_exp=2, backend=backend)
    assert stats.hist_edges.tolist() == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert torch.equal(stats.total.hist_edges, stats.hist_edges)
    default = fgs.tensor_stats([torch.ones(3)], hist="log2", backend=backend)
    want = 2.0 ** np.arange(-48, 17, dtype=np.float64)
    assert tuple(default.hist_edges.shape) == (65,) and default.hist.shape[-1] == 64
    np.testing.assert_array_equal(default.hist_edges.double().numpy(), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_log2_bins_at_power_of_two_boundaries_and_extremes(backend):
    below_one = np.nextafter(np.float32(1.0), np.float32(0.0))
    values = [1.0, float(below_one), 2.0**-20, -(2.0**10), 1e-45, 1e-40, 2.0**-126, 3e38, -0.0, 6.0]
    x = torch.tensor(values, dtype=torch.float32)
    stats = fgs.tensor_stats([x], hist="log2", min_exp=-126, max_exp=127, backend=backend)
    counts = dict(enumerate(stats.hist[0].tolist()))
    # bins are exponent + 126: 1 -> 0, just below 1 -> -1, subnormals clamp to -126, 3e38 -> 127, 6 -> 2.
    want = {126: 1, 125: 1, 106: 1, 136: 1, 0: 3, 253: 1, 128: 1}
    assert {b: c for b, c in counts.items() if c} == want
    clamped = fgs.tensor_stats([x], hist="log2", min_exp=-4, max_exp=4, backend=backend)
    assert clamped.hist[0].tolist() == [4, 0, 0, 1, 1, 0, 1, 0, 2]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_hist_edge_rules(backend):
    x = torch.tensor([0.0, 0.25, 0.5, 0.999, 1.0, -0.001, 1.001, NAN, INF])
    stats = fgs.tensor_stats([x], hist="linear", bins=4, range=(0.0, 1.0), backend=backend)
    assert stats.hist[0].tolist() == [
        1,
        1,
        1,
        2,
    ]  # 1.0 == hi goes in the last bin; outside and non-finite dropped
    assert stats.hist_edges[0].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [1.0, -3.0, 1e7, 3e7, 1e15, -2.5e10])
def test_linear_hist_of_a_constant_layer_matches_torch_histc(backend, value):
    x = torch.full((3,), value)
    stats = fgs.tensor_stats([x, torch.tensor([NAN])], hist="linear", bins=5, backend=backend)
    assert torch.equal(stats.hist[0], torch.histc(x, 5).long())
    assert stats.hist[0].sum() == 3 and stats.total.hist.sum() == 3
    assert stats.hist[1].sum() == 0 and stats.hist_edges[1, 0] == -1.0 and stats.hist_edges[1, -1] == 1.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_hist_counts_float64_values_whose_range_collapses_in_float32(backend):
    # Distinct float64 min and max that round to one float32 value: every finite value is still counted once.
    x = torch.tensor([0.1, 0.1 + 1e-12], dtype=torch.float64)
    stats = fgs.tensor_stats([x], hist="linear", bins=4, backend=backend)
    assert stats.hist[0].sum() == 2 and stats.total.hist.sum() == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_to_dict_holds_plain_python_values(backend):
    tensors = [torch.tensor([1.0, NAN]), torch.randn(3, 2), torch.empty(0, dtype=torch.float16)]
    result = fgs.tensor_stats(tensors, names=["w", "b", "e"], hist="log2", backend=backend).to_dict()
    assert set(result) == {"layers", "total"} and list(result["layers"]) == ["w", "b", "e"]
    for values in [*result["layers"].values(), result["total"]]:
        assert set(values) == {*FIELDS, "mean_abs", "hist", "hist_edges", "hist_sum", "hist_sum_squares",
                               "hist_kind"}
        for name in FIELDS:
            want = int if name in oracle.COUNT_FIELDS else float
            assert type(values[name]) is want, name
        assert type(values["hist"]) is list and all(type(c) is int for c in values["hist"])
        assert type(values["hist_edges"]) is list and all(type(e) is float for e in values["hist_edges"])
    assert result["layers"]["b"]["numel"] == 6 and math.isnan(result["layers"]["w"]["sum"])
    assert result["total"]["numel"] == 8 and result["total"]["nonfinite"] == 1
    json.dumps(result)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_table_lists_every_layer_and_a_total_line(backend):
    names = ["embed.weight", "blocks.0.attn.w_q", "head.bias"]
    tensors = [torch.randn(4, 3), torch.tensor([NAN, 1.0]), torch.empty(0)]
    lines = fgs.tensor_stats(tensors, names=names, backend=backend).table().splitlines()
    assert len(lines) == 1 + len(names) + 1
    for name, line in zip(names, lines[1:-1], strict=True):
        assert line.split()[0] == name
    assert lines[-1].split()[0] == "total"
    assert lines[-1].split()[1] == "14"  # total numel
