"""The trajectory layer: maps of a series of checkpoints (:mod:`.maps`) read by the checkpoint readers
(:mod:`.checkpoints`)."""

from .maps import TrajectoryMap, trajectory_map

__all__ = ["TrajectoryMap", "trajectory_map"]
