"""The scaling factor α of TSV-M, Iso-C and Iso-CTS chosen on labelled validation rows, as their authors do.

θ(α) = θ₀ + α·τ_method, and α scales every tensor (spectral.finish), so one merge at α = 1 gives every
θ(α) without re-running the SVDs. When a job's spec has evaluation sets with labelled rows (accuracy
sets for encoder classifiers, exact-match sets for causal LMs) and does not set `alpha` itself:

    1. merge at α = 1 (float32) into a scratch folder beside the output;
    2. score θ(α) on the labelled sets for α on a grid (0.2, 0.4, … 3.0, then ±0.1 around the best:
       the authors' range {0.1 … 3.0}, 17 evaluations instead of 30), with the evaluation stage's own
       scorer (evaluation/evaluate.py: same heads, batching, truncation);
    3. keep the α with the best mean *normalised* score (each set's metric divided by its paired
       expert's, as the official sweep), ties to the smaller α; then run the real merge with it.

Without such sets, or with `alpha` given in the spec, the method's fixed default (or the given value) is
used and nothing is evaluated. The chosen α, the whole curve and the sets used are in the job's metrics
(`alpha_selection`). The evaluate stage then scores the final merge on the same sets, so its numbers are
optimistic by the selection: give the job a held-out split for reporting, or read them as validation.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from merge_ops.context import JobContext, MethodResult
    from merge_ops.evaluation.rows import EvalSet

METHODS = frozenset({"tsv_m", "iso_c", "iso_cts"})
METRIC = {"accuracy": "accuracy", "exact_match": "exact_match"}  # labelled kinds and what they score
COARSE = tuple(round(0.2 * i, 1) for i in range(1, 16))


def labelled(sets: Mapping[str, EvalSet]) -> dict[str, EvalSet]:
    return {n: s for n, s in sets.items() if s.kind in METRIC}


def applies(ctx: JobContext, sets: Mapping[str, EvalSet] | None) -> bool:
    spec = ctx.spec
    return (spec.method in METHODS and "alpha" not in spec.parameters and spec.evaluate is not None
            and bool(sets) and bool(labelled(sets or {})))


def _with(ctx: JobContext, out_dir: Path, **update: Any) -> JobContext:
    spec = ctx.spec.model_copy(update={"parameters": {**ctx.spec.parameters, "alpha": update.pop("alpha")},
                                       **update})
    return dataclasses.replace(ctx, spec=spec, out_dir=out_dir)


def _write_scaled(base: Path, unit: Path, out: Path, alpha: float) -> None:
    """θ₀ + α·(θ₁ − θ₀) for every floating tensor of the α = 1 merge `unit` (others as in it)."""
    import torch
    from safetensors.torch import save_file

    from merge_ops.checkpoint import CheckpointReader

    out.mkdir(parents=True)
    with CheckpointReader(base) as b, CheckpointReader(unit) as u:
        sd = {}
        for n in u.names():
            t = u.read(n)
            if t.is_floating_point() and n in b:
                t0 = b.read(n).to(torch.float32)
                t = t0.add_(t.to(torch.float32) - t0, alpha=alpha)
            sd[n] = t.contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in unit.iterdir():
        if f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json"):
            continue
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)


def run(ctx: JobContext, sets: Mapping[str, EvalSet]) -> MethodResult:
    from merge_ops.evaluation.evaluate import evaluate_model
    from merge_ops.static import driver

    spec, ev = ctx.spec, ctx.spec.evaluate
    assert ev is not None and ctx.base is not None
    chosen_sets = labelled(sets)
    names = spec.expert_names()
    pairing = ev.pairing(names)
    set_specs = ev.set_specs()
    paths = dict(zip(names, (e.path for e in ctx.experts), strict=True))
    kw = {"device": ctx.device, "batch_size": ev.batch_size, "max_length": ev.max_length,
          "answer_margin": ev.answer_margin, "dtype": ev.dtype, "task_specific": spec.task_specific,
          "channel": None}

    def metric(name: str, result: Any) -> float:
        return float(result.sets[name].metrics[METRIC[chosen_sets[name].kind]])

    norm: dict[str, float] = {}  # each set's paired expert, scored once with its own head
    for n, s in chosen_sets.items():
        e = pairing.get(n)
        if e is not None and e in paths:
            norm[n] = metric(n, evaluate_model(paths[e], {n: s}, **kw))
    heads = {n: set_specs[n].head or pairing.get(n) for n, s in chosen_sets.items() if s.kind == "accuracy"}

    scratch = Path(tempfile.mkdtemp(prefix=f".{ctx.out_dir.name}.alpha.", dir=ctx.out_dir.parent))
    curve: dict[float, float] = {}
    try:
        unit = scratch / "unit"
        driver.run(_with(ctx, unit, alpha=1.0, out_dtype="float32"))

        def score(alpha: float) -> float:
            if alpha not in curve:
                ctx.check_cancel()
                ctx.report("plan", len(curve), None)
                folder = scratch / f"a{alpha:g}"
                _write_scaled(ctx.base.path, unit, folder, alpha)
                res = evaluate_model(folder, chosen_sets, heads={n: h for n, h in heads.items() if h}, **kw)
                vals = [metric(n, res) / norm[n] if norm.get(n) else metric(n, res) for n in chosen_sets]
                curve[alpha] = sum(vals) / len(vals)
                shutil.rmtree(folder)
            return curve[alpha]

        for a in COARSE:
            score(a)
        best = max(COARSE, key=lambda a: (curve[a], -a))
        for a in (round(best - 0.1, 1), round(best + 0.1, 1)):
            if a > 0:
                score(a)
        best = max(curve, key=lambda a: (curve[a], -a))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = driver.run(_with(ctx, ctx.out_dir, alpha=best))
    result.metrics["alpha_selection"] = {
        "alpha": best, "criterion": "mean normalised score" if norm else "mean score",
        "sets": sorted(chosen_sets), "curve": {f"{a:g}": round(v, 6) for a, v in sorted(curve.items())}}
    return result
