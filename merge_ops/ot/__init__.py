"""OT fusion of models that do not share a base (see fusion.py for the algorithm, graph.py for what
can be aligned, arch.py for the small MLP/CNN config format)."""

from merge_ops.ot.fusion import FusionOptions, FusionResult, fuse

__all__ = ["FusionOptions", "FusionResult", "fuse"]
