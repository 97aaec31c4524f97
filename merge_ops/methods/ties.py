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

Threshold and tie-break. The k-th largest |τᵢ| is found exactly by a radix select on its bit
pattern (merge_ops/select.py): no sort. Entries above it are kept; of the entries equal to it, the
first ones in index (row-major) order are kept until exactly k are. mergekit keeps the first k of
an `argsort`, whose order among equal magnitudes is unspecified, so on tensors with ties at the
threshold (common: deltas of bf16 weights take few distinct values) the two can keep different
tied entries; every kept value and the count k are the same.
"""

from __future__ import annotations

import torch

from merge_ops.methods.base import TensorInputs
from merge_ops.methods.kernels import buffer, model_param, work_dtype
from merge_ops.methods.task_vectors import merge
from merge_ops.select import RadixSelect, Threshold


def top_k(density: float, n: int) -> int:
    """mergekit's count of kept entries for magnitude trimming."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


class TopK:
    """Keep the k largest magnitudes of a task vector, ties at the threshold by index order."""

    def __init__(self, k: int, n: int, dtype: torch.dtype):
        self.k, self.n = k, n
        self._sel = RadixSelect(k, dtype) if 0 < k < n else None
        self._t: Threshold | None = None
        self._left = 0  # ties at the threshold still to keep, in this pass
        self._seen_ties = 0  # ties at the threshold met so far, in this pass

    def pending(self) -> list[RadixSelect]:
        return [self._sel] if self._sel is not None and not self._sel.done else []

    def start(self) -> None:
        if self._sel is not None:
            self._t = self._sel.result
            assert self._t is not None, "selection passes must run before apply"
            self._left, self._seen_ties = self._t.ties_kept, 0

    def apply(self, d: torch.Tensor) -> None:
        if self.k >= self.n:
            return
        if self.k == 0:
            d.zero_()
            return
        t = self._t
        assert t is not None
        if t.value == 0.0 or self._left == 0:
            torch.hardshrink(d, t.value, out=d)  # keeps |d| > value
            return
        below = _prev_float(t.value, d.dtype)  # hardshrink(below) keeps |d| >= value
        if self._left == t.n_equal - self._seen_ties:  # every remaining tie is kept
            torch.hardshrink(d, below, out=d)
            return
        mag = buffer("tie_mag", d.numel(), d.dtype, d.device)
        eq = buffer("tie_eq", d.numel(), torch.bool, d.device)
        torch.eq(torch.abs(d, out=mag), t.value, out=eq)
        ties = int(eq.sum())
        self._seen_ties += ties
        if ties > self._left:  # the block holding the last kept tie: drop the later ones
            drop = eq.nonzero().squeeze(1)[self._left:]
            d[drop] = 0
            ties = self._left
        self._left -= ties
        torch.hardshrink(d, below, out=d)


def _prev_float(v: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` below v > 0."""
    t = torch.tensor(v, dtype=dtype)
    return float(torch.nextafter(t, torch.zeros((), dtype=dtype)))


def trims(x: TensorInputs, method: str) -> list[TopK]:
    n, wd = x.experts[0].numel() if x.experts else 0, work_dtype(x.compute_dtype)
    return [TopK(top_k(float(model_param(x, method, i, "density")), n), n, wd)
            for i in range(len(x.experts))]


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    return merge(x, "ties", trims(x, "ties"), consensus=True)
