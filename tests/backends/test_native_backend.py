"""The native backend (compiled C) against the torch backend (the reference).

The float64 oracle tests of test_torch_backend.py and test_pairs.py run on both CPU backends; here are the
native backend's own seams: its 2048-element blocks and 16-element lanes, chunk and thread boundaries,
outputs it must write in full, every fp16 and bf16 bit pattern, and building the library.
"""

from __future__ import annotations

import math
import os
import signal
import time

import helpers
import numpy as np
import oracle
import pytest
import torch
from helpers import pair_rows, raw_stats

from fastgradstats.backends import native_backend, torch_backend
from fastgradstats.hist import HistSpec
from fastgradstats.rows import PAIR_K, derive

pytestmark = pytest.mark.skipif(not native_backend.available(), reason=native_backend.unavailable_reason())

NAN, INF = math.nan, math.inf
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Around the kernel's lanes (16) and blocks (2048), and the chunk sizes used below.
SIZES = (0, 1, 15, 16, 17, 2047, 2048, 2049, 0, 5003)
SPECS = {**helpers.SPECS, "linear_many_bins": HistSpec.make("linear", bins=1000)}


def layers(dtype: torch.dtype, specials: bool, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=generator).to(dtype) for n in SIZES]
    if specials:  # on lane and block boundaries, and zeros of both signs
        tensors[3][15] = INF
        tensors[5][2046] = -INF
        tensors[6][0], tensors[6][2047] = 0.0, -0.0
        tensors[7][2048] = NAN
        tensors[9][4096], tensors[9][7] = INF, 0.0
    return tensors


def assert_same_raw(got, want) -> None:
    """Counts, extremes and histograms exact; sums, moments and norms to the reference's float32 rounding.

    The statistics are compared, not the raw rows: Σx² may be NaN or Inf beside an Inf (rows.py)."""
    got_stats, want_stats = derive(got.rows), derive(want.rows)
    for name, want_value in want_stats.items():
        if name in ("numel", "zeros", "nonfinite", "min", "max", "linf"):
            assert torch.equal(got_stats[name].nan_to_num(), want_value.nan_to_num()), name
        else:
            torch.testing.assert_close(got_stats[name], want_value, rtol=1e-5, atol=1e-12, equal_nan=True,
                                       msg=name)
    for field in ("hist", "total_hist"):
        if getattr(want, field) is None:
            assert getattr(got, field) is None, field
        else:
            assert torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.fixture
def many_threads(monkeypatch):
    """Three threads even for small inputs, so thread ranges split layers and chunks."""
    monkeypatch.setattr(native_backend, "MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)


@pytest.fixture
def poisoned_numpy(monkeypatch):
    """np.empty returns NaN-filled floats and minimum-value ints: output the kernels skip shows up."""
    real_empty = np.empty

    def empty(shape, dtype=float, **kwargs):
        array = real_empty(shape, dtype=dtype, **kwargs)
        array.fill(np.nan if np.dtype(dtype).kind == "f" else np.iinfo(dtype).min)
        return array

    monkeypatch.setattr(np, "empty", empty)


@pytest.mark.usefixtures("many_threads", "poisoned_numpy")
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "specials"])
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", [7, 2048, 1 << 16])
def test_raw_stats_equal_the_torch_backend(dtype, spec, specials, chunk_size):
    tensors = layers(dtype, specials)
    got = raw_stats("native", tensors, SPECS[spec], chunk_size=chunk_size)
    assert_same_raw(got, raw_stats("torch", tensors, SPECS[spec]))


@pytest.mark.parametrize("spec", ["log2", "linear"])
def test_results_do_not_depend_on_the_thread_count(monkeypatch, spec):
    tensors = layers(torch.float32, specials=False) + layers(torch.bfloat16, specials=True, seed=1)
    one = raw_stats("native", tensors, SPECS[spec], chunk_size=1000)
    monkeypatch.setattr(native_backend, "MIN_ELEMENTS_PER_THREAD", 1)
    for threads in (2, 5):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        several = raw_stats("native", tensors, SPECS[spec], chunk_size=1000)
        assert torch.equal(several.rows.nan_to_num(), one.rows.nan_to_num())
        assert torch.equal(several.hist, one.hist)
        assert several.total_hist is one.total_hist is None or torch.equal(several.total_hist, one.total_hist)


