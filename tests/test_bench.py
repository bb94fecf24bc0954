"""The benchmark module and the ``fastgradstats bench`` command, on a few small tensors with one repeat."""

import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, requires_cuda

import fastgradstats as fgs
from fastgradstats import launches as bench_launches
from fastgradstats.bench import suite as bench
from fastgradstats.cli import main

SMALL = bench.Workload("small", ((3, 5), (40,), (2, 3, 4)))
SMALL_BF16 = bench.Workload("small-bf16", SMALL.shapes, torch.bfloat16)
ENVIRONMENT_FIELDS = {"date", "commit", "device", "torch", "triton", "backend", "dtype", "tensors", "repeats"}
ROW_FIELDS = {"workload", "family", "candidate", "ms", "bytes", "gb_per_s", "floor_fraction", "speedups",
              "baseline_ms", "launches", "launch_ops", "host_syncs", "error", "extra_peak_bytes"}
needs_triton = pytest.mark.skipif(not fgs.dispatch.triton_available(), reason="needs triton")


def run_small(workload=SMALL, families=None, **kwargs):
    kwargs = {"repeats": 1, "warmup": 0, "device": DEVICE, "results": None, **kwargs}
    return bench.run([workload], families, **kwargs)


def test_every_family_gives_ours_then_its_baselines_then_the_floor():
    rows = run_small()
    expected = [(family, candidate) for family, baselines in bench.FAMILIES.items()
                for candidate in (bench.OURS, *baselines, bench.FLOOR) if family in bench.DEFAULT_FAMILIES]
    assert [(row.family, row.candidate) for row in rows] == expected


def test_rows_have_every_field_measured():
    for row in run_small():
        assert set(asdict(row)) == ROW_FIELDS
        assert row.workload == "small" and row.error is None
        assert row.ms > 0 and row.gb_per_s > 0 and row.floor_fraction > 0


def test_our_rows_hold_the_speedup_over_each_baseline_of_their_family():
    rows = run_small()
    by_key = {(row.family, row.candidate): row for row in rows}
    for family in bench.DEFAULT_FAMILIES:
        baselines = bench.FAMILIES[family]
        ours = by_key[family, bench.OURS]
        assert set(ours.speedups) == set(ours.baseline_ms) == set(baselines)
        for baseline in baselines:
            assert ours.baseline_ms[baseline] == by_key[family, baseline].ms
            assert ours.speedups[baseline] == pytest.approx(by_key[family, baseline].ms / ours.ms)


def test_floor_fraction_is_floor_time_over_time():
    rows = run_small(families=["stats"])
    floor = rows[-1]
    assert floor.candidate == bench.FLOOR and floor.floor_fraction == 1.0
    for row in rows:
        assert row.floor_fraction == pytest.approx(floor.ms / row.ms)


@pytest.mark.parametrize("workload", [SMALL, SMALL_BF16], ids=["fp32", "bf16"])
def test_workload_tensors_are_aligned_views_of_the_buffer_the_floor_reads(workload, monkeypatch):
    tensors = workload.tensors(torch.device(DEVICE))
    buffer = bench.storage_of(tensors)
    assert [t.shape for t in tensors] == [torch.Size(shape) for shape in workload.shapes]
    assert all(t.dtype == workload.dtype and t.is_contiguous() for t in tensors)
    assert all(t.data_ptr() % 64 == 0 for t in tensors)
    assert all(t.untyped_storage().data_ptr() == buffer.data_ptr() for t in tensors)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))  # no two overlap
    assert buffer.nbytes < workload.num_bytes + 64 * len(tensors)
    summed = []
    monkeypatch.setattr(torch, "sum", lambda t: summed.append(t) or t.new_zeros(()))
    a, b = tensors, workload.tensors(torch.device(DEVICE), seed=1)
    bench.read_floor(bench.lists_read("pair", a, b))()
    assert [t.data_ptr() for t in summed] == [buffer.data_ptr(), bench.storage_of(b).data_ptr()]
    assert [t.numel() for t in summed] == [buffer.numel()] * 2


