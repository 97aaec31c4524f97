"""Run one MergeSpec in-process: resolve → (learn) → merge → write, then optionally publish.

This is the one entry point both `alloy merge` and the Celery worker use, so a merge behaves the
same on a laptop and in the service. Stages report through `progress(stage, step, total, loss)` and
cancellation is checked between steps through `cancel_requested()`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from merge_ops.errors import AlloyError, InputError
from merge_ops.job import JobContext, MethodResult, ProgressFn, ResolvedModel, _no_progress
from merge_ops.spec import MergeSpec


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


def resolve_inputs(spec: MergeSpec, opts: ResolveOptions, progress: ProgressFn = _no_progress
                   ) -> tuple[ResolvedModel | None, list[ResolvedModel]]:
    from merge_ops.sources import resolve

    refs = ([spec.base] if spec.base else []) + [e.model for e in spec.experts]
    out: list[ResolvedModel] = []
    for i, ref in enumerate(refs):
        progress("resolve", i, len(refs))
        out.append(resolve(ref, token=opts.token, endpoint=opts.endpoint, cache_dir=opts.cache_dir,
                           allowed_roots=opts.allowed_roots))
    progress("resolve", len(refs), len(refs))
    return (out[0], out[1:]) if spec.base else (None, out)


def run_merge(
    spec: MergeSpec,
    out_dir: Path,
    *,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    cancel_requested: Callable[[], bool] | None = None,
    job_id: str | None = None,
    resolve_options: ResolveOptions | None = None,
    calibration: dict[str, Path] | None = None,
) -> MergeOutcome:
    """Merge into `out_dir` (created; must be empty or absent). Raises AlloyError subclasses.

    The checkpoint is written into a temporary sibling folder and renamed into place at the end, so
    a failed or cancelled merge never leaves a half-written model where the caller looks for one.
    """
    from merge_ops.card import write_card

    t0 = time.perf_counter()
    progress = progress or _no_progress
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"output folder {out_dir} is not empty: choose a new folder or empty it")
    base, experts = resolve_inputs(spec, resolve_options or ResolveOptions(), progress)
    cal = calibration if calibration is not None else _local_calibration(spec)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        ctx = JobContext(spec=spec, base=base, experts=experts, out_dir=tmp, device=device,
                         calibration=cal, progress=progress,
                         cancel_requested=cancel_requested or (lambda: False), job_id=job_id)
        ctx.check_cancel()
        result = _method_runner(spec)(ctx)
        progress("write", 0, 1)
        result.metrics.setdefault("seconds", round(time.perf_counter() - t0, 3))
        write_card(tmp, spec, base, experts, result, job_id=job_id)
        progress("write", 1, 1)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeOutcome(out_dir, base, experts, result, time.perf_counter() - t0)


def _method_runner(spec: MergeSpec) -> Callable[[JobContext], MethodResult]:
    m = spec.method_def()
    if m.kind == "static":
        from merge_ops.merge import run

        return run
    module = m.module()
    if not hasattr(module, "run"):
        raise AlloyError(f"method {m.name} is declared but its runner is missing")
    return module.run


def _local_calibration(spec: MergeSpec) -> dict[str, Path]:
    """Calibration entries that are file paths (the service maps set ids to files itself)."""
    if spec.calibration is None:
        return {}
    out = {}
    for task, src in spec.calibration.tasks.items():
        p = Path(src).expanduser()
        if not p.is_file():
            raise InputError(f"calibration data for {task!r}: {src!r} is not a file (JSONL expected)",
                             param=f"calibration.tasks.{task}")
        out[task] = p
    return out


def publish_result(outcome: MergeOutcome, spec: MergeSpec, publisher, *, job_id: str | None = None):
    """Publish the merged folder to spec.publish.repo exactly once per job.

    The publisher itself looks for a commit carrying job_id on the branch (and still creates a tag
    a crashed attempt missed), so a retried job reuses its commit instead of publishing twice.
    """
    target = spec.publish
    if target is None:
        raise InputError("the spec has no `publish` target")
    msg = f"Merge {spec.method} ({len(spec.experts)} experts)" + (f" job {job_id}" if job_id else "")
    return publisher.publish(outcome.out_dir, target.repo, branch=target.branch, tag=target.tag,
                             job_id=job_id, message=msg)
