"""Evaluation results as plain data (JSON in the job, alloy_merge.json and the cache), and the
normalised metrics that compare a merged model with its base and experts. No torch.

Normalised per set (the issue's definitions), then averaged over the sets that have them:
    perplexity sets     normalised_gain = (NLL_base − NLL_merged) / (NLL_base − NLL_expert)
                        1 = as good as the expert on its domain, 0 = no better than the base
    exact_match sets    accuracy_ratio  = exact_match_merged / exact_match_expert
    accuracy sets       accuracy_ratio  = accuracy_merged / accuracy_expert
A ratio whose denominator is (nearly) zero is undefined (None) and left out of the mean: an expert
that is no better than the base on its own domain says nothing about what the merge kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from merge_ops.evaluation.declarations import AGGREGATE_METRICS, NORMALISED_METRIC

_EPS = 1e-9  # below this a denominator is treated as zero


@dataclass
class SetResult:
    kind: str
    metrics: dict[str, float]  # nll/ppl, exact_match/answer_nll, accuracy (declarations.KIND_METRICS)
    rows: int
    tokens: int | None = None  # tokens scored (perplexity: predicted tokens; exact_match: answer tokens)
    set_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "metrics": dict(self.metrics), "rows": self.rows, "tokens": self.tokens,
                "set_sha256": self.set_sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SetResult:
        return cls(d["kind"], {k: float(v) for k, v in d["metrics"].items()}, int(d["rows"]), d.get("tokens"),
                   d.get("set_sha256"))


@dataclass
class EvalResult:
    sets: dict[str, SetResult]
    model: str | None = None  # commit / fingerprint of the model scored, when known
    settings: dict[str, Any] = field(default_factory=dict)
    evaluator: str = "alloy"
    # filled by `normalise`: per set {normalised_gain | accuracy_ratio: value or None}, and the means
    normalised: dict[str, dict[str, float | None]] = field(default_factory=dict)
    aggregate: dict[str, float | None] = field(default_factory=dict)

    def value(self, set_name: str | None, metric: str) -> float | None:
        """A metric of a set (raw or normalised), or a mean over sets when set_name is None."""
        if set_name is None:
            return self.aggregate.get(metric)
        s = self.sets.get(set_name)
        if s is None:
            return None
        if metric in s.metrics:
            return s.metrics[metric]
        return self.normalised.get(set_name, {}).get(metric)

    def table(self) -> str:
        """A Markdown table, one row per set (the CLI prints it; a card can embed it)."""
        head = ["set", "kind", "rows", "metric", "value", "normalised"]
        rows = []
        for name, s in self.sets.items():
            norm = next((f"{k} {_num(v)}" for k, v in self.normalised.get(name, {}).items()), "")
            for i, (m, v) in enumerate(s.metrics.items()):
                rows.append([name if i == 0 else "", s.kind if i == 0 else "", str(s.rows) if i == 0 else "",
                             m, _num(v), norm if i == 0 else ""])
        rows += [["(mean)", "", "", k, _num(v), ""] for k, v in self.aggregate.items() if v is not None]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
        return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])

    def to_dict(self) -> dict[str, Any]:
        return {"evaluator": self.evaluator, "model": self.model, "settings": dict(self.settings),
                "sets": {n: s.to_dict() for n, s in self.sets.items()},
                "normalised": {n: dict(v) for n, v in self.normalised.items()},
                "aggregate": dict(self.aggregate)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalResult:
        return cls({n: SetResult.from_dict(s) for n, s in d.get("sets", {}).items()}, d.get("model"),
                   dict(d.get("settings") or {}), d.get("evaluator", "alloy"),
                   {n: dict(v) for n, v in (d.get("normalised") or {}).items()}, dict(d.get("aggregate") or {}))


def normalised_gain(nll_base: float, nll_merged: float, nll_expert: float) -> float | None:
    """(NLL_base − NLL_merged) / (NLL_base − NLL_expert); None when the expert equals the base."""
    den = nll_base - nll_expert
    if abs(den) < _EPS:
        return None
    return (nll_base - nll_merged) / den


def accuracy_ratio(merged: float, expert: float) -> float | None:
    """merged / expert accuracy; None when the expert scores 0."""
    return None if expert < _EPS else merged / expert


def _loss_metric(s: SetResult) -> str | None:
    # token NLL from Alloy's evaluator; bits per byte from lm-eval: a fixed multiple of the total NLL
    # over the same text, so the gain ratio is the same whichever is used
    return next((m for m in ("nll", "bits_per_byte") if m in s.metrics), None)


def _ratio_metric(s: SetResult) -> str | None:
    return next((m for m in ("exact_match", "accuracy") if m in s.metrics), None)


def normalise(merged: EvalResult, base: EvalResult | None, experts: Mapping[str, EvalResult | None]
              ) -> EvalResult:
    """Fill `merged.normalised` and `merged.aggregate` (and return it).

    `experts` maps a set name to the result of the expert it is paired with (the same expert may
    serve several sets); sets without a pairing or without the needed result stay unnormalised."""
    per: dict[str, dict[str, float | None]] = {}
    for name, s in merged.sets.items():
        exp = experts.get(name)
        es = exp.sets.get(name) if exp is not None else None
        metric = NORMALISED_METRIC.get(s.kind)
        if es is None or metric is None:
            continue
        if metric == "normalised_gain":
            m = _loss_metric(s)
            bs = base.sets.get(name) if base is not None else None
            if m is None or bs is None or m not in bs.metrics or m not in es.metrics:
                continue
            per[name] = {metric: _finite(normalised_gain(bs.metrics[m], s.metrics[m], es.metrics[m]))}
        else:
            m = _ratio_metric(s)
            if m is None or m not in es.metrics:
                continue
            per[name] = {metric: _finite(accuracy_ratio(s.metrics[m], es.metrics[m]))}
    merged.normalised = per
    merged.aggregate = {}
    for agg, metric in AGGREGATE_METRICS.items():
        vals = [v[metric] for v in per.values() if v.get(metric) is not None]
        merged.aggregate[agg] = sum(vals) / len(vals) if vals else None  # type: ignore[arg-type]
    return merged


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.6g}"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
