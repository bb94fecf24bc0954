"""Pair statistics: dot, norms, cosine and distance of two tensor sets (optionally from an origin).

The torch backend is checked against a float64 numpy oracle, the Triton kernels (under the interpreter without
a GPU) against the torch backend, and the public call against plain per-layer torch loops.
"""

import copy
import functools
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, NATIVE
from helpers import CountingKernel, pair_rows
from oracle import values

import fastgradstats as fgs
from fastgradstats.rows import COSINE_EPS, derive_pair

FIELDS = ("numel", "dot", "a_l2", "b_l2", "cos", "dist")
FLOAT_FIELDS = FIELDS[1:]
PAIR_RAW_STATS = {name: functools.partial(pair_rows, name) for name in ("torch", "native")}
CHUNK, BLOCK = 32, 16  # tiny kernel chunks so small tensors straddle chunk and block boundaries
kernels = importlib.import_module("fastgradstats.kernels")
pair_kernels = importlib.import_module("fastgradstats.kernels.pair_stats")
merge_kernels = importlib.import_module("fastgradstats.kernels.merge")


# --- float64 numpy oracle -----------------------------------------------------------------------------------


def oracle_fields(x: np.ndarray, y: np.ndarray, diff: np.ndarray) -> dict[str, float]:
    """Pair statistics of a' = x, b' = y and a - b = diff, all float64, from the contract."""
    dot = float(x @ y)
    a_l2, b_l2 = math.sqrt(float(x @ x)), math.sqrt(float(y @ y))
    return {
        "numel": x.size,
        "dot": dot,
        "a_l2": a_l2,
        "b_l2": b_l2,
        "cos": dot / (max(a_l2, COSINE_EPS) * max(b_l2, COSINE_EPS)),
        "dist": math.sqrt(float(diff @ diff)),
    }


