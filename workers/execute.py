"""Drive one job through its stages: claim → resolve/plan/(learn)/merge/write → publish → record.

Everything this writes goes through the fenced Store calls, so a worker that lost its lease (reaped
while stalled) stops at its next progress call without touching the record of the new attempt.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.admission import AdmissionError, check_model_sources, publish_problem
from jobs.queue import GPU
from jobs.server_paths import PathHider, model_refs
from jobs.settings import Settings, worker_name
from jobs.states import CANCELLED, FAILED, REJECTED, SUCCEEDED
from jobs.store import Store
from merge_ops.errors import AlloyError, Cancelled
from merge_ops.evaluation.gates import Rejected
from merge_ops.sources import scrub
from merge_ops.spec import MergeSpec

log = logging.getLogger("alloy.worker")
_now = time.monotonic  # the job timeout's clock (tests step it)


class Reporter:
    """The job's progress-and-cancel channel (merge_ops.context.Channel): progress() and
    cancel_requested() as throttled, fenced writes to the job store, plus a heartbeat thread."""

    def __init__(self, store: Store, job_id: str, attempt: int, settings: Settings):
        self.store, self.job_id, self.attempt, self.s = store, job_id, attempt, settings
        self.stage: str | None = None
        self.cancel = False  # a cancel was requested, this attempt lost the job, or it timed out
        # ALLOY_JOB_TIMEOUT_SECONDS, per attempt: past it the job stops at its next progress or cancel
        # check (recorded as failed `timeout`); a step that never checks is failed by the heartbeat
        # thread after a grace period, and the fence keeps the late step from writing anything
        self.deadline = _now() + settings.job_timeout_seconds
        self.timed_out = False
        self._last = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        # renews the lease even while one step runs for a long time (no progress calls)
        while not self._stop.wait(self.s.heartbeat_seconds):
            self._write()
            if self._past_deadline() and _now() > self.deadline + self._grace():
                if self.store.finish(self.job_id, self.attempt, FAILED, error_code="timeout",
                                     error_message=timeout_message(self.s)):
                    log.warning("job %s: past its time limit and not stopping; recorded as failed", self.job_id)
                return

    def _grace(self) -> float:
        return max(60.0, 3 * self.s.heartbeat_seconds)

    def _past_deadline(self) -> bool:
        if not self.timed_out and _now() >= self.deadline:
            self.timed_out = self.cancel = True
        return self.timed_out

    def _write(self, **progress: Any) -> None:
        with self._lock:
            try:
                owner, cancel = self.store.heartbeat(self.job_id, self.attempt, self.s.lease_seconds,
                                                     **progress)
            except Exception:  # a DB blip: the lease has slack; the next beat retries
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)
                return
            self._last = time.monotonic()
            if not owner:
                log.warning("job %s attempt %d: lease lost, stopping", self.job_id, self.attempt)
            self.cancel = self.cancel or cancel or not owner

    def enter_stage(self, stage: str) -> None:
        if stage != self.stage:
            self.stage = stage
            if not self.store.set_stage(self.job_id, self.attempt, stage):
                self.cancel = True

    def progress(self, stage: str, step: int, total: int | None, loss: float | None = None) -> None:
        self.enter_stage(stage)
        self._past_deadline()
        done = total is not None and step >= total
        if done or time.monotonic() - self._last >= self.s.progress_interval:
            self._write(stage=stage, step=step, total=total,
                        loss=None if loss is None else float(loss), progress_event=True)
        if self.cancel:
            raise Cancelled("cancelled on request")

    def cancel_requested(self) -> bool:
        self._past_deadline()
        if time.monotonic() - self._last >= self.s.progress_interval:
            self._write()
        return self.cancel


def redact(text: str, settings: Settings) -> str:
    """Hub tokens must never reach a job record: scrub every tenant's from any message we store."""
    return scrub(text, *(tok.get_secret_value() for tok in settings.hub_tokens.values()))


