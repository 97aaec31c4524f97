"""Linear merge (model soup): a weighted average of the models' weights.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML, arXiv:2203.05482.

    out = Σ wᵢ·modelᵢ / Σ wᵢ         (no division with normalize: false)

Defaults as in mergekit: weight 1, normalize true. Every model listed under `experts` takes part;
the base, if the spec names one, does not (as in mergekit, where only `models` are averaged).
"""

from __future__ import annotations

import torch

from merge_ops.errors import SpecError
from merge_ops.methods.base import TensorInputs
from merge_ops.methods.kernels import model_param, param, weighted_sum, work_dtype


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    if not x.experts:
        raise SpecError("linear needs at least one model under `experts`", param="experts")
    weights = [float(model_param(x, "linear", i, "weight")) for i in range(len(x.experts))]
    if param(x, "linear", "normalize"):
        total = sum(weights)
        if total == 0:
            raise SpecError(f"linear: the weights for tensor {x.name!r} sum to 0, so they cannot be "
                            "normalised; change the weights or set normalize: false", param="weight")
        weights = [w / total for w in weights]
    return weighted_sum(x.experts, weights, x.out_dtype, work_dtype(x.compute_dtype))