def oracle(a, b, origin=None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-layer fields ([L] arrays) and the total (every layer flattened and concatenated)."""
    xs, ys, diffs = [], [], []
    for i in range(len(a)):
        x, y = values(a[i]), values(b[i])
        diffs.append(x - y)
        if origin is not None:
            o = values(origin[i])
            x, y = x - o, y - o
        xs.append(x)
        ys.append(y)
    layers = [oracle_fields(x, y, d) for x, y, d in zip(xs, ys, diffs)]
    per_layer = {field: np.array([layer[field] for layer in layers]) for field in FIELDS}
    concat = [np.concatenate(parts) if parts else np.zeros(0) for parts in (xs, ys, diffs)]
    return per_layer, oracle_fields(*concat)


def assert_matches_oracle(stats: fgs.PairStats, a, b, origin=None, rtol=1e-5, atol=1e-6) -> None:
    per_layer, total = oracle(a, b, origin)
    for field in FIELDS:
        got, got_total = getattr(stats, field), getattr(stats.total, field)
        if field == "numel":
            assert got.tolist() == per_layer[field].tolist()
            assert got_total.item() == total[field]
            continue
        np.testing.assert_allclose(got.double().cpu().numpy(), per_layer[field], rtol=rtol, atol=atol,
                                   err_msg=field)
        np.testing.assert_allclose(got_total.item(), total[field], rtol=rtol, atol=atol,
                                   err_msg=f"total {field}")


def random_layers(shapes, dtypes, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=generator)).to(dtype).to(DEVICE)
            for shape, dtype in zip(shapes, dtypes)]


ODD_SHAPES = [(1,), (3, 5), (0,), (7,), (2, 0), (33,), (4, 1, 9)]
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPE_MIXES = {  # (a dtypes, b dtypes, origin dtypes), one per layer of ODD_SHAPES
    "fp32": ([F32] * 7, [F32] * 7, [F32] * 7),
    "bf16-fp32": ([BF16] * 7, [F32] * 7, [F16] * 7),
    "per-layer": (
        [F32, BF16, F16, F32, BF16, F16, F64],
        [F16, F32, BF16, BF16, F32, F16, F32],
        [BF16, F16, F32, F64, F16, F32, F32],
    ),
}


# --- CPU backends (torch, native) against the float64 oracle ------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", NATIVE])
@pytest.mark.parametrize("with_origin", [False, True], ids=["no-origin", "origin"])
@pytest.mark.parametrize("mix", list(DTYPE_MIXES))
def test_cpu_backends_match_float64_oracle_per_layer_and_total(mix, with_origin, backend):
    a_dtypes, b_dtypes, o_dtypes = DTYPE_MIXES[mix]
    a = random_layers(ODD_SHAPES, a_dtypes, seed=1)
    b = random_layers(ODD_SHAPES, b_dtypes, seed=2)
    origin = random_layers(ODD_SHAPES, o_dtypes, seed=3, scale=0.5) if with_origin else None
    stats = fgs.pair_stats(a, b, origin=origin, backend=backend)
    assert_matches_oracle(stats, a, b, origin)


def test_empty_layers_have_zero_numel_dot_norms_cos_and_dist():
    a = [torch.zeros(0, device=DEVICE), torch.ones(2, 0, device=DEVICE)]
    b = [torch.zeros(0, device=DEVICE), torch.ones(2, 0, device=DEVICE)]
    stats = fgs.pair_stats(a, b, backend="torch")
    for field in FIELDS:
        assert getattr(stats, field).tolist() == [0, 0], field
        assert getattr(stats.total, field).item() == 0, field


@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_chunked_cpu_backends_merge_chunks_exactly(backend):
    sizes = [1, 5, 0, 12, 23]
    a = [t.reshape(-1) for t in random_layers([(n,) for n in sizes], [torch.float32] * 5, seed=4)]
    b = [t.reshape(-1) for t in random_layers([(n,) for n in sizes], [torch.bfloat16] * 5, seed=5)]
    origin = [t.reshape(-1) for t in random_layers([(n,) for n in sizes], [torch.float16] * 5, seed=6)]
    rows = PAIR_RAW_STATS[backend](a, b, origin, chunk_size=5)
    stats = fgs.PairStats.from_rows(rows, [str(i) for i in range(len(sizes))])
    assert_matches_oracle(stats, a, b, origin, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", NATIVE, "triton"])
def test_dist_stays_accurate_when_a_is_almost_b(backend):
    generator = torch.Generator().manual_seed(7)
    a = torch.randn(4096, generator=generator)
    b = a + 1e-6 * torch.randn(4096, generator=generator)
    true_dist = math.sqrt(float(((values(a) - values(b)) ** 2).sum()))
    naive = math.sqrt(max(float(a @ a + b @ b - 2 * (a @ b)), 0.0))
    assert not abs(naive - true_dist) < 0.5 * true_dist  # the textbook formula fails here in float32
    stats = fgs.pair_stats([a.to(DEVICE)], [b.to(DEVICE)], backend=backend)
    assert stats.dist.item() == pytest.approx(true_dist, rel=1e-4)
    assert stats.total.dist.item() == pytest.approx(true_dist, rel=1e-4)


def test_cos_equals_torch_cosine_similarity_per_layer_and_on_the_concatenation():
    generator = torch.Generator().manual_seed(8)
    a = [torch.randn(6, 4, generator=generator), torch.zeros(5), torch.zeros(3),
         1e-10 * torch.randn(9, generator=generator), torch.randn(11, generator=generator)]
    b = [torch.randn(6, 4, generator=generator), torch.randn(5, generator=generator), torch.zeros(3),
         1e-10 * torch.randn(9, generator=generator), -2 * a[4]]
    stats = fgs.pair_stats([t.to(DEVICE) for t in a], [t.to(DEVICE) for t in b], backend="torch")
    expected = [F.cosine_similarity(x.double().reshape(-1), y.double().reshape(-1), dim=0)
                for x, y in zip(a, b)]
    torch.testing.assert_close(stats.cos.cpu(), torch.stack(expected).float(), rtol=1e-6, atol=1e-7)
    assert stats.cos[1].item() == 0 and stats.cos[2].item() == 0  # zero vectors: cosine 0, not NaN
    concat_a = torch.cat([t.double().reshape(-1) for t in a])
    concat_b = torch.cat([t.double().reshape(-1) for t in b])
    expected_total = F.cosine_similarity(concat_a, concat_b, dim=0).float()
    torch.testing.assert_close(stats.total.cos.cpu(), expected_total, rtol=1e-6, atol=1e-7)


def test_fields_are_float32_tensors_of_one_value_per_layer_on_the_input_device():
    a = random_layers(ODD_SHAPES, [torch.bfloat16] * 7, seed=9)
    stats = fgs.pair_stats(a, random_layers(ODD_SHAPES, [torch.float16] * 7, seed=10))
    for field in FIELDS:
        value, total = getattr(stats, field), getattr(stats.total, field)
        assert value.shape == (len(ODD_SHAPES),) and total.shape == ()
        assert value.device == a[0].device and total.device == a[0].device
        assert value.dtype == (torch.int64 if field == "numel" else torch.float32)
    assert stats.names == [str(i) for i in range(len(ODD_SHAPES))]


def test_to_dict_and_table_list_every_layer_and_the_total():
    a = random_layers([(3,), (4,)], [F32] * 2, seed=11)
    b = random_layers([(3,), (4,)], [F32] * 2, seed=12)
    stats = fgs.pair_stats(a, b, names=["enc", "dec"])
    data = stats.to_dict()
    assert list(data["layers"]) == ["enc", "dec"]
    assert set(data["layers"]["enc"]) == {*FIELDS, "ratio"} == set(data["total"])
    assert data["layers"]["dec"]["numel"] == 4 and data["total"]["numel"] == 7
    assert data["total"]["cos"] == pytest.approx(stats.total.cos.item())
    lines = stats.table().splitlines()
    assert len(lines) == 4 and lines[1].startswith("enc") and lines[3].startswith("total")


# --- Triton kernels under the interpreter, against the torch backend ----------------------------------------


def triton_rows(a, b, origin=None):
    return pair_rows("triton", a, b, origin, chunk_size=CHUNK, block_size=BLOCK)


def assert_rows_match_torch_backend(rows: torch.Tensor, a, b, origin=None) -> None:
    reference = pair_rows("torch", a, b, origin)
    assert rows.shape == reference.shape and rows.dtype == torch.float64
    got, expected = derive_pair(rows), derive_pair(reference)
    assert torch.equal(got["numel"], expected["numel"])
    for field in FLOAT_FIELDS:
        torch.testing.assert_close(got[field], expected[field], rtol=1e-5, atol=1e-5, msg=field)


def flat_layers(sizes, dtypes, seed, scale=1.0):
    return [t.reshape(-1) for t in random_layers([(n,) for n in sizes], dtypes, seed, scale)]


SIZES = [1, 15, 16, 17, 0, 31, 33, 0, 64, 97]


@pytest.mark.parametrize("with_origin", [False, True], ids=["no-origin", "origin"])
def test_triton_rows_match_torch_for_odd_sizes_straddling_chunks(poisoned_empty, with_origin):
    a = flat_layers(SIZES, [torch.float32] * len(SIZES), seed=13)
    b = flat_layers(SIZES, [torch.float32] * len(SIZES), seed=14)
    origin = flat_layers(SIZES, [torch.float32] * len(SIZES), seed=15, scale=0.5) if with_origin else None
    assert_rows_match_torch_backend(triton_rows(a, b, origin), a, b, origin)


def test_triton_empty_tensors_keep_their_slots(poisoned_empty):
    sizes = [0, 40, 0, 0, 7, 0]
    a = flat_layers(sizes, [torch.float32] * 6, seed=16)
    b = flat_layers(sizes, [torch.float32] * 6, seed=17)
    rows = triton_rows(a, b)
    assert torch.equal(rows[[0, 2, 3, 5]], torch.zeros_like(rows[[0, 2, 3, 5]]))
    assert derive_pair(rows)["numel"].tolist() == sizes
    assert_rows_match_torch_backend(rows, a, b)


def test_triton_group_of_only_empty_tensors_writes_zero_rows(poisoned_empty):
    a = [torch.ones(20, device=DEVICE), torch.zeros(0, dtype=torch.float16, device=DEVICE)]
    b = [torch.ones(20, device=DEVICE), torch.zeros(0, dtype=torch.float16, device=DEVICE)]
    rows = triton_rows(a, b)
    assert rows[1].tolist() == [0.0] * rows.shape[1]
    assert_rows_match_torch_backend(rows, a, b)


@pytest.mark.parametrize("with_origin", [False, True], ids=["no-origin", "origin"])
def test_triton_rows_match_torch_for_mixed_dtypes_in_one_call(poisoned_empty, with_origin):
    a_dtypes, b_dtypes, o_dtypes = DTYPE_MIXES["per-layer"]
    sizes = [17, 0, 45, 3, 64, 33, 20]
    a = flat_layers(sizes, a_dtypes, seed=18)
    b = flat_layers(sizes, b_dtypes, seed=19)
    origin = flat_layers(sizes, o_dtypes, seed=20, scale=0.5) if with_origin else None
    assert_rows_match_torch_backend(triton_rows(a, b, origin), a, b, origin)


@pytest.mark.parametrize("with_origin", [False, True], ids=["no-origin", "origin"])
def test_triton_rows_match_torch_for_views_with_different_misalignment(poisoned_empty, with_origin):
    generator = torch.Generator().manual_seed(21)

    def base(dtype):
        return torch.randn(100, generator=generator).to(dtype).to(DEVICE)

    fp32_a, fp32_b, fp32_o = base(torch.float32), base(torch.float32), base(torch.float32)
    bf16_a, fp16_b, bf16_o = base(torch.bfloat16), base(torch.float16), base(torch.bfloat16)
    a = [fp32_a[3:80], bf16_a[5:70], fp32_a[80:81], bf16_a[1:2]]
    b = [fp32_b[1:78], fp16_b[2:67], fp32_b[3:4], fp16_b[7:8]]
    origin = [fp32_o[2:79], bf16_o[6:71], fp32_o[0:1], bf16_o[4:5]] if with_origin else None
    assert a[0].data_ptr() % 16 != b[0].data_ptr() % 16
    assert a[1].data_ptr() % 16 != b[1].data_ptr() % 16
    assert_rows_match_torch_backend(triton_rows(a, b, origin), a, b, origin)


def test_triton_rows_are_bit_identical_across_runs(poisoned_empty):
    a = flat_layers(SIZES, [torch.bfloat16] * len(SIZES), seed=22)
    b = flat_layers(SIZES, [torch.float32] * len(SIZES), seed=23)
    origin = flat_layers(SIZES, [torch.float32] * len(SIZES), seed=24)
    first = triton_rows(a, b, origin)
    second = triton_rows(a, b, origin)
    assert torch.equal(first, second)


def test_triton_launches_two_kernels_per_dtype_group(monkeypatch):
    chunk_kernel = CountingKernel(pair_kernels._pair_chunk_kernel)
    merge_kernel = CountingKernel(merge_kernels._merge_kernel)
    monkeypatch.setattr(pair_kernels, "_pair_chunk_kernel", chunk_kernel)
    monkeypatch.setattr(merge_kernels, "_merge_kernel", merge_kernel)
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    sizes = [40, 5, 0, 70, 9, 33]  # three (a, b) dtype groups of two layers each, among many chunks
    a = flat_layers(sizes, [f32, bf16, f32, f16, bf16, f16], seed=25)
    b = flat_layers(sizes, [f32, f32, f32, f16, f32, f16], seed=26)
    rows = triton_rows(a, b)
    assert (chunk_kernel.launches, merge_kernel.launches) == (3, 3)
    assert_rows_match_torch_backend(rows, a, b)


# --- public API ---------------------------------------------------------------------------------------------


def snapshots_of_two_sgd_steps() -> list[torch.nn.Module]:
    """The model at initialisation, after one and after two SGD steps."""
    torch.manual_seed(27)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = [copy.deepcopy(model)]
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(16, 6, device=DEVICE)).square().mean().backward()
        optimizer.step()
        snapshots.append(copy.deepcopy(model))
    return snapshots


def test_pair_stats_of_two_training_steps_matches_a_per_layer_torch_loop():
    _, step1, step2 = snapshots_of_two_sgd_steps()
    stats = fgs.pair_stats(step1, step2)
    pairs = list(zip(step1.named_parameters(), step2.parameters()))
    assert stats.names == [name for (name, _), _ in pairs] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    expected = {
        "numel": [p.numel() for (_, p), _ in pairs],
        "dot": [(p * q).sum() for (_, p), q in pairs],
        "a_l2": [p.norm() for (_, p), _ in pairs],
        "b_l2": [q.norm() for _, q in pairs],
        "cos": [F.cosine_similarity(p.reshape(-1), q.reshape(-1), dim=0) for (_, p), q in pairs],
        "dist": [torch.dist(p, q) for (_, p), q in pairs],
    }
    assert stats.numel.tolist() == expected["numel"]
    for field in FLOAT_FIELDS:
        torch.testing.assert_close(stats.__getattribute__(field), torch.stack(expected[field]).detach(),
                                   rtol=1e-5, atol=1e-6, msg=field)


def test_update_directions_measured_from_the_initial_model():
    init, step1, step2 = snapshots_of_two_sgd_steps()
    stats = fgs.pair_stats(step1, step2, origin=init)
    for i, (p0, p1, p2) in enumerate(zip(init.parameters(), step1.parameters(), step2.parameters())):
        update1, update2 = (p1 - p0).detach().reshape(-1), (p2 - p0).detach().reshape(-1)
        expected_cos = F.cosine_similarity(update1.double(), update2.double(), dim=0).float()
        torch.testing.assert_close(stats.cos[i], expected_cos, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.a_l2[i], update1.norm(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats.dist[i], torch.dist(p1, p2).detach(), rtol=1e-5, atol=1e-7)


def test_state_dicts_are_matched_by_name_and_integer_buffers_are_skipped():
    torch.manual_seed(28)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    model = model.to(DEVICE)
    before = copy.deepcopy(model.state_dict())
    model.train()
    model(torch.randn(8, 4, device=DEVICE))  # updates the running statistics and num_batches_tracked
    after = model.state_dict()
    reordered = dict(reversed(list(after.items())))  # matched by name, not position; layers follow a's order
    stats = fgs.pair_stats(before, reordered)
    floating = [name for name, t in before.items() if t.is_floating_point()]
    assert stats.names == floating
    assert "1.num_batches_tracked" in before and "1.num_batches_tracked" not in stats.names
    assert_matches_oracle(stats, [before[n] for n in floating], [after[n] for n in floating])
    assert stats.dist[floating.index("1.running_mean")].item() > 0


def test_strict_false_skips_names_present_in_one_set_only():
    generator = torch.Generator().manual_seed(29)
    shared_a, shared_b = torch.randn(4, generator=generator), torch.randn(4, generator=generator)
    a = {"only_a": torch.randn(3), "shared": shared_a}
    b = {"shared": shared_b, "only_b": torch.randn(2, 2)}
    stats = fgs.pair_stats(a, b, strict=False)
    assert stats.names == ["shared"]
    assert_matches_oracle(stats, [shared_a], [shared_b])


def test_strict_names_mismatch_names_the_culprits():
    a = {"only_a": torch.ones(3), "shared": torch.ones(4)}
    b = {"shared": torch.ones(4), "only_b": torch.ones(2)}
    with pytest.raises(ValueError, match=r"only in a: 'only_a'; only in b: 'only_b'"):
        fgs.pair_stats(a, b)


def test_origin_missing_a_name_is_named_or_skipped():
    a = {"w": torch.ones(3), "v": torch.ones(2)}
    b = {"w": torch.zeros(3), "v": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"missing from origin: 'v'"):
        fgs.pair_stats(a, b, origin={"w": torch.ones(3)})
    assert fgs.pair_stats(a, b, origin={"w": torch.ones(3)}, strict=False).names == ["w"]


class TiedNet(torch.nn.Module):
    """An embedding tied to the output layer (one Parameter, two state_dict keys) and a BatchNorm (float
    buffers in the state_dict)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.out = torch.nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(self.norm(self.emb(tokens)))


def tied_net_and_a_trained_copy() -> tuple[TiedNet, TiedNet]:
    """A TiedNet and a copy after one SGD step (parameters and running statistics both moved)."""
    torch.manual_seed(33)
    model = TiedNet().to(DEVICE)
    trained = copy.deepcopy(model)
    trained(torch.randint(0, 10, (16,), device=DEVICE)).square().mean().backward()
    with torch.no_grad():
        for p in trained.parameters():
            p -= 0.1 * p.grad
    return model, trained


def assert_same_pair_stats(got: fgs.PairStats, expected: fgs.PairStats) -> None:
    assert got.names == expected.names
    for field in FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), msg=field)
        torch.testing.assert_close(getattr(got.total, field), getattr(expected.total, field), msg=field)


