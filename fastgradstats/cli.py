"""The ``fastgradstats`` command.

    fastgradstats demo [--steps 300] [--every 10] [--out fastgradstats-demo] [--seed 0]
                       [--backend torch|triton]
    fastgradstats bench [--workload NAME ...] [--family NAME ...] [--repeats N] [--device cpu|cuda]
                        [--backend torch|triton] [--results PATH] [--no-save]
    fastgradstats trajectory CKPT... [--center 0|PATH] [--per-layer] [--exclude REGEX ...] [--device cpu|cuda]
                             --out DIR

``demo`` trains a tiny transformer on the CPU with a Monitor attached and writes a report folder (statistics
as JSON lines, plots, a TensorBoard log); see :mod:`fastgradstats.demo`. ``bench`` times the statistics
against the usual PyTorch baselines on model-shaped random tensors and appends the rows to a JSON-lines
results file; see :mod:`fastgradstats.bench.suite`. ``trajectory``
maps a checkpoint series (cosines, MDS, cone
angle, path length) into ``DIR/trajectory.json`` and ``DIR/trajectory.png``; see
:mod:`fastgradstats.trajectory`.

Options are checked, and the output folder created and tried with a test file, before any training or
checkpoint reading: a bad option prints the usage and a one-line error and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import tempfile
from pathlib import Path

import torch

from fastgradstats import demo
from fastgradstats.bench import suite as bench
from fastgradstats.dispatch import BACKENDS, resolve_backend
from fastgradstats.trajectory import trajectory_map


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastgradstats`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fastgradstats", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo",
                                      help="train a tiny model on CPU with a Monitor and write a report")
    demo_parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo_parser.add_argument("--every", type=int, default=10, help="track every N-th step (default 10)")
    demo_parser.add_argument("--out", default="fastgradstats-demo",
                             help="report folder (default ./fastgradstats-demo); an earlier report there is "
                                  "replaced: its stats.jsonl, plots and TensorBoard event files are removed "
                                  "first, other files are kept")
    demo_parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default 0)")
    demo_parser.add_argument("--backend", choices=list(BACKENDS), default=None,
                             help="statistics backend (default: automatic)")
    bench_parser = commands.add_parser("bench", help="time the statistics against the usual PyTorch code")
    bench_parser.add_argument("--workload", action="append", choices=list(bench.WORKLOADS),
                              help="tensor shapes to measure, repeatable (default: gpt2-small on the CPU; "
                                   "gpt2-small, 1b, 7b and many-small on CUDA; tiny is for smoke tests)")
    bench_parser.add_argument("--family", action="append", choices=list(bench.FAMILIES),
                              help="statistic family, repeatable (default: all)")
    bench_parser.add_argument("--repeats", type=int, default=None,
                              help="timed calls per candidate; the median is reported (default 5 on CPU, "
                                   "20 on CUDA)")
    bench_parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench_parser.add_argument("--backend", choices=list(BACKENDS), default=None,
                              help="statistics backend (default: automatic)")
    bench_parser.add_argument("--results", default=str(bench.DEFAULT_RESULTS),
                              help=f"JSON-lines file to append the rows to (default {bench.DEFAULT_RESULTS})")
    bench_parser.add_argument("--no-save", action="store_true", help="print the table only")
    trajectory_parser = commands.add_parser("trajectory", help="cosine map, MDS, cone angle and path length "
                                                               "of a series of checkpoints")
    trajectory_parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                                   help=".safetensors, .pt or .bin state_dicts, in training order")
    trajectory_parser.add_argument("--center", default=None,
                                   help="measure directions from this checkpoint: an index into CKPT "
                                        "(0 = from initialisation) or another file (default: raw parameters)")
    trajectory_parser.add_argument("--per-layer", action="store_true",
                                   help="also one map per tensor (in trajectory.json and, with their Gram "
                                        "matrices, in trajectory_layers.json)")
    trajectory_parser.add_argument("--exclude", action="append", metavar="REGEX",
                                   help="drop tensors whose name matches, repeatable (e.g. running_)")
    trajectory_parser.add_argument("--device", default=None, help="where to compute the Gram (default cpu)")
    trajectory_parser.add_argument("--out", required=True,
                                   help="folder for trajectory.json and trajectory.png")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_bench(bench_parser, args)
    if args.command == "trajectory":
        return run_trajectory(trajectory_parser, args)
    if args.steps < 1 or args.every < 1:
        demo_parser.error("--steps and --every must be >= 1")
    try:
        resolve_backend(args.backend, torch.device("cpu"))
    except ValueError as error:  # e.g. --backend triton without TRITON_INTERPRET=1 (the demo runs on the CPU)
        demo_parser.error(str(error))
    out = writable_folder(demo_parser, "--out", args.out)
    try:
        demo.start_report(out)
    except OSError as error:
        demo_parser.error(f"--out {args.out}: cannot clear the earlier report: {error}")
    demo.run(args.steps, args.every, out, args.seed, args.backend)
    return 0


def writable_folder(parser: argparse.ArgumentParser, option: str, path: str) -> Path:
    """``path`` as a folder, created if missing, in which a test file could be written; a parser error
    naming ``option`` otherwise."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        parser.error(f"{option} {path}: not a folder")
    except OSError as error:
        parser.error(f"{option} {path}: cannot create or write to this folder: {error.strerror or error}")
    return folder


