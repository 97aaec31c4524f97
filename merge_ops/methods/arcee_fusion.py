"""Arcee Fusion: take the expert's value only where its change matters most to the base.

Arcee AI 2025 (arcee.ai; mergekit's `arcee_fusion`). Per tensor, with a = base and b = the one
expert, rows along the last dimension (a 1-D tensor is one row):

    KL(row) = Σ p·log(p/q),  p = softmax(b_row) + 1e-8,  q = softmax(a_row) + 1e-8
    importance = |b − a| · KL(row)
    threshold  = median + 1.5·(q3 − q1) of the importances, quantile q taken as the
                 ⌊q·(n − 1)⌋-th smallest
    out = a + (b − a)·[importance ≥ threshold]

No parameters (mergekit has none). mergekit takes its quantiles from a random sample of 1M
importances (with replacement) when a tensor is larger than that; Alloy takes them exactly from all
n, so on such tensors the masks agree in distribution, not entry by entry. Blocked passes over
whole rows: the KL per row and the importances (kept as one fp32/fp64 tensor for the quantiles),
then the masked update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef
from merge_ops.errors import SpecError
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")

METHOD = MethodDef(
    "arcee_fusion", "static", "keep the expert's changes whose importance (|Δ|·row KL) is an upper outlier",
    "Arcee AI 2025, Arcee Fusion (arcee.ai); as in mergekit",
    (), max_experts=1)

PROB_EPS = 1e-8


def quantile(values: torch.Tensor, q: float) -> float:
    """The ⌊q·(n − 1)⌋-th smallest value (0-based), as mergekit's index into a sorted copy."""
    i = int(q * (values.numel() - 1))
    return float(torch.kthvalue(values, i + 1).values)


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import block_size, buffer, require_base, work_dtype

    a = require_base(x)
    if len(x.experts) != 1:
        raise SpecError(f"arcee_fusion merges the base with exactly one expert, got {len(x.experts)}",
                        param="experts")
    b = x.experts[0]
    wd, device = work_dtype(x.compute_dtype), a.device
    n = a.numel()
    if n == 0:
        return a.to(x.out_dtype, copy=True)
    cols = a.shape[-1] if a.dim() > 0 else 1
    rows = n // cols
    va, vb = a.reshape(rows, cols), b.reshape(rows, cols)
    per = max(1, block_size(device) // cols)  # whole rows: the softmax needs them
    importance = torch.empty(rows, cols, dtype=wd, device=device)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        m = (r1 - r0) * cols
        ba = buffer("base", m, wd, device).view(r1 - r0, cols).copy_(va[r0:r1])
        bb = buffer("d0", m, wd, device).view(r1 - r0, cols).copy_(vb[r0:r1])
        p = torch.softmax(bb, dim=-1).add_(PROB_EPS)
        q = torch.softmax(ba, dim=-1).add_(PROB_EPS)
        kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
        torch.sub(bb, ba, out=importance[r0:r1]).abs_().mul_(kl)
    flat = importance.view(-1)
    q1, med, q3 = (quantile(flat, q) for q in (0.25, 0.5, 0.75))
    threshold = med + 1.5 * (q3 - q1)
    out = torch.empty(a.shape, dtype=x.out_dtype, device=device)
    fo = out.view(rows, cols)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        m = (r1 - r0) * cols
        ba = buffer("base", m, wd, device).view(r1 - r0, cols).copy_(va[r0:r1])
        d = buffer("d0", m, wd, device).view(r1 - r0, cols).copy_(vb[r0:r1]).sub_(ba)
        keep = torch.ge(importance[r0:r1], threshold, out=buffer("keep", m, wd, device).view(r1 - r0, cols))
        fo[r0:r1].copy_(ba.addcmul_(d, keep))
    return out
