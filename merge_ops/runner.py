"""Run one MergeSpec in-process: resolve → (learn) → merge → write, then optionally publish.

This is the one entry point both `alloy merge` and the Celery worker use, so a merge behaves the
same on a laptop and in the service. Stages report through one Channel (context.py):
`progress(stage, step, total, loss)`, and cancellation is checked between steps through
`cancel_requested()`. The spec was validated when it was built; nothing here checks it again.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from merge_ops.calibration import SET_ID, calibration_files, check_calibration
from merge_ops.context import SILENT, Channel, JobContext, MethodResult, ResolvedModel, report
from merge_ops.errors import InputError
from merge_ops.evaluation.gates import Rejected
from merge_ops.spec import MergeSpec

REJECTED_EXIT = 3  # `alloy merge` exit code when a publish_if gate rejected the merge


@dataclass
class ResolveOptions:
    """How ModelRefs become local folders (hub endpoint/token, allowed local roots)."""

    token: str | None = None
    endpoint: str | None = None
    cache_dir: Path | None = None
    allowed_roots: list[Path] | None = None


@dataclass
class MergeOutcome:
    out_dir: Path
    base: ResolvedModel | None
    experts: list[ResolvedModel]
    result: MethodResult
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # {"results", "baselines", "gates"} when the spec has `evaluate:` (also in alloy_merge.json)
    evaluation: dict | None = None

    @property
    def rejected(self) -> bool:
        gates = (self.evaluation or {}).get("gates")
        return gates is not None and not gates["passed"]


def resolve_inputs(spec: MergeSpec, opts: ResolveOptions, channel: Channel | None = None
                   ) -> tuple[ResolvedModel | None, list[ResolvedModel]]:
    from merge_ops.sources import resolve

    refs = ([spec.base] if spec.base else []) + [e.model for e in spec.experts]
    out: list[ResolvedModel] = []
    for i, ref in enumerate(refs):
        report(channel, "resolve", i, len(refs))
        # an expert given as a LoRA adapter alone is applied to the base (resolved first)
        lora_base = out[0] if spec.base and i > 0 else None
        out.append(resolve(ref, token=opts.token, endpoint=opts.endpoint, cache_dir=opts.cache_dir,
                           allowed_roots=opts.allowed_roots, lora_base=lora_base))
    report(channel, "resolve", len(refs), len(refs))
    return (out[0], out[1:]) if spec.base else (None, out)


def run_merge(
    spec: MergeSpec,
    out_dir: Path,
    *,
    device: str = "cpu",
    channel: Channel | None = None,
    job_id: str | None = None,
    resolve_options: ResolveOptions | None = None,
    find_calibration_set: Callable[[str], Path | None] | None = None,
    eval_cache_dir: Path | None = None,
    published_evaluation: Callable[[], dict | None] | None = None,
) -> MergeOutcome:
    """Merge into `out_dir` (created; must be empty or absent). Raises AlloyError subclasses.

    Calibration references resolve to local files first (a set id through `find_calibration_set`:
    the service's store), so a missing set fails before any model is downloaded. The checkpoint is
    written into a temporary sibling folder and renamed into place at the end, so a failed or
    cancelled merge never leaves a half-written model where the caller looks for one.
    """
    from merge_ops.card import write_card

    t0 = time.perf_counter()
    channel = channel or SILENT
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"output folder {out_dir} is not empty: choose a new folder or empty it")
    cal = calibration_files(spec, find_calibration_set)
    eval_sets = load_evaluation_sets(spec, find_calibration_set)  # before any download: fail fast
    base, experts = resolve_inputs(spec, resolve_options or ResolveOptions(), channel)
    check_rows_against_model(spec, cal, base, experts)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        ctx = JobContext(spec=spec, base=base, experts=experts, out_dir=tmp, device=device,
                         calibration=cal, channel=channel, job_id=job_id)
        ctx.check_cancel()
        result = run_method(ctx, eval_sets)
        evaluation = None
        if spec.evaluate is not None:
            evaluation = evaluate_stage(tmp, spec, eval_sets, base, experts, device=device, channel=channel,
                                        cache_dir=eval_cache_dir, published=published_evaluation)
        ctx.report("write", 0, 1)
        result.metrics.setdefault("seconds", round(time.perf_counter() - t0, 3))
        write_card(tmp, spec, base, experts, result, job_id=job_id, calibration=cal, evaluation=evaluation)
        ctx.report("write", 1, 1)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeOutcome(out_dir, base, experts, result, time.perf_counter() - t0, evaluation=evaluation)


def check_rows_against_model(spec: MergeSpec, cal: dict[str, Path], base: ResolvedModel | None,
                             experts: list[ResolvedModel]) -> None:
    """The calibration rows against the model that reads them (the base; OT: the anchor), now that
    its files are on disk: a hub model's vocabulary and tokenizer are unknown at submit, and a token
    id past the embedding table would otherwise end the job in an IndexError mid-learning."""
    if not cal:
        return
    if spec.method_def().kind == "ot":
        anchor = int(spec.global_param("anchor") or 0)
        model = experts[anchor] if anchor < len(experts) else None
    else:
        model = base
    if model is not None:
        check_calibration(spec, cal, model_folder=model.path)


def evaluation_files(spec: MergeSpec, find_set: Callable[[str], Path | None] | None = None) -> dict[str, Path]:
    """Evaluation-set name -> local JSONL file: a path, or a set id of the service (`find_set`, the
    same store as calibration sets; the CLI has none)."""
    if spec.evaluate is None:
        return {}
    out: dict[str, Path] = {}
    for name, s in spec.evaluate.set_specs().items():
        where = f"evaluate.sets.{name}"
        if SET_ID.match(s.set):
            found = find_set(s.set) if find_set is not None else None
            if find_set is None:
                raise InputError(f"{where}: {s.set!r} is a set id, which only the service can read: give a "
                                 "JSONL file instead", param=where)
            if found is None or not Path(found).is_file():
                raise InputError(f"{where}: set {s.set!r} no longer exists", param=where)
            out[name] = Path(found)
            continue
        p = Path(s.set).expanduser()
        if not p.is_file():
            raise InputError(f"{where}: {s.set!r} is not a file (JSONL expected)", param=where)
        out[name] = p
    return out


def load_evaluation_sets(spec: MergeSpec, find_set: Callable[[str], Path | None] | None = None) -> dict:
    """The spec's evaluation sets read and checked line by line (EvalSetError names the line)."""
    if spec.evaluate is None:
        return {}
    from merge_ops.evaluation.rows import parse_eval_set

    specs = spec.evaluate.set_specs()
    # errors name the reference as written (a set id in the service, never its path on the server)
    return {n: parse_eval_set(p.read_bytes(), kind=specs[n].kind, source=specs[n].set)
            for n, p in evaluation_files(spec, find_set).items()}


def evaluate_stage(merged_dir: Path, spec: MergeSpec, sets: dict, base: ResolvedModel | None,
                   experts: list[ResolvedModel], *, device: str = "cpu", channel: Channel | None = None,
                   cache_dir: Path | None = None, published: Callable[[], dict | None] | None = None) -> dict:
    """Score the merged folder (and, cached per input commit, base and experts), then check the
    `publish_if` gates (the published revision's results fetched only when a rule compares with them).
    Returns {"results", "baselines", "gates"}; "gates" is None without `publish_if`."""
    from merge_ops.evaluation import EvalResult, check_gates
    from merge_ops.evaluation.cache import ResultCache
    from merge_ops.evaluation.evaluate import run_evaluation

    assert spec.evaluate is not None
    report(channel, "evaluate", 0, None)
    merged, baselines = run_evaluation(
        merged_dir, spec.evaluate, sets, base=base, experts=dict(zip(spec.expert_names(), experts, strict=True)),
        task_specific=spec.task_specific, cache=ResultCache(cache_dir) if cache_dir is not None else None,
        device=device, channel=channel)
    gates = None
    if spec.publish_if:
        prev = None
        if published is not None and any(r.not_worse_than_published for r in spec.publish_if):
            prev_doc = published()
            prev = EvalResult.from_dict(prev_doc) if prev_doc else None
        gates = check_gates(merged, spec.publish_if, prev).to_dict()
    return {"results": merged.to_dict(), "baselines": {k: v.to_dict() for k, v in baselines.items()},
            "gates": gates}


def published_evaluation(publisher, repo: str, branch: str = "main") -> dict | None:
    """The evaluation results in alloy_merge.json at the head of `repo`'s `branch` (None: nothing
    published there yet, or published without an evaluation)."""
    import json

    from merge_ops.card import FACTS_FILE

    text: str | None = None
    if hasattr(publisher, "path"):  # LocalHub
        try:
            f = publisher.path(repo, branch) / FACTS_FILE
        except InputError:
            return None
        text = f.read_text() if f.is_file() else None
    else:  # HfHubPublisher
        from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            f = publisher._api().hf_hub_download(repo, FACTS_FILE, revision=branch)
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return None
        text = Path(f).read_text()
    if text is None:
        return None
    ev = json.loads(text).get("evaluation") or {}
    return ev.get("results")


def raise_if_rejected(outcome: MergeOutcome) -> None:
    """Raise Rejected (with the gate report) when the outcome failed a publish_if gate."""
    if outcome.rejected:
        gates = (outcome.evaluation or {})["gates"]
        failed = [c["rule"] for c in gates["checks"] if not c["passed"]]
        raise Rejected("publish_if gate failed: " + "; ".join(failed) + ": nothing was published",
                       report=gates)


def run_method(ctx: JobContext, eval_sets: dict | None = None) -> MethodResult:
    """Run the spec's method on resolved inputs: static methods through the streaming driver, learned
    ones through the learned driver, OT fusion through its own `run`. With the spec's evaluation sets,
    TSV-M/Iso-C/Iso-CTS without an explicit `alpha` choose it on their labelled rows (alpha_select.py)."""
    from merge_ops.methods import implementation

    m = ctx.spec.method_def()
    if m.kind == "static":
        from merge_ops.static import alpha_select, driver

        if alpha_select.applies(ctx, eval_sets):
            return alpha_select.run(ctx, eval_sets or {})
        return driver.run(ctx)
    module = implementation(m)
    if m.kind == "learned":
        from merge_ops.learned import driver as learned

        return learned.run(ctx, module)
    return module.run(ctx)


def publish_result(outcome: MergeOutcome, spec: MergeSpec, publisher, *, job_id: str | None = None):
    """Publish the merged folder to spec.publish.repo exactly once per job.

    The publisher itself looks for a commit carrying job_id on the branch (and still creates a tag
    a crashed attempt missed), so a retried job reuses its commit instead of publishing twice.
    """
    target = spec.publish
    if target is None:
        raise InputError("the spec has no `publish` target")
    raise_if_rejected(outcome)
    msg = f"Merge {spec.method} ({len(spec.experts)} experts)" + (f" job {job_id}" if job_id else "")
    return publisher.publish(outcome.out_dir, target.repo, branch=target.branch, tag=target.tag,
                             job_id=job_id, message=msg)
