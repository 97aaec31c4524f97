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
    calibration:                        # learned methods and activation-based OT fusion
      tasks: {code: ./calib/code.jsonl} # expert name -> JSONL file or calibration-set id
    publish: {repo: team/merged}        # optional
    tokenizer: {source: union}          # optional: output vocabulary (merge_ops/tokenizer_spec.py)
    chat_template: chatml               # optional
    seed: 0

Validation is complete when a spec is built, and nothing else validates it again: unknown method or
parameter, wrong types, non-finite numbers, values out of range (inclusive or exclusive bounds),
regexes that do not compile, too few experts, duplicate experts, bad refs (control characters, `..`
in a branch or tag), oversized lists and strings, and each method's own cross-field rules
(`MethodDef.check`) are all refused with a message that names the field. `load_spec` (the CLI) also
reads the calibration files it names (calibration.check_calibration). Nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from merge_ops.calibration import SET_ID, CalibrationRefField, calibration_files, check_calibration
from merge_ops.declare import MethodDef
from merge_ops.errors import SpecError
from merge_ops.evaluation.declarations import EvaluateSpec, GateRule, validate_evaluation
from merge_ops.methods import MERGEKIT_NAMES, METHODS
from merge_ops.refs import CONTROL, check_ref_name, is_repo_id, parse_model_ref, ref_parts
from merge_ops.slices_spec import SliceSpec, check_local_ranges, check_slices, slices_from_mergekit
from merge_ops.tokenizer_spec import TokenizerSpec, check_tokenizer_fields, tokenizer_from_mergekit

DType = Literal["float32", "bfloat16", "float16", "float64"]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_SIZE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
MAX_EXPERTS = 64
MAX_PARAMETERS = 64
MAX_PATTERNS = 64
MAX_SHARD = 10**15  # a petabyte: beyond any checkpoint
Ref = Annotated[str, StringConstraints(max_length=4096)]
Label = Annotated[str, StringConstraints(max_length=200)]


def parse_size(s: str | int) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, as mergekit's --out-shard-size)."""
    if isinstance(s, int):
        return s
    m = _SIZE.match(s)
    if not m:
        raise ValueError(f"cannot read size {s!r}: write e.g. 500MB or 2GB")
    return int(float(m.group(1)) * 1000 ** " KMGT".index((m.group(2) or " ").upper()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ExpertSpec(_Strict):
    model: Ref = Field(description="local folder or hub id org/name@revision; a PEFT LoRA adapter as "
                                   "model+adapter, or the adapter alone (applied to `base`)")
    name: str | None = Field(None, max_length=64, description="task name (defaults to the folder or repo name)")
    parameters: dict[str, Any] = Field(default_factory=dict, max_length=MAX_PARAMETERS)

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str) -> str:
        return _valid_ref(v)


class CalibrationSpec(_Strict):
    tasks: dict[str, CalibrationRefField] = Field(
        max_length=MAX_EXPERTS, description="expert name -> JSONL file or calibration-set id")
    samples_per_task: int | None = Field(None, ge=1, le=1_000_000,
                                         description="sample this many per task (None: all)")
    max_length: int = Field(64, ge=1, le=8192, description="token length cap for text samples")


class PublishSpec(_Strict):
    repo: str = Field(max_length=200, description="target repo id, org/name")
    hub: Literal["local", "hf"] = "local"
    branch: str = Field("main", max_length=128)
    tag: str | None = Field(None, max_length=128)
    private: bool = True

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        if not is_repo_id(v):
            raise ValueError(f"{v!r} is not a repo id: use org/name (letters, digits, '_', '-', '.')")
        return v

    @field_validator("branch", "tag")
    @classmethod
    def _ref_name(cls, v: str | None) -> str | None:
        if v is not None and (why := check_ref_name(v)):
            raise ValueError(why)
        return v


class NotifySpec(_Strict):
    url: str = Field(max_length=2048, description="http(s) URL that receives the job on a terminal state")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v) or CONTROL.search(v) or re.search(r"\s", v):
            raise ValueError("notify.url must be an http:// or https:// URL")
        return v


