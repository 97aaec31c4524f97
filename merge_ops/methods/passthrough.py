"""Passthrough: copy one model's tensors unchanged (optionally scaled).

mergekit's `passthrough` for plain `models:` configs: exactly one input model, every tensor copied
(times its `scale`, when set). mergekit uses it mostly with `slices` to stack layer ranges
(frankenmerges), which `merge_ops/static/slices.py` plans; for a plain `models:` config it is a copy,
a dtype conversion or a uniform rescale. The one model is the single expert; a base may not be given as
well (mergekit: at most one input).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.errors import SpecError

if TYPE_CHECKING:
    import torch

    from merge_ops.spec import MergeSpec
    from merge_ops.static.inputs import TensorInputs


def check(spec: MergeSpec) -> None:
    if spec.base is not None:
        raise ValueError("base: passthrough copies exactly one model: list it under `experts` (mergekit "
                         "`models`) and drop the base")


METHOD = MethodDef(
    "passthrough", "static", "copy one model's tensors (optionally times `scale`)",
    "mergekit (no paper)",
    (Param("scale", None, "multiply every tensor by this (null: copy unchanged)", scope="model",
           nullable=True, gradient=True),),
    needs_base=False, max_experts=1, check=check)


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import weighted_sum, work_dtype

    inputs = x.experts or ([x.base] if x.base is not None else [])
    if len(inputs) != 1:
        raise SpecError(f"passthrough copies exactly one model, got {len(inputs)}", param="experts")
    x = x.with_defaults(METHOD)
    scale = x.model_params[0].get("scale") if x.model_params else None
    if scale is None:
        return inputs[0].to(x.out_dtype, copy=True)
    return weighted_sum(inputs, [float(scale)], x.out_dtype, work_dtype(x.compute_dtype))
