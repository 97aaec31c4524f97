"""Arcee Fusion: take the expert's value only where its change matters most to the base.

Arcee AI 2025 (arcee.ai; mergekit's `arcee_fusion`). Per tensor, with a = base and b = the one
expert, rows along the last dimension (a 1-D tensor is one row):

    KL(row) = Σ p·log(p/q),  p = softmax(b_row) + 1e-8,  q = softmax(a_row) + 1e-8
    importance = |b − a| · KL(row)
    threshold  = median + 1.5·(q3 − q1) of the importances, quantile q taken as the
                 ⌊q·(n − 1)⌋-th smallest
    out = a + (b − a)·[importance ≥ threshold]

No parameters (mergekit has none). Unlike the other methods (kernels.py), the arithmetic runs in
the compute dtype itself, op for op as mergekit 0.1.5 does it: the mask is a discrete function of
the importances, and with `dtype: bfloat16` mergekit's KL is dominated by bf16 rounding (p/q near
1), so computing it in fp32 selects other entries (a different model, up to |b − a| apart) rather
than the same ones more precisely. Inputs are rounded to the compute dtype, as mergekit's loader
does; the KL, importances and threshold stay in it; b − a is taken in it and a + (b − a)·mask in
fp32 (mergekit's float mask promotes it), then written in the output dtype. mergekit writes that
fp32 sum as is (float32 files from a bfloat16 config); Alloy writes the output dtype, so the
tensors are mergekit's rounded once (identical with `out_dtype: float32`).

mergekit takes its quantiles from a random sample of 1M importances (with replacement) when a tensor
is larger than that; Alloy takes them exactly from all n, so on such tensors the masks agree in
distribution, not entry by entry. Blocked passes over whole rows: the KL per row and the importances
(kept as one tensor in the compute dtype for the quantiles), then the masked update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef
from merge_ops.errors import SpecError
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")
np = lazy("numpy")

METHOD = MethodDef(
    "arcee_fusion", "static", "keep the expert's changes whose importance (|Δ|·row KL) is an upper outlier",
    "Arcee AI 2025, Arcee Fusion (arcee.ai); as in mergekit",
    (), max_experts=1)

PROB_EPS = 1e-8


def quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """The ⌊q·(n − 1)⌋-th smallest values (0-based), as mergekit's indices into a sorted copy; 0-d
    tensors in the values' dtype, so the threshold arithmetic rounds as mergekit's does.

    On CPU one numpy sort of a copy (SIMD, values only) gives all of them ~6x faster than a torch
    `kthvalue` each; bf16 is sorted as fp32 (exact, order-preserving) and converted back exactly."""
    idx = [int(q * (values.numel() - 1)) for q in qs]
    if values.device.type == "cpu" and values.dtype in (torch.float64, torch.float32, torch.float16,
                                                        torch.bfloat16):
        v = values.float() if values.dtype == torch.bfloat16 else values
        ordered = np.sort(v.reshape(-1).numpy())
        return [torch.tensor(ordered[i]).to(values.dtype) for i in idx]
    return [torch.kthvalue(values.reshape(-1), i + 1).values for i in idx]


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import block_size, buffer, require_base, work_dtype

    a = require_base(x)
    if len(x.experts) != 1:
        raise SpecError(f"arcee_fusion merges the base with exactly one expert, got {len(x.experts)}",
                        param="experts")
    b = x.experts[0]
    cd, device = x.compute_dtype, a.device
    wd = work_dtype(cd)  # the masked sum: fp32 for a 16-bit compute dtype, as mergekit's promotion
    n = a.numel()
    if n == 0:
        return a.to(x.out_dtype, copy=True)
    cols = a.shape[-1] if a.dim() > 0 else 1
    rows = n // cols
    va, vb = a.reshape(rows, cols), b.reshape(rows, cols)
    per = max(1, block_size(device) // cols)  # whole rows: the softmax needs them
    importance = torch.empty(rows, cols, dtype=cd, device=device)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        m = (r1 - r0) * cols
        ba = buffer("base", m, cd, device).view(r1 - r0, cols).copy_(va[r0:r1])
        bb = buffer("d0", m, cd, device).view(r1 - r0, cols).copy_(vb[r0:r1])
        p = torch.softmax(bb, dim=-1).add_(PROB_EPS)
        q = torch.softmax(ba, dim=-1).add_(PROB_EPS)
        kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
        torch.sub(bb, ba, out=importance[r0:r1]).abs_().mul_(kl)
    flat = importance.view(-1)
    q1, med, q3 = quantiles(flat, (0.25, 0.5, 0.75))
    threshold = med + 1.5 * (q3 - q1)  # in the compute dtype, as mergekit
    out = torch.empty(a.shape, dtype=x.out_dtype, device=device)
    fo = out.view(rows, cols)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        m = (r1 - r0) * cols
        shape = (r1 - r0, cols)
        ba = buffer("base", m, cd, device).view(shape).copy_(va[r0:r1])
        d = buffer("d0", m, cd, device).view(shape).copy_(vb[r0:r1]).sub_(ba)  # b − a in the compute dtype
        if cd != wd:
            ba = buffer("base_w", m, wd, device).view(shape).copy_(ba)
            d = buffer("d0_w", m, wd, device).view(shape).copy_(d)
        keep = torch.ge(importance[r0:r1], threshold, out=buffer("keep", m, wd, device).view(shape))
        fo[r0:r1].copy_(ba.addcmul_(d, keep))
    return out
