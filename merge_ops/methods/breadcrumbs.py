"""Model Breadcrumbs: drop both tails of each task vector's magnitudes, then sum.

Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV, arXiv:2312.06795. With mergekit's semantics (its `magnitude_outliers`), per tensor of n
entries, with density < 1:

    keep = ⌊density·n⌋ entries, drop the top ⌊gamma·n⌋ magnitudes (outliers), and the
    bot = max(0, n − keep − top) smallest; i.e. keep the entries of ascending magnitude rank
    bot … bot + keep − 1. When density + gamma > 1 fewer outliers are dropped, to keep `keep`.
    density ≥ 1 keeps everything (gamma is then not applied, as in mergekit).

then task arithmetic over the trimmed vectors (optionally L1-rescaled, as ties.py). Defaults:
weight 1, density 1, gamma 0.01, lambda 1, normalize false, rescale false.

The band is computed as top-(n − bot) minus top-(n − bot − keep), two exact radix selections
(ties.TopK) over the same passes; ties at either edge are broken by index order, where mergekit's
`sort` leaves them unspecified.
"""

from __future__ import annotations

import torch

from merge_ops.methods.base import TensorInputs
from merge_ops.methods.kernels import buffer, model_param, work_dtype
from merge_ops.methods.task_vectors import merge
from merge_ops.methods.ties import TopK
from merge_ops.select import RadixSelect


class Band:
    """Keep the entries whose ascending magnitude rank is in [bot, bot + keep)."""

    def __init__(self, density: float, gamma: float, n: int, dtype: torch.dtype):
        self.all = density >= 1
        keep = int(density * n)
        top = int(gamma * n)
        bot = max(0, n - keep - top)
        self.upto = TopK(n - bot, n, dtype)  # everything above the dropped small ones
        self.outliers = TopK(n - bot - keep, n, dtype)  # the dropped large ones

    def pending(self) -> list[RadixSelect]:
        return [] if self.all else self.upto.pending() + self.outliers.pending()

    def start(self) -> None:
        if not self.all:
            self.upto.start()
            self.outliers.start()

    def apply(self, d: torch.Tensor) -> None:
        if self.all:
            return
        if self.outliers.k == 0:
            self.upto.apply(d)
            return
        top = buffer("band_top", d.numel(), d.dtype, d.device).copy_(d)
        self.outliers.apply(top)
        self.upto.apply(d)
        d.sub_(top)  # exact: the outliers are a subset of `upto`, with identical values


def trims(x: TensorInputs, method: str) -> list[Band]:
    n, wd = x.experts[0].numel() if x.experts else 0, work_dtype(x.compute_dtype)
    return [Band(float(model_param(x, method, i, "density")), float(model_param(x, method, i, "gamma")),
                 n, wd) for i in range(len(x.experts))]


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    return merge(x, "breadcrumbs", trims(x, "breadcrumbs"), consensus=False)
