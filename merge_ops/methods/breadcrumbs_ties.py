"""Model Breadcrumbs with TIES: Breadcrumbs' two-tailed magnitude trim, then TIES sign election.

Davari & Belilovsky 2024, arXiv:2312.06795; Yadav et al. 2023, arXiv:2306.01708. mergekit's
`breadcrumbs_ties`, per tensor:

    τᵢ = band(expertᵢ − base)   keep ascending-magnitude ranks [bot, bot + ⌊density·n⌋), dropping the
                                top ⌊gamma·n⌋ outliers (breadcrumbs.py; optional L1 rescale)
    m  = sign(Σ wᵢ·τᵢ) (0 elects +);  Δ = Σ wᵢ·τᵢ over the experts agreeing with m
    normalize: Δ ← Δ / Σ agreeing wᵢ (0 → 1);  out = base + λ·Δ

Defaults (mergekit): weight 1, density 1, gamma 0.01, lambda 1, normalize false, rescale false.
Ties at the band edges are ranked by index order (see breadcrumbs.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param, task_vector_params
from merge_ops.methods import breadcrumbs

if TYPE_CHECKING:
    import torch

    from merge_ops.static.inputs import TensorInputs

METHOD = MethodDef(
    "breadcrumbs_ties", "static",
    "Breadcrumbs' two-tailed magnitude trim, then TIES sign election and disjoint merge",
    "Davari & Belilovsky 2024, arXiv:2312.06795; Yadav et al. 2023, arXiv:2306.01708",
    task_vector_params(normalize=False, rescale=False, density=True, consensus=True,
                       extra=(Param("gamma", 0.01, "fraction of largest-magnitude entries removed",
                                    scope="model", min=0.0, max=1.0, gradient=True),)))


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.task_vectors import merge

    x = x.with_defaults(METHOD)
    return merge(x, breadcrumbs.trims(x), consensus=True)
