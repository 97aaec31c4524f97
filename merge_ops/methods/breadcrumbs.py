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

The band is computed as top-(n − bot) minus top-(n − bot − keep): two exact thresholds from one
magnitude pass (select.TopK); at either edge, ties are ranked by index order (the earlier index
counts as larger), where mergekit's `sort` leaves them unspecified.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from merge_ops.methods.base import TensorInputs
from merge_ops.methods.kernels import buffer, model_param, work_dtype
from merge_ops.methods.task_vectors import merge
from merge_ops.methods.ties import keep_top
from merge_ops.select import Threshold, TopK


class Band:
    """Keep the entries whose ascending magnitude rank is in [bot, bot + keep)."""

    def __init__(self, density: float, gamma: float, n: int, dtype: torch.dtype, device: torch.device):
        keep = int(density * n)
        bot = max(0, n - keep - int(gamma * n))
        self.upto, self.outliers = n - bot, n - bot - keep  # top-k counts: kept band = upto − outliers
        self.n = n
        self.needs_magnitudes = density < 1 and (0 < self.upto < n or 0 < self.outliers < n)
        self.top = TopK(n, dtype, device) if self.needs_magnitudes else None
        self.all = density >= 1
        self.t_upto: Threshold | None = None
        self.t_out: Threshold | None = None

    def observe(self, start: int, mags: torch.Tensor) -> None:
        assert self.top is not None
        self.top.add(start, mags)

    def finish(self, magnitudes_at: Callable[[torch.Tensor], torch.Tensor]) -> None:
        assert self.top is not None
        if 0 < self.upto < self.n:
            self.t_upto = self.top.threshold(self.upto, magnitudes_at)
        if 0 < self.outliers < self.n:
            self.t_out = self.top.threshold(self.outliers, magnitudes_at)
        self.top = None

    def start(self) -> None:
        pass

    def apply(self, d: torch.Tensor, start: int) -> None:
        if self.all:
            return
        top = None
        if self.outliers > 0:  # copy the outliers before trimming the small ones away
            top = buffer("band_top", d.numel(), d.dtype, d.device).copy_(d)
            keep_top(top, start, self.outliers, self.n, self.t_out)
        keep_top(d, start, self.upto, self.n, self.t_upto)
        if top is not None:
            d.sub_(top)  # exact: the outliers are a subset of `upto`, with identical values


def trims(x: TensorInputs, method: str) -> list[Band]:
    n, wd = x.experts[0].numel() if x.experts else 0, work_dtype(x.compute_dtype)
    device = x.experts[0].device if x.experts else torch.device("cpu")
    return [Band(float(model_param(x, method, i, "density")), float(model_param(x, method, i, "gamma")),
                 n, wd, device) for i in range(len(x.experts))]


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    return merge(x, "breadcrumbs", trims(x, "breadcrumbs"), consensus=False)
