"""Inputs at the edges, on every CPU-testable backend (torch, native, Triton in its interpreter): histograms
whose float32 arithmetic overflows, float64 values beyond float32's range, |mean| ≫ std, negative-bit views.

Each case is checked against the float64 oracle and across backends; anything that once crashed the
interpreter also runs in a subprocess first.
"""

import subprocess
import sys

import numpy as np
import oracle
import pytest
import torch
from conftest import DEVICE, NATIVE

import fastgradstats as fgs
from fastgradstats import dispatch

BACKENDS = ["torch", NATIVE, pytest.param("triton", marks=pytest.mark.filterwarnings("ignore"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("fastgradstats.kernels")
    return request.param


def stats_of(tensors, backend, **kwargs):
    return fgs.tensor_stats([t.to(DEVICE) for t in tensors], backend=backend, **kwargs)


# ------------------------------------------------------------------------------------- linear histograms

OVERFLOWING_HISTOGRAMS = {
    "data range times bins overflows": ([torch.tensor([6e36, 0.0, 1.0])], None),
    "range wider than float32": ([torch.randn(1000)], (-3e38, 3e38)),
    "values near float32's maximum": ([torch.tensor([3.4e38, -3.4e38, 1e38, 0.0])], (-3.4e38, 3.4e38)),
    "float64 beyond float32": ([torch.tensor([1e39, 0.0, 1.0, -1e300], dtype=torch.float64)], None),
    "tiny range": ([torch.tensor([0.0, 1e-45, 5e-45, 1.0])], (0.0, 1e-44)),
}


@pytest.mark.skipif(DEVICE != "cpu", reason="the native backend reads CPU tensors")
def test_overflowing_linear_histograms_do_not_crash_the_native_backend(tmp_path):
    script = "\n".join([
        "import torch, fastgradstats as fgs",
        *(f"fgs.tensor_stats({tensors}, hist='linear', range={lo_hi!r}, backend='native')"
          for tensors, lo_hi in (("[torch.tensor([6e36, 0., 1.])]", None),
                                 ("[torch.randn(1000)]", (-3e38, 3e38)),
                                 ("[torch.tensor([1e39, 0., 1.], dtype=torch.float64)]", None))),
        "print('ok')",
    ])
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("case", OVERFLOWING_HISTOGRAMS)
def test_overflowing_linear_histograms_match_the_oracle(case, backend):
    tensors, lo_hi = OVERFLOWING_HISTOGRAMS[case]
    stats = stats_of(tensors, backend, hist="linear", bins=16, range=lo_hi)
    for i, t in enumerate(tensors):
        x = oracle.values(t)
        lo, hi = oracle.linear_range(x) if lo_hi is None else (np.float32(lo_hi[0]), np.float32(lo_hi[1]))
        want = oracle.linear_hist(x, 16, lo, hi)
        np.testing.assert_array_equal(stats.hist[i].cpu().numpy(), want, err_msg=case)
        assert (stats.hist[i] >= 0).all()


def test_every_finite_element_is_counted_by_a_data_range_histogram(backend):
    x = torch.tensor([3e38, -3e38, 1.0, 0.0, 2e38, float("inf"), float("nan")])
    stats = stats_of([x], backend, hist="linear", bins=8)
    assert stats.hist.sum().item() == 5
    assert stats.total.hist.sum().item() == 5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy sums of inf
def test_linear_histograms_agree_across_backends_on_random_extremes():
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.randint(-149, 128, (4000,), generator=generator).double())
    x = (torch.randn(4000, generator=generator, dtype=torch.float64) * magnitudes).float()
    results = [stats_of([x, x[:1000] * 1e-3], b, hist="linear", bins=32).hist.cpu()
               for b in ("torch", "native", "triton") if _usable(b)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


def _usable(backend: str) -> bool:
    try:
        fgs.dispatch.resolve_backend(backend, torch.device(DEVICE))
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------- float64 beyond float32


def test_float64_beyond_float32_lands_in_the_end_log2_bins(backend):
    x = torch.tensor([1e300, -1e300, 1e-300, 5e-324, 0.0, 1.0, float("inf"), 1e39], dtype=torch.float64)
    stats = stats_of([x], backend, hist="log2")
    hist = stats.hist[0].cpu()
    assert hist.sum().item() + stats.zeros.item() + stats.nonfinite.item() == x.numel()
    assert hist[-1].item() == 3 and hist[0].item() == 2
    np.testing.assert_array_equal(hist.numpy(), oracle.log2_hist(oracle.values(x), -48, 15))


def test_float64_beyond_float32_keeps_finite_statistics(backend):
    x = torch.tensor([1e39, -2e39, 3.0, 1e-300], dtype=torch.float64)
    stats = stats_of([x], backend)
    want = oracle.stats(oracle.values(x))
    assert stats.nonfinite.item() == 0
    rows = stats.rows.cpu()[0]
    assert rows.isfinite().all()
    assert abs(rows[1].item() - want["sum"]) <= 1e-12 * abs(want["sum"])
    assert abs(fgs.rows.l2_norm(rows).item() - want["l2"]) <= 1e-12 * want["l2"]


# -------------------------------------------------------------------------------------- |mean| ≫ std


@pytest.mark.parametrize("ratio", [3e5, 1e7])
def test_std_is_accurate_when_the_mean_dominates(backend, ratio):
    generator = torch.Generator().manual_seed(1)
    n = 200_000 if backend != "triton" else 20_000
    x = (1e4 + (1e4 / ratio) * torch.randn(n, generator=generator)).float()
    want = oracle.stats(oracle.values(x))["std"]
    kwargs = {"chunk_size": 4096, "block_size": 256} if backend == "triton" else {}
    if backend == "triton":
        rows = dispatch.raw_stats([x.to(DEVICE)], None, "triton", **kwargs).rows.cpu()
        got = fgs.rows.derive(rows)["std"][0].item()
    else:
        got = stats_of([x], backend).std.item()
    assert abs(got - want) <= 1e-5 * want


def test_torch_backend_sum_is_as_accurate_as_torch_sum():
    generator = torch.Generator().manual_seed(0)
    for seed in range(5):
        x = 100 * torch.randn(300_001, generator=generator)
        truth = oracle.values(x).sum()
        ours = fgs.tensor_stats([x], backend="torch").sum.item()
        # the float32 result is rounded once from float64: half an ulp of the sum at most
        assert abs(ours - truth) <= max(abs(x.sum().item() - truth), np.spacing(np.float32(truth))), seed


# ------------------------------------------------------------------------------------- negative bits


def test_negative_bit_views_are_read_with_their_sign(backend):
    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    z = torch.complex(torch.zeros(4), x)
    for view in (torch._neg_view(x), z.conj().imag):
        assert view.is_neg()
        stats = stats_of([view], backend, hist="log2")
        want = oracle.stats(oracle.values(view.resolve_neg()))
        assert stats.sum.item() == want["sum"] and stats.min.item() == want["min"]
        assert stats.hist.sum().item() == 4


def test_negative_bit_views_in_pairs(backend):
    a = torch.tensor([1.0, -2.0, 3.0])
    b = torch.tensor([0.5, 0.5, 0.5])
    got = fgs.pair_stats([torch._neg_view(a).to(DEVICE)], [b.to(DEVICE)], backend=backend)
    assert got.dot.item() == pytest.approx(-(a * b).sum().item())
