"""MergeSpec: the whole request, read from YAML (ours or mergekit's) or from a JSON job body.

    method: ties
    base: ./models/base                 # local folder or org/name@revision
    experts:
      - model: ./models/code
        name: code                      # task name; defaults to the folder/repo name
        parameters: {weight: 1.0, density: 0.5}
    parameters: {lambda: 1.0}           # method parameters; model-scoped ones act as defaults
    dtype: float32                      # compute dtype
    out_dtype: bfloat16                 # output dtype (default: the base's)
    calibration:                        # learned methods only
      tasks: {code: ./calib/code.jsonl} # expert name -> JSONL file or calibration-set id
    publish: {repo: team/merged}        # optional
    seed: 0

Validation is complete before anything runs: unknown method or parameter, wrong types, values
out of range, too few experts, duplicate experts, bad repo ids are all refused with a message that
names the field. Nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge_ops import params as pv
from merge_ops.catalog import METHODS, MethodDef, Param
from merge_ops.errors import SpecError
from merge_ops.refs import is_repo_id, parse_model_ref

DType = Literal["float32", "bfloat16", "float16", "float64"]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(s: str | int) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, as mergekit's --out-shard-size)."""
    if isinstance(s, int):
        return s
    m = _SIZE.match(s)
    if not m:
        raise ValueError(f"cannot read size {s!r}: write e.g. 500MB or 2GB")
    return int(float(m.group(1)) * 1000 ** " KMGT".index((m.group(2) or " ").upper()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpertSpec(_Strict):
    model: str = Field(description="local folder or hub id org/name@revision")
    name: str | None = Field(None, description="task name (defaults to the folder or repo name)")
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str) -> str:
        return _valid_ref(v)


class CalibrationSpec(_Strict):
    tasks: dict[str, str] = Field(description="expert name -> JSONL file or calibration-set id")
    samples_per_task: int | None = Field(None, ge=1, description="sample this many per task (None: all)")
    max_length: int = Field(64, ge=1, le=8192, description="token length cap for text samples")


class PublishSpec(_Strict):
    repo: str = Field(description="target repo id, org/name")
    hub: Literal["local", "hf"] = "local"
    branch: str = "main"
    tag: str | None = None
    private: bool = True

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        if not is_repo_id(v):
            raise ValueError(f"{v!r} is not a repo id: use org/name (letters, digits, '_', '-', '.')")
        return v


class NotifySpec(_Strict):
    url: str = Field(description="http(s) URL that receives the job on a terminal state")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("notify.url must be an http:// or https:// URL")
        return v


class MergeSpec(_Strict):
    name: str | None = Field(None, description="a label for the merged model")
    method: str
    base: str | None = None
    experts: list[ExpertSpec] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: DType = "float32"
    out_dtype: DType | None = None
    task_specific: list[str] = Field(
        default_factory=list, description="regexes of tensors each task keeps (e.g. classification heads)")
    calibration: CalibrationSpec | None = None
    publish: PublishSpec | None = None
    notify: NotifySpec | None = None
    shard_size: str = "2GB"
    seed: int = 0

    @field_validator("base")
    @classmethod
    def _base(cls, v: str | None) -> str | None:
        return None if v is None else _valid_ref(v)

    @field_validator("task_specific")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for r in v:
            try:
                re.compile(r)
            except re.error as e:
                raise ValueError(f"task_specific pattern {r!r} is not a regex: {e}") from None
        return v

    @field_validator("shard_size")
    @classmethod
    def _shard(cls, v: str) -> str:
        if parse_size(v) < 1_000_000:
            raise ValueError("shard_size must be at least 1MB")
        return v

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        m = METHODS.get(self.method)
        if m is None:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(sorted(METHODS))}")
        if m.needs_base and self.base is None:
            raise ValueError(f"method {m.name} needs a base model: set `base`")
        n = len(self.experts)
        if n < m.min_experts:
            raise ValueError(f"method {m.name} needs at least {m.min_experts} expert(s), got {n}")
        if m.max_experts is not None and n > m.max_experts:
            raise ValueError(f"method {m.name} takes at most {m.max_experts} expert(s), got {n}")
        refs = [e.model for e in self.experts]
        dup = next((r for r in refs if refs.count(r) > 1), None)
        if dup is not None:
            raise ValueError(f"expert {dup!r} is listed twice: each expert must appear once")
        if self.base is not None and self.base in refs:
            raise ValueError(f"{self.base!r} is both the base and an expert")
        names = self.expert_names()
        for nm in names:
            if not _NAME.match(nm):
                raise ValueError(f"expert name {nm!r}: use letters, digits, '_', '-', '.' (max 64)")
        dupn = next((x for x in names if names.count(x) > 1), None)
        if dupn is not None:
            raise ValueError(f"two experts are named {dupn!r}: give them distinct `name`s")
        _check_params(m, self.parameters, where="parameters", allow_model_scope=True)
        for i, e in enumerate(self.experts):
            _check_params(m, e.parameters, where=f"experts[{i}].parameters", allow_model_scope=True,
                          model_only=True)
        for p in m.params:
            if p.required and p.name not in self.parameters and not all(
                    p.name in e.parameters for e in self.experts):
                raise ValueError(f"method {m.name} needs parameter {p.name!r} ({p.help})")
        if m.needs_calibration:
            if self.calibration is None:
                raise ValueError(f"method {m.name} learns on unlabelled data: add `calibration.tasks` "
                                 "mapping each expert name to a JSONL file or calibration-set id")
            missing = [x for x in names if x not in self.calibration.tasks]
            if missing:
                raise ValueError(f"calibration.tasks has no data for expert(s) {missing}; "
                                 f"keys must be the expert names {names}")
            extra = [x for x in self.calibration.tasks if x not in names]
            if extra:
                raise ValueError(f"calibration.tasks names unknown expert(s) {extra}; experts: {names}")
        return self

    # -- helpers used by the runner -------------------------------------------------------------
    def method_def(self) -> MethodDef:
        return METHODS[self.method]

    def expert_names(self) -> list[str]:
        return [e.name or _default_name(e.model) for e in self.experts]

    def global_param(self, name: str) -> Any:
        """A global parameter's value (spec value or the method's default)."""
        p = self.method_def().param(name)
        return self.parameters.get(name, p.default if p else None)

    def model_param_value(self, i: int, name: str) -> Any:
        """A model-scoped parameter for expert i, unresolved (may be a gradient or filter list)."""
        e = self.experts[i]
        if name in e.parameters:
            return e.parameters[name]
        if name in self.parameters:
            return self.parameters[name]
        p = self.method_def().param(name)
        return p.default if p else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _valid_ref(v: str) -> str:
    # pydantic reports ValueErrors as field errors (a 422 in the API); a SpecError would escape it
    try:
        parse_model_ref(v)
    except SpecError as e:
        raise ValueError(e.message) from None
    return v