def test_bytes_are_numel_times_itemsize_of_each_list_read():
    numel = 3 * 5 + 40 + 2 * 3 * 4
    assert SMALL_BF16.num_bytes == numel * 2
    for row in run_small(SMALL_BF16, ["stats", "pair"]):
        assert row.bytes == (2 if row.family == "pair" else 1) * numel * 2
        assert row.gb_per_s == pytest.approx(row.bytes / (row.ms * 1e-3) / 1e9)


def test_model_workloads_have_their_real_sizes():
    gpt2 = bench.WORKLOADS["gpt2-small"]
    assert len(gpt2.shapes) == 148 and gpt2.numel == 124_439_808 and gpt2.dtype == torch.float32
    assert 0.9e9 < bench.WORKLOADS["1b"].numel < 1.2e9 and bench.WORKLOADS["1b"].dtype == torch.bfloat16
    assert 6.5e9 < bench.WORKLOADS["7b"].numel < 7.5e9
    sizes = [shape[0] for shape in bench.WORKLOADS["many-small"].shapes]
    assert len(sizes) == 5000 and min(sizes) >= 100 and max(sizes) <= 5000


def test_results_lines_are_appended_and_parse(tmp_path):
    path = tmp_path / "results" / "results.jsonl"
    first = run_small(families=["stats"], results=path)
    second = run_small(families=["stats"], results=path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(first) + len(second)
    records = [json.loads(line) for line in lines]
    for record in records:
        assert ROW_FIELDS <= set(record)
        assert ENVIRONMENT_FIELDS <= set(record)
        assert record["date"].endswith("Z") and record["torch"] == torch.__version__
    assert [r["candidate"] for r in records[:3]] == ["ours", "norm-loop", "foreach-norm"]
    assert records[0]["speedups"].keys() == {"norm-loop", "foreach-norm"}


def test_a_failing_candidate_gives_a_row_with_its_error(monkeypatch):
    def out_of_memory(a, b):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB")

    monkeypatch.setitem(bench.BASELINES, "cat-cosine", out_of_memory)
    ours, cat, loop, _ = run_small(families=["pair"])
    assert cat.ms is None and cat.gb_per_s is None and "out of memory" in cat.error
    assert set(ours.speedups) == {"cosine-loop"} and ours.baseline_ms["cat-cosine"] is None
    assert loop.ms is not None


def test_a_workload_larger_than_free_memory_is_skipped(monkeypatch, capsys):
    monkeypatch.setattr(bench, "free_bytes", lambda device: 100)
    assert run_small() == []
    assert "small: skipped" in capsys.readouterr().out


def test_every_row_counts_the_launches_of_one_call():
    rows = run_small(families=["stats", "linear-hist"], backend="torch")
    for row in rows:
        assert row.launches >= 1 and row.launches == sum(row.launch_ops.values()), row
    by_candidate = {row.candidate: row for row in rows}
    assert by_candidate[bench.FLOOR].launch_ops == {"aten.sum": 1}
    assert by_candidate["norm-loop"].launch_ops == {"aten.linalg_vector_norm": len(SMALL.shapes)}


def test_host_syncs_are_counted_for_every_candidate_on_cuda():
    rows = run_small(families=["linear-hist"], backend="torch")
    syncs = {row.candidate: row.host_syncs for row in rows}
    if DEVICE == "cuda":
        assert syncs == {"ours": 0, "wandb-loop": 2 * len(SMALL.shapes), "read-floor": 0}  # min, max .item()
    else:
        assert syncs == dict.fromkeys(syncs, None)


@needs_triton
def test_triton_launches_are_counted_per_call():
    rows = run_small(backend="triton")
    for row in rows:
        assert row.launches == sum(row.launch_ops.values()), row
    ours = {row.family: row.launch_ops for row in rows if row.candidate == bench.OURS}
    for family in ("stats+log2", "stats", "linear-hist", "pair"):  # our Triton kernels are counted
        assert any(not name.startswith("aten.") for name in ours[family]), ours[family]
    theirs = [name for row in rows if row.candidate != bench.OURS for name in row.launch_ops]
    assert theirs and all(name.startswith("aten.") for name in theirs)


def test_workloads_run_in_each_given_dtype(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = run_small(families=["stats"], dtypes=[torch.bfloat16, torch.float32], results=path)
    assert [row.bytes for row in rows] == [79 * 2] * 4 + [79 * 4] * 4
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["dtype"] for r in records] == ["bfloat16"] * 4 + ["float32"] * 4


def test_roofline_table_sets_the_prediction_beside_the_measured_fraction():
    def model(name, fraction):
        return {"name": name, "predictions": [{"gpu": "H100 SXM", "fraction": 1.0},
                                              {"gpu": "H200", "fraction": fraction}]}

    models = [model("tensor_stats_log2[bf16]", 0.6), model("tensor_stats[bf16]", 0.75),
              model("linear_hist[bf16]", 0.25)]
    assert bench.predicted_fraction("stats+log2", "bfloat16", models, "H200") == 0.6
    assert bench.predicted_fraction("linear-hist", "bfloat16", models, "H200") == pytest.approx(
        1 / (1 / 0.75 + 1 / 0.25))  # the rows pass, then the histogram pass
    assert bench.predicted_fraction("pair", "bfloat16", models, "H200") is None
    assert bench.predicted_fraction("trajectory", "bfloat16", models, "H200") is None
    records = [{"workload": "1b", "dtype": "bfloat16", "family": "stats+log2", "candidate": "ours", "ms": 1.0,
                "gb_per_s": 2400.0, "floor_fraction": 0.55, "launches": 90, "error": None},
               {"workload": "1b", "dtype": "bfloat16", "family": "stats+log2", "candidate": "norm-loop",
                "ms": 3.0, "gb_per_s": 800.0, "floor_fraction": 0.2, "launches": 291, "error": None}]
    table = bench.roofline_table(records, models, "H200").splitlines()
    assert len(table) == 3 and "4,800 GB/s" in table[0]
    assert table[2].split() == ["1b", "bfloat16", "stats+log2", "1.000", "2400.0", "0.550", "0.500", "0.600",
                                "90"]


@requires_cuda
@needs_triton
def test_our_calls_make_no_host_sync_on_cuda():
    rows = run_small(backend="triton", device="cuda")
    assert {row.family: row.host_syncs for row in rows if row.candidate == bench.OURS} == dict.fromkeys(
        bench.FAMILIES, 0)


def test_table_shows_every_candidate_and_the_failures(monkeypatch):
    rows = run_small(families=["stats"])
    rows[1].ms, rows[1].error = None, "RuntimeError: boom"
    table = bench.format_table(SMALL, rows, bench.environment(torch.device(DEVICE), None), repeats=1)
    assert table.startswith("small: 3 tensors, 79 elements of float32")
    for candidate in ("ours", "norm-loop", "foreach-norm", "read-floor"):
        assert candidate in table
    assert "failed" in table and "RuntimeError: boom" in table


def test_cli_bench_runs_the_tiny_workload_without_saving(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--workload", "tiny", "--family", "stats", "--family", "pair", "--repeats", "1",
                 "--device", DEVICE, "--no-save"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: 4 tensors") and "cat-cosine" in out and "wandb-loop" not in out
    assert not (tmp_path / "benchmarks").exists()


def test_cli_bench_appends_to_the_results_path(tmp_path):
    path = tmp_path / "out.jsonl"
    assert main(["bench", "--workload", "tiny", "--family", "stats", "--repeats", "1", "--device", DEVICE,
                 "--results", str(path)]) == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["candidate"] for r in records] == ["ours", "norm-loop", "foreach-norm", "read-floor"]
    assert {r["workload"] for r in records} == {"tiny"} and {r["repeats"] for r in records} == {1}


@pytest.mark.parametrize("option", [["--repeats", "0"], ["--workload", "huge"], ["--family", "norms"]])
def test_cli_bench_rejects_bad_options(option):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--no-save", *option])
    assert exit_info.value.code == 2


DEVICE_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"


def test_device_check_script_parses():
    subprocess.run(["bash", "-n", str(DEVICE_CHECK)], check=True)


@needs_triton
def test_device_check_dry_run_records_every_step_and_goes_on_after_a_failure(tmp_path):
    roofline = tmp_path / "given-roofline.json"
    roofline.write_text(json.dumps([{"name": "tensor_stats_log2[bf16]",
                                     "predictions": [{"gpu": "H200", "fraction": 0.6}]}]))
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "DEVICE_CHECK_DRY_RUN": "1", "PYTHON": sys.executable,
                   "ROOFLINE_JSON": str(roofline), "DEVICE_CHECK_BENCH": "no-such-workload:float32:all "
                   "tiny:bfloat16,float32:stats+log2,pair", "DEVICE_CHECK_BUDGET_S": "120"}
    done = subprocess.run(["bash", str(DEVICE_CHECK)], env=environment, capture_output=True, text=True,
                          timeout=150, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()[1:])
    assert steps == {"env": "ok", "install": "skipped (dry run)", "gpu-tests": "ok", "launches": "ok",
                     "bench-no-such-workload-float32": "failed (1)", "bench-tiny-bfloat16-float32": "ok",
                     "roofline": "ok", "compare": "ok"}, done.stdout
    files = sorted(path.name for path in out.iterdir())  # a lent machine returns at most 8 files
    assert files == ["device_check.log", "launches.json", "results.jsonl", "roofline.json", "steps.tsv"]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["workload"], r["dtype"]) for r in records} == {("tiny", "bfloat16"), ("tiny", "float32")}
    assert set(json.loads((out / "launches.json").read_text())["calls"]) == set(bench_launches.CALLS)
    summary = done.stdout[done.stdout.index("measured vs roofline"):]
    assert "tiny        bfloat16  stats+log2" in summary and " 0.600 " in summary
    assert "FAILED: bench-no-such-workload-float32: failed (1)" in done.stdout


