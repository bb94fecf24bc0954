"""Backends: each turns validated tensors into raw rows (:mod:`fastgradstats.rows`) and histogram counts.

``torch_backend`` is the portable pure-PyTorch reference; ``native_backend`` runs the C kernels of
``native_stats.c`` on CPU tensors. The Triton backend lives in :mod:`fastgradstats.kernels`.
:mod:`fastgradstats.dispatch` chooses among them.
"""
