"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS,
arXiv:2306.01708. With mergekit's semantics (per tensor, not over the whole flattened model):

    1. trim:  τᵢ keeps its k = max(1, ⌊density·n⌋) largest-magnitude entries (density ≥ 1 keeps
              all, density ≤ 0 none); with `rescale`, the kept entries are scaled to the L1 norm
              τᵢ had before trimming.
    2. elect: m = sign(Σ wᵢ·τᵢ) per entry (an exact 0 elects +).
    3. merge: Δ = Σ wᵢ·τᵢ over the experts whose entry has sign m; with `normalize` (default on)
              divided by the sum of those experts' weights (a zero sum counts as 1).
    out = base + λ·Δ (times the LiNeS depth scale when `lines` is on).

Defaults: weight 1, density 1, lambda 1, normalize true, rescale false (int8_mask accepted, no
effect: the masks here are never materialised).

Threshold and tie-break. The k-th largest |τᵢ| is found exactly from a histogram of its bit
patterns (static/topk.py): no sort. Entries above it are kept; of the entries equal to it, the
first ones in index (row-major) order are kept until exactly k are. mergekit keeps the first k of
an `argsort`, whose order among equal magnitudes is unspecified, so on tensors with ties at the
threshold (common: deltas of bf16 weights take few distinct values) the two can keep different
tied entries; every kept value and the count k are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, task_vector_params
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs
    from merge_ops.static.topk import Threshold

torch = lazy("torch")
topk = lazy("merge_ops.static.topk")
kernels = lazy("merge_ops.static.kernels")

METHOD = MethodDef(
    "ties", "static", "trim each task vector to its top-density magnitudes, elect signs, disjoint mean",
    "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708",
    task_vector_params(normalize=True, rescale=False, density=True, consensus=True))


def top_k(density: float, n: int) -> int:
    """mergekit's count of kept entries for magnitude trimming."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


class TopKTrim:
    """Keep the k largest magnitudes of a task vector, ties at the threshold by index order."""

    def __init__(self, k: int, n: int, dtype: torch.dtype, device: torch.device):
        self.k, self.n = k, n
        self.needs_magnitudes = 0 < k < n
        self.top = topk.TopK(n, dtype, device) if self.needs_magnitudes else None
        self.t: Threshold | None = None

    def observe(self, start: int, mags: torch.Tensor) -> None:
        assert self.top is not None
        self.top.add(start, mags)

    def finish(self, magnitudes_at: Callable[[torch.Tensor], torch.Tensor]) -> None:
        assert self.top is not None
        self.t = self.top.threshold(self.k, magnitudes_at)
        self.top = None  # the keys are no longer needed

    def start(self) -> None:
        pass

    def apply(self, d: torch.Tensor, start: int) -> None:
        keep_top(d, start, self.k, self.n, self.t)


def keep_top(d: torch.Tensor, start: int, k: int, n: int, t: Threshold | None) -> None:
    """Zero all but the top k (by magnitude, then index) of the block d at flat offset `start`."""
    if k >= n:
        return
    if k == 0:
        d.zero_()
        return
    assert t is not None, "the magnitude pass must run before apply"
    if t.value == 0.0:  # the ties are zeros: dropping them changes nothing
        torch.hardshrink(d, 0.0, out=d)
        return
    torch.hardshrink(d, prev_float(t.value, d.dtype), out=d)  # keeps |d| >= value
    dropped = t.dropped_ties  # then zero the ties past the first (k - n_greater)
    if dropped.numel():
        lo, hi = (int(torch.searchsorted(dropped, v)) for v in (start, start + d.numel()))
        if hi > lo:
            d[dropped[lo:hi] - start] = 0


def prev_float(v: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` below v > 0."""
    t = torch.tensor(v, dtype=dtype)
    return float(torch.nextafter(t, torch.zeros((), dtype=dtype)))


def trims(x: TensorInputs) -> list[TopKTrim]:
    n, wd = x.experts[0].numel() if x.experts else 0, kernels.work_dtype(x.compute_dtype)
    device = x.experts[0].device if x.experts else torch.device("cpu")
    return [TopKTrim(top_k(float(mp["density"]), n), n, wd, device) for mp in x.model_params]


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.task_vectors import merge

    x = x.with_defaults(METHOD)
    return merge(x, trims(x), consensus=True)
