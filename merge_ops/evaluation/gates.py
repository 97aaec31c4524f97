"""`publish_if` gates: decide from evaluation results whether a merged model may be published.

    threshold    {set, metric, min, max}     the merged model's value lies within the bounds
    comparison   {not_worse_than_published: {set, metric, tolerance, relative}}
                 not worse than the currently published revision's stored value by more than
                 `tolerance` (absolute, or a fraction of the published value with `relative`);
                 "worse" follows the metric's direction (lower NLL is better, higher accuracy is)

A metric that was not measured fails its gate (a gate that cannot be checked must not let a model
through). A comparison passes, and says why, when there is nothing published to compare with (the
first publish) or the published revision has no value for that metric (published before it was
measured): the caller fetches the published revision's stored results and passes them in.
No torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from merge_ops.errors import AlloyError
from merge_ops.evaluation.declarations import METRICS, GateRule, parse_publish_if
from merge_ops.evaluation.results import EvalResult, _num


class Rejected(AlloyError):
    """The merge ran, but its evaluation failed a `publish_if` gate: nothing is published.
    `report` is the gate report (passed, checks, table) for the job result."""

    code = "rejected"

    def __init__(self, message: str, *, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


@dataclass
class GateCheck:
    rule: str  # the rule in words
    set: str | None
    metric: str
    value: float | None  # the merged model's
    bound: str  # what it had to satisfy, with numbers
    published: float | None
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "set": self.set, "metric": self.metric, "value": self.value,
                "bound": self.bound, "published": self.published, "passed": self.passed, "note": self.note}


@dataclass
class GateReport:
    checks: list[GateCheck]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def table(self) -> str:
        """A Markdown table, one row per rule (readable as plain text too)."""
        head = ["gate", "set", "metric", "value", "required", "published", "result"]
        rows = [[c.rule, c.set or "(all)", c.metric, _num(c.value), c.bound, _num(c.published),
                 ("pass" if c.passed else "FAIL") + (f" ({c.note})" if c.note else "")] for c in self.checks]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
        return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [c.to_dict() for c in self.checks], "table": self.table()}


def check_gates(results: EvalResult, rules: Sequence[GateRule | Mapping[str, Any]],
                published: EvalResult | Mapping[str, Any] | None = None) -> GateReport:
    """Every rule checked against `results` (the merged model's, normalised if gates use normalised
    metrics); `published` is the published revision's stored results (EvalResult or its dict)."""
    parsed = parse_publish_if(list(rules))
    pub = EvalResult.from_dict(published) if isinstance(published, Mapping) else published
    return GateReport([_check(results, r, pub) for r in parsed])


def _check(results: EvalResult, rule: GateRule, published: EvalResult | None) -> GateCheck:
    set_name, metric = rule.target
    value = results.value(set_name, metric)
    cmp = rule.not_worse_than_published
    if cmp is None:
        bound = " and ".join(x for x in (f">= {rule.min:g}" if rule.min is not None else "",
                                         f"<= {rule.max:g}" if rule.max is not None else "") if x)
        if value is None:
            return GateCheck(rule.describe(), set_name, metric, None, bound, None, False, "not measured")
        ok = (rule.min is None or value >= rule.min) and (rule.max is None or value <= rule.max)
        return GateCheck(rule.describe(), set_name, metric, value, bound, None, ok)
    old = published.value(set_name, metric) if published is not None else None
    higher = METRICS[metric].higher_is_better
    if old is None:
        note = "nothing published yet" if published is None else "published revision has no value"
        return GateCheck(rule.describe(), set_name, metric, value, "not worse than published", None,
                         value is not None, note if value is not None else "not measured")
    slack = cmp.tolerance * abs(old) if cmp.relative else cmp.tolerance
    limit = old - slack if higher else old + slack
    bound = f"{'>=' if higher else '<='} {limit:.6g}"
    if value is None:
        return GateCheck(rule.describe(), set_name, metric, None, bound, old, False, "not measured")
    ok = value >= limit if higher else value <= limit
    return GateCheck(rule.describe(), set_name, metric, value, bound, old, ok)
