"""The finalize kernels (kernels/finalize.py) against their PyTorch twins (rows.derive, merge_rows,
derive_pair): every field of every layer and of the total, over more layers than one program takes, with
empty, NaN and Inf layers; outputs poisoned before each run (torch.empty filled with NaN)."""

import math

import pytest
import torch
from conftest import DEVICE

import fastgradstats as fgs
from fastgradstats.backends import torch_backend
from fastgradstats.hist import HistSpec, log2_edges
from fastgradstats.rows import (
    ABSSUM,
    MAX,
    NEG_MIN,
    K,
    derive,
    derive_pair,
    l2_norm,
    linf_norm,
    merge_pair_rows,
    merge_rows,
)

finalize = pytest.importorskip("fastgradstats.kernels.finalize")


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    real_empty = torch.empty

    def empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(torch.iinfo(t.dtype).min)

    monkeypatch.setattr(torch, "empty", empty)


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
    raw = torch_backend.raw_stats(layers(count), spec)
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
    raw = torch_backend.raw_stats([torch.full((10,), 3e30), torch.ones(5)])
    out = finalize.finalize_tensor_stats(raw.rows.to(DEVICE), None, None, None)
    assert out["total_norms"][0].item() == pytest.approx(math.sqrt(10 * 9e60 + 5))


def test_no_layers_at_all():
    raw = torch_backend.raw_stats([])
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


def test_a_finalized_result_reaches_the_host_in_one_copy_per_packed_buffer():
    layers = [torch.randn(10, device=DEVICE), torch.randn(7, device=DEVICE)]
    stats = fgs.tensor_stats(layers, backend="triton")
    host = stats._host_derived()
    assert set(host) == set(stats.FIELDS)
    assert len({t.untyped_storage().data_ptr() for t in host.values()}) == 2  # floats and counts
    assert all(torch.equal(host[f], getattr(stats, f).cpu()) for f in stats.FIELDS)
