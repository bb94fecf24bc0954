"""The main job, ``fastgradstats demo``: trains, monitors and writes the report folder."""

import json

import pytest

from fastgradstats import demo
from fastgradstats.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_demo_writes_the_report_folder(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--steps", "12", "--every", "5", "--out", str(out)]) == 0
    lines = (out / "stats.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 6, 11]
    assert {"grad", "param", "init", "alerts"} <= set(records[-1])
    assert "transformer.wte.weight" in records[-1]["grad"]["layers"]
    for name in ("gradient_flow.png", "log2_heatmap.png", "norms.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "largest gradients" in printed and "smallest" in printed and "alerts:" in printed


@pytest.mark.parametrize("argv", [[], ["demo", "--every", "0"], ["demo", "--steps", "-1"],
                                  ["demo", "--backend", "jax"]])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: fastgradstats" in capsys.readouterr().err


def test_cli_triton_backend_on_cpu_needs_the_interpreter(monkeypatch, capsys):
    pytest.importorskip("fastgradstats.kernels")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "triton"])
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_demo_into_an_earlier_report_starts_afresh(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--steps", "3", "--every", "1", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--steps", "2", "--every", "1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    if (out / "tensorboard").exists():
        assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert "held an earlier report" in capsys.readouterr().out


def test_start_report_removes_only_what_the_demo_writes(tmp_path):
    out = tmp_path / "report"
    (out / "tensorboard").mkdir(parents=True)
    written = ["stats.jsonl", "gradient_flow.png", "log2_heatmap.png", "norms.png",
               "tensorboard/events.out.tfevents.1.host.1.0"]
    kept = ["notes.txt", "other.png", "tensorboard/readme.md"]
    for name in written + kept:
        (out / name).write_text(name)
    assert demo.start_report(out) == out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(kept)


def test_demo_help_says_an_earlier_report_is_replaced(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "an earlier report there is replaced" in " ".join(capsys.readouterr().out.split())
