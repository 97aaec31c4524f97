"""/v1/methods: the merge methods this server runs, read from the torch-free registry
(merge_ops.methods.METHODS, declared with merge_ops/declare.py), so clients can build specs and forms
without guessing. Importing the registry never imports torch (a test checks the API process)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from merge_ops.declare import MethodDef, Param
from merge_ops.methods import METHODS
from service.auth import Reader
from service.errors import ApiError
from service.routes_jobs import ERRORS

router = APIRouter(prefix="/v1/methods", tags=["methods"])
_TYPES = {float: "number", int: "integer", bool: "boolean", str: "string"}


class ParamOut(BaseModel):
    name: str
    type: Literal["number", "integer", "boolean", "string"]
    default: Any = Field(description="the value used when the spec leaves it out (null: none, or `auto`)")
    required: bool
    nullable: bool = Field(description="null is a meaningful value (e.g. `auto`)")
    scope: Literal["model", "global"] = Field(description="model: per expert (experts[i].parameters) or "
                                              "global default; global: once, in `parameters`")
    per_layer: bool = Field(description="accepts per-layer gradients and {filter, value} lists")
    min: float | None
    max: float | None
    min_inclusive: bool
    max_inclusive: bool
    range: str | None = Field(description="the bounds as text: '[0, 1]', '> 0', ...")
    choices: list[Any] | None
    help: str


class MethodOut(BaseModel):
    name: str
    object: Literal["method"] = "method"
    kind: Literal["static", "learned", "ot"]
    summary: str
    paper: str
    needs_base: bool
    min_experts: int
    max_experts: int | None
    calibration: Literal["required", "optional", "none"] = Field(
        description="required: every expert needs a calibration set (calibration.tasks); optional: read "
                    "only by some settings (OT fusion's activation ground metric)")
    mergekit_name: str | None = Field(description="mergekit's `merge_method` for this method (static ones)")
    parameters: list[ParamOut]


class MethodList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MethodOut]


def _param(p: Param) -> ParamOut:
    return ParamOut(name=p.name, type=_TYPES.get(p.type, "number"), default=_plain(p.default),
                    required=p.required, nullable=p.nullable, scope=p.scope, per_layer=p.gradient,
                    min=p.min, max=p.max, min_inclusive=p.min_inclusive, max_inclusive=p.max_inclusive,
                    range=p.range_text(), choices=None if p.choices is None else [_plain(c) for c in p.choices],
                    help=p.help)


def _plain(x: Any) -> Any:
    return [_plain(v) for v in x] if isinstance(x, list | tuple) else x


def method_out(m: MethodDef) -> MethodOut:
    calibration = "required" if m.needs_calibration else "optional" if m.reads_calibration else "none"
    return MethodOut(name=m.name, kind=m.kind, summary=m.summary, paper=m.paper, needs_base=m.needs_base,
                     min_experts=m.min_experts, max_experts=m.max_experts, calibration=calibration,
                     mergekit_name=(m.mergekit_name or m.name) if m.kind == "static" else None,
                     parameters=[_param(p) for p in m.params])


@router.get("", response_model=MethodList, responses=ERRORS, summary="Every merge method and its parameters")
def list_methods(p: Reader) -> MethodList:
    return MethodList(data=[method_out(m) for m in sorted(METHODS.values(), key=lambda m: (m.kind, m.name))])


@router.get("/{name}", response_model=MethodOut, responses=ERRORS, summary="One merge method")
def get_method(name: str, p: Reader) -> MethodOut:
    m = METHODS.get(name)
    if m is None:
        raise ApiError(404, "not_found", f"no method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return method_out(m)
