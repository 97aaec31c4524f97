"""DELLA without sign election: MagPrune drop and rescale (della.py), then task arithmetic.

Deep et al. 2024, arXiv:2406.11617; mergekit's `della_linear`. Defaults (mergekit): weight 1,
density 1, epsilon 0.15, lambda 1, normalize false, rescale true.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.methods import della

if TYPE_CHECKING:
    import torch

    from merge_ops.static.inputs import TensorInputs

METHOD = della.declare("della_linear", "drop task-vector entries at random, keeping larger magnitudes "
                       "more often (MagPrune), rescale, then sum", consensus=False)


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.task_vectors import merge

    x = x.with_defaults(METHOD)
    return merge(x, della.trims(x), consensus=False)
