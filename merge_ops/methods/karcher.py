"""Karcher mean: the Riemannian (geodesic) mean of the models' tensors on the unit sphere, rescaled.

Karcher 1977, "Riemannian center of mass and mollifier smoothing"; for merging, arXiv:2603.04972;
mergekit's `karcher`. Per tensor, over every input (the base too, when given, last), equal weights 1/N:

    uᵢ = vᵢ/‖vᵢ‖ (0 when ‖vᵢ‖ = 0); valid: ‖vᵢ‖ > tol, with weights αᵢ renormalised over them
    μ  = normalised Σ αᵢuᵢ (the first valid uᵢ when that sum's norm < tol)
    repeat max_iter times:  θᵢ = acos⟨μ, uᵢ⟩ (terms with θᵢ < tol skipped)
                            T = Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − ⟨μ, uᵢ⟩μ); stop when ‖T‖ < tol
                            μ ← cos‖T‖·μ + sin‖T‖·T/‖T‖, renormalised
    out = (Σ ‖vᵢ‖/N)·μ            (no valid input: zeros)

Defaults (mergekit): max_iter 10, tol 1e-5. μ and T always lie in the span of the inputs, so the
iteration runs on N×N Gram matrices: one blocked Gram pass (float64 sums), then one weighted sum.
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
    "karcher", "static", "geodesic (Karcher) mean of the models on the unit sphere, times their mean norm",
    "Karcher 1977; arXiv:2603.04972; as in mergekit",
    (Param("max_iter", 10, "iterations of the Riemannian gradient step", type=int, min=0, max=10_000),
     Param("tol", 1e-5, "convergence and degeneracy tolerance", min=0.0)),
    needs_base=False)


def coefficients(g: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """Coefficients of the inputs in the result, from their Gram matrix g (N, N)."""
    g = g.to(torch.float64)
    n = g.shape[0]
    norms = torch.diagonal(g).clamp_min(0).sqrt()
    eye = torch.eye(n, dtype=torch.float64)
    units = [eye[i] / norms[i] if norms[i] != 0 else eye[i] * 0 for i in range(n)]  # uᵢ as coefficients
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return [0.0] * n

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ g @ b)

    def norm(a: torch.Tensor) -> float:
        return math.sqrt(max(dot(a, a), 0.0))

    alphas = [1.0 / len(valid)] * len(valid)
    mean = sum((a * units[i] for a, i in zip(alphas, valid, strict=True)), torch.zeros(n, dtype=torch.float64))
    mn = norm(mean)
    mean = units[valid[0]].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        for a, i in zip(alphas, valid, strict=True):
            d = min(1.0, max(-1.0, dot(mean, units[i])))
            theta = math.acos(d)
            if theta < tol:
                continue
            tangent += a * (theta / math.sin(theta)) * (units[i] - d * mean)
        tn = norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = norm(mean)
        if un > tol:
            mean = mean / un
    scale = float(norms.sum()) / n
    return (mean * scale).tolist()


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import gram, weighted_sum, work_dtype

    inputs = list(x.experts) + ([x.base] if x.base is not None else [])  # mergekit appends the base
    if not inputs:
        raise SpecError("karcher needs at least one model", param="experts")
    if len(inputs) == 1 or inputs[0].numel() == 0:
        return inputs[0].to(x.out_dtype, copy=True)
    x = x.with_defaults(METHOD)
    wd = work_dtype(x.compute_dtype)
    c = coefficients(gram(inputs, None, wd)[0], int(x.params["max_iter"]), float(x.params["tol"]))
    return weighted_sum(inputs, c, x.out_dtype, wd)