def run_job(job_id: str, store: Store, settings: Settings) -> str:
    """Run one delivery of job `job_id`; returns what happened (for logs and tests)."""
    claim = store.claim(job_id, worker_name(), settings.lease_seconds)
    if claim is None:
        log.info("job %s: not claimable (duplicate delivery, cancelled or finished)", job_id)
        return "skipped"
    job, attempt = claim.job, claim.attempt
    log.info("job %s: attempt %d started", job_id, attempt)
    job_dir = settings.data_dir / "jobs" / job_id
    work = job_dir / f"attempt-{attempt}"
    for old in job_dir.glob("attempt-*") if job_dir.exists() else []:
        shutil.rmtree(old, ignore_errors=True)  # leftovers of an attempt whose worker died
    rep = Reporter(store, job_id, attempt, settings)
    hide = _path_hider(job.spec, settings, job_dir)
    try:
        with rep:
            result = _run(job.spec, job.tenant, job.queue, job_id, work, rep, store, settings)
    except Rejected as e:  # the publish_if gate: the job ends `rejected` with the table, nothing published
        shutil.rmtree(work, ignore_errors=True)
        ok = store.finish(job_id, attempt, REJECTED, result=hide(e.report), error_code=e.code,
                          error_message=hide(redact(e.message, settings)))
        return "rejected" if ok else "fenced"
    except Exception as e:
        shutil.rmtree(work, ignore_errors=True)
        if rep.timed_out and isinstance(e, Cancelled):
            ok = store.finish(job_id, attempt, FAILED, error_code="timeout", error_message=timeout_message(settings))
            return "timeout" if ok else "fenced"
        return _record_failure(store, settings, job_id, attempt, e, hide)
    if result["published"] is not None:
        shutil.rmtree(work, ignore_errors=True)  # the hub holds it now; coefficients were copied out
    else:  # unpublished: the only copy stays here, named relative to the data dir (never its path)
        result["output"] = (work / "model").relative_to(settings.data_dir).as_posix()
    if store.finish(job_id, attempt, SUCCEEDED, result=hide(result)):
        log.info("job %s succeeded", job_id)
        return "succeeded"
    return "fenced"


def timeout_message(settings: Settings) -> str:
    return (f"the job ran longer than this server's limit of {settings.job_timeout_seconds:g} s "
            "(ALLOY_JOB_TIMEOUT_SECONDS) and was stopped: use fewer steps or smaller inputs, or ask the operator")


def _path_hider(spec_doc: dict[str, Any], settings: Settings, job_dir: Path) -> Callable[[Any], Any]:
    """What the job record gets instead of server paths (jobs/server_paths.py)."""
    return PathHider(model_refs(spec_doc), settings, job_dir).value


def _record_failure(store: Store, settings: Settings, job_id: str, attempt: int, e: Exception,
                    hide: Callable[[Any], Any]) -> str:
    if isinstance(e, Cancelled):
        ok = store.finish(job_id, attempt, CANCELLED, error_code="cancelled",
                          error_message="cancelled on request")
        return "cancelled" if ok else "fenced"
    if isinstance(e, AlloyError):
        code, msg = e.code, hide(redact(e.message, settings))
        log.info("job %s failed: %s: %s", job_id, code, msg)
    else:
        log.exception("job %s: unexpected error", job_id, exc_info=e)
        code, msg = "internal_error", hide(redact(f"unexpected {type(e).__name__} in the worker: {e}", settings))[:2000]
    return "failed" if store.finish(job_id, attempt, FAILED, error_code=code, error_message=msg) else "fenced"


