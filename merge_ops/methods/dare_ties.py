"""DARE-TIES: DARE's random drop and rescale (dare.py), then TIES sign election and disjoint
merge (ties.py).

Yu et al. 2024, arXiv:2311.03099; Yadav et al. 2023, arXiv:2306.01708. Defaults (mergekit): weight
1, density 1, lambda 1, normalize false, rescale true.
"""

from __future__ import annotations

import torch

from merge_ops.methods import dare
from merge_ops.methods.base import TensorInputs
from merge_ops.methods.task_vectors import merge


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    return merge(x, "dare_ties", dare.trims(x, "dare_ties"), consensus=True)
