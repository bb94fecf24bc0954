"""The benchmark module and the ``fastgradstats bench`` command, on a few small tensors with one repeat."""

import json
from dataclasses import asdict

import pytest
import torch
from conftest import DEVICE, requires_cuda

import fastgradstats as fgs
from fastgradstats import bench
from fastgradstats.cli import main

SMALL = bench.Workload("small", ((3, 5), (40,), (2, 3, 4)))
SMALL_BF16 = bench.Workload("small-bf16", SMALL.shapes, torch.bfloat16)
ENVIRONMENT_FIELDS = {"date", "commit", "device", "torch", "triton", "backend", "dtype", "tensors", "repeats"}
ROW_FIELDS = {"workload", "family", "candidate", "ms", "bytes", "gb_per_s", "floor_fraction", "speedups",
              "baseline_ms", "launches", "host_syncs", "error"}
needs_triton = pytest.mark.skipif(not fgs.dispatch.triton_available(), reason="needs triton")


def run_small(workload=SMALL, families=None, **kwargs):
    kwargs = {"repeats": 1, "warmup": 0, "device": DEVICE, "results": None, **kwargs}
    return bench.run([workload], families, **kwargs)


def test_every_family_gives_ours_then_its_baselines_then_the_floor():
    rows = run_small()
    expected = [(family, candidate) for family, baselines in bench.FAMILIES.items()
                for candidate in (bench.OURS, *baselines, bench.FLOOR)]
    assert [(row.family, row.candidate) for row in rows] == expected


def test_rows_have_every_field_measured():
    for row in run_small():
        assert set(asdict(row)) == ROW_FIELDS
        assert row.workload == "small" and row.error is None
        assert row.ms > 0 and row.gb_per_s > 0 and row.floor_fraction > 0


def test_our_rows_hold_the_speedup_over_each_baseline_of_their_family():
    rows = run_small()
    by_key = {(row.family, row.candidate): row for row in rows}
    for family, baselines in bench.FAMILIES.items():
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


def test_torch_backend_reports_no_launch_count():
    ours = run_small(families=["stats"], backend="torch")[0]
    assert ours.launches is None
    assert ours.host_syncs == (0 if DEVICE == "cuda" else None)


@needs_triton
def test_triton_launches_are_counted_per_call():
    rows = run_small(backend="triton")
    launches = {row.family: row.launches for row in rows if row.candidate == bench.OURS}
    assert launches == {"stats+log2": 2, "stats": 2, "linear-hist": 3, "pair": 2, "trajectory": 0}
    assert all(row.launches is None for row in rows if row.candidate != bench.OURS)


@needs_triton
def test_launch_counting_sees_one_pair_of_launches_per_dtype_and_restores_the_kernels():
    from fastgradstats.kernels import merge, tensor_stats

    chunk_kernel, merge_kernel = tensor_stats._chunk_kernel, merge._merge_kernel
    tensors = [torch.ones(5, device=DEVICE), torch.ones(7, device=DEVICE, dtype=torch.bfloat16)]
    assert bench.count_launches(lambda: fgs.tensor_stats(tensors, backend="triton")) == 4
    assert tensor_stats._chunk_kernel is chunk_kernel and merge._merge_kernel is merge_kernel


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
