"""NuSLERP: spherical interpolation of two experts (or of their task vectors, given a base).

mergekit's `nuslerp`. With two experts e₀, e₁, weights w₀, w₁ and an optional base b:

    t  = w₁ / (w₀ + w₁)                   (0.5 when |w₀ + w₁| < 1e-6)
    vᵢ = eᵢ − b (or eᵢ without a base), taken as vectors per tensor (`nuslerp_flatten`, default),
         else per row (vectors along the last dimension) or, with `nuslerp_row_wise`, per column
         (vectors along the first dimension: mergekit's `dim=0`)
    cos = ⟨v₀/‖v₀‖, v₁/‖v₁‖⟩ clamped to [−1, 1]      (a norm below 1e-7 counts as 1e-7)
    1 − cos² ≤ 1e-16 (colinear):  out = (1 − t)·v₀ + t·v₁
    else θ = acos(cos):  out = sin((1 − t)θ)/sin θ · v₀ + sin(tθ)/sin θ · v₁
    plus b when a base is given.

`weight` is required for both experts (mergekit has no default). Two blocked passes: the 2x2 Gram
matrices (float64 sums), then one weighted sum with the coefficients.
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
    "nuslerp", "static", "spherical interpolation of two experts (of their task vectors with a base)",
    "mergekit's NuSLERP (no paper)",
    (Param("weight", None, "this expert's share of the interpolation: t = w₁/(w₀ + w₁)", scope="model",
           gradient=True, required=True),
     Param("nuslerp_row_wise", False, "interpolate column vectors (mergekit's dim 0) when not flattened",
           type=bool),
     Param("nuslerp_flatten", True, "interpolate each tensor as one vector", type=bool)),
    needs_base=False, min_experts=2, max_experts=2)

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8


def slerp_coefficients(t: float, g: torch.Tensor) -> torch.Tensor:
    """(…, 2) coefficients of v₀ and v₁ from Gram matrices g (…, 2, 2), in float64."""
    n0 = g[..., 0, 0].clamp_min(0).sqrt().clamp_min(NORM_EPS)
    n1 = g[..., 1, 1].clamp_min(0).sqrt().clamp_min(NORM_EPS)
    cos = (g[..., 0, 1] / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.where(colinear, 1.0, torch.sin(theta))
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return torch.stack([c0, c1], dim=-1)


def column_gram(tensors: list[torch.Tensor], minus: torch.Tensor | None, wd: torch.dtype) -> torch.Tensor:
    """Per-column Gram matrices (cols, E, E) of (tensorᵢ − minus) viewed as rows x cols, float64."""
    from merge_ops.static.kernels import block_size, buffer, row_spans

    rows = tensors[0].shape[0]
    cols = tensors[0].numel() // rows
    e, device = len(tensors), tensors[0].device
    g = torch.zeros(cols, e, e, dtype=torch.float64, device=device)
    views = [t.reshape(rows, cols) for t in tensors]
    mv = minus.reshape(rows, cols) if minus is not None else None
    for r0, r1, c0, c1 in row_spans(rows, cols, block_size(device)):
        n = (r1 - r0) * (c1 - c0)
        ds = []
        for i, v in enumerate(views):
            d = buffer(f"d{i}", n, wd, device).view(r1 - r0, c1 - c0).copy_(v[r0:r1, c0:c1])
            if mv is not None:
                d.sub_(mv[r0:r1, c0:c1])
            ds.append(d)
        for i in range(e):
            for j in range(i, e):
                s = (ds[i] * ds[j]).sum(0).to(torch.float64)
                g[c0:c1, i, j] += s
                if i != j:
                    g[c0:c1, j, i] += s
    return g


def column_sum(tensors: list[torch.Tensor], coeffs: torch.Tensor, out_dtype: torch.dtype,
               wd: torch.dtype) -> torch.Tensor:
    """Σ coeffs[:, i]·tensorᵢ with one coefficient per column (coeffs: cols x E)."""
    from merge_ops.static.kernels import block_size, buffer, row_spans

    shape, device = tensors[0].shape, tensors[0].device
    rows = shape[0]
    cols = tensors[0].numel() // rows
    out = torch.empty(shape, dtype=out_dtype, device=device)
    fo = out.view(rows, cols)
    views = [t.reshape(rows, cols) for t in tensors]
    cw = coeffs.to(wd)
    for r0, r1, c0, c1 in row_spans(rows, cols, block_size(device)):
        n = (r1 - r0) * (c1 - c0)
        acc = buffer("acc", n, wd, device).view(r1 - r0, c1 - c0)
        tmp = buffer("tmp", n, wd, device).view(r1 - r0, c1 - c0)
        for i, v in enumerate(views):
            c = cw[c0:c1, i]
            if i == 0:
                acc.copy_(v[r0:r1, c0:c1]).mul_(c)
            else:
                acc.addcmul_(tmp.copy_(v[r0:r1, c0:c1]), c)
        fo[r0:r1, c0:c1].copy_(acc)
    return out


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import gram, weighted_sum, work_dtype

    if len(x.experts) != 2:
        raise SpecError(f"nuslerp interpolates exactly two experts, got {len(x.experts)}", param="experts")
    x = x.with_defaults(METHOD)
    w = [mp["weight"] for mp in x.model_params]
    if any(v is None for v in w):
        raise SpecError("nuslerp needs a `weight` for each expert", param="weight")
    w0, w1 = float(w[0]), float(w[1])
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    ref = x.experts[0]
    wd = work_dtype(x.compute_dtype)
    if ref.numel() == 0:
        return ref.to(x.out_dtype, copy=True)
    tensors = [*x.experts] + ([x.base] if x.base is not None else [])

    def with_base(c: torch.Tensor) -> torch.Tensor:  # (…, 2) → (…, 2 or 3): base takes 1 − c₀ − c₁
        return torch.cat([c, 1 - c.sum(-1, keepdim=True)], -1) if x.base is not None else c

    if x.params["nuslerp_flatten"] or ref.dim() < 2:
        c = with_base(slerp_coefficients(t, gram(x.experts, x.base, wd)[0]))
        return weighted_sum(tensors, [float(v) for v in c], x.out_dtype, wd)
    if x.params["nuslerp_row_wise"]:
        c = with_base(slerp_coefficients(t, column_gram(x.experts, x.base, wd)))
        return column_sum(tensors, c, x.out_dtype, wd)
    rows = ref.numel() // ref.shape[-1]
    c = with_base(slerp_coefficients(t, gram(x.experts, x.base, wd, rows)))
    return weighted_sum(tensors, [c[:, i] for i in range(c.shape[1])], x.out_dtype, wd, rows)
