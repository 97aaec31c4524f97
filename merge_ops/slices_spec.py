"""Layer slices: a model stacked from layer ranges of the merged models (mergekit's `slices:` and
`modules:`), declared and validated here; merged by static/slices.py.

    method: passthrough
    experts: [{model: ./orca}, {model: ./platypus}]
    slices:                                   # output layers, in order
      - sources: [{model: orca, layer_range: [0, 24]}]
      - sources: [{model: platypus, layer_range: [20, 40]}]
        parameters: {scale: 1.0}              # this slice's method parameters
        method: linear                        # optional: another static method for this slice

A source names a merged model: the base's or an expert's ref, or an expert's name. `layer_range` is
[start, end), 0-based. Every source of a slice covers as many layers; the output has the sum of the
slices' lengths (its config's layer count says so). Output layer `offset` of a slice reads layer
`start + offset` of each source, with gradients (list-valued parameters) evaluated at
t = offset / (length - 1) over the slice (t = 1 for a one-layer slice), as mergekit 0.1.5's planner.
Tensors before the blocks (embeddings) come from the first slice's sources and parameters, those
after them (final norm, head) from the last slice's, both at t = 0.

Parameter precedence, as mergekit's `ConfigReader.parameter_sources`: the source's `parameters`,
the expert's, the slice's, then the top-level `parameters`; a filter list that matches nothing falls
through to the next. A slice's base is its `base`, else the spec's base when one of its sources
reads it (for methods that use a base); the other sources are its experts.

What cannot be checked without the checkpoints (a range past a model's depth) is checked by
`check_ranges` when the models are local (the CLI at load, the driver at run time).
Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from merge_ops import layers
from merge_ops import params as pv
from merge_ops.errors import SpecError
from merge_ops.modules_spec import (
    check_local_modules,
    check_slice_modules,
    module_slices,
    read_config,
    slice_label,
)

if TYPE_CHECKING:
    from merge_ops.declare import MethodDef
    from merge_ops.spec import MergeSpec

MAX_SLICES = 1024
MAX_LAYER = 1_000_000
Ref = Annotated[str, StringConstraints(max_length=4096)]
# methods that need no base but use one when given (mergekit's `OPTIONAL` base policy)
BASE_OPTIONAL = frozenset({"nuslerp", "multislerp"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SliceSource(_Strict):
    model: Ref = Field(description="a merged model: the base's or an expert's ref, or an expert's name")
    layer_range: tuple[Annotated[int, Field(ge=0, le=MAX_LAYER)], Annotated[int, Field(ge=0, le=MAX_LAYER)]] | None = (
        Field(None, description="[start, end): the source's layers start .. end-1 (0-based); required, except "
                                "in a module's slice, where none means all the module's layers"))
    parameters: dict[str, Any] = Field(default_factory=dict, max_length=64)


class SliceSpec(_Strict):
    sources: list[SliceSource] = Field(min_length=1, max_length=65)
    base: Ref | None = Field(None, description="the source that is this slice's base (default: the spec's base, "
                                                 "when a source reads it)")
    method: str | None = Field(None, max_length=64, description="this slice's static method (default: the spec's)")
    parameters: dict[str, Any] = Field(default_factory=dict, max_length=64)
    module: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                               description="the module of a multi-module architecture this slice stacks "
                                           "(mergekit `modules:`, see modules_spec.py)")


def model_position(spec: MergeSpec, ref: str) -> int | None:
    """Driver position (base first) of the model a slice names; None when it names none."""
    from merge_ops.tokenizer_spec import model_index

    return model_index(spec, ref)


def slice_base(spec: MergeSpec, s: SliceSpec) -> int | None:
    """Driver position of slice `s`'s base, or None when the slice has none: its `base`, else the
    spec's base when a source reads it. A method that reads no base (mergekit's `IGNORED` policy:
    linear, karcher, passthrough) takes every source as an input, as mergekit does."""
    m = slice_method(spec, s)
    if not (m.needs_base or m.name in BASE_OPTIONAL):
        return None
    positions = [model_position(spec, src.model) for src in s.sources]
    if s.base is not None:
        return model_position(spec, s.base)
    return 0 if spec.base is not None and 0 in positions else None


def slice_method(spec: MergeSpec, s: SliceSpec) -> MethodDef:
    from merge_ops.methods import METHODS

    return METHODS[s.method or spec.method]


def check_slices(spec: MergeSpec, check_params: Any) -> None:
    """Cross-field rules of `slices`, from MergeSpec's validator (ValueError naming the field).
    `check_params(method, values, where=..., model_only=...)` is spec.py's parameter check."""
    from merge_ops.methods import METHODS

    assert spec.slices is not None
    if not spec.slices:
        raise ValueError("slices: list at least one slice")
    if len(spec.slices) > MAX_SLICES:
        raise ValueError(f"slices: at most {MAX_SLICES} slices")
    if spec.task_specific:
        raise ValueError("task_specific: not read with `slices` (each output tensor comes from its slice's "
                         "sources): remove one of them")
    if spec.tokenizer is not None:
        raise ValueError("tokenizer: Alloy does not merge vocabularies in a sliced (frankenmerge) model yet: "
                         "remove `tokenizer` (the base's or the first model's tokenizer files are kept)")
    check_slice_modules(spec)
    read: set[int] = set()
    for i, s in enumerate(spec.slices):
        where = slice_label(spec, i)
        if s.method is not None:
            m = METHODS.get(s.method)
            if m is None or m.kind != "static":
                raise ValueError(f"{where}.method: {s.method!r} is not a static method; static: "
                                 f"{', '.join(sorted(k for k, v in METHODS.items() if v.kind == 'static'))}")
        m = slice_method(spec, s)
        positions = []
        for j, src in enumerate(s.sources):
            start, end = src.layer_range or (0, 1)
            # a module without blocks (a projector) is merged by a slice of no layers
            if end < start or (end == start and s.module is None):
                raise ValueError(f"{where}.sources[{j}].layer_range: [{start}, {end}] is empty: end must be "
                                 "greater than start ([start, end), 0-based)")
            pos = model_position(spec, src.model)
            if pos is None:
                raise ValueError(f"{where}.sources[{j}].model: {src.model!r} is not one of the merged models "
                                 "(the base, or an expert's model or name)")
            if pos in positions:
                raise ValueError(f"{where}.sources[{j}].model: {src.model!r} is read twice in one slice")
            positions.append(pos)
            check_params(m, src.parameters, where=f"{where}.sources[{j}].parameters", model_only=True)
        lengths = [src.layer_range[1] - src.layer_range[0] for src in s.sources if src.layer_range is not None]
        if len(set(lengths)) > 1 or (lengths and len(lengths) < len(s.sources)):
            raise ValueError(f"{where}.sources: every source of a slice covers as many layers, got {lengths}")
        read.update(positions)
        base = slice_base(spec, s)
        if s.base is not None and (model_position(spec, s.base) is None or (base is not None and base not in positions)):
            raise ValueError(f"{where}.base: {s.base!r} is not one of this slice's sources")
        check_params(m, s.parameters, where=f"{where}.parameters")
        if m.needs_base and base is None:
            raise ValueError(f"{where}: method {m.name} needs a base: set the slice's `base` to one of its "
                             "sources (or list the spec's base among them)")
        n = len(positions) - (base is not None)
        if n < m.min_experts:
            raise ValueError(f"{where}: method {m.name} needs at least {m.min_experts} non-base source(s), got {n}")
        if m.max_experts is not None and n > m.max_experts:
            raise ValueError(f"{where}: method {m.name} takes at most {m.max_experts} non-base source(s), "
                             f"got {n}")
        # a slice with its own method reads the top-level parameters that method declares (the others
        # are checked against the spec's method)
        for p in m.params:
            if p.required and not _has(p.name, spec, s):
                raise ValueError(f"{where}: method {m.name} needs parameter {p.name!r} ({p.help})")
    if spec.base is not None and 0 not in read:
        raise ValueError("base: read by no slice: remove it or add it to a slice's sources")
    unused = [x for k, x in enumerate(spec.expert_names()) if k + (spec.base is not None) not in read]
    if unused:
        raise ValueError(f"experts: {unused} are read by no slice: remove them or add them to a slice's sources")


