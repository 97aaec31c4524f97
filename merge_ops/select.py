"""Exact k-th largest magnitude without sorting: a radix select over float bit patterns.

TIES and Breadcrumbs keep the top-k magnitudes of every task vector. mergekit finds them with a
full `argsort`; a threshold needs much less. For non-negative IEEE floats the bit pattern, read as
a signed integer, orders exactly like the value, so the k-th largest can be found 16 bits at a time
with one histogram (`torch.bincount`) per 16-bit digit: one pass for bf16/fp16 (2¹⁵ possible
magnitudes), two for fp32 (high half, then the low half inside the one bucket that holds the
answer), four for fp64. Each pass is a linear scan and keeps no copy of the data, so the input can
be a stream of blocks computed on the fly (|expert − base|, a block at a time).

Inputs must be magnitudes as `abs()` returns them: non-negative, no -0.0 (NaN sorts above +inf).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

_INT = {16: torch.int16, 32: torch.int32, 64: torch.int64}
DIGIT = 16


@dataclass(frozen=True)
class Threshold:
    """The k-th largest value and how many elements sit above and at it."""

    value: float
    k: int
    n_greater: int  # elements strictly greater than value (< k)
    n_equal: int  # elements equal to value (n_greater + n_equal >= k)

    @property
    def ties_kept(self) -> int:
        """How many elements equal to `value` belong to the top k."""
        return self.k - self.n_greater


class RadixSelect:
    """The k-th largest of n non-negative floats, fed as blocks over one pass per 16-bit digit.

        sel = RadixSelect(k, torch.float32)
        while not sel.done:
            for block in blocks():      # the same n values in every pass, in any blocking
                sel.add(block)
            sel.next_pass()
        sel.result                      # Threshold
    """

    def __init__(self, k: int, dtype: torch.dtype):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.bits = torch.finfo(dtype).bits
        if self.bits not in _INT:
            raise ValueError(f"unsupported dtype {dtype}")
        self.dtype, self.int_dtype, self.k = dtype, _INT[self.bits], k
        self.n_digits = self.bits // DIGIT
        self.digit = 0  # the digit the current pass resolves, from the top
        self.prefix = 0  # the answer's digits resolved so far
        self.rank = k  # the rank of the answer among the elements that share `prefix`
        self.n_greater = 0
        self.result: Threshold | None = None
        self._hist: torch.Tensor | None = None
        self._key: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def add(self, mags: torch.Tensor) -> None:
        """Count one block of magnitudes into the current pass's histogram."""
        if mags.dtype != self.dtype:
            raise TypeError(f"expected {self.dtype} magnitudes, got {mags.dtype}")
        bits = mags.reshape(-1).view(self.int_dtype)
        shift = self.bits - DIGIT * (self.digit + 1)
        if self.digit == 0:
            # the sign bit is clear, so the top digit has 15 bits: 2^15 bins
            key, bins = (bits if shift == 0 else self._shift(bits, shift)), 1 << (DIGIT - 1)
        else:
            # position inside the bucket `prefix`; below -> bin 0, above -> the last bin (ignored)
            key = self._shift(bits, shift)
            key.sub_(self.prefix << DIGIT).clamp_(-1, 1 << DIGIT).add_(1)
            bins = (1 << DIGIT) + 2
        h = torch.bincount(key, minlength=bins)
        self._hist = h if self._hist is None else self._hist.add_(h)

    def _shift(self, bits: torch.Tensor, shift: int) -> torch.Tensor:
        if self._key is None or self._key.numel() < bits.numel() or self._key.device != bits.device:
            self._key = torch.empty(bits.numel(), dtype=self.int_dtype, device=bits.device)
        key = self._key[: bits.numel()]
        return torch.bitwise_right_shift(bits, shift, out=key)

    def next_pass(self) -> bool:
        """Close the current pass; True once the k-th largest is known (`result`)."""
        if self.done:
            return True
        if self._hist is None:
            raise ValueError("no values were added in this pass")
        h = self._hist.cpu()
        if self.digit > 0:
            h = h[1:-1]
        from_top = h.flip(0).cumsum(0)  # elements whose digit is >= each value, from the top
        if int(from_top[-1]) < self.rank:
            raise ValueError(f"k={self.k} is larger than the number of values counted")
        i = int(torch.searchsorted(from_top, self.rank))
        d = h.numel() - 1 - i
        in_digit = int(h[d])
        above = int(from_top[i]) - in_digit
        self.n_greater += above
        self.rank -= above
        self.prefix = (self.prefix << DIGIT) | d
        self.digit += 1
        self._hist = None
        if self.digit == self.n_digits:
            value = torch.tensor([self.prefix], dtype=torch.int64).to(self.int_dtype).view(self.dtype)
            self.result = Threshold(float(value), self.k, self.n_greater, in_digit)
            self._key = None
        return self.done


def select_stream(k: int, dtype: torch.dtype, blocks: Callable[[], Iterable[torch.Tensor]]) -> Threshold:
    """The k-th largest of the values `blocks()` yields (called once per pass)."""
    sel = RadixSelect(k, dtype)
    while not sel.done:
        for b in blocks():
            sel.add(b)
        sel.next_pass()
    assert sel.result is not None
    return sel.result


def kth_largest(mags: torch.Tensor, k: int, block: int = 1 << 18) -> Threshold:
    """The k-th largest element of a tensor of magnitudes (1 <= k <= numel)."""
    flat = mags.reshape(-1)
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k={k} is outside 1..{flat.numel()}")
    return select_stream(k, flat.dtype, lambda: (flat[s:s + block] for s in range(0, flat.numel(), block)))
