"""DARE-TIES: DARE's random drop and rescale (dare_linear.py), then TIES sign election and disjoint
merge (ties.py).

Yu et al. 2024, arXiv:2311.03099; Yadav et al. 2023, arXiv:2306.01708. Defaults (mergekit): weight
1, density 1, lambda 1, normalize false, rescale true.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, task_vector_params
from merge_ops.methods import dare_linear

if TYPE_CHECKING:
    import torch

    from merge_ops.static.inputs import TensorInputs

METHOD = MethodDef(
    "dare_ties", "static", "DARE drop-and-rescale, then TIES sign election and disjoint merge",
    "Yu et al. 2024, arXiv:2311.03099; Yadav et al. 2023, arXiv:2306.01708",
    task_vector_params(normalize=False, rescale=True, density=True, consensus=True))


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.task_vectors import merge

    x = x.with_defaults(METHOD)
    return merge(x, dare_linear.trims(x), consensus=True)
