"""The task-vector core of task_arithmetic, ties, dare_linear, dare_ties and breadcrumbs.

This is mergekit's "generalized task arithmetic", tensor by tensor, with the same semantics:

    τᵢ = trimᵢ(expertᵢ − base)          sparsification (TIES top-k, DARE random, Breadcrumbs band);
                                        with `rescale`, τᵢ is scaled to keep the L1 norm it had
                                        before trimming (mergekit's RescaleNorm.l1)
    δᵢ = wᵢ·τᵢ
    no consensus:  Δ = Σ δᵢ,                        divisor = Σ wᵢ      (|divisor| < 1e-8 → 1)
    consensus:     m = sign(Σ δᵢ), 0 counts as +    (TIES sign election from the weighted deltas)
                   Δ = Σ δᵢ·[sign δᵢ = m],          divisor = Σ wᵢ·[sign δᵢ = m]   (0 → 1)
                   (a zero δᵢ agrees with neither sign)
    normalize:     Δ ← Δ / divisor
    out = base + λ·s(l)·Δ               s(l) = LiNeS depth scale (1 unless `lines`)

Passes over the tensor, all blocked (see kernels.py): one selection pass for top-k thresholds
(TIES, Breadcrumbs; see topk.py), one when `rescale` needs the L1 norms before and after
trimming, then the merge pass. Without trimming or consensus the merge is a single fused weighted
sum: (1 − c·Σwᵢ)·base + Σ c·wᵢ·expertᵢ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from merge_ops.static import lines
from merge_ops.static.inputs import TensorInputs
from merge_ops.static.kernels import (
    block_size,
    buffer,
    ones,
    require_base,
    spans,
    sub_into,
    weighted_sum,
    work_dtype,
)

RESCALE_EPS = 1e-7  # mergekit: below this norm (before or after trimming) no rescale happens


class Trim(Protocol):
    """The sparsification of one expert's task vector, applied a block at a time."""

    needs_magnitudes: bool  # whether `observe` must see |τ| (one pass) before `apply` works

    def observe(self, start: int, mags: torch.Tensor) -> None:
        """See |τ| for the block at flat offset `start`."""
        ...

    def finish(self, magnitudes_at: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """End of the magnitude pass; `magnitudes_at(idx)` gives exact |τ| at flat indices."""
        ...

    def start(self) -> None:
        """Rewind per-pass state (a random stream): called before every apply pass."""
        ...

    def apply(self, d: torch.Tensor, start: int) -> None:
        """Zero the dropped entries of the block of τ at flat offset `start`, in place."""
        ...


def merge(x: TensorInputs, trims: Sequence[Trim | None] | None = None, consensus: bool = False
          ) -> torch.Tensor:
    """The merged tensor; `x` carries every parameter of the method (TensorInputs.with_defaults)."""
    base = require_base(x)
    experts = x.experts
    if not experts:
        return base.to(x.out_dtype, copy=True)
    n_exp = len(experts)
    wd, device = work_dtype(x.compute_dtype), base.device
    weights = [float(mp["weight"]) for mp in x.model_params]
    normalize = bool(x.params["normalize"])
    scale = float(x.params["lambda"]) * lines.scale(x, normalize)
    rescale = bool(x.params.get("rescale", False))  # methods without `rescale` never rescale
    trim_list: list[Trim | None] = list(trims) if trims is not None else [None] * n_exp
    active = [i for i, t in enumerate(trim_list) if t is not None]

    if not consensus and not active:
        div = _divisor(sum(weights)) if normalize else 1.0
        c = scale / div
        return weighted_sum([base, *experts], [1.0 - c * sum(weights), *(c * w for w in weights)],
                            x.out_dtype, wd)

    n, block = base.numel(), block_size(device)
    fb = base.reshape(-1)
    fe = [e.reshape(-1) for e in experts]

    # 1. one selection pass: the magnitudes |τᵢ| that top-k thresholds need
    if select := [i for i in active if trim_list[i].needs_magnitudes]:  # type: ignore[union-attr]
        for s, e in spans(n, block):
            b = buffer("base", e - s, wd, device).copy_(fb[s:e])
            mag = buffer("mag", e - s, wd, device)
            for i in select:
                trim_list[i].observe(s, sub_into(fe[i][s:e], b, mag).abs_())  # type: ignore[union-attr]
        for i in select:
            trim_list[i].finish(  # type: ignore[union-attr]
                lambda idx, i=i: (fe[i][idx].to(wd) - fb[idx].to(wd)).abs_())

    # 2. rescale factors: L1 norm of τᵢ before / after trimming
    factors = [1.0] * n_exp
    if rescale and active:
        before = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n_exp)]
        after = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(n_exp)]
        for i in active:
            trim_list[i].start()  # type: ignore[union-attr]
        for s, e in spans(n, block):
            b = buffer("base", e - s, wd, device).copy_(fb[s:e])
            d = buffer("d0", e - s, wd, device)
            for i in active:
                sub_into(fe[i][s:e], b, d)
                before[i] += torch.linalg.vector_norm(d, 1)  # block sums in wd, totals in float64
                trim_list[i].apply(d, s)  # type: ignore[union-attr]
                after[i] += torch.linalg.vector_norm(d, 1)
        for i in active:
            bf, af = float(before[i]), float(after[i])
            if bf >= RESCALE_EPS and af >= RESCALE_EPS:
                factors[i] = bf / af

    # 3. merge pass
    for i in active:
        trim_list[i].start()  # type: ignore[union-attr]
    coeffs = [w * f for w, f in zip(weights, factors, strict=True)]
    out = torch.empty(base.shape, dtype=x.out_dtype, device=device)
    fo = out.view(-1)
    if consensus:
        _consensus_pass(fb, fe, fo, trim_list, weights, coeffs, scale, normalize, wd, block)
    else:
        div = _divisor(sum(weights)) if normalize else 1.0
        for s, e in spans(n, block):
            b = buffer("base", e - s, wd, device).copy_(fb[s:e])
            d = buffer("d0", e - s, wd, device)
            acc = buffer("acc", e - s, wd, device)
            for i in range(n_exp):
                sub_into(fe[i][s:e], b, d)
                if (t := trim_list[i]) is not None:
                    t.apply(d, s)
                if i == 0:
                    torch.mul(d, coeffs[i], out=acc)
                else:
                    acc.add_(d, alpha=coeffs[i])
            b.add_(acc, alpha=scale / div)
            fo[s:e].copy_(b)
    return out


