"""Triton kernels of fastgradstats (installed as ``fastgradstats.kernels``); import only where Triton is
present.

The package is the "triton" backend of :class:`fastgradstats.dispatch.Backend` (``raw_rows``,
``linear_hist``, ``pair_rows``). The kernels need Triton >= 3.4 (pyproject.toml's floor):
:mod:`fastgradstats.dispatch` checks the installed version (``TRITON_MIN_VERSION``) before it chooses them.
"""

from .pair_stats import pair_rows
from .tensor_stats import linear_hist, raw_rows

NAME = "triton"

__all__ = ["NAME", "linear_hist", "pair_rows", "raw_rows"]