def test_per_expert_family_splits_stacked_tensors_and_runs_only_where_there_are_some():
    stats = bench.ours("per-expert", None)(SMALL.tensors(torch.device(DEVICE)), [])
    assert stats.names == ["0", "1", "2[0]", "2[1]"]
    assert len(bench.slice_loop(SMALL.tensors(torch.device(DEVICE)), [])) == 4
    flat = bench.Workload("flat", ((3, 5), (40,)))
    rows = run_small(flat, ["per-expert", "stats"])
    assert {row.family for row in rows} == {"stats"}


def test_optim_family_is_opt_in_and_ours_takes_chunk_buffers_where_the_copy_takes_the_model():
    """Rows of ours, the copy-based and the Composer-style way with time and extra peak memory; and the
    issue's criterion scaled down: the extra peak of optimizer_stats (state statistics and the update) does
    not grow with the model, under 25 MB (2.5% of a 1 GB model) for a 67 MB one, where the copy-based way
    holds a full copy."""
    assert "optim" in bench.FAMILIES and "optim" not in bench.DEFAULT_FAMILIES
    workload = bench.WORKLOADS["params-64mb"]
    rows = run_small(workload, ["optim"], device="cpu")
    assert [(row.family, row.candidate) for row in rows] == [("optim", "ours"), ("optim", "copy-diff"),
                                                              ("optim", "composer-loop")]
    assert all(row.error is None and row.ms > 0 and row.bytes == 3 * workload.num_bytes for row in rows)
    assert set(rows[0].speedups) == {"copy-diff", "composer-loop"}
    ours, copy, composer = (row.extra_peak_bytes for row in rows)
    if ours is None:
        pytest.skip("peak resident memory cannot be reset here (/proc/self/clear_refs)")
    assert ours < 25e6
    assert copy >= workload.num_bytes
    assert composer >= 2 * max(math.prod(shape) for shape in workload.shapes) * 4  # temporaries per layer


def test_floor_table_gives_the_median_and_range_of_the_runs():
    def record(family, ms, floor_ms, candidate="ours"):
        return {"backend": "native", "dtype": "bfloat16", "family": family, "candidate": candidate, "ms": ms,
                "floor_fraction": floor_ms / ms}

    records = [record("stats", 10.0, 5.0), record("stats", 30.0, 10.0), record("stats", 8.0, 8.0),
               record("pair", 12.0, 10.0), record("stats", 7.0, 7.0, candidate="read-floor")]
    lines = bench.floor_table(records).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| native | bfloat16 | every statistic | 3 | 10.0 ms | 8.0 ms | 2.00× (1.00–3.00) |"
    assert lines[3].startswith("| native | bfloat16 | pair")
    assert lines[3].endswith("| 1 | 12.0 ms | 10.0 ms | 1.20× |")
