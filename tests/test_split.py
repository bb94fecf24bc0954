"""split=: a stacked tensor (MoE experts, heads) as one layer per slice along dim 0, and stats.group()."""

from __future__ import annotations

import math

import numpy as np
import oracle
import pytest
import torch
from conftest import DEVICE, NATIVE

import fastgradstats as fgs
from fastgradstats.hist import DEFAULT_MAX_EXP, DEFAULT_MIN_EXP
from fastgradstats.split import expand

BACKENDS = ["torch", NATIVE, "triton"]
SPLIT = {r"experts\.w\d": 4, r"^q_proj$": 3}


def moe_tensors() -> tuple[list[torch.Tensor], list[str]]:
    """A [4, 3, 5] expert stack whose expert 2 is all zero (received no gradient), a bf16 [6, 4] projection
    split into 3 heads, a transposed (dense, non-contiguous) stack and an unsplit bias."""
    torch.manual_seed(0)
    experts = torch.randn(4, 3, 5, device=DEVICE)
    experts[2] = 0.0
    experts[1, 0, 0] = float("nan")
    q_proj = torch.randn(6, 4, device=DEVICE).to(torch.bfloat16)
    transposed = torch.randn(5, 8, device=DEVICE).t()
    bias = torch.randn(7, device=DEVICE) + 3.0
    return [experts, q_proj, transposed, bias], ["experts.w1", "q_proj", "experts.w2", "bias"]


def assert_rows_match_oracle(stats, tensors: list[torch.Tensor], hist: str | None) -> None:
    """Layer i of stats has the statistics (and histogram) of tensors[i], from the float64 oracle."""
    assert len(stats) == len(tensors)
    host = stats.to_dict()["layers"]
    for name, tensor in zip(stats.names, tensors):
        x = oracle.values(tensor)
        want, got = oracle.stats(x), host[name]
        for field in oracle.COUNT_FIELDS:
            assert got[field] == want[field], (name, field)
        for field in oracle.FLOAT_FIELDS:
            scale = want["l1"] if field in ("sum", "mean") else abs(want[field])
            if field == "mean":
                scale /= max(want["numel"], 1)
            same = math.isnan(got[field]) and math.isnan(want[field]) or got[field] == want[field]
            assert same or abs(got[field] - want[field]) <= 1e-5 * scale + 1e-12, (name, field, got, want)
        if hist == "log2":
            np.testing.assert_array_equal(got["hist"], oracle.log2_hist(x, DEFAULT_MIN_EXP, DEFAULT_MAX_EXP))
        elif hist == "linear":
            lo, hi = oracle.linear_range(x)
            np.testing.assert_array_equal(got["hist"], oracle.linear_hist(x, 16, lo, hi))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hist", [None, "log2", "linear"])