def _has(name: str, spec: MergeSpec, s: SliceSpec) -> bool:
    if name in spec.parameters or name in s.parameters:
        return True
    return all(name in src.parameters or _expert_params(spec, src.model).get(name) is not None
               for src in s.sources)


def _expert_params(spec: MergeSpec, ref: str) -> dict[str, Any]:
    pos = model_position(spec, ref)
    k = None if pos is None else pos - (spec.base is not None)
    return spec.experts[k].parameters if k is not None and k >= 0 else {}


def model_scopes(spec: MergeSpec, s: SliceSpec, ref: str) -> list[dict[str, Any]]:
    """Parameter sources of a model in slice `s`, highest precedence first."""
    src = next(x for x in s.sources if model_position(spec, x.model) == model_position(spec, ref))
    return [src.parameters, _expert_params(spec, ref), s.parameters, spec.parameters]


def resolve_scoped(scopes: list[dict[str, Any]], name: str, tensor: str, t: float) -> Any:
    """mergekit's `resolve_parameter`: the first scope whose value resolves (not None) for `tensor`."""
    for scope in scopes:
        if name in scope:
            v = pv.resolve(scope[name], tensor, t)
            if v is not None:
                return v
    return None


# -- depth checks against the checkpoints ---------------------------------------------------------
def config_depth(folder: Path) -> int | None:
    """A checkpoint's layer count from its config.json (None when it does not say)."""
    try:
        doc = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    for d in (doc, doc.get("text_config") if isinstance(doc, dict) else None):
        if isinstance(d, dict):
            for key in layers.DEPTH_KEYS:
                if isinstance(d.get(key), int):
                    return int(d[key])
    return None