def test_a_model_against_a_state_dict_skips_its_buffers_and_tied_aliases():
    model, trained = tied_net_and_a_trained_copy()
    state_dict = trained.state_dict()
    assert {"norm.running_mean", "norm.running_var", "out.weight"} <= set(state_dict)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["emb.weight", "norm.weight", "norm.bias"]
    expected = fgs.pair_stats(list(model.parameters()), [state_dict[n] for n in names], names=names)
    assert_same_pair_stats(fgs.pair_stats(model, state_dict), expected)
    assert_same_pair_stats(fgs.pair_stats(model, copy.deepcopy(trained).state_dict()), expected)


def test_a_state_dict_against_a_model_skips_its_buffers_and_tied_aliases():
    model, trained = tied_net_and_a_trained_copy()
    state_dict = trained.state_dict()
    names = [name for name, _ in model.named_parameters()]
    expected = fgs.pair_stats([state_dict[n] for n in names], list(model.parameters()), names=names)
    assert_same_pair_stats(fgs.pair_stats(state_dict, model), expected)


def test_a_parameter_missing_from_a_state_dict_against_a_model_is_named_or_skipped():
    model, trained = tied_net_and_a_trained_copy()
    state_dict = trained.state_dict()
    del state_dict["norm.bias"]
    with pytest.raises(ValueError, match=r"\(only in a: 'norm.bias'\)"):
        fgs.pair_stats(model, state_dict)
    assert fgs.pair_stats(model, state_dict, strict=False).names == ["emb.weight", "norm.weight"]


