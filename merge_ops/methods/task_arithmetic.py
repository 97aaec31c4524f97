"""Task arithmetic: add scaled task vectors to the base.

Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR, arXiv:2212.04089.

    out = base + λ·Σ wᵢ·(expertᵢ − base)     (÷ Σ wᵢ with `normalize`; a |Σ wᵢ| < 1e-8 counts as 1)

computed in one blocked pass as (1 − λΣwᵢ)·base + Σ λwᵢ·expertᵢ. Defaults as in mergekit:
weight 1, lambda 1, normalize false; LiNeS depth scaling optional (`lines`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, task_vector_params

if TYPE_CHECKING:
    import torch

    from merge_ops.static.inputs import TensorInputs

METHOD = MethodDef(
    "task_arithmetic", "static", "base + λ·Σ wᵢ·τᵢ over task vectors τᵢ = expertᵢ − base",
    "Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
    task_vector_params(normalize=False, rescale=None, density=False, consensus=False))


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.task_vectors import merge

    return merge(x.with_defaults(METHOD))
