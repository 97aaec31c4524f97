"""RAM: Reinforced Agent Merging — average each entry over only the experts that changed it.

arXiv:2601.13572; mergekit's `ram`. Per entry, with τᵢ = expertᵢ − base and nzᵢ = |τᵢ| > epsilon:

    c   = Σ nzᵢ                               experts that changed this entry
    out = base + Σ nzᵢ·τᵢ / max(c, 1)         (an entry changed by one expert takes its change whole)

Defaults (mergekit): epsilon 1e-5. One blocked pass (`ramplus_tl` adds per-expert boosts, see
ramplus_tl.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")

EPSILON = Param("epsilon", 1e-5, "a task-vector entry counts as changed when |τ| exceeds this", min=0.0)

METHOD = MethodDef(
    "ram", "static", "average each entry's change over the experts that changed it",
    "Reinforced Agent Merging, arXiv:2601.13572; as in mergekit",
    (EPSILON,))


def merge(x: TensorInputs, boosts: list[float] | None) -> torch.Tensor:
    """base + Σ nzᵢ·τᵢ·(boostᵢ if c = 1 else 1/c), blockwise (boosts None: all 1)."""
    from merge_ops.static.kernels import block_size, buffer, require_base, spans, work_dtype

    base = require_base(x)
    if not x.experts:
        return base.to(x.out_dtype, copy=True)
    eps = float(x.params["epsilon"])
    wd, device = work_dtype(x.compute_dtype), base.device
    out = torch.empty(base.shape, dtype=x.out_dtype, device=device)
    fb, fo = base.reshape(-1), out.view(-1)
    fe = [e.reshape(-1) for e in x.experts]
    for s, e in spans(base.numel(), block_size(device)):
        n = e - s
        b = buffer("base", n, wd, device).copy_(fb[s:e])
        cnt = buffer("cnt", n, wd, device).zero_()
        ds = []
        for i, f in enumerate(fe):
            d = buffer(f"d{i}", n, wd, device).copy_(f[s:e]).sub_(b)
            nz = torch.gt(d.abs(), eps).to(wd)
            d.mul_(nz)
            cnt.add_(nz)
            ds.append(d)
        acc = buffer("acc", n, wd, device).zero_()
        if boosts is None:
            for d in ds:
                acc.add_(d)
            acc.div_(cnt.clamp_min_(1))
        else:
            shared = torch.gt(cnt, 1).to(wd)
            inv = cnt.clamp_min(1).reciprocal_().mul_(shared)  # 1/c where c > 1, else 0
            unique = torch.eq(cnt, 1).to(wd)
            for d, lam in zip(ds, boosts, strict=True):
                acc.addcmul_(d, unique, value=lam).addcmul_(d, inv)
        fo[s:e].copy_(b.add_(acc))
    return out


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    return merge(x.with_defaults(METHOD), None)
