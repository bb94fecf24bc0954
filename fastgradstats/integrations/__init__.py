"""Training-framework integrations: a callback that runs a :class:`fastgradstats.Monitor` for you.

    from fastgradstats.integrations.lightning import FastGradStatsCallback          # Lightning
    from fastgradstats.integrations.transformers import FastGradStatsTrainerCallback  # 🤗 Trainer

Each submodule imports its framework only when it is imported itself (``pip install "fastgradstats[all]"``
installs them); the names are also reachable from this package, which imports the submodule on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"FastGradStatsCallback": "lightning", "FastGradStatsTrainerCallback": "transformers"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
