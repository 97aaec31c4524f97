"""SLERP: spherical linear interpolation between the base and one expert.

Shoemake 1985, "Animating rotation with quaternion curves", SIGGRAPH; as used for model merging
by mergekit. Per tensor, with a = base, b = expert viewed as vectors:

    dot = ⟨a/‖a‖, b/‖b‖⟩ clamped to [−1, 1]      (a norm ≤ 1e-8 counts as 1)
    |dot| > 0.9995 (nearly collinear or antipodal): out = (1 − t)·a + t·b   (lerp)
    otherwise θ = acos(dot):  out = sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b

The coefficients apply to the raw (unnormalised) tensors, as in mergekit. `t` is required
(0 = base, 1 = expert) and accepts per-layer gradients and filters.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.errors import SpecError

if TYPE_CHECKING:
    import torch

    from merge_ops.static.inputs import TensorInputs

METHOD = MethodDef(
    "slerp", "static", "spherical interpolation between the base and one expert",
    "Shoemake 1985; as used by mergekit",
    (Param("t", None, "interpolation factor: 0 = base, 1 = expert", min=0.0, max=1.0, gradient=True,
           required=True),),
    max_experts=1)

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def coefficients(t: float, g: torch.Tensor) -> tuple[float, float]:
    """(coefficient of a, coefficient of b) from the 2x2 Gram matrix of a and b."""
    na, nb = math.sqrt(max(float(g[0, 0]), 0.0)), math.sqrt(max(float(g[1, 1]), 0.0))
    na, nb = (na if na > EPS else 1.0), (nb if nb > EPS else 1.0)
    dot = min(1.0, max(-1.0, float(g[0, 1]) / (na * nb)))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import gram, require_base, weighted_sum, work_dtype

    base = require_base(x)
    if len(x.experts) != 1:
        raise SpecError(f"slerp merges the base with exactly one expert, got {len(x.experts)}",
                        param="experts")
    t = x.with_defaults(METHOD).params["t"]
    if t is None:
        raise SpecError("slerp needs `t` (0 = base, 1 = expert)", param="t")
    expert = x.experts[0]
    wd = work_dtype(x.compute_dtype)
    if base.numel() == 0:
        return base.to(x.out_dtype, copy=True)
    ca, cb = coefficients(float(t), gram([base, expert], None, wd)[0])
    return weighted_sum([base, expert], [ca, cb], x.out_dtype, wd)
