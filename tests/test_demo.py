"""The main job, ``fastgradstats demo``: trains, monitors and writes the report folder."""

import json

import pytest

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
