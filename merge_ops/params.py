"""Parameter values as mergekit writes them, resolved for one tensor.

A value is one of
- a scalar: `0.5`, `true`, `"sum"`;
- a gradient: a list of numbers interpolated over depth (`[0, 0.5, 1]`: 0 at the first block,
  1 at the last), see `layers.depth_fraction`;
- a conditional list: `[{filter: "mlp", value: 0.8}, {value: 0.2}]`: the first entry whose `filter`
  is a substring of the tensor name (or that has no filter) gives the value, which may itself be a
  gradient.
"""

from __future__ import annotations

import math
from typing import Any

from merge_ops.errors import SpecError

Scalar = float | int | bool | str


def is_gradient(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )


def is_conditional(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def resolve(value: Any, tensor_name: str, t: float) -> Scalar | None:
    """The scalar that `value` takes for `tensor_name` at depth fraction `t`."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if is_gradient(value):
        scaled = t * (len(value) - 1)
        i0 = min(int(math.floor(scaled)), len(value) - 1)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    if is_conditional(value):
        for entry in value:
            flt = entry.get("filter")
            if flt is None or flt in tensor_name:
                return resolve(entry.get("value"), tensor_name, t)
        return None
    raise SpecError(f"cannot interpret parameter value {value!r}: use a number, a list of numbers "
                    "(a per-layer gradient) or a list of {filter, value} entries")


def leaves(value: Any) -> list[Scalar]:
    """Every scalar a value can resolve to (for range checks at validation time)."""
    if is_gradient(value):
        return list(value)
    if is_conditional(value):
        out: list[Scalar] = []
        for entry in value:
            out.extend(leaves(entry.get("value")))
        return out
    return [value]
