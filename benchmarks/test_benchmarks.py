"""pytest-benchmark timings of every statistic family on GPT-2-small shapes: ours, each baseline, the floor.

    pytest benchmarks/ --benchmark-only          # groups = families; compare the rows within a group

Candidates and the workload come from :mod:`fastgradstats.bench.suite` (``fastgradstats bench`` reports the
same comparison as GB/s, fraction of the read floor and speedups, and keeps the rows).
"""

import functools

import pytest
import torch

from fastgradstats.bench import suite as bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORKLOAD = bench.WORKLOADS["gpt2-small"]
# The opt-in families (optim, compiled) time whole subprocesses or compiled steps: `fastgradstats bench` only.
CASES = [(family, candidate) for family, baselines in bench.FAMILIES.items()
         if family not in bench.OPT_IN_FAMILIES for candidate in (bench.OURS, *baselines, bench.FLOOR)]


@pytest.fixture(scope="module")
def lists() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(a, b): the workload's tensors with seeds 0 and 1 (only the pair family reads b)."""
    return WORKLOAD.tensors(DEVICE, seed=0), WORKLOAD.tensors(DEVICE, seed=1)


def synchronized(fn):
    """fn followed by a CUDA synchronize, so that the timing covers the device work."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(DEVICE)

    return call


@pytest.mark.parametrize(("family", "candidate"), CASES, ids=[f"{f}:{c}" for f, c in CASES])
def test_bench(benchmark, lists, family, candidate):
    a, b = lists
    num_bytes = WORKLOAD.num_bytes * bench.LISTS_READ.get(family, 1)
    if candidate == bench.FLOOR:
        fn = bench.read_floor(bench.lists_read(family, a, b))
    elif candidate == bench.OURS:
        fn = functools.partial(bench.ours(family, None), a, b)
    else:
        fn = functools.partial(bench.BASELINES[candidate], a, b)
    benchmark.group = f"{WORKLOAD.name} {family} ({num_bytes / 1e6:,.0f} MB read)"
    benchmark.extra_info["bytes"] = num_bytes
    benchmark.pedantic(synchronized(fn), rounds=3, warmup_rounds=1, iterations=1)
