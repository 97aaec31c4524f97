"""NearSwap: move the base toward the expert only where the two are already close.

alchemonaut 2024, QuartetAnemoi-70B-t0.0001 (model card); mergekit's `nearswap`. Per entry, with
a = base, b = the one expert:

    w   = clamp(t / max(|a − b|, 1e-6), 0, 1)
    out = w·b + (1 − w)·a          (entries within t of each other take b; far ones stay near a)

`t` is required (mergekit has no default) and accepts per-layer gradients and filters.
One blocked pass (kernels.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.errors import SpecError
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")

METHOD = MethodDef(
    "nearswap", "static", "take the expert's value where it is within t of the base, interpolate by "
    "t/|a−b| elsewhere",
    "alchemonaut 2024, QuartetAnemoi-70B-t0.0001 (model card); as in mergekit",
    (Param("t", None, "similarity threshold: entries closer than t take the expert's value",
           gradient=True, required=True),),
    max_experts=1)


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import block_size, buffer, require_base, spans, work_dtype

    base = require_base(x)
    if len(x.experts) != 1:
        raise SpecError(f"nearswap merges the base with exactly one expert, got {len(x.experts)}",
                        param="experts")
    t = x.with_defaults(METHOD).params["t"]
    if t is None:
        raise SpecError("nearswap needs `t`", param="t")
    t = float(t)
    wd, device = work_dtype(x.compute_dtype), base.device
    out = torch.empty(base.shape, dtype=x.out_dtype, device=device)
    fa, fb, fo = base.reshape(-1), x.experts[0].reshape(-1), out.view(-1)
    for s, e in spans(base.numel(), block_size(device)):
        a = buffer("base", e - s, wd, device).copy_(fa[s:e])
        d = buffer("d0", e - s, wd, device).copy_(fb[s:e]).sub_(a)  # b − a
        w = buffer("acc", e - s, wd, device)
        torch.abs(d, out=w).clamp_min_(1e-6)
        w.reciprocal_().mul_(t).clamp_(0, 1)
        fo[s:e].copy_(a.addcmul_(w, d))  # a + w·(b − a)
    return out
