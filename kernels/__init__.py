"""Triton kernels of fastgradstats (installed as ``fastgradstats.kernels``); import only where Triton is present."""

from .tensor_stats import raw_stats

__all__ = ["raw_stats"]