def _divisor(total: float) -> float:
    return 1.0 if abs(total) < 1e-8 else total


def _consensus_pass(fb: torch.Tensor, fe: list[torch.Tensor], fo: torch.Tensor,
                    trims: list[Trim | None], weights: list[float], coeffs: list[float],
                    scale: float, normalize: bool, wd: torch.dtype, block: int) -> None:
    """TIES elect + disjoint merge, blockwise.

    With sgn = ±1 the elected sign and cᵢ = wᵢ·(rescale factor): δᵢ·sgn > 0 exactly where δᵢ agrees,
    so Σ agreeing δᵢ = sgn·Σ |cᵢ|·relu(τᵢ·sign(cᵢ)·sgn) (no per-expert select), and the divisor
    adds wᵢ·sign(relu(τᵢ·sign(cᵢ)·sgn)).
    """
    device = fb.device
    n_exp = len(fe)
    min_w = min(w for w, c in zip(weights, coeffs, strict=True) if c != 0.0) if any(coeffs) else 0.0
    for s, e in spans(fb.numel(), block):
        L = e - s
        b = buffer("base", L, wd, device).copy_(fb[s:e])
        acc = buffer("acc", L, wd, device)
        ds = []
        for i in range(n_exp):
            d = buffer(f"d{i}", L, wd, device)
            sub_into(fe[i][s:e], b, d)
            if (t := trims[i]) is not None:
                t.apply(d, s)
            c = coeffs[i]
            if c == 0.0:  # a zero δᵢ never agrees: it counts neither in the sum nor the divisor
                continue
            if c < 0:
                d.neg_()
            if not ds:
                torch.mul(d, abs(c), out=acc)
            else:
                acc.add_(d, alpha=abs(c))
            ds.append((d, abs(c), weights[i]))
        if not ds:
            fo[s:e].copy_(b)
            continue
        # majority sign of Σ δᵢ; +0 elects + (a -0 sum means every δᵢ is 0: nothing to elect)
        sgn = torch.copysign(ones(L, wd, device), acc, out=buffer("sgn", L, wd, device))
        if normalize:
            div = buffer("div", L, wd, device).zero_()
            agree = buffer("agree", L, wd, device)
        for j, (d, c, w) in enumerate(ds):
            d.mul_(sgn).clamp_min_(0)  # |δᵢ|/|cᵢ| where δᵢ agrees with the elected sign, else 0
            if normalize:  # float 0/1 masks: bool tensors take slow conversion paths on CPU
                div.add_(torch.sign(d, out=agree), alpha=w)
            if j == 0:
                torch.mul(d, c, out=acc)
            else:
                acc.add_(d, alpha=c)
        acc.mul_(sgn)
        if normalize:
            if min_w > 0:  # a nonzero divisor is >= the smallest weight; a zero one has acc = 0
                div.clamp_min_(min_w)
            else:
                div.add_(torch.eq(div, 0, out=agree))  # 0 -> 1
            acc.div_(div)
        b.add_(acc, alpha=scale)
        fo[s:e].copy_(b)
