"""How a merge method declares itself: parameters (defaults, bounds, choices, help), paper, kind and
needs. Each method module holds one `METHOD = MethodDef(...)` beside its math; `merge_ops.methods`
collects them. Nothing here imports torch: the API validates specs with these declarations.

Parameter scopes follow mergekit: a `model` parameter may be set per expert (`experts[i].parameters`)
and also globally as the default for every expert; a `global` parameter is set once. Parameters with
`gradient=True` accept per-layer gradients and `{filter, value}` lists (see `params.py`).

Every number is checked to be finite and within its bounds (±MAX_MAGNITUDE where none is declared:
beyond that a merge only overflows), so a spec that passes never fails on a parameter value later.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from merge_ops import params as pv

if TYPE_CHECKING:
    from merge_ops.spec import MergeSpec

Kind = Literal["static", "learned", "ot"]
MAX_MAGNITUDE = 1e6
MAX_STRING = 1000
MAX_LIST = 256  # entries of a per-layer gradient or of a filter list
MAX_FILTER = 256  # characters of a filter
MAX_STEPS = 100_000  # optimizer steps of a learned method: a bound on one job's work



def regex_problem(value: str) -> str | None:
    """A `check` for regex-valued parameters: why `value` does not compile, or None."""
    try:
        re.compile(value)
    except re.error as e:
        return f"{value!r} is not a regex: {e}"
    return None

@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    help: str
    type: type = float
    scope: Literal["model", "global"] = "global"
    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True  # False: the value must be strictly above `min`
    max_inclusive: bool = True
    choices: tuple[Any, ...] | None = None
    gradient: bool = False  # accepts per-layer gradients and filter lists
    required: bool = False
    nullable: bool = False  # None is a meaningful value (e.g. "auto")
    check: Callable[[Any], str | None] | None = None  # a value's further rule: what is wrong, or None

    def range_text(self) -> str | None:
        """'[0, 1]', '(0, 1)', '> 0', ... for `alloy methods` (None when unbounded)."""
        if self.min is not None and self.max is not None:
            return (f"{'[' if self.min_inclusive else '('}{self.min:g}, "
                    f"{self.max:g}{']' if self.max_inclusive else ')'}")
        if self.min is not None:
            return f"{'>=' if self.min_inclusive else '>'} {self.min:g}"
        if self.max is not None:
            return f"{'<=' if self.max_inclusive else '<'} {self.max:g}"
        return None

    def validate(self, value: Any, where: str) -> None:
        """Raise ValueError('<where>: <what to fix>') unless `value` is acceptable."""
        if value is None:
            if self.nullable or (self.default is None and not self.required):
                return
            raise ValueError(f"{where}: needs a value ({self.help})")
        if (pv.is_gradient(value) or pv.is_conditional(value)) and not self.gradient:
            raise ValueError(f"{where}: takes a single value, not a per-layer list")
        if isinstance(value, list) and len(value) > MAX_LIST:
            raise ValueError(f"{where}: {len(value)} entries; at most {MAX_LIST}")
        if pv.is_conditional(value):
            for entry in value:
                bad = set(entry) - {"filter", "value"}
                if bad or "value" not in entry:
                    raise ValueError(f"{where}: conditional entries are {{filter, value}}; got {entry}")
                flt = entry.get("filter")
                if flt is not None and (not isinstance(flt, str) or not flt or len(flt) > MAX_FILTER):
                    raise ValueError(f"{where}: a filter is a non-empty substring of tensor names (at most "
                                     f"{MAX_FILTER} characters), got {flt!r}")
                inner = entry["value"]
                if pv.is_conditional(inner):
                    raise ValueError(f"{where}: a filter entry's value is a number or a per-layer list, "
                                     "not another filter list")
                if isinstance(inner, list) and len(inner) > MAX_LIST:
                    raise ValueError(f"{where}: {len(inner)} entries; at most {MAX_LIST}")
        for leaf in pv.leaves(value):
            self._validate_leaf(leaf, where)

    def _validate_leaf(self, leaf: Any, where: str) -> None:
        if self.type is bool:
            if not isinstance(leaf, bool):
                raise ValueError(f"{where}: must be true or false, got {leaf!r}")
            return
        if self.type is str:
            if not isinstance(leaf, str):
                raise ValueError(f"{where}: must be a string, got {leaf!r}")
            if len(leaf) > MAX_STRING:
                raise ValueError(f"{where}: {len(leaf)} characters; at most {MAX_STRING}")
        elif self.type in (int, float):
            if isinstance(leaf, bool) or not isinstance(leaf, int | float):
                raise ValueError(f"{where}: must be a number, got {leaf!r}")
            if not math.isfinite(leaf):
                raise ValueError(f"{where}: {leaf} is not a finite number")
            if self.type is int and not float(leaf).is_integer():
                raise ValueError(f"{where}: must be an integer, got {leaf!r}")
            self._validate_bounds(leaf, where)
        if self.choices is not None and leaf not in self.choices:
            raise ValueError(f"{where}: {leaf!r} is not one of {list(self.choices)}")
        if self.check is not None and (why := self.check(leaf)):
            raise ValueError(f"{where}: {why}")

    def _validate_bounds(self, leaf: float, where: str) -> None:
        lo, hi = self.min, self.max
        if abs(leaf) > MAX_MAGNITUDE:  # first: a huge value is out of range whatever the declared bounds
            raise ValueError(f"{where}: {leaf:g} is out of range: use a value within ±{MAX_MAGNITUDE:g}")
        if lo is not None and leaf < lo:
            raise ValueError(f"{where}: {leaf} is below the minimum {lo}")
        if lo is not None and leaf == lo and not self.min_inclusive:
            raise ValueError(f"{where}: must be above {lo:g}, got {leaf}")
        if hi is not None and leaf > hi:
            raise ValueError(f"{where}: {leaf} is above the maximum {hi}")
        if hi is not None and leaf == hi and not self.max_inclusive:
            raise ValueError(f"{where}: must be below {hi:g}, got {leaf}")


@dataclass(frozen=True)
class MethodDef:
    name: str
    kind: Kind
    summary: str
    paper: str
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    min_experts: int = 1
    max_experts: int | None = None
    needs_calibration: bool = False  # every expert needs a calibration set
    mergekit_name: str | None = None  # mergekit's `merge_method` where it differs (static methods)
    # rules across fields, run once the spec is otherwise valid: raise ValueError('<field>: <fix>')
    check: Callable[[MergeSpec], None] | None = None
    module: str = ""  # where the math lives: filled in by the registry (merge_ops.methods)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def reads_calibration(self) -> bool:
        return self.needs_calibration or self.kind == "ot"


# -- parameters shared by the task-vector methods (task_arithmetic, ties, dare_*, breadcrumbs) ----
WEIGHT = Param("weight", 1.0, "scale of this expert's task vector (or of the model, for linear)",
               scope="model", gradient=True)
DENSITY = Param("density", 1.0, "fraction of task-vector entries kept per tensor", scope="model",
                min=0.0, max=1.0, gradient=True)
LAMBDA = Param("lambda", 1.0, "scale of the merged task vector", min=0.0)
INT8_MASK = Param("int8_mask", False, "store sign masks as int8 (memory); results identical", type=bool)
LINES = (
    Param("lines", False, "LiNeS: scale the merged task vector linearly with depth", type=bool),
    Param("lines_alpha", None, "LiNeS scale of the shallowest block and of tensors outside blocks; "
          "null = 1/N (N experts) for summed task vectors, 1 for averaged ones (normalize: true)",
          nullable=True, min=0.0),
    Param("lines_beta", 0.5, "LiNeS extra scale reached at the deepest block: λ(l) = α + β·l/(L-1)",
          min=0.0),
)


def task_vector_params(*, normalize: bool, rescale: bool | None, density: bool, consensus: bool,
                       extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    """The parameters of a generalized-task-arithmetic method (static/task_vectors.py)."""
    params: list[Param] = [WEIGHT]
    if density:
        params.append(DENSITY)
    params += list(extra)
    params += [LAMBDA, Param("normalize", normalize, "divide by the sum of weights", type=bool)]
    if rescale is not None:
        params.append(Param("rescale", rescale, "rescale kept entries to preserve the tensor's scale",
                            type=bool))
    if consensus:
        params.append(INT8_MASK)
    params += list(LINES)
    return tuple(params)


# -- parameters shared by the learned methods ------------------------------------------------------
def learn_params(*, steps: int, batch_size: int, lr: float,
                 lr_help: str = "learning rate of the coefficients",
                 steps_help: str = "optimizer steps") -> tuple[Param, ...]:
    """steps, batch_size and lr, with a method's own defaults."""
    return (
        Param("steps", steps, steps_help, type=int, min=1, max=MAX_STEPS),
        Param("batch_size", batch_size, "calibration samples per task per step", type=int, min=1,
              max=65536),
        Param("lr", lr, lr_help, min=0.0),
    )
