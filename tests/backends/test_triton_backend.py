"""The Triton backend against the torch backend (the reference).

Without CUDA the kernels run in Triton's numpy interpreter (see conftest.py), so the data stay small and the
launches use tiny chunks (32 elements, blocks of 16) that put several chunks and tensors in one launch. Every
Triton call runs with ``torch.empty`` poisoned (NaN for floats, the most negative integer for ints), so a row
or partial the kernels fail to write shows up in the comparison.
"""

from __future__ import annotations

import functools
import math
import sys

import numpy as np
import pytest
import torch
from helpers import SPECS, CountingKernel, raw_stats
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgradstats as fgs
from fastgradstats.hist import HistSpec
from fastgradstats.rows import FMAX, NEG_FMIN, RawStats, derive, empty_rows

kernel_module = pytest.importorskip("fastgradstats.kernels.tensor_stats")
# The interpreter evaluates inf - inf and overflowing products of the NaN/Inf cases with numpy, which warns.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK, BLOCK = 32, 16
# The kernels cast every input dtype to float32 right after the load and accumulate in float32 within a chunk
# (float64 across chunks), so one relative tolerance holds for fp32/bf16/fp16; float64 inputs are rounded to
# float32 first (6e-8 relative), well inside it.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-5}
COUNT_FIELDS = ("numel", "zeros", "nonfinite")
EXACT_FIELDS = ("min", "max", "linf")  # maxima of float32-cast values: no rounding anywhere
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NAN, INF = float("nan"), float("inf")


# Sizes around the 32-element chunk and the 16-element block, with empty tensors between non-empty ones.
SIZES = (0, 1, 15, 16, 17, 33, 0, 100, 257)
# (position, value) written into the layer of that size: specials on chunk and block boundaries, a NaN and an
# Inf as the first element of a chunk (where the kernel picks its shift), zeros of both signs.
SPECIALS = {
    15: [(7, INF)],
    17: [(0, 0.0), (16, -0.0)],
    33: [(31, INF), (32, -INF)],
    100: [(64, NAN), (5, 0.0)],
    257: [(0, 0.0), (128, 0.0), (256, 0.0)],
}


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, CountingKernel]:
    """Counters of the stage-1 and stage-2 kernels, patched in every kernels module that launches them."""
    counters = {}
    for name in ("_chunk_kernel", "_merge_kernel"):
        homes = [module for module_name, module in list(sys.modules.items())
                 if module_name.startswith("fastgradstats.kernels") and hasattr(module, name)]
        assert homes, f"no kernels module defines {name}"
        counters[name] = CountingKernel(getattr(homes[0], name))
        for module in homes:
            monkeypatch.setattr(module, name, counters[name])
    return counters


def triton_raw(tensors, spec, chunk_size=CHUNK, block_size=BLOCK) -> RawStats:
    return raw_stats("triton", tensors, spec, chunk_size=chunk_size, block_size=block_size)


