"""Results own every derived number: mean_abs, the histogram's spec and sums, the pair ratio, the cosine rule,
and the one host snapshot they reach the host in."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import fastgradstats as fgs
from fastgradstats import results
from fastgradstats.results import host_snapshot


def layers() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(50, generator=generator).to(DEVICE), torch.tensor([-3.0, 0.0, 0.5], device=DEVICE),
            torch.tensor([1.0, math.nan], device=DEVICE), torch.tensor([2.0, -math.inf], device=DEVICE),
            torch.empty(0, device=DEVICE)]


def test_mean_abs_is_the_mean_of_absolute_values_per_layer_and_in_total():
    tensors = layers()[:2]
    stats = fgs.tensor_stats(tensors)
    want = [t.double().abs().mean().item() for t in tensors]
    assert stats.mean_abs.dtype == torch.float32
    assert stats.mean_abs.tolist() == pytest.approx(want, rel=1e-6)
    want_total = torch.cat(tensors).double().abs().mean().item()
    assert stats.total.mean_abs.item() == pytest.approx(want_total, rel=1e-6)


def test_mean_abs_is_nan_for_nan_inf_for_inf_and_nan_when_empty():
    mean_abs = fgs.tensor_stats(layers()).mean_abs.tolist()
    assert math.isnan(mean_abs[2]) and mean_abs[3] == math.inf and math.isnan(mean_abs[4])


@pytest.mark.parametrize("hist", ["log2", "linear"])
def test_spec_is_the_histograms_and_none_without_one(hist):
    stats = fgs.tensor_stats(layers()[:2], hist=hist, bins=16)
    assert stats.spec.kind == stats.total.spec.kind == hist
    plain = fgs.tensor_stats(layers()[:2])
    assert plain.spec is None and plain.hist_sum is None and plain.total.hist_sum_squares is None


def test_log2_hist_sums_are_of_absolute_values_and_linear_ones_of_values():
    tensors = layers()[:2]
    values = torch.cat(tensors).double()
    log2, linear = fgs.tensor_stats(tensors, hist="log2"), fgs.tensor_stats(tensors, hist="linear")
    assert log2.hist_sum.dtype == log2.hist_sum_squares.dtype == torch.float64
    close = {"rel": 1e-6, "abs": 1e-5}  # sums accumulate in float32 within chunks
    assert log2.hist_sum.tolist() == pytest.approx([t.double().abs().sum().item() for t in tensors], **close)
    assert linear.hist_sum.tolist() == pytest.approx([t.double().sum().item() for t in tensors], **close)
    assert log2.total.hist_sum.item() == pytest.approx(values.abs().sum().item(), **close)
    assert linear.total.hist_sum.item() == pytest.approx(values.sum().item(), **close)
    squares = [t.double().square().sum().item() for t in tensors]
    for stats in (log2, linear):
        assert stats.hist_sum_squares.tolist() == pytest.approx(squares, **close)
        assert stats.total.hist_sum_squares.item() == pytest.approx(values.square().sum().item(), **close)


def test_hist_sums_are_nan_where_the_rows_cannot_tell_the_binned_values():
    stats = fgs.tensor_stats(layers(), hist="log2")
    assert [math.isnan(v) for v in stats.hist_sum.tolist()] == [False, False, True, True, False]
    assert stats.hist_sum[4].item() == stats.hist_sum_squares[4].item() == 0.0  # empty
    ranged = fgs.tensor_stats([torch.tensor([0.5, -0.5]), torch.tensor([0.5, 3.0])], hist="linear",
                              range=(-1.0, 1.0))
    assert ranged.hist_sum[0].item() == 0.0 and math.isnan(ranged.hist_sum[1].item())  # 3.0 is not binned


def test_to_dict_carries_mean_abs_and_the_histograms_sums_and_kind():
    stats = fgs.tensor_stats(layers()[:2], ["a", "b"], hist="log2")
    data = stats.to_dict()
    for name, values in [*data["layers"].items(), ("total", data["total"])]:
        source = stats.total if name == "total" else stats
        index = () if name == "total" else (stats.names.index(name),)
        assert values["mean_abs"] == source.mean_abs[index].item()
        assert values["hist_sum"] == source.hist_sum[index].item()
        assert values["hist_sum_squares"] == source.hist_sum_squares[index].item()
        assert values["hist_kind"] == "log2"
        assert values["hist"] == source.hist[index].tolist()


def test_pair_ratio_is_the_distance_over_the_norm_of_the_reference_b_per_layer_and_in_total():
    a = [torch.tensor([3.0, 4.0], device=DEVICE), torch.tensor([0.0, 0.0, 0.0], device=DEVICE)]
    b = [torch.tensor([3.0, 3.0], device=DEVICE), torch.tensor([1.0, 0.0, 0.0], device=DEVICE)]
    stats = fgs.pair_stats(a, b)
    assert stats.ratio.dtype == torch.float32
    assert stats.ratio.tolist() == pytest.approx([1.0 / math.sqrt(18.0), 1.0])
    assert stats.total.ratio.item() == pytest.approx(math.sqrt(2.0) / math.sqrt(19.0))
    data = stats.to_dict()
    assert data["layers"]["0"]["ratio"] == stats.ratio[0].item()
    assert data["total"]["ratio"] == stats.total.ratio.item()


def test_pair_ratio_is_inf_when_only_b_is_zero_and_nan_when_both_vanish():
    zero = torch.zeros(3, device=DEVICE)
    stats = fgs.pair_stats([torch.ones(3, device=DEVICE), zero, torch.empty(0, device=DEVICE)],
                           [zero, zero, torch.empty(0, device=DEVICE)])
    ratio = stats.ratio.tolist()
    assert ratio[0] == math.inf and math.isnan(ratio[1]) and math.isnan(ratio[2])


def test_cosine_with_a_zero_vector_is_zero_as_cosine_similarity():
    a = [torch.zeros(4, device=DEVICE), torch.tensor([1.0, 2.0], device=DEVICE)]
    b = [torch.randn(4, device=DEVICE), torch.zeros(2, device=DEVICE)]
    stats = fgs.pair_stats(a, b)
    want = [F.cosine_similarity(x, y, dim=0).item() for x, y in zip(a, b)]
    assert stats.cos.tolist() == want == [0.0, 0.0]


def test_record_alert_count_is_a_device_tensor_and_to_dict_has_it():
    model = torch.nn.Linear(3, 2).to(DEVICE)
    model(torch.randn(4, 3, device=DEVICE)).sum().backward()
    model.bias.grad.zero_()  # a dead layer
    record = fgs.Monitor(model).step()
    assert record.alert_count.dtype == torch.int64 and record.alert_count.device == model.bias.device
    assert record.alert_count.item() == len(record.alerts) == 1
    assert record.to_dict()["alert_count"] == 1
    assert fgs.Monitor(model, alerts=False).step().to_dict()["alert_count"] is None


def test_host_snapshot_copies_tensors_of_every_dtype_exactly_in_one_copy(monkeypatch):
    copies = []
    real_to_host = results.to_host
    monkeypatch.setattr(results, "to_host", lambda packed: copies.append(packed) or real_to_host(packed))
    tensors = [torch.tensor([True, False], device=DEVICE), torch.arange(6, device=DEVICE).reshape(2, 3),
               torch.tensor(1.5, device=DEVICE), torch.randn(3, 5, device=DEVICE)[:, 1],
               torch.tensor([2**60 + 1], device=DEVICE), torch.tensor([0.1], dtype=torch.float64).to(DEVICE),
               torch.tensor([1.0, 2.0], dtype=torch.bfloat16).to(DEVICE)]
    host = host_snapshot(tensors)
    assert len(copies) == 1
    for got, want in zip(host, tensors):
        assert got.device.type == "cpu" and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want.cpu())


def test_stats_cpu_copies_once_and_keeps_the_host_copy(monkeypatch):
    copies = []
    real_to_host = results.to_host
    monkeypatch.setattr(results, "to_host", lambda packed: copies.append(packed) or real_to_host(packed))
    stats = fgs.tensor_stats(layers()[:2], hist="log2")
    host = stats.cpu()
    assert stats.cpu() is host and host.cpu() is host and stats.total.cpu() is host.total
    assert host.l2.device.type == "cpu" and torch.equal(host.hist, stats.hist.cpu())
    stats.to_dict(), stats.table(), stats.total.to_dict()
    assert len(copies) == 1


@pytest.mark.parametrize("value_range", [None, (-1.0, 1.0)])
def test_linear_edges_reuse_the_ranges_the_histogram_was_binned_over(monkeypatch, value_range):
    """Eager results take their edges from the ranges dispatch binned over: linear_ranges runs once."""
    from fastgradstats import results

    def derive_again(*args):
        raise AssertionError("the ranges were derived a second time")

    monkeypatch.setattr(results, "linear_ranges", derive_again)
    tensors = [torch.randn(40, device=DEVICE), torch.randn(7, device=DEVICE) * 3]
    stats = fgs.tensor_stats(tensors, hist="linear", bins=5, range=value_range)
    lo, hi = value_range or (tensors[0].min().item(), tensors[0].max().item())
    assert stats.hist_edges[0, 0].item() == pytest.approx(lo)
    assert stats.hist_edges[0, -1].item() == pytest.approx(hi)
    assert stats.total.hist_edges.shape == (6,)