def test_an_origin_state_dict_against_models_skips_their_buffers_and_tied_aliases():
    init, trained = tied_net_and_a_trained_copy()
    origin = init.state_dict()
    names = [name for name, _ in init.named_parameters()]
    expected = fgs.pair_stats(list(trained.parameters()), list(init.parameters()), names=names,
                              origin=[origin[n] for n in names])
    assert_same_pair_stats(fgs.pair_stats(trained, init, origin=origin), expected)
    assert_same_pair_stats(fgs.pair_stats(trained, init.state_dict(), origin=origin), expected)
    torch.testing.assert_close(fgs.cosine_similarity(trained, init.state_dict(), origin=origin),
                               expected.total.cos)


def test_a_parameter_missing_from_an_origin_state_dict_is_named_or_skipped():
    init, trained = tied_net_and_a_trained_copy()
    origin = init.state_dict()
    del origin["emb.weight"]
    with pytest.raises(ValueError, match=r"\(missing from origin: 'emb.weight'\)"):
        fgs.pair_stats(trained, init.state_dict(), origin=origin)
    stats = fgs.pair_stats(trained, init.state_dict(), origin=origin, strict=False)
    assert stats.names == ["norm.weight", "norm.bias"]


def test_duplicated_name_is_named():
    layers = [torch.ones(2), torch.ones(3), torch.ones(4)]
    with pytest.raises(ValueError, match="pair_stats: layer name 'w' appears more than once"):
        fgs.pair_stats(layers, layers, names=["w", "b", "w"])


