"""examples/trajectory_hallmarks.py: momentum + weight decay < momentum < plain SGD in the mean directional
similarity of the trajectory (quick mode, seed 0), with the lr / (1 - β) control reported beside them."""

import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trajectory_hallmarks.py"


def load_example():
    spec = importlib.util.spec_from_file_location("trajectory_hallmarks", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_momentum_and_weight_decay_lower_the_directional_similarity(capsys):
    example = load_example()
    results = example.main(["--quick", "--seeds", "0"])[0]  # a few seconds on one CPU thread
    omega = {name: run.omega for name, run in results.items()}
    # Held for seeds 0-9 in quick mode, with gaps of at least 0.008 (see the example's docstring).
    assert omega["momentum + wd"] < omega["momentum"] < omega["plain SGD"], omega
    assert example.ordering_holds(results)
    # The control, plain SGD at the momentum runs' effective step lr / (1 - 0.9), is run and reported.
    control = example.CONTROL
    assert example.RUNS[control][0] == example.RUNS["momentum"][0] / (1 - example.MOMENTUM)
    assert 0 < omega[control] < 1
    printed = capsys.readouterr().out
    assert control in printed and f"control ({control}) ω = {omega[control]:.3f}" in printed
    assert "ordering held for 1/1 seeds" in printed
