"""fastgradstats: fused per-layer gradient and parameter statistics for PyTorch.

    import fastgradstats as fgs
    stats = fgs.grad_stats(model, hist="log2")
    stats.l2, stats.total.l2, print(stats.table())
"""

from .api import grad_stats, param_stats, tensor_stats
from .clip import clip_grad_norm_
from .gns import GradientNoiseScale, NoiseScale
from .monitoring import plots, sinks
from .monitoring.alerts import Alert, AlertConfig
from .monitoring.monitor import Monitor, StepRecord
from .optim import OptimizerStats, optimizer_stats
from .pairs import cosine_similarity, pair_stats
from .results import PairStats, TensorStats
from .trajectory import TrajectoryMap, trajectory_map

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlertConfig",
    "GradientNoiseScale",
    "Monitor",
    "NoiseScale",
    "OptimizerStats",
    "PairStats",
    "StepRecord",
    "TensorStats",
    "TrajectoryMap",
    "clip_grad_norm_",
    "cosine_similarity",
    "grad_stats",
    "optimizer_stats",
    "pair_stats",
    "param_stats",
    "plots",
    "sinks",
    "tensor_stats",
    "trajectory_map",
]
