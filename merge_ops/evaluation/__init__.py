"""Evaluation as a stage of a job: score the merged model (and, cached per input commit, its base
and experts) on held-out sets, normalise, gate publishing, and report results for the card.

    declarations.py  set kinds, metric names, `evaluate:` / `publish_if:` models and cross-checks
    rows.py          evaluation-set JSONL rows, checked line by line
    results.py       EvalResult / SetResult (plain JSON) and the normalised metrics
    gates.py         check_gates(results, rules, published) -> GateReport (pass/fail + table)
    model_index.py   results as the Hugging Face card's `model-index`
    cache.py         per-(model commit, set, settings) results on disk
    evaluate.py      evaluate_model / run_evaluation (torch + transformers)
    harness.py       EleutherAI's lm-eval as an optional evaluator (the `eval` extra)

Importing this package (and every module but evaluate.py and harness.py) does not import torch:
the API validates specs and uploaded sets with it.
"""

from merge_ops.evaluation.declarations import (
    METRICS,
    SET_KINDS,
    EvalSetError,
    EvalSetSpec,
    EvalSettings,
    EvaluateSpec,
    GateRule,
    parse_publish_if,
    validate_evaluation,
)
from merge_ops.evaluation.gates import GateReport, check_gates
from merge_ops.evaluation.model_index import model_index
from merge_ops.evaluation.results import EvalResult, SetResult, normalise
from merge_ops.evaluation.rows import EvalRow, EvalSet, parse_eval_set, read_eval_set

__all__ = [
    "METRICS", "SET_KINDS", "EvalResult", "EvalRow", "EvalSet", "EvalSetError", "EvalSetSpec", "EvalSettings",
    "EvaluateSpec", "GateReport", "GateRule", "SetResult", "check_gates", "model_index", "normalise",
    "parse_eval_set", "parse_publish_if", "read_eval_set", "validate_evaluation",
]