def test_non_string_name_is_named():
    layers = [torch.ones(2), torch.ones(3)]
    with pytest.raises(TypeError, match="pair_stats: layer names must be str, got 7"):
        fgs.pair_stats(layers, layers, names=["w", 7])
    with pytest.raises(TypeError, match="pair_stats: names must be a sequence of str, got the str 'wb'"):
        fgs.pair_stats(layers, layers, names="wb")


def test_lists_of_different_lengths_are_rejected():
    with pytest.raises(ValueError, match="a has 2 tensors but b has 1"):
        fgs.pair_stats([torch.ones(2), torch.ones(3)], [torch.ones(2)])
    with pytest.raises(ValueError, match="origin has 1 tensors but a has 2"):
        fgs.pair_stats([torch.ones(2), torch.ones(3)], [torch.ones(2), torch.ones(3)], origin=[torch.ones(2)])


def test_shape_mismatch_names_the_layer_and_both_shapes():
    a = [torch.ones(3, 4), torch.ones(2)]
    with pytest.raises(ValueError, match=r"layer 'w' has shape \(3, 4\) in a but \(4, 3\) in b"):
        fgs.pair_stats(a, [torch.ones(4, 3), torch.ones(2)], names=["w", "v"])
    with pytest.raises(ValueError, match=r"layer 'v' has shape \(2,\) in a but \(3,\) in origin"):
        fgs.pair_stats(a, [torch.ones(3, 4), torch.ones(2)], names=["w", "v"],
                       origin=[torch.ones(3, 4), torch.ones(3)])