@pytest.mark.usefixtures("many_threads")
@pytest.mark.parametrize("spec", ["log2", "linear", "linear_range"])
def test_openmp_and_python_threads_give_the_same_bits(monkeypatch, spec):
    """The chunk ranges on OpenMP's threads (torch's intra-op pool) and on the Python threads (a forked child,
    or a compiler without OpenMP) give bit-identical rows and histograms."""
    native_backend.available()
    if native_backend._openmp_pid is None:
        pytest.skip("the native library was built without OpenMP")
    tensors = layers(torch.float32, specials=True) + layers(torch.bfloat16, specials=False, seed=1)
    b, origin = [t.flip(0) for t in tensors], [t * 0.5 for t in tensors]
    openmp = raw_stats("native", tensors, SPECS[spec], chunk_size=1000)
    openmp_pairs = native_backend.pair_rows(tensors, b, origin, chunk_size=1000)
    monkeypatch.setattr(native_backend, "_openmp_pid", None)
    threads = raw_stats("native", tensors, SPECS[spec], chunk_size=1000)
    assert torch.equal(openmp.rows.view(torch.int64), threads.rows.view(torch.int64))
    assert torch.equal(openmp.hist, threads.hist)
    if threads.total_hist is not None:
        assert torch.equal(openmp.total_hist, threads.total_hist)
    pairs = native_backend.pair_rows(tensors, b, origin, chunk_size=1000)
    assert torch.equal(openmp_pairs.view(torch.int64), pairs.view(torch.int64))


@pytest.mark.parametrize("offset", [0.0, 3.0, -200.0])
def test_bfloat16_moments_are_accurate_whatever_the_mean(offset):
    # bfloat16 chunks are summed around 0 by dot products, and again around a shift when their mean dominates.
    generator = torch.Generator().manual_seed(8)
    x = (offset + 0.05 * (1 + abs(offset)) * torch.randn(70001, generator=generator)).to(torch.bfloat16)
    x[[3, 5000]] = 0.0
    rows = raw_stats("native", [x, x[:2047]]).rows
    for got, part in zip(derive(rows)["std"], (x, x[:2047])):
        assert abs(got.item() - oracle.stats(oracle.values(part))["std"]) <= 1e-6 * got.item()
    want = oracle.stats(oracle.values(x))
    assert abs(rows[0, 1].item() - want["sum"]) <= 1e-6 * want["l1"]
    assert derive(rows)["zeros"][0].item() == want["zeros"]


def on_and_beside_bin_edges(lo: float, hi: float, bins: int, dtype: torch.dtype) -> torch.Tensor:
    """lo, hi, and every bin edge of [lo, hi] in ``dtype`` with its neighbours up to 2 ulps either side."""
    edges = torch.tensor([lo + (hi - lo) * k / bins for k in range(bins + 1)], dtype=torch.float64).to(dtype)
    values = [edges]
    for direction in (math.inf, -math.inf):
        step = edges
        for _ in range(2):
            step = torch.nextafter(step.float(), torch.tensor(direction)).to(dtype)
            values.append(step)
    return torch.cat(values).clamp(lo, hi)


