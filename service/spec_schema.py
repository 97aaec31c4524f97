"""OpenAPI only: POST /v1/jobs documented as a union of per-method specs, discriminated on `method`.

Each method's `parameters` (and `experts[i].parameters`) become a typed object built at app creation
from the torch-free declarations (merge_ops/declare.py): types, bounds, choices, defaults and help,
so a client generated from /openapi.json validates a spec before sending it. Requests are still
validated by the one MergeSpec (validated once, with every cross-field rule); these models are
never used to validate anything.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from merge_ops.declare import MAX_FILTER, MAX_LIST, MAX_MAGNITUDE, MethodDef, Param
from merge_ops.methods import METHODS
from merge_ops.spec import MAX_EXPERTS, ExpertSpec, MergeSpec

_FORBID = ConfigDict(extra="forbid")
COMPONENT = "MergeSpecByMethod"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _leaf(p: Param) -> Any:
    if p.choices is not None:
        return Literal[tuple(c for c in p.choices if c is not None)]
    if p.type is bool:
        return bool
    if p.type is str:
        return str
    bounds: dict[str, float] = {}
    if p.min is not None:
        bounds["ge" if p.min_inclusive else "gt"] = p.min
    else:
        bounds["ge"] = -MAX_MAGNITUDE
    if p.max is not None:
        bounds["le" if p.max_inclusive else "lt"] = p.max
    else:
        bounds["le"] = MAX_MAGNITUDE
    return Annotated[int if p.type is int else float, Field(**bounds)]


def _param_type(p: Param, prefix: str) -> Any:
    leaf = _leaf(p)
    t: Any = leaf
    if p.gradient:  # a per-layer gradient, or {filter, value} entries (first matching filter wins)
        layers = Annotated[list[leaf], Field(min_length=1, max_length=MAX_LIST)]
        entry = create_model(f"{prefix}{_camel(p.name)}Filter", __config__=_FORBID,
                             filter=(Annotated[str, Field(min_length=1, max_length=MAX_FILTER)] | None, None),
                             value=(Union[leaf, layers], ...))  # noqa: UP007  (leaf may be Annotated)
        t = Union[leaf, layers, Annotated[list[entry], Field(min_length=1, max_length=MAX_LIST)]]  # noqa: UP007
    if p.nullable or p.default is None:
        t = Union[t, None]  # noqa: UP007
    return t


def _params_model(name: str, params: list[Param], prefix: str) -> type[BaseModel]:
    fields = {}
    for p in params:
        help_ = p.help + (" (required, here or on every expert)" if p.required else "")
        fields[p.name] = (_param_type(p, prefix), Field(None if p.required else p.default, description=help_))
    return create_model(name, __config__=_FORBID, **fields)


def method_spec_model(m: MethodDef) -> type[BaseModel]:
    """The MergeSpec of one method, with typed parameters (documentation only)."""
    prefix = _camel(m.name)
    params = _params_model(f"{prefix}Parameters", list(m.params), prefix)
    expert_params = _params_model(f"{prefix}ExpertParameters", [p for p in m.params if p.scope == "model"],
                                  prefix)
    expert_fields = {k: (f.annotation, f) for k, f in ExpertSpec.model_fields.items() if k != "parameters"}
    expert = create_model(f"{prefix}Expert", __config__=_FORBID, **expert_fields,
                          parameters=(expert_params, Field(default_factory=expert_params)))
    fields = {k: (f.annotation, f) for k, f in MergeSpec.model_fields.items()
              if k not in ("method", "experts", "parameters", "base")}
    base_field = MergeSpec.model_fields["base"]
    return create_model(
        f"{prefix}Spec", __config__=_FORBID, __doc__=f"{m.name}: {m.summary}",
        method=(Literal[m.name], ...),
        base=(base_field.annotation, Field(... if m.needs_base else None, description="local folder or hub id "
                                           "org/name@revision" + (" (required)" if m.needs_base else ""))),
        experts=(list[expert], Field(min_length=m.min_experts, max_length=m.max_experts or MAX_EXPERTS)),
        parameters=(params, Field(default_factory=params)),
        **fields)


def spec_union_schema() -> dict[str, Any]:
    """JSON schema of the union (oneOf + discriminator mapping), refs into #/components/schemas."""
    models = [method_spec_model(m) for m in sorted(METHODS.values(), key=lambda m: m.name)]
    union = Annotated[Union[tuple(models)], Field(discriminator="method")]  # noqa: UP007
    return TypeAdapter(union).json_schema(ref_template="#/components/schemas/{model}")


def install(app: FastAPI, path: str = "/v1/jobs") -> None:
    """Document POST `path`'s body as the per-method union (the schema is built once, on first use)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        union = spec_union_schema()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, sub in union.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[COMPONENT] = {**union, "title": "MergeSpec",
                                 "description": "A MergeSpec; `parameters` typed per `method`."}
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        body["schema"] = {"$ref": f"#/components/schemas/{COMPONENT}"}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
