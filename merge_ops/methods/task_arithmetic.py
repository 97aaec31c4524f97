"""Task arithmetic: add scaled task vectors to the base.

Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR, arXiv:2212.04089.

    out = base + λ·Σ wᵢ·(expertᵢ − base)     (÷ Σ wᵢ with `normalize`; a |Σ wᵢ| < 1e-8 counts as 1)

computed in one blocked pass as (1 − λΣwᵢ)·base + Σ λwᵢ·expertᵢ. Defaults as in mergekit:
weight 1, lambda 1, normalize false; LiNeS depth scaling optional (`lines`).
"""

from __future__ import annotations

import torch

from merge_ops.methods.base import TensorInputs
from merge_ops.methods.task_vectors import merge


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    return merge(x, "task_arithmetic")
