"""The finalize kernels (kernels/finalize.py) against their PyTorch twins (rows.derive, merge_rows,
derive_pair): every field of every layer and of the total, over more layers than one program takes, with
empty, NaN and Inf layers; outputs poisoned before each run (torch.empty filled with NaN)."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import raw_stats

import fastgradstats as fgs
from fastgradstats import results
from fastgradstats.hist import HistSpec, log2_edges
from fastgradstats.rows import (
    ABSSUM,
    MAX,
    NEG_MIN,
    K,
    derive,
    derive_hist_sums,
    derive_pair,
    l2_norm,
    linf_norm,
    merge_pair_rows,
    merge_rows,
)

finalize = pytest.importorskip("fastgradstats.kernels.finalize")


pytestmark = pytest.mark.usefixtures("poisoned_empty")


def layers(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(count)
    out = [torch.randn(int(n), generator=generator) * 10.0 ** (i % 7 - 3)
           for i, n in enumerate(torch.randint(0, 40, (count,), generator=generator))]
    out[1] = torch.tensor([1.0, float("inf")])
    out[2] = torch.tensor([float("nan"), 2.0])
    out[3] = torch.empty(0)
    return out


def assert_field(name, got, want):
    got, want = got.cpu().double(), want.cpu().double()
    assert torch.equal(got.isnan(), want.isnan()), name
    finite = ~want.isnan()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("count", [5, 300])
@pytest.mark.parametrize("spec", [None, HistSpec.make("log2"),
                                  HistSpec.make("log2", min_exp=-126, max_exp=127)])
def test_tensor_fields_match_the_torch_derivation(count, spec):
    raw = raw_stats("torch", layers(count), spec)
    rows = raw.rows.to(DEVICE)
    out = finalize.finalize_tensor_stats(rows, None if raw.hist is None else raw.hist.to(DEVICE), None, spec)
    want, total = derive(raw.rows), merge_rows(raw.rows)
    want_total = derive(total)
    for name, value in want.items():
        assert_field(name, out["layers"][name], value)
        assert_field(f"total {name}", out["total"][name], want_total[name])
    specified = torch.ones(K, dtype=torch.bool)
    specified[[MAX, NEG_MIN]] = not total[ABSSUM].isnan()  # with a NaN the raw maxima are unspecified
    assert_field("total row", out["total_row"].cpu()[specified], total[specified])
    assert_field("norms", out["total_norms"], torch.stack([l2_norm(total), linf_norm(total)]))
    if spec is not None:
        assert torch.equal(out["total_hist"].cpu(), raw.hist.sum(0))
        assert torch.equal(out["edges"].cpu(), log2_edges(spec))


def test_total_of_finite_layers_keeps_a_finite_norm():
    raw = raw_stats("torch", [torch.full((10,), 3e30), torch.ones(5)])
    out = finalize.finalize_tensor_stats(raw.rows.to(DEVICE), None, None, None)
    assert out["total_norms"][0].item() == pytest.approx(math.sqrt(10 * 9e60 + 5))


def test_no_layers_at_all():
    raw = raw_stats("torch", [])
    out = finalize.finalize_tensor_stats(raw.rows.to(DEVICE), None, None, None)
    assert out["total"]["numel"].item() == 0 and out["total"]["l2"].item() == 0.0
    assert math.isnan(out["total"]["mean"].item())


@pytest.mark.parametrize("count", [3, 300])
def test_pair_fields_match_the_torch_derivation(count):
    generator = torch.Generator().manual_seed(count)
    rows = torch.rand(count, 5, generator=generator, dtype=torch.float64) * 10
    rows[0] = 0.0  # an empty pair: cos 0, as F.cosine_similarity
    out = finalize.finalize_pair_stats(rows.to(DEVICE))
    want, want_total = derive_pair(rows), derive_pair(merge_pair_rows(rows))
    for name, value in want.items():
        assert_field(name, out["layers"][name], value)
        assert_field(f"total {name}", out["total"][name], want_total[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("max_norm", [1.0, 0.1, 1e4])
def test_clip_coefficient_is_torchs(dtype, norm_type, max_norm):
    norms = torch.tensor([3.7, 1.25], dtype=torch.float64)
    norm, coef = finalize.clip_coefficient(norms.to(DEVICE), norm_type, max_norm, dtype)
    want_norm = norms[0 if norm_type == 2.0 else 1].to(dtype)
    want_coef = torch.clamp(max_norm / (want_norm + 1e-6), max=1.0)
    assert norm.dtype == coef.dtype == dtype
    assert torch.equal(norm.cpu(), want_norm) and torch.equal(coef.cpu(), want_coef)


@pytest.mark.parametrize("spec", [HistSpec.make("log2"), HistSpec.make("linear", bins=8),
                                  HistSpec.make("linear", bins=8, range=(-1.0, 1.0))], ids=str)
def test_hist_sums_match_the_torch_derivation(spec):
    tensors = layers(300)
    tensors[4] = torch.tensor([-0.5, 0.25, 0.0])  # inside the fixed range
    rows = fgs.tensor_stats(tensors, backend="torch").rows
    out = finalize.finalize_tensor_stats(rows.to(DEVICE), None, None, spec)
    want, want_total = derive_hist_sums(rows, spec.kind, spec.range), derive_hist_sums(merge_rows(rows),
                                                                                        spec.kind, spec.range)
    for name, value in want.items():
        assert out["layers"][name].dtype == torch.float64
        assert_field(name, out["layers"][name], value)
        assert_field(f"total {name}", out["total"][name], want_total[name])
    assert out["layers"]["hist_sum"][4].item() == pytest.approx(0.75 if spec.kind == "log2" else -0.25)
    assert out["layers"]["hist_sum_squares"][4].item() == pytest.approx(0.3125)


def test_without_a_histogram_there_are_no_hist_sums():
    out = finalize.finalize_tensor_stats(fgs.tensor_stats(layers(5), backend="torch").rows.to(DEVICE), None,
                                         None, None)
    assert "hist_sum" not in out["layers"] and "hist_sum_squares" not in out["total"]


def test_a_finalized_result_reaches_the_host_in_one_copy(monkeypatch):
    copies = []
    monkeypatch.setattr(results, "to_host", lambda packed: copies.append(packed) or packed.cpu())
    layers = [torch.randn(10, device=DEVICE), torch.randn(7, device=DEVICE)]
    stats = fgs.tensor_stats(layers, backend="triton", hist="log2")
    data = stats.to_dict()
    stats.table()
    assert len(copies) == 1
    host = stats.cpu()
    for field in (*stats.FIELDS, "hist_sum", "hist_sum_squares"):
        assert torch.equal(getattr(host, field), getattr(stats, field).cpu())
        assert data["layers"]["1"][field] == getattr(stats, field)[1].item()
        assert data["total"][field] == getattr(stats.total, field).item()
