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
magnitude pass (topk.TopK); at either edge, ties are ranked by index order (the earlier index
counts as larger), where mergekit's `sort` leaves them unspecified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param, task_vector_params
from merge_ops.lazy import lazy
from merge_ops.methods.ties import keep_top

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs
    from merge_ops.static.topk import Threshold

torch = lazy("torch")
topk = lazy("merge_ops.static.topk")
kernels = lazy("merge_ops.static.kernels")

METHOD = MethodDef(
    "breadcrumbs", "static", "drop the largest (gamma) and smallest magnitudes of each task vector, then sum",
    "Davari & Belilovsky 2024, Model Breadcrumbs, arXiv:2312.06795",
    task_vector_params(normalize=False, rescale=False, density=True, consensus=False,
                       extra=(Param("gamma", 0.01, "fraction of largest-magnitude entries removed",
                                    scope="model", min=0.0, max=1.0, gradient=True),)))


class Band:
    """Keep the entries whose ascending magnitude rank is in [bot, bot + keep)."""

    def __init__(self, density: float, gamma: float, n: int, dtype: torch.dtype, device: torch.device):
        keep = int(density * n)
        bot = max(0, n - keep - int(gamma * n))
        self.upto, self.outliers = n - bot, n - bot - keep  # top-k counts: kept band = upto − outliers
        self.n = n
        self.needs_magnitudes = density < 1 and (0 < self.upto < n or 0 < self.outliers < n)
        self.top = topk.TopK(n, dtype, device) if self.needs_magnitudes else None
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
            top = kernels.buffer("band_top", d.numel(), d.dtype, d.device).copy_(d)
            keep_top(top, start, self.outliers, self.n, self.t_out)
        keep_top(d, start, self.upto, self.n, self.t_upto)
        if top is not None:
            d.sub_(top)  # exact: the outliers are a subset of `upto`, with identical values


def trims(x: TensorInputs) -> list[Band]:
    n, wd = x.experts[0].numel() if x.experts else 0, kernels.work_dtype(x.compute_dtype)
    device = x.experts[0].device if x.experts else torch.device("cpu")
    return [Band(float(mp["density"]), float(mp["gamma"]), n, wd, device) for mp in x.model_params]


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.task_vectors import merge

    x = x.with_defaults(METHOD)
    return merge(x, trims(x), consensus=False)
