"""Linear merge (model soup): a weighted average of the models' weights.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML, arXiv:2203.05482.

    out = Σ wᵢ·modelᵢ / Σ wᵢ         (no division with normalize: false)

Defaults as in mergekit: weight 1, normalize true. Every model listed under `experts` takes part;
the base, if the spec names one, does not (as in mergekit, where only `models` are averaged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops import params as pv
from merge_ops.declare import WEIGHT, MethodDef, Param
from merge_ops.errors import SpecError

if TYPE_CHECKING:
    import torch

    from merge_ops.spec import MergeSpec
    from merge_ops.static.inputs import TensorInputs


def check(spec: MergeSpec) -> None:
    """With `normalize`, the weights must not sum to 0 at any depth (checked where every weight is a
    number or a per-layer gradient; filter lists depend on tensor names, checked per tensor)."""
    if not spec.global_param("normalize"):
        return
    values = [spec.model_param_value(i, "weight") for i in range(len(spec.experts))]
    values = [1.0 if v is None else v for v in values]
    if any(pv.is_conditional(v) for v in values):
        return
    # each weight is linear between its own breakpoints: the sum can only vanish at a breakpoint
    # or between two where it changes sign
    points = sorted({i / (len(v) - 1) if len(v) > 1 else 0.0 for v in values if isinstance(v, list)
                     for i in range(len(v))} | {0.0, 1.0})
    sums = [sum(float(pv.resolve(v, "", t)) for v in values) for t in points]
    if any(s == 0 for s in sums) or any(a * b < 0 for a, b in zip(sums, sums[1:], strict=False)):
        raise ValueError("parameters.weight: the experts' weights sum to 0"
                         + (" at some depth" if any(isinstance(v, list) for v in values) else "")
                         + ", so they cannot be normalised; "
                         "change the weights or set normalize: false")


METHOD = MethodDef(
    "linear", "static", "weighted average of the models' weights",
    "Wortsman et al. 2022, Model soups, arXiv:2203.05482",
    (WEIGHT, Param("normalize", True, "divide by the sum of weights", type=bool)),
    needs_base=False, check=check)


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import weighted_sum, work_dtype

    if not x.experts:
        raise SpecError("linear needs at least one model under `experts`", param="experts")
    x = x.with_defaults(METHOD)
    weights = [float(mp["weight"]) for mp in x.model_params]
    if x.params["normalize"]:
        total = sum(weights)
        if total == 0:
            # a filter list can still make one tensor's weights cancel: say which
            raise SpecError(f"linear: the weights for tensor {x.name!r} sum to 0, so they cannot be "
                            "normalised; change the weights or set normalize: false", param="weight")
        weights = [w / total for w in weights]
    return weighted_sum(x.experts, weights, x.out_dtype, work_dtype(x.compute_dtype))
