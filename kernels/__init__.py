"""Triton kernels of fastgradstats (installed as ``fastgradstats.kernels``); import only where Triton is
present.

They need Triton >= 3.4 (setup.py's floor): :mod:`fastgradstats.dispatch` checks the installed version
(``TRITON_MIN_VERSION``) before it chooses them.
"""

from .pair_stats import pair_raw_stats
from .tensor_stats import raw_stats

__all__ = ["pair_raw_stats", "raw_stats"]
