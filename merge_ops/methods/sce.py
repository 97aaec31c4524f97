"""SCE: Select, Calculate, Erase — variance-selected entries, energy weights, sign election.

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990; mergekit's `sce`.
Per tensor, with τᵢ = expertᵢ − base (E experts, n entries):

    select:    with select_topk < 1, keep the k = ⌊select_topk·#{v ≠ 0}⌋ entries of largest
               variance v = Var_i(τᵢ) (population variance across experts), in every τᵢ; the
               rest are zeroed (select_topk ≤ 0: all)
    calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²)   (1/E when that sum is below 1e-6)
    erase:     m = sign(Σ τᵢ) (unweighted; 0 elects +); τᵢ counts where sign τᵢ = m (0 never does)
    out = base + Σ wᵢ·τᵢ·[agree] / max(Σ wᵢ·[agree], 1e-6)

Defaults (mergekit): select_topk 1 (no selection); int8_mask accepted, no effect. The variance
threshold is found exactly (static/topk.py); of tied variances the first by index are kept, where
mergekit's `topk` leaves them unspecified. Up to three blocked passes: variances (only when
selecting), the energies, the merge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import INT8_MASK, MethodDef, Param
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs
    from merge_ops.static.topk import Threshold

torch = lazy("torch")

METHOD = MethodDef(
    "sce", "static", "keep high-variance entries, weight task vectors by their energy, TIES sign election",
    "Wan et al. 2024, FuseChat (SCE), arXiv:2408.07990",
    (Param("select_topk", 1.0, "fraction of (nonzero-variance) entries kept by variance across experts",
           min=0.0, max=1.0, gradient=True),
     INT8_MASK))


def variance(ds: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Population variance across experts, elementwise, with fixed operation order (so a gather at
    any index reproduces the blocked value exactly)."""
    mean = torch.zeros_like(out)
    for d in ds:
        mean.add_(d)
    mean.div_(len(ds))
    out.zero_()
    tmp = torch.empty_like(out)
    for d in ds:  # sub, mul, add: no fused multiply-add, whose rounding differs between code paths
        torch.sub(d, mean, out=tmp)
        out.add_(tmp.mul_(tmp))
    return out.div_(len(ds))


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.methods.ties import keep_top
    from merge_ops.static.kernels import block_size, buffer, require_base, spans, work_dtype
    from merge_ops.static.topk import TopK

    base = require_base(x)
    if not x.experts:
        return base.to(x.out_dtype, copy=True)
    x = x.with_defaults(METHOD)
    topk_frac = float(x.params["select_topk"])
    wd, device = work_dtype(x.compute_dtype), base.device
    n, block, n_exp = base.numel(), block_size(device), len(x.experts)
    fb, fe = base.reshape(-1), [e.reshape(-1) for e in x.experts]

    def deltas(s: int, e: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = buffer("base", e - s, wd, device).copy_(fb[s:e])
        return b, [buffer(f"d{i}", e - s, wd, device).copy_(f[s:e]).sub_(b) for i, f in enumerate(fe)]

    # 1. select: the variance threshold
    select = 0.0 < topk_frac < 1.0
    k = n
    thr: Threshold | None = None
    if topk_frac <= 0.0:
        k = 0
    elif select:
        top = TopK(n, wd, device)
        nonzero = 0
        for s, e in spans(n, block):
            _, ds = deltas(s, e)
            v = variance(ds, buffer("var", e - s, wd, device))
            nonzero += int(torch.count_nonzero(v))
            top.add(s, v)
        k = int(nonzero * topk_frac)
        if 0 < k < n:
            thr = top.threshold(k, lambda idx: variance(
                [fe[i][idx].to(wd) - fb[idx].to(wd) for i in range(n_exp)],
                torch.empty(idx.numel(), dtype=wd, device=device)))
        del top

    def masked(s: int, e: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, ds = deltas(s, e)
        if k == 0:
            for d in ds:
                d.zero_()
        elif k < n:
            v = variance(ds, buffer("var", e - s, wd, device))
            keep_top(v, s, k, n, thr)  # kept variances are > 0 (k ≤ #nonzero)
            keep = torch.gt(v, 0, out=buffer("keep", e - s, wd, device))
            for d in ds:
                d.mul_(keep)
        return b, ds

    # 2. calculate: energies mean(τᵢ²) of the selected task vectors
    energy = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n_exp)]
    for s, e in spans(n, block):
        _, ds = masked(s, e)
        for i, d in enumerate(ds):
            energy[i] += torch.dot(d, d).to(torch.float64)
    means = [float(v) / n for v in energy]
    total = sum(means)
    weights = [1.0 / n_exp] * n_exp if abs(total) < 1e-6 else [m / total for m in means]

    # 3. erase and merge
    out = torch.empty(base.shape, dtype=x.out_dtype, device=device)
    fo = out.view(-1)
    for s, e in spans(n, block):
        b, ds = masked(s, e)
        L = e - s
        sgn = buffer("acc", L, wd, device).zero_()
        for d in ds:
            sgn.add_(d)
        sgn = torch.where(sgn >= 0, 1.0, -1.0).to(wd)
        num = buffer("num", L, wd, device).zero_()
        den = buffer("den", L, wd, device).zero_()
        agree = buffer("agree", L, wd, device)
        for d, w in zip(ds, weights, strict=True):
            torch.eq(torch.sign(d), sgn, out=agree)
            num.addcmul_(d, agree, value=w)
            den.add_(agree, alpha=w)
        fo[s:e].copy_(b.add_(num.div_(den.clamp_min_(1e-6))))
    return out
