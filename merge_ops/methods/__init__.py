"""The merge methods: one module each, holding its declaration (`METHOD = MethodDef(...)`) beside its math.

    static   merge_tensor(x: TensorInputs) -> Tensor    run by the streaming driver (static/driver.py)
    learned  learn(s: Session) -> Trained               run by the learned driver (learned/driver.py)
    ot       run(ctx: JobContext) -> MethodResult

The registry is every module of this package that declares a METHOD; adding a method is adding a
module. Importing the registry does not import torch (method modules import it lazily), so the API
validates specs with it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from types import ModuleType

from merge_ops.declare import MethodDef


def _discover() -> dict[str, MethodDef]:
    found: dict[str, MethodDef] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        m = getattr(module, "METHOD", None)
        if not isinstance(m, MethodDef):
            continue
        if m.name in found:
            raise RuntimeError(f"method {m.name!r} is declared by {found[m.name].module} and {module.__name__}")
        found[m.name] = dataclasses.replace(m, module=module.__name__)
    return found


METHODS: dict[str, MethodDef] = _discover()
# mergekit's `merge_method` names, derived from the declarations (every static method has mergekit's
# semantics)
MERGEKIT_NAMES: dict[str, str] = {m.mergekit_name or m.name: m.name for m in METHODS.values()
                                  if m.kind == "static"}


def get_method(name: str) -> MethodDef:
    from merge_ops.errors import SpecError

    m = METHODS.get(name)
    if m is None:
        raise SpecError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}",
                        param="method")
    return m


def implementation(m: MethodDef) -> ModuleType:
    """The module that holds a method's math (imports torch when the math does)."""
    return importlib.import_module(m.module)