class MergeSpec(_Strict):
    name: Label | None = Field(None, description="a label for the merged model")
    method: str = Field(max_length=64)
    base: Ref | None = None
    experts: list[ExpertSpec] = Field(min_length=1, max_length=MAX_EXPERTS)
    parameters: dict[str, Any] = Field(default_factory=dict, max_length=MAX_PARAMETERS)
    dtype: DType = "float32"
    out_dtype: DType | None = None
    task_specific: list[Annotated[str, StringConstraints(max_length=512)]] = Field(
        default_factory=list, max_length=MAX_PATTERNS,
        description="regexes of tensors each task keeps (e.g. classification heads)")
    calibration: CalibrationSpec | None = None
    publish: PublishSpec | None = None
    notify: NotifySpec | None = None
    evaluate: EvaluateSpec | None = Field(
        None, description="evaluation sets scored after the merge and before publishing")
    publish_if: list[GateRule] | None = Field(
        None, max_length=MAX_PATTERNS, description="gates on the evaluation results; a failed one ends the "
                                                   "job `rejected` and publishes nothing")
    shard_size: str = Field("2GB", max_length=32)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    tokenizer: TokenizerSpec | None = Field(
        None, description="output vocabulary (base | union | a merged model) and per-token embedding sources; "
                          "none: the base's tokenizer files, copied")
    slices: list[SliceSpec] | None = Field(
        None, description="output layers stacked from layer ranges of the merged models (mergekit `slices`): "
                          "see merge_ops/slices_spec.py")
    chat_template: Annotated[str, StringConstraints(max_length=65536)] | None = Field(
        None, description="alpaca | chatml | exaone | llama3 | mistral | auto | a Jinja template")

    @field_validator("name")
    @classmethod
    def _label(cls, v: str | None) -> str | None:
        if v is not None and CONTROL.search(v):
            raise ValueError("the name holds a control character")
        return v

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
        if parse_size(v) > MAX_SHARD:
            raise ValueError("shard_size must be at most 1PB")
        return v

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        m = METHODS.get(self.method)
        if m is None:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(sorted(METHODS))}")
        sliced = self.slices is not None  # counts, base and required parameters are checked per slice
        if m.needs_base and self.base is None and not sliced:
            raise ValueError(f"method {m.name} needs a base model: set `base`")
        n = len(self.experts)
        if n < m.min_experts and not sliced:
            raise ValueError(f"method {m.name} needs at least {m.min_experts} expert(s), got {n}")
        if m.max_experts is not None and n > m.max_experts and not sliced:
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
        _check_params(m, self.parameters, where="parameters")
        for i, e in enumerate(self.experts):
            _check_params(m, e.parameters, where=f"experts[{i}].parameters", model_only=True)
        for p in m.params:
            if p.required and not sliced and p.name not in self.parameters and not all(
                    p.name in e.parameters for e in self.experts):
                raise ValueError(f"method {m.name} needs parameter {p.name!r} ({p.help})")
        self._check_calibration(m, names)
        validate_evaluation(self.evaluate, self.publish_if, names, has_base=self.base is not None)
        if self.publish is None and any(r.not_worse_than_published for r in self.publish_if or []):
            raise ValueError("publish_if: not_worse_than_published compares with the published revision: "
                             "add `publish: {repo: ...}`")
        check_tokenizer_fields(self)
        if sliced:
            if m.kind != "static":
                raise ValueError(f"slices: method {m.name} is {m.kind}; slices stack layers in the static driver")
            check_slices(self, _check_params)
        elif m.check is not None:  # a method's cross-field rules read `experts`; a sliced spec's are per slice
            m.check(self)
        return self

    def _check_calibration(self, m: MethodDef, names: list[str]) -> None:
        if self.calibration is None:
            if m.needs_calibration:
                raise ValueError(f"method {m.name} learns on unlabelled data: add `calibration.tasks` "
                                 "mapping each expert name to a JSONL file or calibration-set id")
            return
        if not m.reads_calibration:
            raise ValueError(f"calibration: method {m.name} reads no calibration data: remove `calibration`")
        missing = [x for x in names if x not in self.calibration.tasks]
        if m.needs_calibration and missing:
            raise ValueError(f"calibration.tasks has no data for expert(s) {missing}; "
                             f"keys must be the expert names {names}")
        extra = [x for x in self.calibration.tasks if x not in names]
        if extra:
            raise ValueError(f"calibration.tasks names unknown expert(s) {extra}; experts: {names}")

    # -- resolved values, for the methods ------------------------------------------------------
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

    def method_params(self) -> dict[str, Any]:
        """Every parameter of the method: a global one's value, a model-scoped one's list per expert
        (values as written: per-layer lists are resolved per tensor by the static driver)."""
        out: dict[str, Any] = {}
        for p in self.method_def().params:
            if p.scope == "global":
                out[p.name] = self.global_param(p.name)
            else:
                out[p.name] = [self.model_param_value(i, p.name) for i in range(len(self.experts))]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _valid_ref(v: str) -> str:
    # pydantic reports ValueErrors as field errors (a 422 in the API); a SpecError would escape it
    try:
        for part in ref_parts(v):  # `model+adapter`: a LoRA adapter applied to a model (mergekit's syntax)
            parse_model_ref(part)
    except SpecError as e:
        raise ValueError(e.message) from None
    return v


def _default_name(ref: str) -> str:
    r = parse_model_ref(ref_parts(ref)[-1])  # a model with an adapter is named for the adapter
    base = (r.repo_id or r.local_path or ref).rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)[:64] or "expert"


def _check_params(m: MethodDef, values: dict[str, Any], *, where: str, model_only: bool = False) -> None:
    for key, val in values.items():
        p = m.param(key)
        if p is None:
            known = ", ".join(p.name for p in m.params) or "none"
            raise ValueError(f"{where}: method {m.name} has no parameter {key!r}; its parameters: {known}")
        if model_only and p.scope != "model":
            raise ValueError(f"{where}: {key!r} is a global parameter of {m.name}; set it under the "
                             "top-level `parameters`, not per expert")
        p.validate(val, f"{where}.{key}")


