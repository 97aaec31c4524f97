"""RAM+ (tensor-local): RAM with each expert's unique changes boosted by how much it overlaps others.

arXiv:2601.13572; mergekit's `ramplus_tl`. Per tensor, with nzᵢ = |τᵢ| > epsilon and c = Σ nzᵢ:

    sharedᵢ = #entries with nzᵢ and c > 1,   uniqueᵢ = #entries with nzᵢ and c = 1
    ρᵢ = sharedᵢ / max(uniqueᵢ, epsilon),     λᵢ = 1 + r·clamp(ρᵢ, 0, alpha)
    out = base + Σ nzᵢ·τᵢ·(λᵢ where c = 1, 1/c where c > 1)

Defaults (mergekit): r 0.1, alpha 0.2, epsilon 1e-5. Two blocked passes: the counts, then the merge
(ram.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.lazy import lazy
from merge_ops.methods import ram

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")

METHOD = MethodDef(
    "ramplus_tl", "static", "RAM with each expert's unique changes boosted by its overlap with the others",
    "Reinforced Agent Merging, arXiv:2601.13572; as in mergekit",
    (Param("r", 0.1, "boost per unit of shared/unique ratio"),
     Param("alpha", 0.2, "cap of the shared/unique ratio"),
     ram.EPSILON))


def boosts(x: TensorInputs) -> list[float]:
    from merge_ops.static.kernels import block_size, buffer, spans, work_dtype

    base = x.base
    assert base is not None
    eps, r, alpha = float(x.params["epsilon"]), float(x.params["r"]), float(x.params["alpha"])
    wd, device = work_dtype(x.compute_dtype), base.device
    fb, fe = base.reshape(-1), [e.reshape(-1) for e in x.experts]
    shared = [0] * len(fe)
    unique = [0] * len(fe)
    for s, e in spans(base.numel(), block_size(device)):
        n = e - s
        b = buffer("base", n, wd, device).copy_(fb[s:e])
        nzs = [torch.gt(buffer("d0", n, wd, device).copy_(f[s:e]).sub_(b).abs_(), eps) for f in fe]
        cnt = torch.stack(nzs).sum(0)
        one = cnt == 1
        for i, nz in enumerate(nzs):
            u = int((nz & one).sum())
            unique[i] += u
            shared[i] += int(nz.sum()) - u
    return [1 + r * min(max(sh / max(un, eps), 0.0), alpha) for sh, un in zip(shared, unique, strict=True)]


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import require_base

    x = x.with_defaults(METHOD)
    require_base(x)
    if not x.experts:
        return x.base.to(x.out_dtype, copy=True)  # type: ignore[union-attr]
    return ram.merge(x, boosts(x))
