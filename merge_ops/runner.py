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

from merge_ops.calibration import calibration_files
from merge_ops.context import SILENT, Channel, JobContext, MethodResult, ResolvedModel, report
from merge_ops.errors import InputError
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


def resolve_inputs(spec: MergeSpec, opts: ResolveOptions, channel: Channel | None = None
                   ) -> tuple[ResolvedModel | None, list[ResolvedModel]]:
    from merge_ops.sources import resolve

    refs = ([spec.base] if spec.base else []) + [e.model for e in spec.experts]
    out: list[ResolvedModel] = []
    for i, ref in enumerate(refs):
        report(channel, "resolve", i, len(refs))
        out.append(resolve(ref, token=opts.token, endpoint=opts.endpoint, cache_dir=opts.cache_dir,
                           allowed_roots=opts.allowed_roots))
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
    base, experts = resolve_inputs(spec, resolve_options or ResolveOptions(), channel)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        ctx = JobContext(spec=spec, base=base, experts=experts, out_dir=tmp, device=device,
                         calibration=cal, channel=channel, job_id=job_id)
        ctx.check_cancel()
        result = run_method(ctx)
        ctx.report("write", 0, 1)
        result.metrics.setdefault("seconds", round(time.perf_counter() - t0, 3))
        write_card(tmp, spec, base, experts, result, job_id=job_id, calibration=cal)
        ctx.report("write", 1, 1)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeOutcome(out_dir, base, experts, result, time.perf_counter() - t0)


def run_method(ctx: JobContext) -> MethodResult:
    """Run the spec's method on resolved inputs: static methods through the streaming driver, learned
    ones through the learned driver, OT fusion through its own `run`."""
    from merge_ops.methods import implementation

    m = ctx.spec.method_def()
    if m.kind == "static":
        from merge_ops.static import driver

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
    msg = f"Merge {spec.method} ({len(spec.experts)} experts)" + (f" job {job_id}" if job_id else "")
    return publisher.publish(outcome.out_dir, target.repo, branch=target.branch, tag=target.tag,
                             job_id=job_id, message=msg)