def test_state_dict_shape_mismatch_names_the_layer():
    with pytest.raises(ValueError, match=r"layer 'fc.weight' has shape \(2, 3\) in a but \(3, 2\) in b"):
        fgs.pair_stats({"fc.weight": torch.ones(2, 3)}, {"fc.weight": torch.ones(3, 2)})


def test_device_mismatch_names_the_layer_and_both_devices():
    with pytest.raises(ValueError, match="layer 'w' is on cpu in a but on meta in b"):
        fgs.pair_stats([torch.ones(2)], [torch.ones(2, device="meta")], names=["w"])
    with pytest.raises(ValueError, match="layer '1' is on meta but layer '0' is on cpu"):
        on_two_devices = [torch.ones(2), torch.ones(2, device="meta")]
        fgs.pair_stats(on_two_devices, on_two_devices)


def test_non_tensor_layer_names_its_layer_and_list():
    with pytest.raises(TypeError, match="layer '1' in a is a float, not a tensor"):
        fgs.pair_stats([torch.ones(2), 1.5], [torch.ones(2), torch.ones(2)])
    with pytest.raises(TypeError, match="layer 'v' in b is a list, not a tensor"):
        fgs.pair_stats([torch.ones(2), torch.ones(2)], [torch.ones(2), [1.0, 2.0]], names=["w", "v"])