def _default_name(ref: str) -> str:
    r = parse_model_ref(ref)
    base = (r.repo_id or r.local_path or ref).rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)[:64] or "expert"


def _check_params(m: MethodDef, values: dict[str, Any], *, where: str, allow_model_scope: bool,
                  model_only: bool = False) -> None:
    for key, val in values.items():
        p = m.param(key)
        if p is None:
            known = ", ".join(p.name for p in m.params) or "none"
            raise ValueError(f"{where}: method {m.name} has no parameter {key!r}; its parameters: {known}")
        if model_only and p.scope != "model":
            raise ValueError(f"{where}: {key!r} is a global parameter of {m.name}; set it under the "
                             "top-level `parameters`, not per expert")
        _check_value(m, p, val, where=f"{where}.{key}")


def _check_value(m: MethodDef, p: Param, val: Any, *, where: str) -> None:
    if val is None:
        if p.nullable or (p.default is None and not p.required):
            return
        raise ValueError(f"{where}: needs a value ({p.help})")
    if (pv.is_gradient(val) or pv.is_conditional(val)) and not p.gradient:
        raise ValueError(f"{where}: takes a single value, not a per-layer list")
    if pv.is_conditional(val):
        for entry in val:
            bad = set(entry) - {"filter", "value"}
            if bad or "value" not in entry:
                raise ValueError(f"{where}: conditional entries are {{filter, value}}; got {entry}")
    for leaf in pv.leaves(val):
        if p.type is bool:
            if not isinstance(leaf, bool):
                raise ValueError(f"{where}: must be true or false, got {leaf!r}")
            continue
        if p.type is str:
            if not isinstance(leaf, str):
                raise ValueError(f"{where}: must be a string, got {leaf!r}")
        elif p.type in (int, float):
            if isinstance(leaf, bool) or not isinstance(leaf, int | float):
                raise ValueError(f"{where}: must be a number, got {leaf!r}")
            if p.type is int and not float(leaf).is_integer():
                raise ValueError(f"{where}: must be an integer, got {leaf!r}")
            if p.min is not None and leaf < p.min:
                raise ValueError(f"{where}: {leaf} is below the minimum {p.min}")
            if p.max is not None and leaf > p.max:
                raise ValueError(f"{where}: {leaf} is above the maximum {p.max}")
        if p.choices is not None and leaf not in p.choices:
            raise ValueError(f"{where}: {leaf!r} is not one of {list(p.choices)}")


