"""The per-tensor contract between the streaming merge driver and the static methods.

The driver reads one tensor from the base and from every expert (in their stored dtype, e.g.
bf16), resolves the method's parameters for that tensor (gradients, filters), and calls the method
module's `merge_tensor(x)`. The method converts to `compute_dtype` as it goes (ideally in
cache-sized blocks, see DESIGN.md) and returns the merged tensor in `out_dtype`, shaped like the
inputs. Methods never do I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TensorInputs:
    name: str
    base: torch.Tensor | None  # stored dtype; None only for methods that do not need a base
    experts: list[torch.Tensor]  # stored dtype, same shape as base
    model_params: list[dict[str, Any]]  # per expert: model-scoped params resolved for this tensor
    params: dict[str, Any]  # global params resolved for this tensor
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    layer: int | None  # block index (layers.layer_index), None outside blocks
    n_layers: int  # number of blocks in the model
    generator: torch.Generator | None = None  # seeded from (spec seed, tensor name) for random methods