# -- mergekit YAML ------------------------------------------------------------------------------
_MERGEKIT_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                  "slices", "modules", "tokenizer_source", "tokenizer", "chat_template", "name"}


def from_mergekit(doc: dict[str, Any]) -> dict[str, Any]:
    """Translate a mergekit config into our spec dict (same semantics, our field names)."""
    unknown = set(doc) - _MERGEKIT_KEYS
    if unknown:
        raise SpecError(f"mergekit config has keys Alloy does not read: {sorted(unknown)}")
    sliced: dict[str, Any] = {}
    if "slices" in doc or "modules" in doc:  # layer ranges (frankenmerges), or mergekit's `modules`
        sliced = slices_from_mergekit(doc)
        if "models" in sliced:  # `modules: {default: {models: ...}}`: a plain models config
            doc = {k: v for k, v in doc.items() if k != "modules"} | sliced
            sliced = {}
    method = doc["merge_method"]
    if not isinstance(method, str) or method not in MERGEKIT_NAMES:
        raise SpecError(f"mergekit method {method!r} is not supported; supported: "
                        f"{', '.join(sorted(MERGEKIT_NAMES))}")
    base = doc.get("base_model")
    models = [] if sliced else doc.get("models") or []
    if not isinstance(models, list):
        raise SpecError("mergekit `models` is a list of {model, parameters} entries")
    experts = []
    for entry in models:
        model = entry.get("model") if isinstance(entry, dict) else entry
        if not isinstance(model, str):
            raise SpecError(f"mergekit `models` entry {entry!r} needs a `model`")
        params = (entry.get("parameters") or {}) if isinstance(entry, dict) else {}
        if model == base:
            # mergekit lets the base appear in `models` (e.g. for slerp/linear); it carries no task vector
            continue
        experts.append({"model": model, "parameters": params})
    out: dict[str, Any] = {"method": MERGEKIT_NAMES[method], "experts": experts,
                           "parameters": doc.get("parameters") or {}}
    if base is not None:
        out["base"] = base
    if sliced:
        out.pop("base", None)
        out |= sliced
    for k in ("dtype", "out_dtype", "name"):
        if doc.get(k) is not None:
            out[k] = doc[k]
    if doc.get("dtype") is not None and doc.get("out_dtype") is None:
        out["out_dtype"] = doc["dtype"]  # mergekit writes its compute dtype when out_dtype is unset
    return out | tokenizer_from_mergekit(doc)


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
    """Read a spec file: relative local paths (models, calibration files) are taken relative to the
    file's folder, and the calibration files it names are read and checked (set ids are left to the
    service)."""
    p = Path(path)
    spec = _anchor_paths(spec_from_dict(read_yaml(p, "spec file")), p.resolve().parent)
    check_calibration(spec, calibration_files(spec, skip_sets=True))
    check_local_ranges(spec)  # layer ranges against local models' depth (hub models: at run time)
    return spec


def read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SpecError(f"{what} {str(path)!r} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None


def _anchor_paths(spec: MergeSpec, root: Path) -> MergeSpec:
    def fix(ref: str) -> str:
        if len(parts := ref_parts(ref)) > 1:
            return "+".join(fix(x) for x in parts)
        r = parse_model_ref(ref)
        if r.local_path is not None and (r.local_path.startswith(("./", "../")) or r.local_path in (".", "..")):
            return str((root / r.local_path).resolve())
        return ref

    data = spec.model_dump()
    if data.get("base"):
        data["base"] = fix(data["base"])
    for e in data["experts"]:
        e["model"] = fix(e["model"])
    names = set(spec.expert_names())
    for sl in data.get("slices") or []:  # slice sources name models by ref (anchored alike) or expert name
        for src in sl["sources"]:
            src["model"] = src["model"] if src["model"] in names else fix(src["model"])
        if sl.get("base") and sl["base"] not in names:
            sl["base"] = fix(sl["base"])
    if data.get("tokenizer"):  # models named in `tokenizer` are the same refs, anchored the same way
        tok, names = data["tokenizer"], set(spec.expert_names())

        def fix_model(ref: str) -> str:
            return ref if ref in names or ref in ("base", "union") else fix(ref)

        tok["source"] = fix_model(tok["source"])
        for t in tok["tokens"].values():
            if isinstance(t["source"], str):
                t["source"] = fix_model(t["source"])
            elif isinstance(t["source"], dict) and t["source"].get("model"):
                t["source"]["model"] = fix_model(t["source"]["model"])
    cal = spec.calibration
    if cal is not None:
        data["calibration"]["tasks"] = {
            k: str((root / r.path).resolve()) if r.path is not None and not r.path.startswith(("/", "~")) else r.raw
            for k, r in cal.tasks.items()}
    if spec.evaluate is not None:  # evaluation-set files, like calibration files (set ids stay as they are)
        for name, s in spec.evaluate.set_specs().items():
            if not SET_ID.match(s.set) and not s.set.startswith(("/", "~")):
                entry = data["evaluate"]["sets"][name]
                fixed = str((root / s.set).resolve())
                data["evaluate"]["sets"][name] = {**entry, "set": fixed} if isinstance(entry, dict) else fixed
    return MergeSpec.model_validate(data)