@pytest.mark.parametrize("bad", [torch.ones(3), "weights", 3.0, None])
def test_a_single_tensor_or_non_sequence_is_rejected(bad):
    with pytest.raises(TypeError, match="a must be a model, a state_dict or a sequence of tensors"):
        fgs.pair_stats(bad, [torch.ones(3)])


def test_integer_tensors_are_rejected_with_their_dtype():
    with pytest.raises(TypeError, match="layer '0' in b has dtype torch.int64"):
        fgs.pair_stats([torch.ones(3)], [torch.ones(3, dtype=torch.int64)])


def test_mixing_a_model_and_a_sequence_is_rejected():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="both be models/state_dicts or both be sequences"):
        fgs.pair_stats(model, list(model.parameters()))
    with pytest.raises(TypeError, match="origin must be a model/state_dict"):
        fgs.pair_stats(model, copy.deepcopy(model), origin=list(model.parameters()))


def test_cosine_similarity_with_origin_equals_cosine_of_concatenated_differences():
    shapes = [(3, 4), (5,), (0,), (2, 2, 2)]
    a = random_layers(shapes, [torch.float32] * 4, seed=30)
    b = random_layers(shapes, [torch.bfloat16] * 4, seed=31)
    origin = random_layers(shapes, [torch.float32] * 4, seed=32, scale=0.3)
    cos = fgs.cosine_similarity(a, b, origin=origin)
    concat_a = torch.cat([(x.double() - o.double()).reshape(-1) for x, o in zip(a, origin)])
    concat_b = torch.cat([(y.double() - o.double()).reshape(-1) for y, o in zip(b, origin)])
    assert cos.dim() == 0 and cos.dtype == torch.float32
    expected = F.cosine_similarity(concat_a, concat_b, dim=0).float()
    torch.testing.assert_close(cos, expected, rtol=1e-6, atol=1e-7)
    no_origin = fgs.cosine_similarity(a, b)
    expected = F.cosine_similarity(torch.cat([x.double().reshape(-1) for x in a]),
                                   torch.cat([y.double().reshape(-1) for y in b]), dim=0).float()
    torch.testing.assert_close(no_origin, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_origin", [False, True], ids=["no-origin", "origin"])
def test_triton_backend_equals_torch_backend_through_the_public_call(with_origin):
    shapes = [(7, 5), (0,), (33,), (3, 1, 11), (1,)]
    a = random_layers(shapes, [F32, F32, BF16, F16, F32], seed=33)
    b = random_layers(shapes, [F32, BF16, F32, F16, F16], seed=34)
    a[0], b[0] = a[0].t().contiguous().t(), b[0].t().contiguous().t()  # same transposed layout: storage order
    origin = random_layers(shapes, [torch.float32] * 5, seed=35, scale=0.5) if with_origin else None
    torch_stats = fgs.pair_stats(a, b, origin=origin, backend="torch")
    triton_stats = fgs.pair_stats(a, b, origin=origin, backend="triton")
    assert torch.equal(triton_stats.numel, torch_stats.numel)
    for field in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(triton_stats, field), getattr(torch_stats, field),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(getattr(triton_stats.total, field), getattr(torch_stats.total, field),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", NATIVE, "triton"])
def test_transposed_a_with_contiguous_b_pairs_elements_by_index(backend):
    generator = torch.Generator().manual_seed(36)
    weight = torch.randn(5, 3, generator=generator).to(DEVICE)
    a = [weight.t()]  # shape (3, 5), not contiguous
    b = [torch.randn(3, 5, generator=generator).to(DEVICE)]
    origin = [torch.randn(5, 3, generator=generator).to(DEVICE).t()]  # transposed like a, unlike b
    assert not a[0].is_contiguous() and b[0].is_contiguous()
    stats = fgs.pair_stats(a, b, backend=backend)
    assert_matches_oracle(stats, [a[0].contiguous()], b)
    stats = fgs.pair_stats(a, b, origin=origin, backend=backend)
    assert_matches_oracle(stats, [a[0].contiguous()], b, [origin[0].contiguous()])