def check_ranges(spec: MergeSpec, depth_of: dict[int, int | None]) -> None:
    """Every layer range within its model's depth (`depth_of`: driver position -> layers, None when
    unknown). Raises SpecError naming the field. A module's slices are checked per module
    (modules_spec.check_local_modules, static/slices.plan)."""
    for i, s in enumerate(spec.slices or []):
        if s.module is not None:
            continue
        for j, src in enumerate(s.sources):
            assert src.layer_range is not None  # check_slices: required outside a module
            pos = model_position(spec, src.model)
            depth = depth_of.get(pos) if pos is not None else None
            if depth is not None and src.layer_range[1] > depth:
                where = f"slices[{i}].sources[{j}].layer_range"
                raise SpecError(f"{where}: [{src.layer_range[0]}, {src.layer_range[1]}] reaches past the "
                                f"{depth} layers of {src.model!r} (end is exclusive: at most {depth})", param=where)


def check_local_ranges(spec: MergeSpec) -> None:
    """`check_ranges` for the models that are local folders (hub models: at run time)."""
    from merge_ops.refs import parse_model_ref, ref_parts

    if not spec.slices:
        return
    refs = ([spec.base] if spec.base else []) + [e.model for e in spec.experts]
    depth: dict[int, int | None] = {}
    configs: dict[int, dict[str, Any]] = {}
    for k, ref in enumerate(refs):
        r = parse_model_ref(ref_parts(ref)[0])
        folder = Path(r.local_path.removeprefix("file://")).expanduser() if r.local_path is not None else None
        if folder is not None and folder.is_dir():
            depth[k] = config_depth(folder)
            if (cfg := read_config(folder)) is not None:
                configs[k] = cfg
    check_ranges(spec, depth)
    check_local_modules(spec, configs)


# -- mergekit ---------------------------------------------------------------------------------
def fold(hi: dict[str, Any] | None, lo: dict[str, Any] | None) -> dict[str, Any]:
    """Two parameter scopes as one, `hi` first: mergekit falls through to `lo` when `hi`'s filter list
    matches nothing, which is `hi`'s list followed by `lo`'s value as a catch-all entry."""
    out = dict(lo or {})
    for k, v in (hi or {}).items():
        if k in out and pv.is_conditional(v):
            low = out[k]
            out[k] = [*v, *(low if pv.is_conditional(low) else [{"value": low}])]
        else:
            out[k] = v
    return out


