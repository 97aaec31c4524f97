"""Exact top-k threshold of magnitudes without sorting: a histogram of float bit patterns.

TIES and Breadcrumbs keep the top-k magnitudes of every task vector. mergekit finds them with a
full `argsort`; a threshold needs much less. For non-negative IEEE floats the bit pattern, read as
an integer, orders exactly like the value, so:

1. one pass over the magnitudes (a stream of blocks computed on the fly, e.g. |expert − base|)
   stores each element's top 16 bits (15 after the clear sign bit: bf16/fp16 magnitudes are their
   whole value, fp32 keeps exponent + 7 mantissa bits) as an int16 key and histograms the keys
   (`torch.bincount`, 2¹⁵ bins);
2. the histogram names the one key ("bucket") that holds the k-th largest and how many elements lie
   above it; only that bucket's elements are read again (by index), and their exact k-th value,
   tie count and tie positions are found among them.

The answer is exact for every dtype; the cost is one linear pass plus a gather of one bucket
(small unless most elements tie, which bf16 deltas sometimes do; then it is the ties themselves).

Inputs must be magnitudes as `abs()` returns them: non-negative, no -0.0 (NaN sorts above +inf).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

_INT = {16: torch.int16, 32: torch.int32, 64: torch.int64}
BINS = 1 << 15
LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True)
class Threshold:
    """The k-th largest value, how many elements sit above and at it, and which ties are out."""

    value: float
    k: int
    n_greater: int  # elements strictly greater than value (< k)
    n_equal: int  # elements equal to value (n_greater + n_equal >= k)
    dropped_ties: torch.Tensor  # sorted flat indices of the ties NOT in the top k: the last ones

    @property
    def ties_kept(self) -> int:
        """How many elements equal to `value` belong to the top k (the first ones by index)."""
        return self.k - self.n_greater


class TopK:
    """Top-k thresholds of n magnitudes fed once, block by block, in index order.

        top = TopK(n, torch.float32, device)
        for start, block in blocks:          # covering 0..n-1
            top.add(start, block)
        t = top.threshold(k, lambda idx: magnitudes[idx])   # any number of k
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.bits = torch.finfo(dtype).bits
        if self.bits not in _INT:
            raise ValueError(f"unsupported dtype {dtype}")
        self.n, self.dtype = n, dtype
        self.keys = torch.empty(n, dtype=torch.int16, device=device)
        self.hist = torch.zeros(BINS, dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, start: int, mags: torch.Tensor) -> None:
        if mags.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} magnitudes, got {mags.dtype}")
        flat = mags.reshape(-1)
        key = self.keys[start:start + flat.numel()]
        lanes = self.bits // 16
        if LITTLE_ENDIAN:  # the top 16 bits are the last int16 lane of each element: a strided view
            key.copy_(flat.view(torch.int16)[lanes - 1::lanes])
        else:
            key.copy_(torch.bitwise_right_shift(flat.view(_INT[self.bits]), self.bits - 16))
        self.hist += torch.bincount(key, minlength=BINS)
        self.seen += flat.numel()

    def threshold(self, k: int, magnitudes_at: Callable[[torch.Tensor], torch.Tensor]) -> Threshold:
        """The k-th largest; `magnitudes_at(idx)` returns the exact magnitudes at flat indices idx."""
        if self.seen != self.n:
            raise ValueError(f"{self.seen} of {self.n} values were added")
        if not 1 <= k <= self.n:
            raise ValueError(f"k={k} is outside 1..{self.n}")
        h = self.hist.cpu()
        from_top = h.flip(0).cumsum(0)  # elements whose key is >= each key, from the top
        i = int(torch.searchsorted(from_top, k))
        bucket = BINS - 1 - i
        above = int(from_top[i]) - int(h[bucket])
        idx = (self.keys == bucket).nonzero().squeeze(1)  # ascending
        vals = magnitudes_at(idx)
        rank = k - above  # the answer is the rank-th largest in the bucket
        value = torch.kthvalue(vals.cpu(), vals.numel() - rank + 1).values
        eq = vals == value.to(vals.device)
        n_greater = above + int((vals > value.to(vals.device)).sum())
        ties = idx[eq]
        return Threshold(float(value), k, n_greater, ties.numel(), ties[k - n_greater:])


def kth_largest(mags: torch.Tensor, k: int, block: int = 1 << 18) -> Threshold:
    """The k-th largest element of a tensor of magnitudes (1 <= k <= numel)."""
    flat = mags.reshape(-1)
    top = TopK(flat.numel(), flat.dtype, flat.device)
    for s in range(0, flat.numel(), block):
        top.add(s, flat[s:s + block])
    return top.threshold(k, lambda idx: flat[idx])