def usable_device(parser: argparse.ArgumentParser, option: str, name: str) -> torch.device:
    """``torch.device(name)`` once a tensor can be made there; a parser error naming ``option`` otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        parser.error(f"{option} {name}: {_first_line(error)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"{option} {name}: CUDA is not available")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # e.g. cuda:3 on a one-GPU machine
        parser.error(f"{option} {name}: {_first_line(error)}")
    return device


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check the ``bench`` options, then run :func:`fastgradstats.bench.suite.run`."""
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    default = "cuda" if torch.cuda.is_available() else "cpu"
    device = usable_device(parser, "--device", args.device or default)
    try:
        resolve_backend(args.backend, device)
    except ValueError as error:
        parser.error(str(error))
    bench.run(args.workload, args.family, repeats=args.repeats, device=device, backend=args.backend,
              results=None if args.no_save else args.results)
    return 0


def run_trajectory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check the options and the output folder, run :func:`fastgradstats.trajectory_map`, write the JSON and
    the heatmap (when matplotlib is installed), print a summary."""
    if len(args.checkpoints) < 2:
        parser.error("needs at least 2 checkpoints")
    center = args.center
    if center is not None and center.lstrip("-").isdigit():
        center = int(center)
    for pattern in args.exclude or []:
        try:
            re.compile(pattern)
        except re.error as error:
            parser.error(f"--exclude {pattern!r}: not a regular expression: {error}")
    device = usable_device(parser, "--device", args.device) if args.device is not None else None
    out = writable_folder(parser, "--out", args.out)
    try:
        tmap = trajectory_map(args.checkpoints, center=center, per_layer=args.per_layer, exclude=args.exclude,
                              device=device)
    except (ValueError, IndexError, FileNotFoundError, TypeError) as error:
        parser.error(str(error))
    texts = {"trajectory.json": tmap.to_json()}
    if tmap.layers is not None:
        layers = {key: layer.to_dict() for key, layer in tmap.layers.items()}
        texts["trajectory_layers.json"] = json.dumps(layers, allow_nan=False)
    plot = importlib.util.find_spec("matplotlib") is not None
    try:
        for name, text in texts.items():
            (out / name).write_text(text)
        if plot:
            tmap.plot(out / "trajectory.png")
    except OSError as error:
        parser.exit(1, f"{parser.prog}: error: cannot write to {out}: {error}\n")
    written = [*texts, *(["trajectory.png"] if plot else [])]
    print(f"{len(tmap.names)} checkpoints, {len(tmap.keys)} tensors, {tmap.numel:,} elements")
    print(f"MDS (off-diagonal mean cosine): {tmap.mds:.4f}   (with the diagonal: {tmap.mds_all:.4f})")
    print(f"cone angle: {tmap.cone_angle:.2f} degrees")
    print(f"path length: {tmap.path_length:.6g}")
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    if not plot:
        print('no trajectory.png: pip install "fastgradstats[plots]"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
