"""What an evaluation is made of, as data: set kinds, metric names, `evaluate:` and `publish_if:`.

Nothing here imports torch: the API validates a spec's `evaluate:` / `publish_if:` with these
models, and runners trust what passed.

    evaluate:
      sets:                                   # name -> JSONL file / evaluation-set id, or an object
        code: ./eval/code.jsonl
        math: {set: es_3f2a, expert: math, kind: exact_match}
        sst2: {set: ./eval/sst2.jsonl, head: sst2}
      max_length: 512                         # token cap per row (prompts keep their last tokens)
      batch_size: 8
      answer_margin: 4                        # greedy tokens decoded beyond the answer's length
      dtype: float32
      evaluator: alloy                        # or lm_eval (the `eval` extra)
      baselines: true                         # also score base and experts (cached) to normalise
    publish_if:
      - {set: code, metric: ppl, max: 12.0}
      - {metric: mean_normalised_gain, min: 0.5}
      - not_worse_than_published: {set: math, metric: exact_match, tolerance: 0.02}

A set's `expert` pairs it with the expert whose domain it is (normalised metrics); it defaults to
the expert named like the set. `head` names the task head an `accuracy` set is scored with
(`heads/<head>.safetensors` in a learned merge's output); it defaults to the paired expert.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_ops.errors import InputError

SetKind = Literal["perplexity", "exact_match", "accuracy"]
SET_KINDS: tuple[str, ...] = ("perplexity", "exact_match", "accuracy")
# evaluators: Alloy's own (evaluate.py) and, as an optional extra, EleutherAI's lm-eval (harness.py)
EVALUATORS: tuple[str, ...] = ("alloy", "lm_eval")
# what each evaluator measures on each set kind; the first is the headline metric
KIND_METRICS: dict[str, dict[str, tuple[str, ...]]] = {
    "alloy": {"perplexity": ("nll", "ppl"), "exact_match": ("exact_match", "answer_nll"),
              "accuracy": ("accuracy",)},
    # lm-eval scores whole texts (loglikelihood_rolling) per byte/word, not per token; no task heads
    "lm_eval": {"perplexity": ("bits_per_byte", "byte_perplexity", "word_perplexity"),
                "exact_match": ("exact_match",)},
}
# the normalised metric a set of each kind gets when base/expert results are known
NORMALISED_METRIC: dict[str, str] = {"perplexity": "normalised_gain", "exact_match": "accuracy_ratio",
                                     "accuracy": "accuracy_ratio"}
# metrics over all sets (gates name them without a set)
AGGREGATE_METRICS: dict[str, str] = {"mean_normalised_gain": "normalised_gain",
                                     "mean_accuracy_ratio": "accuracy_ratio"}


@dataclass(frozen=True)
class MetricDef:
    name: str
    title: str  # human name (card, tables)
    higher_is_better: bool
    hf_type: str  # model-index metric type


METRICS: dict[str, MetricDef] = {m.name: m for m in [
    MetricDef("nll", "Mean token NLL", False, "nll"),
    MetricDef("ppl", "Perplexity", False, "perplexity"),
    MetricDef("exact_match", "Exact match (greedy)", True, "exact_match"),
    MetricDef("answer_nll", "Answer NLL given the prompt", False, "answer_nll"),
    MetricDef("accuracy", "Accuracy", True, "accuracy"),
    MetricDef("bits_per_byte", "Bits per byte", False, "bits_per_byte"),
    MetricDef("byte_perplexity", "Byte perplexity", False, "byte_perplexity"),
    MetricDef("word_perplexity", "Word perplexity", False, "word_perplexity"),
    MetricDef("normalised_gain", "Normalised gain (base→expert NLL)", True, "normalised_gain"),
    MetricDef("accuracy_ratio", "Accuracy / expert accuracy", True, "accuracy_ratio"),
    MetricDef("mean_normalised_gain", "Mean normalised gain", True, "normalised_gain"),
    MetricDef("mean_accuracy_ratio", "Mean accuracy ratio", True, "accuracy_ratio"),
]}

# bump when a metric's computation changes: cached base/expert results then stop matching
EVAL_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
DType = Literal["float32", "bfloat16", "float16", "float64"]


class EvalSetError(InputError):
    """An evaluation set is malformed (a bad JSONL line, mixed kinds, a label the head lacks)."""

    code = "invalid_evaluation_set"


def metrics_for(kind: str, evaluator: str = "alloy") -> tuple[str, ...]:
    """Per-set metrics a set of this kind reports with this evaluator (raw, then normalised);
    () when the evaluator cannot score the kind."""
    raw = KIND_METRICS[evaluator].get(kind)
    return (*raw, NORMALISED_METRIC[kind]) if raw else ()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class EvalSettings:
    """Settings that change what a model scores (so they are part of every cache key)."""

    max_length: int = 512
    answer_margin: int = 4
    dtype: str = "float32"
    evaluator: str = "alloy"

    def key(self) -> dict:
        return {"max_length": self.max_length, "answer_margin": self.answer_margin, "dtype": self.dtype,
                "evaluator": self.evaluator, "version": EVAL_VERSION}


class EvalSetSpec(_Strict):
    set: str = Field(description="JSONL file or evaluation-set id")
    kind: SetKind | None = Field(None, description="checked against the rows; inferred from them if absent")
    expert: str | None = Field(None, description="the expert whose domain this set is (for normalising); "
                                                 "default: the expert named like the set")
    head: str | None = Field(None, description="task head for an accuracy set; default: the paired expert")

    @field_validator("set")
    @classmethod
    def _ref(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("an evaluation set needs a file or an evaluation-set id")
        return v

    @field_validator("head")
    @classmethod
    def _head_name(cls, v: str | None) -> str | None:
        # a name under the merged model's heads/, never a path: the worker would read it from anywhere
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", v) or (v or "").endswith(
                ".safetensors"):
            raise ValueError(f"head {v!r} must be the name of a task head (heads/<name>.safetensors in the "
                             "merged model), not a path")
        return v


class EvaluateSpec(_Strict):
    sets: dict[str, str | EvalSetSpec] = Field(
        min_length=1, description="set name -> JSONL file / evaluation-set id, or {set, kind, expert, head}")
    max_length: int = Field(512, ge=2, le=32768, description="token cap per row")
    batch_size: int = Field(8, ge=1, le=1024)
    answer_margin: int = Field(4, ge=0, le=256, description="greedy tokens beyond the answer's length")
    dtype: DType = "float32"
    evaluator: Literal["alloy", "lm_eval"] = Field(
        "alloy", description="lm_eval: EleutherAI's lm-evaluation-harness (the `eval` extra; no accuracy sets)")
    baselines: bool = Field(True, description="also score the base and the experts (cached per revision) "
                                              "so results can be normalised")

    @field_validator("sets")
    @classmethod
    def _names(cls, v: dict[str, str | EvalSetSpec]) -> dict[str, str | EvalSetSpec]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"evaluation set name {name!r}: use 1-64 letters, digits, '_', '-', '.'")
        return v

    def set_specs(self) -> dict[str, EvalSetSpec]:
        """Every set as an object (a bare string is its `set`)."""
        return {n: s if isinstance(s, EvalSetSpec) else EvalSetSpec(set=s) for n, s in self.sets.items()}

    def settings(self) -> EvalSettings:
        return EvalSettings(max_length=self.max_length, answer_margin=self.answer_margin, dtype=self.dtype,
                            evaluator=self.evaluator)

    def pairing(self, experts: Sequence[str]) -> dict[str, str | None]:
        """Set name -> the expert it is normalised against (None: not normalised)."""
        return {n: s.expert if s.expert is not None else (n if n in experts else None)
                for n, s in self.set_specs().items()}


class ComparisonRule(_Strict):
    set: str | None = Field(None, description="set name (absent for a mean_* metric)")
    metric: str
    tolerance: float = Field(0.0, ge=0, description="how much worse than the published value still passes")
    relative: bool = Field(False, description="tolerance is a fraction of the published value")


class GateRule(_Strict):
    """One `publish_if` entry: a threshold `{set, metric, min, max}` or a comparison
    `{not_worse_than_published: {set, metric, tolerance, relative}}`."""

    set: str | None = None
    metric: str | None = None
    min: float | None = None
    max: float | None = None
    not_worse_than_published: ComparisonRule | None = None

    @model_validator(mode="after")
    def _shape(self) -> GateRule:
        if self.not_worse_than_published is not None:
            if any(x is not None for x in (self.set, self.metric, self.min, self.max)):
                raise ValueError("a not_worse_than_published rule is an entry of its own: move set/metric "
                                 "inside it")
            _check_metric(self.not_worse_than_published.set, self.not_worse_than_published.metric)
            return self
        if self.metric is None:
            raise ValueError("a publish_if rule needs `metric` with `min` and/or `max`, or "
                             "`not_worse_than_published: {metric, set, tolerance}`")
        if self.min is None and self.max is None:
            raise ValueError(f"publish_if rule on {self.metric!r} needs `min` and/or `max`")
        for v in (self.min, self.max):
            if v is not None and not math.isfinite(v):
                raise ValueError("publish_if bounds must be finite numbers")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"publish_if rule on {self.metric!r}: min {self.min} is above max {self.max}")
        _check_metric(self.set, self.metric)
        return self

    @property
    def target(self) -> tuple[str | None, str]:
        r = self.not_worse_than_published
        return (r.set, r.metric) if r is not None else (self.set, self.metric or "")

    def describe(self) -> str:
        s, m = self.target
        where = f"{s}.{m}" if s else m
        r = self.not_worse_than_published
        if r is not None:
            tol = f"{r.tolerance:g}" + (" (relative)" if r.relative else "")
            return f"{where} not worse than published by more than {tol}"
        parts = [f">= {self.min:g}" if self.min is not None else "", f"<= {self.max:g}" if self.max is not None
                 else ""]
        return f"{where} " + " and ".join(p for p in parts if p)


def _check_metric(set_name: str | None, metric: str) -> None:
    if metric in AGGREGATE_METRICS:
        if set_name is not None:
            raise ValueError(f"{metric} is a mean over all sets: drop `set`")
        return
    if metric not in METRICS:
        known = sorted(m for m in METRICS if m not in AGGREGATE_METRICS)
        raise ValueError(f"unknown metric {metric!r}; per-set metrics: {', '.join(known)}; over all sets: "
                         f"{', '.join(AGGREGATE_METRICS)}")
    if set_name is None:
        raise ValueError(f"metric {metric!r} is per set: add `set`")


def parse_publish_if(doc: object) -> list[GateRule]:
    """A `publish_if` list (dicts or GateRule) as GateRule objects; errors name the entry."""
    from pydantic import ValidationError

    if not isinstance(doc, list):
        raise ValueError("publish_if is a list of rules")
    out = []
    for i, r in enumerate(doc):
        try:
            out.append(r if isinstance(r, GateRule) else GateRule.model_validate(r))
        except ValidationError as e:
            msg = "; ".join((f"{'.'.join(str(x) for x in err['loc'])}: " if err["loc"] else "")
                            + err["msg"].removeprefix("Value error, ") for err in e.errors())
            raise ValueError(f"publish_if[{i}]: {msg}") from None
    return out


def validate_evaluation(evaluate: EvaluateSpec | None, publish_if: Sequence[GateRule] | None,
                        experts: Sequence[str], *, has_base: bool = True) -> None:
    """Cross-checks a MergeSpec makes once both fields are parsed (raises ValueError naming the
    field): gates need `evaluate` and name its sets; a metric fits the evaluator and a declared
    kind; normalised metrics need `baselines`, a paired expert (and a base for normalised_gain);
    pairings name real experts."""
    if evaluate is None:
        if publish_if:
            raise ValueError("publish_if gates on evaluation results: add `evaluate:` with the sets")
        return
    specs = evaluate.set_specs()
    ev = evaluate.evaluator
    for n, s in specs.items():
        if s.expert is not None and s.expert not in experts:
            raise ValueError(f"evaluate.sets.{n}.expert: {s.expert!r} is not an expert; experts: "
                             f"{list(experts)}")
        if s.kind is not None and not metrics_for(s.kind, ev):
            raise ValueError(f"evaluate.sets.{n}: the {ev} evaluator cannot score {s.kind} sets")
    pairing = evaluate.pairing(experts)
    for i, rule in enumerate(publish_if or []):
        set_name, metric = rule.target
        where = f"publish_if[{i}]"
        normalised = metric in AGGREGATE_METRICS or metric in NORMALISED_METRIC.values()
        if normalised and not evaluate.baselines:
            raise ValueError(f"{where}: {metric} needs the base and expert results: set "
                             "evaluate.baselines: true")
        if AGGREGATE_METRICS.get(metric, metric) == "normalised_gain" and not has_base:
            raise ValueError(f"{where}: {metric} compares with the base model, and this merge has none")
        if set_name is None:
            if not any(p is not None for p in pairing.values()):
                raise ValueError(f"{where}: {metric} averages sets paired with an expert, and no set is "
                                 "(name a set like its expert or give `expert:`)")
            continue
        if set_name not in specs:
            raise ValueError(f"{where}: no evaluation set {set_name!r}; sets: {sorted(specs)}")
        if normalised and pairing[set_name] is None:
            raise ValueError(f"{where}: {metric} of {set_name!r} needs its expert: give "
                             f"evaluate.sets.{set_name}.expert")
        kind = specs[set_name].kind
        kinds = [kind] if kind is not None else list(SET_KINDS)
        if not any(metric in metrics_for(k, ev) for k in kinds):
            offered = metrics_for(kind, ev) if kind is not None else sorted(
                {m for k in SET_KINDS for m in metrics_for(k, ev)})
            what = f"a {kind} set" if kind is not None else "a set"
            raise ValueError(f"{where}: {what} scored by the {ev} evaluator reports {', '.join(offered)}, "
                             f"not {metric!r}")