def make_layer(size: int, dtype: torch.dtype, seed: int, specials=()) -> torch.Tensor:
    """randn scaled by a per-layer power of ten (so log2 bins spread), with (position, value) specials."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (seed % 5 - 2)
    x = torch.randn(size, generator=g, dtype=torch.float64) * scale
    for position, value in specials:
        x[position] = value
    return x.to(dtype).to(DEVICE)


def make_layers(dtypes, sizes=SIZES, seed=0) -> list[torch.Tensor]:
    return [
        make_layer(size, dtypes[i % len(dtypes)], seed + i, SPECIALS.get(size, ()))
        for i, size in enumerate(sizes)
    ]


def assert_close_per_layer(name: str, got: torch.Tensor, want: torch.Tensor, atol) -> None:
    """NaN where want is NaN, non-finite values equal, finite ones within atol (a scalar or per layer)."""
    got, want = got.double().cpu(), want.double().cpu()
    atol = torch.as_tensor(atol, dtype=torch.float64).cpu().expand_as(want)
    assert torch.equal(got.isnan(), want.isnan()), (f"{name}: NaN at {got.isnan().tolist()}, "
                                                    f"want {want.isnan().tolist()}")
    same = (got == want) | want.isnan()
    err = (got - want).abs()
    bad = ~same & (~want.isfinite() | ~(err <= atol))
    layers = bad.nonzero().flatten().tolist()
    assert not layers, (f"{name}: layers {layers} got {got[bad].tolist()} want {want[bad].tolist()} "
                        f"atol {atol[bad].tolist()}")


def assert_rows_match(got_rows: torch.Tensor, want_rows: torch.Tensor, rtol: float = 1e-5) -> None:
    """Derived fields of the Triton rows against the reference rows, with tolerances for fp32 accumulation."""
    got, want = derive(got_rows), derive(want_rows)
    for name in COUNT_FIELDS:
        assert torch.equal(got[name].cpu(), want[name].cpu()), (f"{name}: {got[name].tolist()} "
                                                                f"!= {want[name].tolist()}")
    for name in EXACT_FIELDS:
        assert_close_per_layer(name, got[name], want[name], 0.0)
    n = want["numel"].double().clamp_min(1).cpu()
    l1, l2 = want["l1"].double().cpu(), want["l2"].double().cpu()
    assert_close_per_layer("sum", got["sum"], want["sum"], rtol * l1)
    assert_close_per_layer("mean", got["mean"], want["mean"], rtol * l1 / n)
    assert_close_per_layer("l1", got["l1"], want["l1"], rtol * l1)
    assert_close_per_layer("l2", got["l2"], want["l2"], rtol * l2)
    # std through the variance: Σx²/n - mean² inherits the sums' error relative to Σx²/n, not to std².
    mean = want["mean"].double().abs().cpu()
    var_atol = 2 * rtol * (l2 * l2 / n + mean * l1 / n) + 1e-30
    assert_close_per_layer("var", got["std"].double() ** 2, want["std"].double() ** 2, var_atol)
    # The finite ranges feed the linear histogram's edges: equal once rounded to float32 like the edges.
    for field in (FMAX, NEG_FMIN):
        assert torch.equal(got_rows[:, field].float().cpu(),
                           want_rows[:, field].float().cpu()), f"raw field {field}"


def assert_raw_match(got: RawStats, want: RawStats, rtol: float = 1e-5) -> None:
    assert got.rows.shape == want.rows.shape
    assert_rows_match(got.rows, want.rows, rtol)
    for name in ("hist", "total_hist"):
        got_hist, want_hist = getattr(got, name), getattr(want, name)
        assert (got_hist is None) == (want_hist is None), name
        if want_hist is not None:
            assert got_hist.dtype == torch.int64, name
            assert torch.equal(got_hist.cpu(), want_hist.cpu()), (f"{name}:\n{got_hist.tolist()}\n"
                                                                  f"!=\n{want_hist.tolist()}")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.int64)


# ------------------------------------------------------------------------------ raw rows and histograms


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("dtype", DTYPES + ("mixed",), ids=str)
def test_raw_stats_match_torch_backend(spec_name, dtype, poison):
    spec = SPECS[spec_name]
    dtypes = DTYPES if dtype == "mixed" else (dtype,)
    tensors = make_layers(dtypes)
    want = raw_stats("torch", tensors, spec)
    got = poison(triton_raw, tensors, spec)
    assert len(poison.allocations) >= 2  # the rows and the chunk partials were poisoned
    assert_raw_match(got, want, max(RTOL[d] for d in dtypes))


def test_sizes_straddling_chunk_boundaries_at_every_alignment(poison):
    # In fp16 a view starting at element h has its first element h elements into a 16-byte line, so the chunk
    # boundaries (32 elements from the line) fall at 32 - h, 64 - h, ... of the tensor.
    spec = HistSpec.make("log2", min_exp=-6, max_exp=4)
    base = torch.randn(600, generator=torch.Generator().manual_seed(1)).to(torch.float16).to(DEVICE)
    tensors, start = [], 0
    for head in (0, 1, 3, 7):
        for size in (CHUNK - head - 1, CHUNK - head, CHUNK - head + 1, 2 * CHUNK - head + 1):
            start += (head - start) % 8  # the view's first element sits `head` elements into a 16-byte line
            tensors.append(base[start:start + size])
            start += size
    assert {t.data_ptr() % 16 for t in tensors} == {0, 2, 6, 14}
    want = raw_stats("torch", tensors, spec)
    assert_raw_match(poison(triton_raw, tensors, spec), want)


@pytest.mark.parametrize("spec_name", ["log2", "linear"])
def test_views_not_16_byte_aligned(spec_name, poison):
    spec = SPECS[spec_name]
    g = torch.Generator().manual_seed(2)
    tensors = [
        torch.randn(64, generator=g).to(torch.float16).to(DEVICE)[3:40],
        torch.randn(64, generator=g).to(torch.bfloat16).to(DEVICE)[5:62],
        torch.randn(80, generator=g).to(DEVICE)[1:78],
        torch.randn(80, generator=g).to(DEVICE)[3:4],
        torch.randn(50, generator=g, dtype=torch.float64).to(DEVICE)[1:48],
        torch.randn(64, generator=g).to(torch.float16).to(DEVICE)[7:7],
    ]
    assert all(t.data_ptr() % 16 for t in tensors[:-1])
    want = raw_stats("torch", tensors, spec)
    assert_raw_match(poison(triton_raw, tensors, spec), want)


@pytest.mark.parametrize("spec_name", ["log2", "linear"])
def test_empty_tensors_keep_their_slot(spec_name, poison):
    spec = SPECS[spec_name]
    a, b, c = (make_layer(size, torch.float32, seed) for seed, size in enumerate((40, 17, 70)))
    d = make_layer(33, torch.bfloat16, 3)
    empty32, empty16 = torch.empty(0, device=DEVICE), torch.empty(0, dtype=torch.float16, device=DEVICE)
    with_empties = [empty32, a, empty32, b, empty16, d, c, empty32]
    kept = [1, 3, 5, 6]
    got = poison(triton_raw, with_empties, spec)
    want = raw_stats("torch", with_empties, spec)
    assert_raw_match(got, want)
    # The non-empty layers' rows do not move or change when empty tensors sit between them.
    alone = triton_raw([a, b, d, c], spec)
    assert torch.equal(bits(got.rows[kept]), bits(alone.rows))
    assert torch.equal(got.hist[kept].cpu(), alone.hist.cpu())
    empties = [i for i in range(len(with_empties)) if i not in kept]
    assert torch.equal(got.rows[empties].cpu(), empty_rows(len(empties)))
    assert not got.hist[empties].any()


def test_all_layers_empty(poison):
    tensors = [torch.empty(0, device=DEVICE), torch.empty(0, 3, dtype=torch.bfloat16, device=DEVICE)]
    for spec in (None, SPECS["linear"]):
        got = poison(triton_raw, tensors, spec)
        assert_raw_match(got, raw_stats("torch", tensors, spec))
        assert torch.equal(got.rows.cpu(), empty_rows(2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_and_zero_layers(dtype, poison):
    layers = [
        [NAN] * 20,
        [INF] * 20,
        [-INF] * 3,
        [INF, -INF] * 9,
        [0.0] * 35,
        [-0.0] * 5,
        [NAN, 1.0, -2.0, 0.0] * 10,  # NaN as the first element of every chunk
        [INF, 1.0, -2.0] * 11,  # +Inf as the first element of the first chunk
        [-3.0, INF, 0.5] * 12,  # a finite negative shift meeting +Inf
        [2.0, -INF, 0.5] * 12,
        [1.0, NAN, INF, -INF, 0.0, -0.0, 7.5],
        [5.0] * 33,  # min == max: the linear range widens to (4, 6)
    ]
    tensors = [torch.tensor(values, dtype=dtype, device=DEVICE) for values in layers]
    for spec in (None, SPECS["log2"], SPECS["linear"]):
        want = raw_stats("torch", tensors, spec)
        assert_raw_match(poison(triton_raw, tensors, spec), want)


def test_log2_bins_clamp_subnormals_and_large_values(poison):
    # Magnitudes stay below ~1e18 so that Σx² fits in the kernels' float32 accumulators.
    spec = SPECS["log2_narrow"]
    tensors = [
        torch.tensor([1e-40, -1e-42, 1e-30, 1e-6, 3e-4, 0.5, 1.0, 7.9, 8.0, 1e3, -1e15, 3e17] * 3,
                     device=DEVICE),
        torch.tensor([6e-8, -1e-5, 1e-3, 65504.0, 0.25] * 4, dtype=torch.float16, device=DEVICE),
        torch.tensor([1e-38, 1e17, -2.0**-10, 2.0**3] * 5, dtype=torch.bfloat16, device=DEVICE),
    ]
    want = raw_stats("torch", tensors, spec)
    assert_raw_match(poison(triton_raw, tensors, spec), want)


def test_linear_bins_follow_histc_edge_rules(poison):
    spec = HistSpec.make("linear", bins=8, range=(-1.0, 1.0))
    edges = torch.linspace(-1, 1, 17)  # every bin edge and midpoint, hi itself included
    outside = torch.tensor([-1.5, 1.0000001, 3.0, -1.0000001, NAN, INF])
    x = torch.cat([edges, outside, edges.flip(0)]).to(DEVICE)
    got = poison(triton_raw, [x], spec)
    assert_raw_match(got, raw_stats("torch", [x], spec))
    finite = x[x.isfinite()].cpu()
    assert torch.equal(got.hist[0].cpu(), torch.histc(finite, bins=8, min=-1, max=1).to(torch.int64))


def _edge_neighbourhood(lo: float, hi: float, bins: int) -> torch.Tensor:
    """float32 values at, just below and just above every bin edge of (lo, hi) (by float64 arithmetic), where
    a quotient off by one ulp would change the bin."""
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64).to(torch.float32)
    up = torch.nextafter(edges, torch.full_like(edges, math.inf))
    down = torch.nextafter(edges, torch.full_like(edges, -math.inf))
    return torch.cat([edges, up, down, torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)])


@pytest.mark.parametrize("bins", [3, 7, 10, 64, 100])
@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (0.1, 0.7), (-3e-3, 1e-3), (2.0**-130, 2.0**-128),
                                    (-1e38, 3e38), (1000.0, 1000.5)])
def test_linear_bins_equal_division_next_to_every_edge(poison, bins, bounds):
    """The kernels divide by multiplying with the range's reciprocal and one exact fma correction; the bins
    must stay those of the correctly rounded division (torch backend), for fixed and data ranges, power-of-two
    and other bin counts, subnormal (scaled up) and huge (scaled down) ranges."""
    tensors = [_edge_neighbourhood(*bounds, bins).to(DEVICE)]
    tensors.append(tensors[0].flip(0)[5:])
    for spec in (HistSpec.make("linear", bins=bins, range=bounds), HistSpec.make("linear", bins=bins)):
        got, want = poison(triton_raw, tensors, spec), raw_stats("torch", tensors, spec)
        assert torch.equal(got.hist.cpu(), want.hist.cpu()), spec  # (sums of squares of 1e-39 underflow)
        assert (got.total_hist is None) == (want.total_hist is None)
        if want.total_hist is not None:
            assert torch.equal(got.total_hist.cpu(), want.total_hist.cpu()), spec


def test_linear_histogram_with_one_bin(poison):
    x = torch.randn(45, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for spec in (HistSpec.make("linear", bins=1), HistSpec.make("linear", bins=1, range=(-0.5, 0.5))):
        assert_raw_match(poison(triton_raw, [x, x[:3]], spec), raw_stats("torch", [x, x[:3]], spec))


@settings(max_examples=8)
@given(
    layers=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 2, 15, 16, 17, 31, 32, 33, 47, 65, 97]),
            st.sampled_from(DTYPES),
            st.integers(0, 7),
        ),
        min_size=1,
        max_size=5,
    ),
    spec_name=st.sampled_from(list(SPECS)),
    seed=st.integers(0, 2**16),
)
def test_random_layer_lists_match_torch_backend(layers, spec_name, seed):
    tensors = []
    for i, (size, dtype, offset) in enumerate(layers):
        base = make_layer(size + offset, dtype, seed + i)
        tensors.append(base[offset:])
    spec = SPECS[spec_name]
    assert_raw_match(triton_raw(tensors, spec), raw_stats("torch", tensors, spec))


# ----------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size, block_size", [(CHUNK, BLOCK), (1 << 16, 2048)])
def test_std_is_accurate_when_mean_dominates(dtype, chunk_size, block_size, poison):
    g = torch.Generator().manual_seed(5)
    x = (1 + 1e-3 * torch.randn(301, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
    got = derive(poison(triton_raw, [x], None, chunk_size, block_size).rows)
    exact = x.cpu().double().numpy()
    assert float(got["std"][0]) == pytest.approx(np.std(exact), rel=1e-4)
    assert float(got["mean"][0]) == pytest.approx(np.mean(exact), rel=1e-6)


def test_sums_accurate_when_a_chunk_starts_with_an_outlier(poison):
    # The default launch configuration; the chunk's first element (100) is far larger than the others (~1e-3).
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1e-3
    x[0] = 100.0
    x = x.to(DEVICE)
    got = poison(functools.partial(raw_stats, "triton"), [x], None)
    assert_rows_match(got.rows, raw_stats("torch", [x]).rows)


# ----------------------------------------------------------------------------------------- launch counts


def launch_count(launches) -> dict[str, int]:
    return {name: counter.launches for name, counter in launches.items()}


def chunk_passes(spec: HistSpec | None) -> int:
    """Stage-1 launches per dtype group: two only for a linear histogram over per-layer data ranges."""
    return 2 if spec is not None and spec.kind == "linear" and spec.range is None else 1


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_launches_per_dtype_group_do_not_grow_with_layers(spec_name, launches):
    spec = SPECS[spec_name]
    chunk_launches = chunk_passes(spec)
    sizes = [(7 * i) % 23 for i in range(40)]  # 40 layers, a few of them empty
    tensors = [make_layer(size, torch.float32, i) for i, size in enumerate(sizes)]
    got = triton_raw(tensors, spec)
    assert launch_count(launches) == {"_chunk_kernel": chunk_launches, "_merge_kernel": 1}
    assert_raw_match(got, raw_stats("torch", tensors, spec))


@pytest.mark.parametrize("spec_name", ["none", "linear"])
def test_launches_for_several_dtype_groups(spec_name, launches):
    spec = SPECS[spec_name]
    chunk_launches = chunk_passes(spec)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    tensors = [make_layer(5 + 3 * i, dtypes[i % 3], i) for i in range(12)]
    triton_raw(tensors, spec)
    assert launch_count(launches) == {"_chunk_kernel": 3 * chunk_launches, "_merge_kernel": 3}


@pytest.mark.parametrize("spec_name", ["none", "log2", "linear"])
def test_group_of_empty_tensors_launches_only_the_merge(spec_name, launches):
    spec = SPECS[spec_name]
    chunk_launches = chunk_passes(spec)
    tensors = [
        make_layer(20, torch.float32, 0),
        torch.empty(0, dtype=torch.float16, device=DEVICE),
        make_layer(9, torch.float32, 1),
        torch.empty(0, dtype=torch.float16, device=DEVICE),
    ]
    got = triton_raw(tensors, spec)
    assert launch_count(launches) == {"_chunk_kernel": chunk_launches, "_merge_kernel": 2}
    assert_raw_match(got, raw_stats("torch", tensors, spec))


@pytest.mark.parametrize("spec_name", ["none", "log2", "linear", "linear_range"])
def test_the_default_configuration_matches_torch_backend(spec_name, poison):
    """The tile and chunk sizes the package launches (not the tests' tiny ones), at an unaligned start; the
    histogram-only pass of a data-range linear histogram has tiles of its own."""
    tensors = [make_layer(200_003, dtype, seed, ((7, 0.0), (150_000, float("inf"))))[1:]
               for seed, dtype in enumerate((torch.float32, torch.bfloat16))]
    got = poison(functools.partial(raw_stats, "triton"), tensors, SPECS[spec_name])
    want = raw_stats("torch", [t.cpu() for t in tensors], SPECS[spec_name])
    assert_rows_match(got.rows, want.rows)
    for field in ("hist", "total_hist"):
        if getattr(want, field) is not None:
            assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), field


# ------------------------------------------------------------------------------------------ determinism


def test_two_runs_are_bit_identical():
    tensors = make_layers(DTYPES)
    first, second = triton_raw(tensors, SPECS["linear"]), triton_raw(tensors, SPECS["linear"])
    assert torch.equal(bits(first.rows), bits(second.rows))
    assert torch.equal(first.hist, second.hist)
    assert torch.equal(first.total_hist, second.total_hist)


# -------------------------------------------------------------------------------------------- public API


def assert_stats_match(got: fgs.TensorStats, want: fgs.TensorStats) -> None:
    assert got.names == want.names
    assert_rows_match(got.rows, want.rows)
    assert_rows_match(got.total.rows[None], want.total.rows[None])
    for name in ("hist", "hist_edges"):
        for got_part, want_part in ((got, want), (got.total, want.total)):
            g, w = getattr(got_part, name), getattr(want_part, name)
            assert (g is None) == (w is None), name
            if w is not None:
                assert torch.equal(g.cpu(), w.cpu()), name


def small_model() -> torch.nn.Module:
    torch.manual_seed(6)
    model = torch.nn.Sequential(
        torch.nn.Linear(13, 9), torch.nn.LayerNorm(9), torch.nn.GELU(), torch.nn.Linear(9, 5, bias=False)
    ).to(DEVICE)
    model(torch.randn(4, 13, device=DEVICE)).square().mean().backward()
    return model


@pytest.mark.parametrize("hist", [None, "log2", "linear"])
def test_grad_stats_of_a_module_match_torch_backend(hist, poison):
    model = small_model()
    got = poison(fgs.grad_stats, model, hist=hist, bins=11, backend="triton")
    want = fgs.grad_stats(model, hist=hist, bins=11, backend="torch")
    assert got.names == [name for name, _ in model.named_parameters()]
    assert_stats_match(got, want)


def test_param_stats_of_a_module_match_torch_backend(poison):
    # LayerNorm's weight is all ones and its bias all zeros: std 0, and per-layer linear ranges that widen.
    model = small_model()
    got = poison(fgs.param_stats, model, hist="linear", bins=6, backend="triton")
    assert_stats_match(got, fgs.param_stats(model, hist="linear", bins=6, backend="torch"))
    assert float(got.std[2]) == 0.0


def test_non_contiguous_tensors_through_the_public_api(poison):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(7, 13, generator=g).to(DEVICE)
    cube = torch.randn(3, 5, 6, generator=g).to(torch.bfloat16).to(DEVICE)
    half = torch.randn(3 + 5 * 9, generator=g).to(torch.float16).to(DEVICE)
    image = torch.randn(2, 3, 4, 5, generator=g).to(DEVICE)
    tensors = [
        weight.t(),  # dense, read in place
        cube.permute(2, 0, 1),  # dense, read in place
        half[3:].view(5, 9).t(),  # dense, not 16-byte aligned
        image.to(memory_format=torch.channels_last),  # dense
        weight[:, ::2],  # gaps: copied
        torch.randn(1, 9, generator=g).to(DEVICE).expand(4, 9),  # overlaps: copied
        torch.empty(3, 0, device=DEVICE).t(),
        weight[1:, 2:],  # a sub-block with gaps
    ]
    assert not any(t.is_contiguous() for t in tensors[:6])
    for hist in (None, "log2", "linear"):
        got = poison(fgs.tensor_stats, tensors, hist=hist, bins=9, backend="triton")
        want = fgs.tensor_stats(tensors, hist=hist, bins=9, backend="torch")
        assert got.numel.tolist() == [t.numel() for t in tensors]
        assert_stats_match(got, want)


def test_public_api_values_match_float64_numpy():
    tensors = make_layers((torch.float32, torch.float16), sizes=(3, 0, 40, 17))
    stats = fgs.tensor_stats(tensors, backend="triton")
    for i, t in enumerate(tensors):
        x = t.cpu().double().numpy()
        if x.size == 0:
            assert int(stats.numel[i]) == 0 and float(stats.l2[i]) == 0.0
            continue
        assert float(stats.l2[i]) == pytest.approx(np.linalg.norm(x), rel=1e-5)
        assert float(stats.std[i]) == pytest.approx(np.std(x), rel=1e-4)
        assert float(stats.max[i]) == np.max(x) and float(stats.min[i]) == np.min(x)
    exact = np.concatenate([t.cpu().double().numpy() for t in tensors])
    assert float(stats.total.l2) == pytest.approx(math.sqrt(np.sum(exact * exact)), rel=1e-5)


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "chunk_size, block_size",
    [(32, 8), (48, 24), (40, 16), (16, 32), (32, 0), (32, -16), (0, 16), (-32, 16)],
)
def test_bad_block_or_chunk_sizes_raise(chunk_size, block_size):
    x = torch.randn(20, device=DEVICE)
    with pytest.raises(ValueError, match="chunk_size"):
        raw_stats("triton", [x], None, chunk_size=chunk_size, block_size=block_size)



@pytest.mark.parametrize("offset", [1.0, 100.0])
def test_std_accurate_across_many_chunks_when_mean_dominates(offset, poison):
    x = (offset + 1e-3 * torch.randn(3001, generator=torch.Generator().manual_seed(3))).to(DEVICE)
    got = derive(poison(triton_raw, [x], None, 64, BLOCK).rows)
    assert float(got["std"][0]) == pytest.approx(np.std(x.cpu().double().numpy()), rel=2e-5)
