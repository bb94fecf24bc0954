"""Trajectory maps against a float64 oracle of the flattened checkpoints; file readers; errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastgradstats as fgs
from fastgradstats.cli import main
from fastgradstats.trajectory.maps import GRAM_BLOCK

safetensors_torch = pytest.importorskip("safetensors.torch")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLOAT_KEYS = ["w", "bias", "scale", "conv", "half"]


def make_series(count: int, seed: int = 0, step: float = 0.3) -> list[dict[str, torch.Tensor]]:
    """A drifting random walk of state_dicts: odd shapes, a 0-d tensor, a bfloat16 tensor, an int buffer."""
    generator = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    shapes = {"w": (3, 5), "bias": (7,), "scale": (), "conv": (2, 3, 3), "half": (5, 2)}
    current = {key: randn(shape) for key, shape in shapes.items()}
    drift = {key: randn(shape) for key, shape in shapes.items()}
    series = []
    for t in range(count):
        state = {key: v.float() for key, v in current.items()}
        state["half"] = current["half"].bfloat16()
        state["steps"] = torch.tensor(t)
        series.append(state)
        current = {key: v + 0.5 * drift[key] + step * randn(v.shape) for key, v in current.items()}
    return series


def flatten(state: dict[str, torch.Tensor], keys=FLOAT_KEYS) -> torch.Tensor:
    return torch.cat([state[key].double().reshape(-1) for key in keys])


def oracle(series, center, keys=FLOAT_KEYS) -> dict:
    """Every output from the concatenated float64 vectors, computed directly."""
    x = torch.stack([flatten(state, keys) for state in series])
    if center is None:
        vectors = x
    elif isinstance(center, int):
        vectors = x - x[center]
    else:
        vectors = x - flatten(center, keys)
    norms = vectors.norm(dim=1)
    cos = torch.stack([F.cosine_similarity(vectors[i:i + 1], vectors, eps=1e-8) for i in range(len(series))])
    cos.fill_diagonal_(1.0)
    cos[norms == 0, norms == 0] = 0.0  # a zero vector has cosine 0, with itself too
    count = len(series)
    dist = torch.stack([(x[i] - x).norm(dim=1) for i in range(count)])
    directed = [i for i in range(count) if norms[i] > 0]
    off = [cos[i, j].item() for i in directed for j in directed if i != j and cos[i, j].isfinite()]
    every = [cos[i, j].item() for i in directed for j in directed if cos[i, j].isfinite()]
    angles = [math.degrees(math.acos(max(-1.0, min(1.0, cos[i, -1].item()))))
              for i in directed if i != center and norms[-1] > 0]
    return {"gram": x @ x.T, "cos": cos, "norms": norms, "dist": dist, "mds": sum(off) / len(off),
            "mds_all": sum(every) / len(every), "cone_angle": max(angles, default=math.nan),
            "path_length": sum(dist[t, t + 1].item() for t in range(count - 1))}


def assert_matches(tmap: fgs.TrajectoryMap, expected: dict, rtol: float = 1e-10,
                   angle_atol: float = 1e-9) -> None:
    for field in ("gram", "cos", "norms", "dist"):
        torch.testing.assert_close(getattr(tmap, field), expected[field], rtol=rtol, atol=rtol,
                                   equal_nan=True, msg=lambda m, field=field: f"{field}: {m}")
    for field in ("mds", "mds_all", "cone_angle", "path_length"):
        atol = angle_atol if field == "cone_angle" else 1e-9
        assert getattr(tmap, field) == pytest.approx(expected[field], rel=1e-9, abs=atol, nan_ok=True), field


@pytest.mark.parametrize("count", [4, 5, 6])
@pytest.mark.parametrize("center", [None, 0, 2, "external"])
@pytest.mark.parametrize("chunk_size", [4, 1 << 22])
def test_matches_the_float64_oracle(count, center, chunk_size):
    series = make_series(count, seed=count)
    centre = make_series(1, seed=99)[0] if center == "external" else center
    tmap = fgs.trajectory_map(series, center=centre, progress=False, chunk_size=chunk_size)
    assert tmap.names == [str(i) for i in range(count)]
    assert tmap.keys == FLOAT_KEYS  # the int buffer "steps" is skipped
    assert tmap.numel == sum(series[0][key].numel() for key in FLOAT_KEYS)
    assert tmap.center == center
    assert tmap.gram.dtype == tmap.cos.dtype == tmap.dist.dtype == torch.float64
    assert_matches(tmap, oracle(series, centre))


def test_wide_chunks_use_the_blocked_product():
    # 9100 elements in chunks of 38 rows (4940 elements): whole blocks of GRAM_BLOCK columns and a remainder.
    assert GRAM_BLOCK < 4940
    generator = torch.Generator().manual_seed(3)
    series = [{"big": torch.randn(70, 130, generator=generator), "small": torch.randn(3, generator=generator)}
              for _ in range(4)]
    tmap = fgs.trajectory_map(series, center=1, progress=False, chunk_size=5000)
    assert_matches(tmap, oracle(series, 1, keys=["big", "small"]))


def test_centre_index_gives_a_zero_row_and_column_as_cosine_similarity():
    series = make_series(4)
    tmap = fgs.trajectory_map(series, center=2, progress=False)
    assert tmap.norms[2] == 0
    assert tmap.cos[2].eq(0).all() and tmap.cos[:, 2].eq(0).all()
    assert tmap.cos[[0, 1, 3], [0, 1, 3]].eq(1).all()
    centred = [flatten(state) - flatten(series[2]) for state in series]
    assert tmap.cos[2, 0].item() == F.cosine_similarity(centred[2], centred[0], dim=0).item() == 0.0


def test_the_zero_centred_vector_takes_no_part_in_the_mds():
    tmap = fgs.trajectory_map(make_series(4), center=2, progress=False)
    others = [0, 1, 3]
    off = [tmap.cos[i, j].item() for i in others for j in others if i != j]
    assert tmap.mds == pytest.approx(sum(off) / len(off), rel=1e-12)


def test_negative_centre_counts_from_the_end_and_the_final_centre_has_no_cone():
    series = make_series(4)
    tmap = fgs.trajectory_map(series, center=-1, progress=False)
    assert tmap.center == 3
    assert math.isnan(tmap.cone_angle)
    assert_matches(tmap, oracle(series, 3))


def test_small_steps_far_from_the_origin_keep_their_precision():
    # ‖Δθ‖ ≈ 1e-6 ‖θ‖: a raw-Gram formula would lose ~12 digits; the step basis loses none. The raw vectors
    # (center=None) are 2e-6 rad apart, where arccos turns a 1e-16 error of the cosine into ~1e-8 degrees.
    series = make_series(5, step=1e-5)
    shift = {key: 1e3 * torch.ones_like(t, dtype=torch.float64) for key, t in series[0].items()}
    series = [{key: (t.double() * 1e-3 + shift[key]) if key != "steps" else t for key, t in state.items()}
              for state in series]
    for center in (None, 0, 3):
        assert_matches(fgs.trajectory_map(series, center=center, progress=False, chunk_size=8),
                       oracle(series, center), rtol=1e-9, angle_atol=1e-7 if center is None else 1e-9)


def test_per_layer_maps_sum_to_the_global_gram_and_match_the_oracle():
    series = make_series(5)
    tmap = fgs.trajectory_map(series, center=1, per_layer=True, progress=False, chunk_size=3)
    assert list(tmap.layers) == FLOAT_KEYS
    layer_sum = sum(layer.gram for layer in tmap.layers.values())
    torch.testing.assert_close(layer_sum, tmap.gram, rtol=1e-12, atol=0)
    for key, layer in tmap.layers.items():
        assert layer.keys == [key] and layer.layers is None
        assert_matches(layer, oracle(series, 1, keys=[key]))


def test_reads_safetensors_and_pt_files_in_chunks(tmp_path):
    series = make_series(5)
    paths = []
    for t, state in enumerate(series):
        path = tmp_path / (f"step{t}.safetensors" if t % 2 else f"step{t}.pt")
        if t % 2:
            safetensors_torch.save_file(state, path)
        else:
            torch.save(state, path)
        paths.append(path)
    tmap = fgs.trajectory_map(paths, center=0, progress=False, chunk_size=2)
    assert tmap.names == [p.name for p in paths]
    assert sorted(tmap.keys) == sorted(FLOAT_KEYS)  # safetensors lists its keys sorted
    assert_matches(tmap, oracle(series, 0, keys=tmap.keys))


def test_each_checkpoint_tensor_is_read_once(tmp_path, monkeypatch):
    import safetensors

    series = make_series(4)
    paths = [tmp_path / f"{t}.safetensors" for t in range(4)]
    for state, path in zip(series, paths):
        safetensors_torch.save_file(state, path)
    get_slice_calls, elements_read = {}, {}
    real_safe_open = safetensors.safe_open

    class CountingSlice:
        def __init__(self, inner, path):
            self.inner, self.path = inner, path

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __getitem__(self, index):
            piece = self.inner[index]
            elements_read[self.path] = elements_read.get(self.path, 0) + piece.numel()
            return piece

    class CountingHandle:
        def __init__(self, path, framework):
            self.path, self.inner = str(path), real_safe_open(path, framework=framework)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            get_slice_calls[(self.path, key)] = get_slice_calls.get((self.path, key), 0) + 1
            return CountingSlice(self.inner.get_slice(key), self.path)

    monkeypatch.setattr(safetensors, "safe_open", CountingHandle)
    fgs.trajectory_map(paths, center=0, per_layer=True, progress=False, chunk_size=3)
    assert set(get_slice_calls.values()) == {1}
    assert len(get_slice_calls) == 4 * len(series[0])
    assert elements_read == {str(p): sum(series[0][key].numel() for key in FLOAT_KEYS) for p in paths}


def test_truncated_safetensors_file_raises_naming_it(tmp_path):
    series = make_series(3)
    paths = [tmp_path / f"{t}.safetensors" for t in range(3)]
    for state, path in zip(series, paths):
        safetensors_torch.save_file(state, path)
    paths[1].write_bytes(paths[1].read_bytes()[:-16])
    with pytest.raises(ValueError, match="1.safetensors"):
        fgs.trajectory_map(paths, progress=False)


def test_corrupt_pt_file_raises_naming_it(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save(make_series(1)[0], good)
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="bad.pt"):
        fgs.trajectory_map([good, bad], progress=False)


def test_mismatched_shapes_raise_naming_the_key_and_both_shapes():
    series = make_series(3)
    series[2]["w"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"'w' has shape \(3, 5\) in checkpoint '0' but \(3, 4\) in '2'"):
        fgs.trajectory_map(series, progress=False)


def test_different_key_sets_raise_naming_the_key_unless_excluded():
    series = make_series(3)
    series[1]["running_mean"] = torch.zeros(4)
    with pytest.raises(ValueError, match="'running_mean' is in checkpoint '1' but not in '0'"):
        fgs.trajectory_map(series, progress=False)
    del series[1]["bias"]
    with pytest.raises(ValueError, match="'bias' is in checkpoint '0' but not in '1'"):
        fgs.trajectory_map(series, progress=False, exclude="running_")
    tmap = fgs.trajectory_map(series, progress=False, exclude=["running_", "^bias$"])
    assert tmap.keys == ["w", "scale", "conv", "half"]


def test_keys_with_a_missing_key_warn_and_skip_it():
    series = make_series(4)
    del series[2]["conv"]
    with pytest.warns(UserWarning) as warned:
        tmap = fgs.trajectory_map(series, keys=["conv", "w", "steps", "bias"], center=0, progress=False)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2
    assert "skipping 'conv'" in messages[0] and "'2'" in messages[0] and "'1'" not in messages[0]
    assert "skipping 'steps'" in messages[1]  # an int buffer: not floating-point
    assert tmap.keys == ["w", "bias"]
    assert_matches(tmap, oracle(series, 0, keys=["w", "bias"]))


@pytest.mark.parametrize("count", [0, 1])
def test_needs_two_checkpoints(count):
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        fgs.trajectory_map(make_series(count), progress=False)


@pytest.mark.parametrize("center", [4, -5])
def test_centre_out_of_range_raises(center):
    with pytest.raises(IndexError, match="out of range"):
        fgs.trajectory_map(make_series(4), center=center, progress=False)


def test_to_json_parses_with_nan_as_null():
    series = make_series(4)
    series[1]["w"][0, 0] = math.nan
    tmap = fgs.trajectory_map(series, center=0, per_layer=True, progress=False)
    data = json.loads(tmap.to_json())
    assert data["cos"] == [[None if math.isnan(v) else v for v in row] for row in tmap.cos.tolist()]
    assert None in data["cos"][1] and math.isnan(tmap.mds) and data["mds"] is None
    assert len(data["gram"]) == 4
    assert set(data["layers"]) == set(FLOAT_KEYS) and "gram" not in data["layers"]["w"]


def test_plot_writes_a_png(tmp_path):
    tmap = fgs.trajectory_map(make_series(5), center=0, progress=False)
    fig = tmap.plot(tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "MDS" in fig.axes[0].get_title()


def test_progress_bar_runs(capsys):
    pytest.importorskip("tqdm")
    fgs.trajectory_map(make_series(3), progress=True)
    assert "trajectory_map" in capsys.readouterr().err


def test_cli_writes_the_map_and_prints_the_summary(tmp_path, capsys):
    series = make_series(4)
    paths = [tmp_path / f"ckpt{t}.safetensors" for t in range(4)]
    for state, path in zip(series, paths):
        safetensors_torch.save_file(state, path)
    out = tmp_path / "report"
    assert main(["trajectory", *map(str, paths), "--center", "0", "--per-layer", "--exclude", "^half$",
                 "--out", str(out)]) == 0
    data = json.loads((out / "trajectory.json").read_text())
    assert data["names"] == [p.name for p in paths] and data["center"] == 0 and "half" not in data["keys"]
    assert set(json.loads((out / "trajectory_layers.json").read_text())) == set(data["keys"])
    assert (out / "trajectory.png").read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert "MDS" in printed and "cone angle" in printed and "path length" in printed


def test_cli_reports_bad_files_as_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    good = tmp_path / "good.safetensors"
    safetensors_torch.save_file(make_series(1)[0], good)
    with pytest.raises(SystemExit) as exit_info:
        main(["trajectory", str(good), str(bad), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "bad.safetensors" in capsys.readouterr().err