def _run(spec_doc: dict[str, Any], tenant: str, queue: str, job_id: str, work: Path, rep: Reporter,
         store: Store, settings: Settings) -> dict[str, Any]:
    from merge_ops.card import model_name
    from merge_ops.runner import (  # torch: only in the worker
        ResolveOptions,
        publish_result,
        raise_if_rejected,
        run_merge,
    )

    spec = MergeSpec.model_validate(spec_doc)
    # again at resolve: the settings (roots, data dir, hub orgs) may have changed since submit
    check_model_sources(spec, settings)
    if (why := publish_problem(spec, tenant, settings)) is not None:
        raise AdmissionError(why, param="publish.repo")
    opts = ResolveOptions(token=settings.hub_token(tenant), endpoint=settings.hub_endpoint,
                          cache_dir=settings.data_dir / "cache", allowed_roots=settings.roots)
    published = None
    if spec.publish is not None:
        from merge_ops.runner import published_evaluation

        target = spec.publish
        published = lambda: published_evaluation(_publisher(spec, tenant, settings),  # noqa: E731
                                                  target.repo, target.branch)
    from merge_ops.learned.launch import ranks, world_for

    device = _device(queue)
    with ranks(world_for(device)):  # a learned job runs on every GPU the worker owns (launch.py)
        outcome = run_merge(spec, work / "model", device=device, channel=rep, job_id=job_id,
                            resolve_options=opts, find_calibration_set=_set_finder(store, tenant),
                            eval_cache_dir=settings.data_dir / "evaluation" / "cache",
                            published_evaluation=published)
    if outcome.rejected:
        try:
            raise_if_rejected(outcome)
        except Rejected as e:  # the job's result carries the results and the table that failed it
            e.report = {"evaluation": _jsonable(outcome.evaluation), "gates": e.report,
                        "table": e.report.get("table")}
            raise
    result: dict[str, Any] = {
        "metrics": _jsonable(outcome.result.metrics),
        "inputs": [{"model": model_name(m), "commit": m.commit} for m in  # hub id or fingerprint name
                   ([outcome.base] if outcome.base else []) + outcome.experts],
        "artifacts": _keep_artifacts(outcome.out_dir, outcome.result.artifacts, work.parent),
        "published": None,
    }
    if outcome.evaluation is not None:
        result["evaluation"] = _jsonable(outcome.evaluation)
    if spec.publish is not None:
        rep.enter_stage("publish")
        if rep.cancel_requested():  # also the fence: never publish for an attempt that lost the job
            raise Cancelled("cancelled before publishing")
        ref = publish_result(outcome, spec, _publisher(spec, tenant, settings), job_id=job_id)
        result["published"] = _jsonable(dataclasses.asdict(ref) if dataclasses.is_dataclass(ref)
                                        else dict(vars(ref)))
        if str(result["published"].get("url") or "").startswith("file:"):  # the local hub's folder
            result["published"]["url"] = None
    return result


def _set_finder(store: Store, tenant: str):
    """Calibration-set id -> its file, within the job's tenant (None when gone)."""
    def find(set_id: str) -> Path | None:
        cs = store.get_calibration_set(set_id, tenant)
        return None if cs is None else Path(cs.path)

    return find


def _device(queue: str) -> str:
    if queue != GPU:  # a queue name; the device is torch's
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _publisher(spec: MergeSpec, tenant: str, settings: Settings):
    from merge_ops.publish import make_publisher

    return make_publisher(spec.publish.hub, root=settings.hub_root, endpoint=settings.hub_endpoint,
                          token=settings.hub_token(tenant), private=spec.publish.private)


def _keep_artifacts(out_dir: Path, artifacts: dict[str, str], job_dir: Path) -> dict[str, str]:
    """Copy the coefficient files next to the job (served by /coefficients) and list them."""
    kept = {}
    for name in ("coefficients", "coefficients_png"):
        rel = artifacts.get(name)
        if rel and (out_dir / rel).is_file():
            dst = job_dir / ("coefficients.png" if name.endswith("png") else "coefficients.json")
            shutil.copyfile(out_dir / rel, dst)
            kept[name] = dst.name
    return kept


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    return str(x)