# -- mergekit YAML ------------------------------------------------------------------------------
_MERGEKIT_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                  "slices", "tokenizer_source", "tokenizer", "chat_template", "name"}
_MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                     "model_stock", "slerp"}


def from_mergekit(doc: dict[str, Any]) -> dict[str, Any]:
    """Translate a mergekit config into our spec dict (same semantics, our field names)."""
    unknown = set(doc) - _MERGEKIT_KEYS
    if unknown:
        raise SpecError(f"mergekit config has keys Alloy does not read: {sorted(unknown)}")
    if "slices" in doc:
        raise SpecError("mergekit `slices` (layer ranges / frankenmerges) are not supported yet: "
                        "list whole `models:` instead")
    method = doc["merge_method"]
    if method not in _MERGEKIT_METHODS:
        raise SpecError(f"mergekit method {method!r} is not supported; supported: "
                        f"{', '.join(sorted(_MERGEKIT_METHODS))}")
    base = doc.get("base_model")
    experts = []
    for entry in doc.get("models") or []:
        model = entry["model"] if isinstance(entry, dict) else entry
        params = (entry.get("parameters") or {}) if isinstance(entry, dict) else {}
        if model == base:
            # mergekit lets the base appear in `models` (e.g. for slerp/linear); it carries no task vector
            continue
        experts.append({"model": model, "parameters": params})
    out: dict[str, Any] = {"method": method, "experts": experts,
                           "parameters": doc.get("parameters") or {}}
    if base is not None:
        out["base"] = base
    for k in ("dtype", "out_dtype", "name"):
        if doc.get(k) is not None:
            out[k] = doc[k]
    return out


def spec_from_dict(doc: Any) -> MergeSpec:
    if not isinstance(doc, dict):
        raise SpecError("a spec is a mapping (YAML or JSON object) with at least `method` and `experts`")
    if "merge_method" in doc:
        doc = from_mergekit(doc)
    try:
        return MergeSpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_spec(path: str | Path) -> MergeSpec:
    """Read a spec file; relative local model paths are taken relative to the file's folder."""
    p = Path(path)
    spec = spec_from_dict(read_yaml(p, "spec file"))
    return _anchor_paths(spec, p.resolve().parent)


def read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SpecError(f"{what} {str(path)!r} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None


def _anchor_paths(spec: MergeSpec, root: Path) -> MergeSpec:
    def fix(ref: str) -> str:
        r = parse_model_ref(ref)
        if r.local_path is not None and (r.local_path.startswith(("./", "../")) or r.local_path in (".", "..")):
            return str((root / r.local_path).resolve())
        return ref

    data = spec.model_dump()
    if data.get("base"):
        data["base"] = fix(data["base"])
    for e in data["experts"]:
        e["model"] = fix(e["model"])
    cal = data.get("calibration")
    if cal:
        cal["tasks"] = {k: (str((root / v).resolve()) if v.startswith(("./", "../")) else v)
                        for k, v in cal["tasks"].items()}
    return MergeSpec.model_validate(data)
