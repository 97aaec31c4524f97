"""Multi-SLERP: barycentric interpolation of several experts on the hypersphere.

Goddard 2024, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea); mergekit's
`multislerp`. Per tensor, with vᵢ = expertᵢ − base (or expertᵢ without a base) as flat vectors and
weights wᵢ (÷ Σ wᵢ with `normalize_weights`, default on):

    uᵢ = vᵢ / (‖vᵢ‖ + eps);   m = Σ wᵢ·uᵢ;   m̂ = m / ‖m‖
    tangent  τ = Σ wᵢ·(uᵢ − ⟨uᵢ, m̂⟩·m̂);   ‖τ‖ₑ = ‖τ‖ + eps
    out = (m̂·cos ‖τ‖ₑ + τ·sin ‖τ‖ₑ / ‖τ‖ₑ) · Σ wᵢ‖vᵢ‖      (+ base)

One expert: its tensor, unchanged. ‖m‖ < eps: two experts fall back to w₀v₀ + w₁v₁ (+ base); more
raise (antipodal inputs that cancel), as in mergekit. Defaults: normalize_weights true, eps 1e-8;
`weight` is required per expert (mergekit has no default).

Every vector above is a combination of the vᵢ, so the method is one blocked Gram pass (float64
sums) and one weighted sum: the sphere arithmetic runs on E×E matrices.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.errors import SpecError
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")

METHOD = MethodDef(
    "multislerp", "static", "spherical barycentric interpolation of any number of experts",
    "Goddard 2024, Multi-SLERP (goddard.blog); as in mergekit",
    (Param("weight", None, "this expert's barycentric weight", scope="model", gradient=True,
           required=True),
     Param("normalize_weights", True, "divide the weights by their sum", type=bool),
     Param("eps", 1e-8, "numerical floor of norms", min=0.0)),
    needs_base=False)


def coefficients(g: torch.Tensor, w: list[float], eps: float) -> list[float] | None:
    """Coefficients of the vᵢ in the result (None: the weighted mean vanishes), from Gram g (E, E)."""
    g = g.to(torch.float64)
    wt = torch.tensor(w, dtype=torch.float64)
    norms = torch.diagonal(g).clamp_min(0).sqrt()
    a = wt / (norms + eps)  # m = Σ aᵢ vᵢ
    m_norm = math.sqrt(max(float(a @ g @ a), 0.0))
    if m_norm < eps:
        return None
    mhat = a / m_norm
    dots = (g @ mhat) / (norms + eps)  # ⟨uᵢ, m̂⟩
    tan = a - float((wt * dots).sum()) * mhat  # τ = Σ wᵢuᵢ − (Σ wᵢ⟨uᵢ, m̂⟩)·m̂
    tn = math.sqrt(max(float(tan @ g @ tan), 0.0)) + eps
    r = mhat * math.cos(tn) + tan * (math.sin(tn) / tn)
    return (r * float((norms * wt).sum())).tolist()


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import gram, weighted_sum, work_dtype

    if not x.experts:
        raise SpecError("multislerp needs at least one expert", param="experts")
    if len(x.experts) == 1:
        return x.experts[0].to(x.out_dtype, copy=True)
    x = x.with_defaults(METHOD)
    w = [mp["weight"] for mp in x.model_params]
    if any(v is None for v in w):
        raise SpecError("multislerp needs a `weight` for each expert", param="weight")
    w = [float(v) for v in w]
    if x.params["normalize_weights"]:
        total = sum(w)
        if total == 0:
            raise SpecError(f"multislerp: the weights for tensor {x.name!r} sum to 0, so they cannot be "
                            "normalised; change the weights or set normalize_weights: false", param="weight")
        w = [v / total for v in w]
    wd = work_dtype(x.compute_dtype)
    ref = x.experts[0]
    if ref.numel() == 0:
        return ref.to(x.out_dtype, copy=True)
    c = coefficients(gram(x.experts, x.base, wd)[0], w, float(x.params["eps"]))
    if c is None:
        if len(x.experts) != 2:
            raise SpecError(f"multislerp: the weighted mean of tensor {x.name!r} is zero (antipodal inputs "
                            "with balancing weights); use different weights", param="weight")
        c = w
    if x.base is None:
        return weighted_sum(x.experts, c, x.out_dtype, wd)
    return weighted_sum([x.base, *x.experts], [1.0 - sum(c), *c], x.out_dtype, wd)
