"""Triton kernels of fastgradstats (installed as ``fastgradstats.kernels``); import only where Triton is
present."""

from .pair_stats import pair_raw_stats
from .tensor_stats import raw_stats

__all__ = ["pair_raw_stats", "raw_stats"]
