"""The per-tensor contract between the streaming driver and the static methods.

The driver reads one tensor from the base and from every expert (in their stored dtype, e.g.
bf16), resolves the method's parameters for that tensor (gradients, filters, defaults), and calls
the method module's `merge_tensor(x)`. The method converts to `compute_dtype` as it goes (in
cache-sized blocks, see kernels.py) and returns the merged tensor in `out_dtype`, shaped like the
inputs. Methods never do I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from merge_ops.declare import MethodDef


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

    def with_defaults(self, method: MethodDef) -> TensorInputs:
        """Every parameter of `method` present: a value missing (or None) takes its declared default.
        The driver passes them all; a direct call may give only some."""
        glob = {p.name: p.default for p in method.params if p.scope == "global"}
        glob.update({k: v for k, v in self.params.items() if v is not None or k not in glob})
        model = {p.name: p.default for p in method.params if p.scope == "model"}
        per = [{**model, **{k: v for k, v in mp.items() if v is not None}} for mp in self.model_params]
        per += [dict(model) for _ in range(len(self.experts) - len(per))]
        return dataclasses.replace(self, params=glob, model_params=per)
