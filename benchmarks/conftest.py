"""Benchmark setup: two lists of GPT-2-small-shaped tensors (randn * 1e-3), made once per session."""

import pytest
import torch

from fastgradstats import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORKLOAD = bench.WORKLOADS["gpt2-small"]


@pytest.fixture(scope="session")
def lists() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(a, b): the workload's tensors with seeds 0 and 1 (b is read by the pair family only)."""
    return WORKLOAD.tensors(DEVICE, seed=0), WORKLOAD.tensors(DEVICE, seed=1)
