"""The model card (README.md) and alloy_merge.json written next to every merged checkpoint.

Front matter follows the Hub's model-card metadata for merges: `base_model` lists the inputs,
`base_model_relation: merge` says how they relate (the Hub's own inference of it is heuristic), and
`tags`/`library_name` make the model findable and loadable. The body mirrors mergekit's card
(method with its paper, models merged, the exact recipe) and adds what a service knows: the input
commits each model was built from, learned coefficients, metrics, the job id.
`alloy_merge.json` holds the same facts for programs.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from merge_ops.calibration import SET_ID
from merge_ops.context import MethodResult, ResolvedModel
from merge_ops.methods import METHODS
from merge_ops.sources import scrub
from merge_ops.spec import MergeSpec

CARD_FILE = "README.md"
FACTS_FILE = "alloy_merge.json"
_NO_CARD = {"notify"}  # spec fields that may carry secrets (webhook URLs) and say nothing about the model


def alloy_version() -> str:
    try:
        return metadata.version("alloy-merge")
    except metadata.PackageNotFoundError:
        return "dev"


def model_name(m: ResolvedModel) -> str:
    """How cards and job results name a model: its hub id, or for a local folder `local:` and the
    start of its content fingerprint. Never the folder: a server path (and the folder's name) says
    where the server keeps its files, and another tenant could read the model by it."""
    if m.repo_id:
        return m.repo_id
    digest = (m.commit or "").removeprefix("local:")
    return f"local:{digest[:12]}" if digest else "local model"


def _public_refs(spec: MergeSpec, models: list[ResolvedModel]) -> dict[str, str]:
    """Spec strings that name files on the machine that ran the merge -> what the card says instead:
    local model folders -> model_name, calibration and evaluation files -> their file name."""
    out = {m.ref: model_name(m) for m in models if m.repo_id is None}
    if spec.calibration is not None:
        out.update({r.raw: Path(r.path).name for r in spec.calibration.tasks.values() if r.path is not None})
    if spec.evaluate is not None:
        out.update({s.set: Path(s.set).name for s in spec.evaluate.set_specs().values() if not SET_ID.match(s.set)})
    return out


def _swap(x: Any, names: dict[str, str]) -> Any:
    if isinstance(x, dict):
        return {k: _swap(v, names) for k, v in x.items()}
    if isinstance(x, list):
        return [_swap(v, names) for v in x]
    return names.get(x, x) if isinstance(x, str) else x


def _recipe(spec: MergeSpec, names: dict[str, str]) -> dict[str, Any]:
    doc = json.loads(scrub(json.dumps(spec.model_dump(mode="json", exclude_none=True, exclude=_NO_CARD))))
    return _swap(doc, names)


def _inputs(spec: MergeSpec, base: ResolvedModel | None, experts: list[ResolvedModel]) -> list[dict]:
    """One row per input; `ref` is the spec's hub ref, or the local folder's model_name."""
    rows = [] if base is None else [{"role": "base", "name": model_name(base),
                                     "ref": base.ref if base.repo_id else model_name(base),
                                     "repo": base.repo_id, "revision": base.revision, "commit": base.commit}]
    for name, m in zip(spec.expert_names(), experts, strict=True):
        rows.append({"role": "expert", "name": name, "ref": m.ref if m.repo_id else model_name(m),
                     "repo": m.repo_id, "revision": m.revision, "commit": m.commit})
    return rows


def _calibration(spec: MergeSpec, files: dict[str, Path] | None) -> list[dict]:
    """Each task's calibration data: the spec's reference and the SHA-256 of the bytes read."""
    if spec.calibration is None or not files:
        return []
    rows = []
    for task, path in files.items():
        ref = spec.calibration.tasks.get(task)
        digest = hashlib.sha256()
        with Path(path).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        name = ref.set_id or Path(ref.path or ref.raw).name if ref is not None else None  # never a folder
        rows.append({"task": task, "ref": scrub(name) if name is not None else None,
                     "sha256": digest.hexdigest()})
    return rows


def merge_facts(spec: MergeSpec, base: ResolvedModel | None, experts: list[ResolvedModel],
                result: MethodResult, *, job_id: str | None = None, created_at: str | None = None,
                calibration: dict[str, Path] | None = None) -> dict:
    """What alloy_merge.json holds (and the card shows)."""
    m = METHODS[spec.method]
    return {
        "calibration": _calibration(spec, calibration),
        "alloy_version": alloy_version(),
        "method": spec.method,
        "method_kind": m.kind,
        "paper": m.paper,
        "spec": _recipe(spec, _public_refs(spec, ([base] if base else []) + experts)),
        "inputs": _inputs(spec, base, experts),
        "metrics": result.metrics,
        "artifacts": result.artifacts,
        "job_id": job_id,
        "created_at": created_at or datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _paper_links(paper: str) -> str:
    return re.sub(r"arXiv:(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", paper)


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def coefficient_summary(coef: Any) -> str | None:
    """A markdown table from coefficients.json ({"experts", "groups", "values"}: values is groups ×
    experts, as learned/coefficients.py writes it), shown experts × groups with the experts' names:
    every group when there are few, else mean/min/max per expert."""
    if not isinstance(coef, dict):
        return None
    values, experts, groups = coef.get("values"), coef.get("experts"), coef.get("groups")
    if not (isinstance(values, list) and values and isinstance(experts, list) and experts
            and all(isinstance(r, list) and len(r) == len(experts) for r in values)):
        return None
    groups = groups if isinstance(groups, list) and len(groups) == len(values) else [
        f"g{j}" for j in range(len(values))]
    per_expert = [[row[k] for row in values] for k in range(len(experts))]
    if len(groups) <= 8:
        return _table(["expert", *map(str, groups)], [[e, *col] for e, col in zip(experts, per_expert, strict=True)])
    return _table(["expert", "groups", "mean", "min", "max"],
                  [[e, len(c), sum(c) / len(c), min(c), max(c)] for e, c in zip(experts, per_expert, strict=True)])


def render_card(facts: dict, spec: MergeSpec, out_dir: Path) -> str:
    m = METHODS[spec.method]
    inputs = facts["inputs"]
    base = next((i for i in inputs if i["role"] == "base"), None)
    # the Hub reads base_model as hub ids: local inputs are listed in the body only
    hub_ids = [i["repo"] for i in inputs if i["repo"]]
    meta: dict[str, Any] = {"base_model": hub_ids, "base_model_relation": "merge"} if hub_ids else {}
    meta.update({"tags": ["merge", "alloy", spec.method], "library_name": "transformers"})
    title = spec.name or (spec.publish.repo.split("/")[-1] if spec.publish else f"{spec.method} merge")
    ev_results = None
    if facts.get("evaluation"):
        from merge_ops.evaluation import EvalResult, model_index

        ev_results = EvalResult.from_dict(facts["evaluation"]["results"])
        index = model_index(ev_results, spec.publish.repo if spec.publish else title)
        if index:
            meta["model-index"] = index
    n = sum(1 for i in inputs if i["role"] == "expert")
    out = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
           f"A merge of {n} fine-tuned model{'s' if n != 1 else ''} made with Alloy using **{m.name}**"
           + (f" on top of `{base['repo'] or base['ref']}`." if base else "."), "",
           "## Merge method", "", f"**{m.name}**: {m.summary}", "", f"Paper: {_paper_links(m.paper)}", "",
           "## Models merged", "",
           _table(["role", "model", "revision", "commit"],
                  [[i["role"] if i["role"] == "base" else f"expert `{i['name']}`", i["repo"] or i["ref"],
                    i["revision"], f"`{i['commit']}`" if i["commit"] else None] for i in inputs]), ""]
    if facts.get("calibration"):
        out += ["## Calibration data", "",
                _table(["task", "set", "sha256"], [[c["task"], c["ref"], f"`{c['sha256']}`"]
                                                   for c in facts["calibration"]]), ""]
    arts = facts["artifacts"]
    if "coefficients_png" in arts or "coefficients" in arts:
        out += ["## Learned coefficients", ""]
        if "coefficients_png" in arts:
            out += [f"![learned merging coefficients]({arts['coefficients_png']})", ""]
        coef_file = out_dir / arts.get("coefficients", "coefficients.json")
        if coef_file.is_file():
            summary = coefficient_summary(json.loads(coef_file.read_text()))
            if summary:
                out += [summary, ""]
            out += [f"All values: [`{coef_file.name}`]({coef_file.name}).", ""]
    if ev_results is not None:
        out += ["## Evaluation", "", ev_results.table(), ""]
        gates = facts["evaluation"].get("gates")
        if gates:
            out += ["Publish gates (`publish_if`):", "", gates["table"], ""]
    scalars = {k: v for k, v in facts["metrics"].items() if isinstance(v, int | float | str | bool)}
    if scalars:
        out += ["## Metrics", "", _table(["metric", "value"], [[k, v] for k, v in scalars.items()]), ""]
    out += ["## Recipe", "", "```yaml", yaml.safe_dump(facts["spec"], sort_keys=False).rstrip(), "```", "",
            "## Provenance", "",
            f"- Alloy {facts['alloy_version']}, created {facts['created_at']}"
            + (f", job `{facts['job_id']}`" if facts["job_id"] else ""),
            f"- Machine-readable: [`{FACTS_FILE}`]({FACTS_FILE})", ""]
    return "\n".join(out)


def write_card(out_dir: Path, spec: MergeSpec, base: ResolvedModel | None, experts: list[ResolvedModel],
               result: MethodResult, *, job_id: str | None = None,
               calibration: dict[str, Path] | None = None, evaluation: dict | None = None) -> None:
    """Write README.md (model card) and alloy_merge.json into out_dir."""
    out_dir = Path(out_dir)
    facts = merge_facts(spec, base, experts, result, job_id=job_id, calibration=calibration)
    if evaluation is not None:
        facts["evaluation"] = evaluation
    (out_dir / FACTS_FILE).write_text(json.dumps(facts, indent=2, default=str) + "\n")
    (out_dir / CARD_FILE).write_text(render_card(facts, spec, out_dir))
