"""Model Stock: move the experts' average toward the base by their task vectors' angle.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV,
arXiv:2403.19522. With mergekit's semantics, per tensor (or per output row with `filter_wise`):

    cos = mean over pairs i < j of  ⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖·‖τⱼ‖, 1e-6), each clamped to [−1, 1]
          (τᵢ = expertᵢ − base; a mean of cosines, as mergekit, not of angles as FusionBench)
    t   = k·cos / (1 + (k − 1)·cos)      (k experts; t = 0, i.e. the base, where |1 + (k−1)cos| < 1e-6)
    out = t·mean(expertᵢ) + (1 − t)·base

Defaults: filter_wise false. `filter_wise` reduces over the last dimension (per row of a matrix),
as mergekit does. t is NOT clamped to [0, 1], matching mergekit, so a merge is reproducible from a
mergekit recipe: for experts fine-tuned from one base the cosines are positive and t ∈ (0, 1];
negative cosines (experts pulling apart) give t < 0 or, below cos = −1/(k−1), t > 1.
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
    "model_stock", "static", "interpolate the experts' mean toward the base by their task-vector angle",
    "Jang et al. 2024, Model Stock, arXiv:2403.19522",
    (Param("filter_wise", False, "one ratio per output row instead of per tensor", type=bool),),
    min_experts=2)


def ratio(g: torch.Tensor) -> torch.Tensor:
    """t per row from Gram matrices g (rows, k, k) of the task vectors."""
    k = g.shape[-1]
    norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    i, j = torch.triu_indices(k, k, offset=1)
    cos = (g[:, i, j] / (norms[:, i] * norms[:, j]).clamp_min(1e-6)).clamp(-1, 1).mean(dim=1)
    den = 1 + (k - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, den))


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import gram, require_base, weighted_sum, work_dtype

    base = require_base(x)
    k = len(x.experts)
    if k < 2:
        raise SpecError("model_stock needs at least two experts", param="experts")
    x = x.with_defaults(METHOD)
    if base.numel() == 0:
        return base.to(x.out_dtype, copy=True)
    rows = base.numel() // base.shape[-1] if x.params["filter_wise"] and base.dim() > 1 else 1
    wd = work_dtype(x.compute_dtype)
    t = ratio(gram(x.experts, base, wd, rows))
    if rows == 1:
        tv = float(t[0])
        coeffs: list[float | torch.Tensor] = [1.0 - tv, *([tv / k] * k)]
    else:
        coeffs = [1.0 - t, *([t / k] * k)]
    return weighted_sum([base, *x.experts], coeffs, x.out_dtype, wd, rows)
