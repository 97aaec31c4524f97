"""Blocked arithmetic shared by the static methods.

Merging is memory-bound: whole-tensor torch ops (`.float()`, `sub`, `add`) each stream the tensor
through RAM and allocate an fp32 copy of it, so a merge costs many times the bytes it must move.
Every kernel here walks the tensor in blocks of ~256K elements instead: a block of each input is
converted into a reused fp32 buffer that stays in cache, all the arithmetic for that block happens
there, and the result is written once into the output in its final dtype.

The working precision is fp32 (fp64 when the compute dtype is fp64): a 16-bit compute dtype is
promoted, never used for accumulation, so results are at least as precise as requested
(arcee_fusion excepted: it follows mergekit's arithmetic in the compute dtype, see its module).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import torch

from merge_ops.errors import SpecError
from merge_ops.static.inputs import TensorInputs

BLOCK_CPU = 1 << 18  # elements: a handful of fp32 blocks fit in L2/L3 together
BLOCK_CUDA = 1 << 24  # on a GPU, fewer and larger launches win

_local = threading.local()


def work_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def block_size(device: torch.device) -> int:
    return BLOCK_CUDA if device.type == "cuda" else BLOCK_CPU


def buffer(slot: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused scratch tensor of n elements (per thread, per slot): no allocation per block."""
    cache: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = _local.__dict__.setdefault("bufs", {})
    key = (slot, dtype, device)
    buf = cache.get(key)
    if buf is None or buf.numel() < n:
        buf = cache[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def sub_into(x: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = x − b with b, out in the working dtype. A narrower x (bf16 in fp32) is converted by a
    copy first: the same values (that conversion is exact), but a mixed-dtype sub casts element by
    element and is ~2x slower than copy + sub on CPU. A wider x (fp64 in fp32) is subtracted as is,
    rounding once."""
    if x.dtype == out.dtype or torch.promote_types(x.dtype, out.dtype) != out.dtype:
        return torch.sub(x, b, out=out)
    return out.copy_(x).sub_(b)


def ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached tensor of n ones (read-only by convention)."""
    cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = _local.__dict__.setdefault("ones", {})
    buf = cache.get((dtype, device))
    if buf is None or buf.numel() < n:
        buf = cache[(dtype, device)] = torch.ones(n, dtype=dtype, device=device)
    return buf[:n]


def spans(n: int, block: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, block):
        yield s, min(n, s + block)


def row_spans(rows: int, cols: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) blocks of a rows x cols matrix: whole rows when they fit, else row pieces."""
    if cols >= block:
        for r in range(rows):
            for c in range(0, cols, block):
                yield r, r + 1, c, min(cols, c + block)
    else:
        per = max(1, block // max(cols, 1))
        for r in range(0, rows, per):
            yield r, min(rows, r + per), 0, cols


def require_base(x: TensorInputs) -> torch.Tensor:
    if x.base is None:
        raise SpecError("this method needs a base model: set `base` in the spec", param="base")
    return x.base


def weighted_sum(tensors: Sequence[torch.Tensor], coeffs: Sequence[float | torch.Tensor],
                 out_dtype: torch.dtype, wd: torch.dtype, rows: int = 1) -> torch.Tensor:
    """Σ cᵢ·tensorᵢ, blockwise in `wd`, written once in `out_dtype`.

    A coefficient is a float, or a tensor of `rows` values (one per row of the tensors viewed as
    rows x cols, for per-row interpolations such as filter-wise Model Stock).
    """
    shape, device = tensors[0].shape, tensors[0].device
    out = torch.empty(shape, dtype=out_dtype, device=device)
    terms = [(t, c) for t, c in zip(tensors, coeffs, strict=True)
             if isinstance(c, torch.Tensor) or c != 0.0]
    n = out.numel()
    if not terms or n == 0:
        return out.zero_()
    t0, c0 = terms[0]
    if (len(terms) == 1 and not isinstance(c0, torch.Tensor) and wd == torch.float32
            and t0.dtype == out_dtype and out_dtype in (torch.bfloat16, torch.float16)):
        # one 16-bit tensor times a scalar: torch computes it in float32 and rounds once, the bits of
        # the blocked path below in one pass instead of convert, multiply, convert
        return torch.mul(t0, float(c0))
    cols = n // rows
    flat_out = out.view(rows, cols)
    views = [(t.reshape(rows, cols), c.to(wd).view(rows, 1) if isinstance(c, torch.Tensor) else c)
             for t, c in terms]
    for r0, r1, c0, c1 in row_spans(rows, cols, block_size(device)):
        shape2 = (r1 - r0, c1 - c0)
        n2 = shape2[0] * shape2[1]
        acc = buffer("acc", n2, wd, device).view(shape2)
        tmp = buffer("tmp", n2, wd, device).view(shape2)
        for j, (t, c) in enumerate(views):
            blk = t[r0:r1, c0:c1]
            coef = c[r0:r1] if isinstance(c, torch.Tensor) else c
            if j == 0:
                acc.copy_(blk)
                if isinstance(coef, torch.Tensor) or coef != 1.0:
                    acc.mul_(coef)
                continue
            if blk.dtype != wd:
                tmp.copy_(blk)
                blk = tmp
            if isinstance(coef, torch.Tensor):
                acc.addcmul_(blk, coef)
            else:
                acc.add_(blk, alpha=coef)
        flat_out[r0:r1, c0:c1].copy_(acc)
    return out


def gram(tensors: Sequence[torch.Tensor], minus: torch.Tensor | None, wd: torch.dtype,
         rows: int = 1) -> torch.Tensor:
    """Per-row Gram matrices of (tensorᵢ − minus): shape (rows, E, E), accumulated in float64.

    Every dot product and norm Model Stock and SLERP need, in one blocked pass over the inputs.
    """
    device = tensors[0].device
    n = tensors[0].numel()
    e = len(tensors)
    cols = n // rows if rows else 0
    g = torch.zeros(rows, e, e, dtype=torch.float64, device=device)
    if n == 0:
        return g
    views = [t.reshape(rows, cols) for t in tensors]
    mview = minus.reshape(rows, cols) if minus is not None else None
    for r0, r1, c0, c1 in row_spans(rows, cols, block_size(device)):
        r, c = r1 - r0, c1 - c0
        d = buffer("gram", r * e * c, wd, device).view(r, e, c)
        for i, t in enumerate(views):
            d[:, i, :].copy_(t[r0:r1, c0:c1])
        if mview is not None:
            m = buffer("gram_minus", r * c, wd, device).view(r, 1, c)
            m.copy_(mview[r0:r1, c0:c1].unsqueeze(1))
            d.sub_(m)
        g[r0:r1] += torch.bmm(d, d.transpose(1, 2)).to(torch.float64)
    return g