def test_split_rows_equal_the_statistics_of_each_slice(backend, hist):
    tensors, names = moe_tensors()
    split = {**SPLIT, r"experts\.w2": 4}
    stats = fgs.tensor_stats(tensors, names, hist=hist, bins=16, backend=backend, split=split)
    experts, q_proj, transposed, bias = tensors
    assert stats.names == [f"experts.w1[{i}]" for i in range(4)] + [f"q_proj[{i}]" for i in range(3)] + [
        f"experts.w2[{i}]" for i in range(4)] + ["bias"]
    slices = list(experts) + list(q_proj.view(3, 2, 4)) + list(transposed.unflatten(0, (4, 2))) + [bias]
    assert_rows_match_oracle(stats, slices, hist)
    assert_rows_match_oracle(stats.group(r"experts\.w1"), list(experts), hist)
    assert_rows_match_oracle(stats.group("q_proj"), list(q_proj.view(3, 2, 4)), hist)
    assert_rows_match_oracle(stats.group("experts.w2"), list(transposed.unflatten(0, (4, 2))), hist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_is_views_of_the_fields_and_its_total_is_the_whole_tensor(backend):
    tensors, names = moe_tensors()
    stats = fgs.tensor_stats(tensors, names, hist="log2", backend=backend, split=SPLIT)
    experts = stats.group("w1")
    assert experts.names == [f"experts.w1[{i}]" for i in range(4)]
    assert experts.l2.data_ptr() == stats.l2.data_ptr()  # rows 0..3: a view, not a recomputation
    assert experts.hist.data_ptr() == stats.hist.data_ptr()
    heads = stats.group("q_proj")
    assert heads.l2.untyped_storage().data_ptr() == stats.l2.untyped_storage().data_ptr()
    whole = fgs.tensor_stats([tensors[1]], ["q_proj"], hist="log2", backend=backend)
    assert heads.total.numel.item() == whole.numel.item() == 24
    assert torch.allclose(heads.total.l2, whole.l2[0], rtol=1e-6)
    assert torch.allclose(heads.total.std, whole.std[0], rtol=1e-5)
    assert torch.equal(heads.total.hist, whole.hist[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_totals_are_unchanged_by_splitting(backend):
    tensors, names = moe_tensors()
    tensors[0][1, 0, 0] = 0.5  # a finite total, so that every field compares
    split = fgs.tensor_stats(tensors, names, hist="log2", backend=backend, split=SPLIT).total
    whole = fgs.tensor_stats(tensors, names, hist="log2", backend=backend).total
    for field in ("numel", "zeros", "nonfinite", "min", "max", "linf"):
        assert torch.equal(getattr(split, field), getattr(whole, field)), field
    for field in ("sum", "mean", "std", "l1", "l2"):
        assert torch.allclose(getattr(split, field), getattr(whole, field), rtol=1e-6, atol=1e-6), field
    assert torch.equal(split.hist, whole.hist)


def test_slices_of_contiguous_tensors_are_views():
    stack = torch.randn(64, 3, 2)
    parts = expand([stack], [64])
    assert len(parts) == 64
    for i, part in enumerate(parts):
        assert part.is_contiguous()
        assert part.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
        assert part.storage_offset() == i * 6 and torch.equal(part, stack[i:i + 1])


def test_callable_split_and_first_matching_pattern():
    tensors, names = moe_tensors()
    by_shape = fgs.tensor_stats(tensors, names, split=lambda name, t: t.shape[0] if t.dim() == 3 else None)
    assert by_shape.names[:4] == [f"experts.w1[{i}]" for i in range(4)] and len(by_shape) == 7
    first = fgs.tensor_stats(tensors, names, split={"experts": 2, r"experts\.w1": 4})
    assert list(first.splits) == ["experts.w1", "experts.w2"] and len(first.group("w1")) == 2
    assert fgs.tensor_stats(tensors, names, split={"q_proj": 1}).names[1] == "q_proj[0]"


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({r"experts\.w1": 3}, r"layer 'experts.w1' has shape \(4, 3, 5\): dim 0 \(4\) does not split into 3"),
        ({r"experts\.w1": 0}, "split of layer 'experts.w1' must be an int >= 1, got 0"),
        ({r"experts\.w1": 2.0}, "must be an int >= 1, got 2.0"),
        ({r"experts\.w1": True}, "must be an int >= 1, got True"),
        ({"experts[": 2}, r"split pattern 'experts\[' is not a valid regular expression"),
        ({"scalar": 1}, "layer 'scalar' is 0-d and cannot be split into 1 parts"),
        ({"^q_proj$": 2}, "layer name 'q_proj\\[0\\]' appears more than once"),
    ],
)
def test_invalid_splits_raise_a_clear_value_error(split, message):
    tensors, names = moe_tensors()
    tensors += [torch.tensor(1.0), torch.ones(1)]
    names += ["scalar", "q_proj[0]"]
    with pytest.raises(ValueError, match=message):
        fgs.tensor_stats(tensors, names, split=split)


def test_a_split_that_is_neither_mapping_nor_callable_is_a_type_error():
    with pytest.raises(TypeError, match="split must be a mapping"):
        fgs.tensor_stats([torch.ones(2)], split=2)


def test_group_names_the_split_layers_when_nothing_or_several_match():
    tensors, names = moe_tensors()
    stats = fgs.tensor_stats(tensors, names, split={**SPLIT, r"experts\.w2": 2})
    with pytest.raises(KeyError, match="matches 2 split layers"):
        stats.group("experts")
    with pytest.raises(KeyError, match="matches no split layer"):
        stats.group("bias")


def pair_oracle(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    x, y = oracle.values(a), oracle.values(b)
    dot, a_l2, b_l2 = float(x @ y), float(np.sqrt(x @ x)), float(np.sqrt(y @ y))
    cos = dot / (max(a_l2, 1e-8) * max(b_l2, 1e-8))
    return {"numel": x.size, "dot": dot, "a_l2": a_l2, "b_l2": b_l2, "cos": cos,
            "dist": float(np.linalg.norm(x - y))}


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_stats_split_rows_equal_each_slice(backend):
    torch.manual_seed(1)
    a = {"experts.w1": torch.randn(4, 3, 5, device=DEVICE), "bias": torch.randn(5, device=DEVICE)}
    b = {name: t + 0.5 * torch.randn_like(t) for name, t in a.items()}
    b["experts.w1"][3] = a["experts.w1"][3]  # an expert that did not move
    stats = fgs.pair_stats(a, b, backend=backend, split={"w1": 4})
    experts = stats.group("w1")
    host = experts.to_dict()["layers"]
    for i in range(4):
        want = pair_oracle(a["experts.w1"][i], b["experts.w1"][i])
        for field, value in want.items():
            assert host[f"experts.w1[{i}]"][field] == pytest.approx(value, rel=1e-5, abs=1e-6), (i, field)
    whole = fgs.pair_stats(a, b, backend=backend)
    assert torch.allclose(stats.total.cos, whole.total.cos, rtol=1e-6)
    assert torch.allclose(experts.total.dist, whole.dist[0], rtol=1e-6)
    cos = fgs.cosine_similarity(a, b, backend=backend, split={"w1": 2})
    assert torch.allclose(cos, whole.total.cos, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hist", [None, "log2"])
def test_clip_grad_norm_return_stats_split_keeps_the_norm(backend, hist, monkeypatch):
    monkeypatch.setenv("FASTGRADSTATS_BACKEND", backend)
    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(4, 3, 5, device=DEVICE)), torch.nn.Parameter(torch.randn(6))]
    params[0].grad = torch.randn(4, 3, 5, device=DEVICE)
    params[0].grad[1] = 0.0
    params[1].grad = torch.randn(6, device=DEVICE)
    reference = [p.grad.clone() for p in params]

    def with_grads() -> list[torch.nn.Parameter]:
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for copy, g in zip(copies, reference):
            copy.grad = g.clone()
        return copies

    expected = torch.nn.utils.clip_grad_norm_(with_grads(), 1.0)
    unsplit = fgs.clip_grad_norm_(with_grads(), 1.0)
    total, stats = fgs.clip_grad_norm_(params, 1.0, return_stats=True, split={"^0$": 4})
    assert torch.allclose(total, expected, rtol=1e-6) and torch.allclose(total, unsplit, rtol=1e-6)
    assert stats.names == ["0[0]", "0[1]", "0[2]", "0[3]", "1"]
    assert_rows_match_oracle(stats.group("0"), list(reference[0]), None)
    coefficient = 1.0 / (expected.item() + 1e-6)
    assert torch.allclose(params[0].grad, reference[0] * coefficient, rtol=1e-5)


def test_monitor_split_names_slices_in_every_tracked_kind():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    monitor = fgs.Monitor(model, track=("grad", "param", "update"), split={r"0\.weight": 3})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(optimizer)
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model(torch.randn(5, 4)).square().mean().backward()
    record = monitor.step()
    for kind in ("grad", "param", "update"):
        assert record.stats[kind].names[:3] == ["0.weight[0]", "0.weight[1]", "0.weight[2]"], kind
        assert len(record.stats[kind].group(r"0\.weight")) == 3
    weight = model[0].weight.detach()
    assert torch.allclose(record.stats["param"].group("0.weight").l2, weight.view(3, 2, 4).norm(dim=(1, 2)))
    assert record.to_dict()["grad"]["layers"]["0.weight[2]"]["numel"] == 8
    monitor.close()
    with pytest.raises(ValueError, match=r"layer '0.weight' has shape \(6, 4\): dim 0 \(6\) does not split"):
        fgs.Monitor(model, split={r"0\.weight": 4})


# Summaries of split layers: split_summary(), table()


def summary_stats() -> fgs.TensorStats:
    """A [20, 3, 2] stack (part 2 all zero, part 4 NaN, part 5 +inf) and a [4, 2] projection, split."""
    torch.manual_seed(0)
    experts = torch.randn(20, 3, 2)
    experts[2] = 0.0
    experts[4, 0, 0] = float("nan")
    experts[5, 1, 1] = float("inf")
    return fgs.tensor_stats([experts, torch.randn(4, 2)], ["experts", "proj"],
                            split={"experts": 20, "proj": 4}, backend="torch")


def test_split_summary_ranks_parts_by_l2_with_nan_as_largest():
    stats = summary_stats()
    summary = stats.split_summary(k=3)["experts"]
    l2 = stats.group("experts").l2.tolist()
    finite = sorted((value, i) for i, value in enumerate(l2) if math.isfinite(value))
    assert [entry["part"] for entry in summary["smallest"]] == [i for _, i in finite[:3]]
    assert [entry["part"] for entry in summary["largest"]] == [4, 5, finite[-1][1]]
    assert summary["smallest"][0]["name"] == "experts[2]"
    assert summary["smallest"][1]["value"] == l2[finite[1][1]]
    assert math.isnan(summary["largest"][0]["value"]) and summary["largest"][1]["value"] == math.inf
    assert (summary["parts"], summary["field"], summary["dead"], summary["nonfinite"]) == (20, "l2", 1, 2)
    assert math.isnan(summary["cv"])


def test_split_summary_cv_is_population_std_over_mean_of_the_parts():
    stats = summary_stats()
    summary = stats.split_summary(k=10)["proj"]
    l2 = np.array(stats.group("proj").l2.tolist())
    assert summary["cv"] == pytest.approx(l2.std() / l2.mean(), rel=1e-12)
    assert len(summary["smallest"]) == len(summary["largest"]) == 4  # k is capped at the number of parts
    assert [e["part"] for e in summary["smallest"]] == [e["part"] for e in reversed(summary["largest"])]


def test_split_summary_of_pair_stats_ranks_by_dist_and_counts_unmoved_parts_as_dead():
    torch.manual_seed(0)
    a = torch.randn(6, 5)
    b = a.clone()
    b[:3] += torch.randn(3, 5)  # parts 3..5 unchanged
    stats = fgs.pair_stats({"w": a}, {"w": b}, split={"w": 6}, backend="torch")
    summary = stats.split_summary(k=2, layers=["w"])["w"]
    assert summary["field"] == "dist" and summary["dead"] == 3
    assert [e["part"] for e in summary["smallest"]] == [3, 4]
    assert summary["largest"][0]["value"] == stats.dist[:3].max().item()


def test_split_summary_other_field_and_bad_arguments():
    stats = summary_stats()
    assert stats.split_summary(field="linf", layers=["proj"])["proj"]["field"] == "linf"
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        stats.split_summary(k=0)
    with pytest.raises(ValueError, match="no field 'l3'"):
        stats.split_summary(field="l3")
    with pytest.raises(KeyError, match="not split layers"):
        stats.split_summary(layers=["experts[0]"])
    with pytest.raises(ValueError, match="summarize_splits"):
        stats.table(summarize_splits=-1)


def test_table_summarizes_split_layers_with_more_parts_than_the_threshold():
    stats = summary_stats()
    lines = stats.table().splitlines()
    part_rows = [line.split()[0] for line in lines if line.startswith("  experts[")]
    assert len(part_rows) == 6
    summary = stats.split_summary()["experts"]
    assert part_rows == [e["name"] for e in summary["smallest"] + summary["largest"][::-1]]
    assert any(line.startswith("experts: 20 parts by l2, cv nan, 1 dead, 2 NaN/Inf") for line in lines)
    assert "  ..." in lines
    assert [line.split()[0] for line in lines if line.startswith("proj[")] == [f"proj[{i}]" for i in range(4)]
    assert lines[-1].startswith("total")


def test_table_summarize_splits_true_false_and_k():
    stats = summary_stats()
    every_row = stats.table(summarize_splits=False)
    assert all(f"experts[{i}] " in every_row for i in range(20))
    summarized = stats.table(summarize_splits=True, k=1).splitlines()
    assert any(line.startswith("proj: 4 parts by l2") for line in summarized)
    assert sum(line.startswith("  proj[") for line in summarized) == 2
