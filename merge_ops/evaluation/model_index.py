"""Evaluation results as the Hugging Face card's `model-index` metadata (no torch).

One result per evaluation set: task type `text-generation` (perplexity, exact match) or
`text-classification` (a task head's accuracy), dataset name = the set's name (type = its id or
name, as the caller gives), metrics with the Hub's `type`/`value`/`name`. Normalised metrics are
listed with their set when known. `huggingface_hub.ModelCard` parses the result into
`card.data.eval_results`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merge_ops.evaluation.declarations import METRICS
from merge_ops.evaluation.results import EvalResult

TASK_TYPES = {"perplexity": ("text-generation", "Text Generation"),
              "exact_match": ("text-generation", "Text Generation"),
              "accuracy": ("text-classification", "Text Classification")}


def model_index(results: EvalResult, model_name: str, *, dataset_types: Mapping[str, str] | None = None,
                split: str | None = None, source: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The `model-index` list for card metadata (`meta["model-index"] = model_index(...)`).

    `dataset_types` maps a set name to a stable dataset id (e.g. the uploaded set's id); the
    set's name is used otherwise. `source` ({name, url}: e.g. the job's URL) is attached to every
    result; the Hub requires a url with a name."""
    if source is not None and not source.get("url"):
        raise ValueError("a model-index source needs a url")
    out = []
    for name, s in results.sets.items():
        task_type, task_name = TASK_TYPES[s.kind]
        values = {**s.metrics, **{k: v for k, v in results.normalised.get(name, {}).items() if v is not None}}
        metrics = [{"type": METRICS[m].hf_type, "value": round(float(v), 6), "name": METRICS[m].title}
                   for m, v in values.items() if m in METRICS]
        if not metrics:
            continue
        dataset: dict[str, Any] = {"type": (dataset_types or {}).get(name, name), "name": name}
        if split:
            dataset["split"] = split
        out.append({"task": {"type": task_type, "name": task_name}, "dataset": dataset, "metrics": metrics,
                    **({"source": dict(source)} if source is not None else {})})
    return [{"name": model_name, "results": out}] if out else []
