"""The ``fastgradstats`` command rejects bad options and unusable output folders with a one-line usage error,
before it trains or reads a checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgradstats import cli

REPO = Path(__file__).resolve().parents[1]
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Training and checkpoint reading fail the test if they start."""
    monkeypatch.setattr(cli.demo, "run", lambda *args, **kwargs: pytest.fail("the demo started training"))
    monkeypatch.setattr(cli, "trajectory_map", lambda *args, **kwargs: pytest.fail("checkpoints were read"))


def usage_error(argv: list[str], capsys) -> str:
    """The error line of ``fastgradstats ARGV``, which must exit with status 2 after the usage."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastgradstats")
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [err.splitlines()[-1]]
    return errors[0]


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "fastgradstats.cli", *argv], cwd=cwd, env=environment,
                          check=False, capture_output=True, text=True, timeout=300)


def trajectory_argv(tmp_path: Path, *options: str) -> list[str]:
    return ["trajectory", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), *options]


@needs_proc
def test_trajectory_into_an_impossible_folder_is_a_usage_error(tmp_path, capsys, no_expensive_work):
    line = usage_error(trajectory_argv(tmp_path, "--out", "/proc/nope/x"), capsys)
    assert line.startswith("fastgradstats trajectory: error: --out /proc/nope/x: cannot create or write")


def test_trajectory_into_a_file_is_a_usage_error(tmp_path, capsys, no_expensive_work):
    (tmp_path / "taken").write_text("")
    line = usage_error(trajectory_argv(tmp_path, "--out", str(tmp_path / "taken")), capsys)
    assert line == f"fastgradstats trajectory: error: --out {tmp_path / 'taken'}: not a folder"


def test_trajectory_below_a_file_is_a_usage_error(tmp_path, capsys, no_expensive_work):
    (tmp_path / "taken").write_text("")
    line = usage_error(trajectory_argv(tmp_path, "--out", str(tmp_path / "taken" / "x")), capsys)
    assert "cannot create or write to this folder" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_trajectory_on_cuda_without_cuda_is_a_usage_error(tmp_path, capsys, no_expensive_work):
    line = usage_error(trajectory_argv(tmp_path, "--device", "cuda", "--out", str(tmp_path / "out")), capsys)
    assert line == "fastgradstats trajectory: error: --device cuda: CUDA is not available"
    assert not (tmp_path / "out").exists()


def test_trajectory_on_an_unknown_device_is_a_usage_error(tmp_path, capsys, no_expensive_work):
    argv = trajectory_argv(tmp_path, "--device", "nowhere", "--out", str(tmp_path / "out"))
    line = usage_error(argv, capsys)
    assert line.startswith("fastgradstats trajectory: error: --device nowhere: ")


def test_trajectory_with_a_bad_exclude_pattern_is_a_usage_error(tmp_path, capsys, no_expensive_work):
    line = usage_error(trajectory_argv(tmp_path, "--exclude", "running_", "--exclude", "[",
                                       "--out", str(tmp_path / "out")), capsys)
    assert line.startswith("fastgradstats trajectory: error: --exclude '[': not a regular expression")
    assert not (tmp_path / "out").exists()


@needs_proc
def test_demo_into_an_impossible_folder_is_a_usage_error(capsys, no_expensive_work):
    line = usage_error(["demo", "--out", "/proc/nope/x"], capsys)
    assert line.startswith("fastgradstats demo: error: --out /proc/nope/x: cannot create or write")


def test_demo_into_a_file_is_a_usage_error(tmp_path, capsys, no_expensive_work):
    (tmp_path / "taken").write_text("keep me")
    line = usage_error(["demo", "--out", str(tmp_path / "taken")], capsys)
    assert line == f"fastgradstats demo: error: --out {tmp_path / 'taken'}: not a folder"
    assert (tmp_path / "taken").read_text() == "keep me"


def test_bench_on_an_unknown_device_is_a_usage_error(capsys):
    line = usage_error(["bench", "--device", "nowhere", "--no-save"], capsys)
    assert line.startswith("fastgradstats bench: error: --device nowhere: ")


@pytest.mark.parametrize("argv", [
    ["trajectory", "a.pt", "b.pt", "--out", "taken"],
    ["trajectory", "a.pt", "b.pt", "--exclude", "[", "--out", "out"],
    ["demo", "--out", "taken"],
])
def test_the_console_command_prints_no_traceback(tmp_path, argv):
    (tmp_path / "taken").write_text("")
    for name in ("a.pt", "b.pt"):
        torch.save({"w": torch.randn(4, 3)}, tmp_path / name)
    done = run_cli(*argv, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"fastgradstats {argv[0]}: error: ")