@pytest.mark.parametrize("bins", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_linear_hist_of_values_on_both_ranges_bin_edges_equals_the_torch_backend(dtype, bins):
    # Layers of other scales than the total range: each value is binned over two different grids, on and
    # beside the edges of both (path counting, native_stats.c).
    generator = torch.Generator().manual_seed(6)
    bounds = [(-1.0, 2.0), (-0.3, 0.05), (0.5, 7.0), (-1e-3, 1e-3)]
    lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
    tensors = []
    for layer_lo, layer_hi in bounds:
        inside = torch.rand(3000, generator=generator, dtype=torch.float64) * (layer_hi - layer_lo) + layer_lo
        edges = torch.cat([on_and_beside_bin_edges(layer_lo, layer_hi, bins, dtype),
                           on_and_beside_bin_edges(lo, hi, bins, dtype)])
        layer = torch.cat([inside.to(dtype), edges[(edges >= layer_lo) & (edges <= layer_hi)]])
        tensors.append(layer[torch.randperm(len(layer), generator=generator)])
    spec = HistSpec.make("linear", bins=bins)
    got = raw_stats("native", tensors, spec)
    want = raw_stats("torch", tensors, spec)
    assert torch.equal(got.hist, want.hist)
    assert torch.equal(got.total_hist, want.total_hist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_hist_counts_values_outside_either_range(dtype):
    # Ranges narrower than the data, and NaN and Inf: blocks with values outside a range are counted one by
    # one beside those counted by path cell.
    generator = torch.Generator().manual_seed(7)
    tensors = [torch.randn(5000, generator=generator).to(dtype) for _ in range(3)]
    tensors[1][[5, 2047, 4000]] = torch.tensor([NAN, INF, -INF], dtype=dtype)
    ranges = torch.tensor([[-1.0, 1.0, 1.0], [-0.5, 3.0, 1.0], [2.0, 5.0, 1.0], [-2.0, 0.25, 1.0]])
    spec = HistSpec.make("linear", bins=64)
    got = native_backend.linear_hist(tensors, spec, ranges)
    want = torch_backend.linear_hist(tensors, spec, ranges)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_pattern_converts_exactly(dtype):
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = patterns[patterns.isfinite()]
    rows = pair_rows("native", [finite], [finite.float()])
    assert rows[0, 4].item() == 0.0  # Σ(a - b)² with b converted by torch
    every_exponent = HistSpec.make("log2", min_exp=-126, max_exp=127)
    got = raw_stats("native", [patterns], every_exponent)
    assert_same_raw(got, raw_stats("torch", [patterns], every_exponent))


@pytest.mark.usefixtures("many_threads", "poisoned_numpy")
@pytest.mark.parametrize("with_origin", [False, True], ids=["no-origin", "origin"])
@pytest.mark.parametrize("chunk_size", [7, 1 << 16])
def test_pair_rows_equal_the_torch_backend(with_origin, chunk_size):
    a = layers(torch.float32, specials=False, seed=2)
    b = [t.to(dtype) for t, dtype in zip(layers(torch.float32, False, seed=3), DTYPES * 3)]
    origin = [t.to(dtype) for t, dtype in zip(layers(torch.float32, False, seed=4), DTYPES[::-1] * 3)]
    origin = origin if with_origin else None
    got = pair_rows("native", a, b, origin, chunk_size=chunk_size)
    want = pair_rows("torch", a, b, origin)
    assert got.shape == (len(a), PAIR_K) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-9)


def test_transposed_and_strided_views_read_their_own_elements():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(300, 70, generator=generator)
    views = [weight.t(), weight[::3], weight[:, 5:9]]
    got = raw_stats("native", views, SPECS["log2"])
    assert_same_raw(got, raw_stats("native", [v.contiguous() for v in views], SPECS["log2"]))
    assert_same_raw(got, raw_stats("torch", views, SPECS["log2"]))


def test_non_cpu_tensors_are_refused():
    with pytest.raises(ValueError, match="backend 'native' needs CPU tensors, got meta"):
        raw_stats("native", [torch.empty(3, device="meta")])
    with pytest.raises(ValueError, match="the native backend needs CPU tensors, got meta"):
        native_backend.raw_rows([torch.empty(3, device="meta")])


def test_non_contiguous_tensors_are_refused_by_the_kernels_guard():
    with pytest.raises(ValueError, match="reads contiguous tensors"):
        native_backend.raw_rows([torch.ones(4, 4)[:, 0]])


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty library cache, and a build that forgets its result afterwards."""
    monkeypatch.setenv("FASTGRADSTATS_CACHE", str(tmp_path))
    native_backend._build.cache_clear()
    yield tmp_path
    native_backend._build.cache_clear()


def test_library_is_built_once_into_the_cache(fresh_build, monkeypatch):
    assert native_backend.available()
    assert len(list(fresh_build.glob("native_stats-*.so"))) == 1
    native_backend._build.cache_clear()
    monkeypatch.setattr(native_backend, "_run_compiler", lambda *args, **kwargs: pytest.fail("rebuilt"))
    assert native_backend.available()


def test_a_failing_compiler_is_reported_not_raised(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.warns(RuntimeWarning, match="native CPU backend is unavailable"):
        assert not native_backend.available()
    assert native_backend.unavailable_reason().startswith("compiling native_stats.c failed")
    with pytest.raises(ValueError, match="backend 'native' is unavailable: compiling"):
        raw_stats("native", [torch.ones(3)])
    with pytest.raises(RuntimeError, match="the native backend is unavailable: compiling"):
        native_backend.raw_rows([torch.ones(3)])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_computes_with_its_own_threads(many_threads):
    # Ranges long enough that the parent's pool starts all three threads; once they are idle, a child that
    # reused that pool (whose threads it does not have) would wait forever.
    tensors = [torch.randn(1 << 22) for _ in range(3)]
    want = raw_stats("native", tensors).rows
    time.sleep(0.2)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a hung child dies, and the parent reads nothing
        rows = raw_stats("native", tensors).rows
        os.write(writer, b"1" if torch.equal(rows.nan_to_num(), want.nan_to_num()) else b"0")
        os._exit(0)
    os.close(writer)
    assert os.read(reader, 1) == b"1"
    os.waitpid(pid, 0)


def test_cc_may_carry_arguments(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "cc -DFASTGRADSTATS_UNUSED=1")
    assert native_backend.available(), native_backend.unavailable_reason()
    assert raw_stats("native", [torch.ones(3)]).rows[0, 1].item() == 3.0


def test_linear_total_counts_do_not_wrap_past_2_to_the_32():
    # 65537 chunks that all read the same 65536 zeros: 2^32 + 65536 elements in one bin of one thread's
    # total histogram, which a 32-bit count flushed only at the end would wrap to 65536.
    kernels = native_backend._kernels()
    data = torch.zeros(1 << 16, dtype=torch.bfloat16)
    chunks = (1 << 16) + 1
    addresses = np.full(chunks, data.data_ptr(), dtype=np.int64)
    numel = np.full(chunks, data.numel(), dtype=np.int64)
    dtypes = np.full(chunks, native_backend.DTYPE_CODES[torch.bfloat16], dtype=np.int32)
    layer = np.zeros(chunks, dtype=np.int64)
    ranges = np.array([[-1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=np.float32)
    hist, total = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    status = kernels.fgs_linear_hist(0, chunks, addresses.ctypes.data, numel.ctypes.data, dtypes.ctypes.data,
                                     layer.ctypes.data, 1, ranges.ctypes.data, 1, hist.ctypes.data,
                                     total.ctypes.data)
    assert status == 0
    assert hist[0] == total[0] == chunks * data.numel()