def slices_from_mergekit(doc: dict[str, Any]) -> dict[str, Any]:
    """mergekit `slices:` or `modules:` -> our spec's base / experts / slices / parameters."""
    params = doc.get("parameters") or {}
    slices = doc.get("slices")
    base = doc.get("base_model")
    tagged: list[tuple[str, dict[str, Any], str | None, dict[str, Any]]] = []  # (where, slice, module, params)
    if "modules" in doc:
        if slices is not None or doc.get("models"):
            raise SpecError("mergekit config: give exactly one of `models`, `slices` or `modules`", param="modules")
        modules = doc["modules"]
        if not isinstance(modules, dict) or not modules:
            raise SpecError("mergekit `modules` maps a module name to {slices | models, parameters}", param="modules")
        if set(modules) == {"default"}:  # the single-module layout: plain slices or models
            mod = modules["default"]
            if not isinstance(mod, dict) or (not mod.get("slices")) == (not mod.get("models")):
                raise SpecError("mergekit `modules.default`: give exactly one of `slices` or `models`",
                                param="modules.default")
            params = fold(mod.get("parameters"), params)
            if mod.get("models"):
                return {"models": mod["models"], "parameters": params}
            slices = mod["slices"]
        elif "default" in modules:
            raise SpecError("mergekit `modules.default` is the single-module layout: it goes alone, not with "
                            f"{sorted(set(modules) - {'default'})}", param="modules.default")
        else:  # a multi-module architecture: each module's slices, tagged with it (modules_spec.py)
            for name, mod in modules.items():
                mod_slices, mod_params = module_slices(str(name), mod, base)
                tagged += [(f"modules.{name}.slices[{i}]", sl, str(name), mod_params)
                           for i, sl in enumerate(mod_slices)]
    elif doc.get("models"):
        raise SpecError("mergekit config: give exactly one of `models`, `slices` or `modules`", param="slices")
    if not tagged:
        if not isinstance(slices, list) or not slices:
            raise SpecError("mergekit `slices` is a list of {sources: [{model, layer_range}], ...}", param="slices")
        tagged = [(f"slices[{i}]", sl, None, {}) for i, sl in enumerate(slices)]
    order: list[str] = []
    out_slices = [_slice_entry(sl, where, module, mod_params, order) for where, sl, module, mod_params in tagged]
    out: dict[str, Any] = {"slices": out_slices, "parameters": params}
    experts = [m for m in order if m != base]
    if base is not None and base in order and experts:
        out["base"] = base
    else:  # a base no slice reads is no input (mergekit: a base must be among a slice's sources)
        experts = order
    out["experts"] = [{"model": m} for m in experts]
    return out


def _slice_entry(s: Any, where: str, module: str | None, module_params: dict[str, Any],
                 order: list[str]) -> dict[str, Any]:
    """One mergekit output slice in our schema; the models it reads are appended to `order`. A
    module's parameters rank below the slice's (mergekit's `ConfigReader.parameter_sources`)."""
    if not isinstance(s, dict) or not isinstance(s.get("sources"), list):
        raise SpecError(f"mergekit `{where}` needs `sources`: a list of {{model, layer_range}}", param=where)
    unknown = set(s) - {"sources", "base_model", "parameters", "residual_weight"}
    if unknown:
        raise SpecError(f"mergekit `{where}` has keys mergekit does not read: {sorted(unknown)}", param=where)
    if s.get("residual_weight") is not None:  # declared by mergekit 0.1.5, read nowhere: a no-op there
        raise SpecError(f"mergekit `{where}.residual_weight` has no effect in mergekit 0.1.5 (declared, "
                        "never read) and Alloy does not implement it either; remove it",
                        param=f"{where}.residual_weight")
    sources = []
    for j, src in enumerate(s["sources"]):
        if not isinstance(src, dict) or not isinstance(src.get("model"), str):
            raise SpecError(f"mergekit `{where}.sources[{j}]` needs a `model`", param=f"{where}.sources[{j}]")
        if src["model"] not in order:
            order.append(src["model"])
        sources.append({k: v for k, v in src.items() if k != "parameters"}
                       | {"parameters": src.get("parameters") or {}})
    entry: dict[str, Any] = {"sources": sources, "parameters": fold(s.get("parameters"), module_params)}
    if s.get("base_model") is not None:
        entry["base"] = s["base_model"]
    if module is not None:
        entry["module"] = module
    return entry
