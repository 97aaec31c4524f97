"""The scheduler loop (`alloy scheduler` runs `python -m workers.scheduler`): turns due schedules into
jobs, exactly once per run.

Any number of scheduler processes may run (for availability). Each tick:

1. Finish runs that a dead scheduler recorded but left without a job (`pending`): creating the job
   again with the run's unique key returns the job if it exists, so this never makes a second one.
2. For each due schedule, take its lease (a conditional UPDATE: one process wins), then
   - cron: find the due times since `next_due_at`. One on time → run it. Several, or one later than
     the misfire grace (nobody was running) → catch-up: `once` runs the latest of them, `skip`
     records a skipped run. A run whose resolved input commits equal those of the last run that did
     not fail is recorded as skipped ("inputs unchanged"): it would publish a duplicate.
   - on_new_revision: read the hub heads of the base and every expert; if a commit differs from
     the last run's (or there is no run yet), run.
   A run pins the spec to the commits it read (`org/name@<sha>`), renders the per-run tag, is
   recorded (run counter compare-and-set), and its job is created with the unique key
   `schedule:<id>:<n>` through the same store call and checks as `POST /v1/jobs`, then woken.
3. Release the lease with the next due time.

The clock is the store's (`Store(url, clock=...)`), so tests step time instead of sleeping.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.admission import AdmissionError, check_admission
from jobs.models import Schedule, ScheduleRun
from jobs.queue import EnqueueFn, producer, queue_for, send, wake
from jobs.schedule_store import ScheduleStore, job_key
from jobs.settings import Settings, worker_name
from jobs.states import QUEUED
from jobs.store import Store
from jobs.triggers import (
    MAX_MISSED_COUNTED,
    CronTrigger,
    RevisionTrigger,
    changes,
    due_between,
    input_refs,
    inputs_key,
    next_cron,
    parse_trigger,
    pin,
    render_tag,
    same_commits,
)
from merge_ops.errors import AlloyError
from merge_ops.spec import MergeSpec, format_validation_error
from workers.process import run_until_signalled

log = logging.getLogger("alloy.scheduler")

HeadFn = Callable[[str, str], str]  # (model ref, tenant) -> the commit it points at now


class SchedulerSettings(BaseSettings):
    """`ALLOY_SCHEDULER_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="ALLOY_SCHEDULER_", env_ignore_empty=True, extra="ignore")
    tick_seconds: float = Field(1.0, gt=0, description="how often a scheduler looks for due schedules")
    lease_seconds: float = Field(60.0, gt=0, description="a schedule being evaluated is held this long")
    misfire_grace_seconds: float = Field(
        60.0, ge=0, description="a cron run this late counts as missed (catch-up policy applies)")
    pending_after_seconds: float = Field(
        15.0, gt=0, description="a run left without a job this long is finished by any scheduler")


@dataclass
class Outcome:
    """What one tick did with one schedule (for logs and tests)."""

    schedule_id: str
    status: str  # submitted | skipped | failed | unchanged | error
    run: ScheduleRun | None = None
    detail: str = ""


def short(commit: str | None) -> str:
    if not commit:
        return "none"
    return commit[:19] if commit.startswith("local:") else commit[:12]


class Scheduler:
    def __init__(self, store: Store, settings: Settings, config: SchedulerSettings | None = None, *,
                 heads: HeadFn | None = None, enqueue: EnqueueFn | None = None, owner: str | None = None):
        self.store, self.settings = store, settings
        self.cfg = config or SchedulerSettings()
        self.schedules = ScheduleStore(store)
        self.heads = heads or self._hub_head
        self._enqueue = enqueue
        self.owner = owner or f"scheduler:{worker_name()}"

    # -- the outside world ------------------------------------------------------------------------
    def _hub_head(self, ref: str, tenant: str) -> str:
        from merge_ops.sources import head_commit

        return head_commit(ref, token=self.settings.hub_token(tenant),  # the tenant's, as for its jobs
                           endpoint=self.settings.hub_endpoint, allowed_roots=self.settings.roots)

    def enqueue(self, job_id: str, queue: str) -> None:
        if self._enqueue is None:
            app = producer(self.settings)
            self._enqueue = lambda j, q: send(j, q, app)
        self._enqueue(job_id, queue)

    # -- one pass ---------------------------------------------------------------------------------
    def tick(self) -> list[Outcome]:
        t = self.store.clock()
        out = []
        for run, tenant in self.schedules.pending(t - timedelta(seconds=self.cfg.pending_after_seconds)):
            try:
                out.append(self._finish_pending(run, tenant))
            except Exception as e:  # one bad run must not stall every schedule
                log.exception("run %s: could not create its job", run.id)
                out.append(Outcome(run.schedule_id, "error", run, str(e)))
        for sid in self.schedules.due(t):
            sch = self.schedules.claim(sid, self.owner, t, self.cfg.lease_seconds)
            if sch is None:
                continue  # another scheduler holds it
            error = None
            try:
                outcome, nxt = self._evaluate(sch, t)
            except Exception as e:  # a DB blip or a bug: keep the loop alive, retry next tick
                log.exception("schedule %s: evaluation failed", sid)
                outcome, nxt = Outcome(sid, "error", detail=str(e)), t + timedelta(seconds=self.cfg.tick_seconds)
                error = f"{type(e).__name__}: {e}"[:2000]
            if outcome.status in ("error", "failed") and error is None:
                error = outcome.detail  # shown on the schedule until a later evaluation goes through
            self.schedules.release(sid, self.owner, nxt, last_error=error)
            out.append(outcome)
        for o in out:
            if o.status != "unchanged":
                log.info("schedule %s: %s %s", o.schedule_id, o.status, o.detail)
        return out

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("scheduler %s: tick every %.1f s", self.owner, self.cfg.tick_seconds)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # database unreachable: try again next tick
                log.exception("scheduler tick failed")
            stop.wait(self.cfg.tick_seconds)

    # -- deciding ---------------------------------------------------------------------------------
    def _evaluate(self, sch: Schedule, t: datetime) -> tuple[Outcome, datetime]:
        trigger = parse_trigger(sch.trigger)
        if isinstance(trigger, CronTrigger):
            return self._cron(sch, trigger, t)
        return self._revision(sch, trigger, t)

    def _cron(self, sch: Schedule, trig: CronTrigger, t: datetime) -> tuple[Outcome, datetime]:
        nxt = next_cron(trig, t)
        count, earliest, due = due_between(trig, sch.next_due_at, t)
        if due is None:  # next_due_at was not a cron time (trigger changed under us): realign
            return Outcome(sch.id, "unchanged"), nxt
        key = f"due:{due.isoformat()}"
        # missed = the oldest unhandled due time is older than the grace: no scheduler was running.
        # Several due times within the grace (a per-second cron, a slow tick) just coalesce.
        missed = (t - earliest).total_seconds() > self.cfg.misfire_grace_seconds
        reason = "cron" if count == 1 else f"cron ({count} due times coalesced)"
        if missed:
            what = f"{count}{'+' if count >= MAX_MISSED_COUNTED else ''} due time(s) up to {due.isoformat()} passed " \
                   "while no scheduler was running"
            if sch.catch_up == "skip":
                return self._record(sch, key, due, "skipped", f"{what}; catch_up is `skip`", []), nxt
            reason = f"catch-up: {what}; catch_up `once` runs the latest"
        try:
            inputs = self._read_inputs(sch)
        except AlloyError as e:
            return self._record(sch, key, due, "failed", f"could not read the inputs' commits: {e.message}",
                                []), nxt
        prev = self.schedules.last_submitted(sch.id, ok_only=True)
        if prev is not None and same_commits(prev[0].inputs, inputs):
            run, state = prev
            why = (f"inputs unchanged since run {run.n} (job {run.job_id}, {state or 'pending'}): "
                   "nothing new to publish")
            return self._record(sch, key, due, "skipped", why, [], inputs=inputs), nxt
        return self._submit(sch, inputs, due, reason, key, changes(prev[0].inputs if prev else None, inputs)), nxt

    def _revision(self, sch: Schedule, trig: RevisionTrigger, t: datetime) -> tuple[Outcome, datetime]:
        nxt = t + timedelta(seconds=trig.poll_seconds)
        try:
            inputs = self._read_inputs(sch)
        except AlloyError as e:  # the hub is down or refuses: keep polling, show why on the schedule
            return Outcome(sch.id, "error", detail=f"could not read the inputs' commits: {e.message}"), nxt
        prev = self.schedules.last_submitted(sch.id)
        if prev is not None and same_commits(prev[0].inputs, inputs):
            return Outcome(sch.id, "unchanged"), nxt
        moved = changes(prev[0].inputs if prev else None, inputs)
        reason = "first run" if prev is None else "new revision: " + ", ".join(
            f"{c['name']} {short(c['from'])} -> {short(c['to'])}" for c in moved)
        key = f"inputs:{inputs_key(inputs)}:after:{sch.run_count}"
        return self._submit(sch, inputs, t, reason, key, moved), nxt

    def _read_inputs(self, sch: Schedule) -> list[dict[str, Any]]:
        spec = MergeSpec.model_validate(sch.spec)
        return [{**row, "commit": self.heads(row["ref"], sch.tenant)} for row in input_refs(spec)]

    # -- recording --------------------------------------------------------------------------------
    def _record(self, sch: Schedule, key: str, due: datetime, status: str, reason: str,
                moved: list[dict[str, Any]], *, inputs: list[dict[str, Any]] | None = None) -> Outcome:
        run = self.schedules.record_run(self.schedules.new_run(
            sch, run_key=key, n=None, status=status, reason=reason, due_at=due, inputs=inputs or [],
            changes=moved))
        if run is None:
            return Outcome(sch.id, "unchanged", detail="recorded by another scheduler")
        return Outcome(sch.id, status, run, reason)

    def _submit(self, sch: Schedule, inputs: list[dict[str, Any]], due: datetime, reason: str, key: str,
                moved: list[dict[str, Any]]) -> Outcome:
        n = sch.run_count + 1
        tz = sch.trigger.get("timezone", "UTC")
        tag = render_tag(sch.tag_template, n, due, tz) if sch.tag_template and sch.spec.get("publish") else None
        pinned = pin(sch.spec, inputs, tag)
        try:  # the same checks as POST /v1/jobs (rules may have changed since the schedule was made)
            spec = MergeSpec.model_validate(pinned)
            check_admission(spec, sch.tenant, self.store, self.settings)
        except ValidationError as e:
            return self._record(sch, key, due, "failed", f"the pinned spec is invalid: "
                                f"{format_validation_error(e)}", moved, inputs=inputs)
        except AdmissionError as e:
            return self._record(sch, key, due, "failed", e.message, moved, inputs=inputs)
        run = self.schedules.record_run(self.schedules.new_run(
            sch, run_key=key, n=n, status="pending", reason=reason, due_at=due, inputs=inputs, changes=moved,
            spec=spec.model_dump(mode="json"), tag=tag))
        if run is None:
            return Outcome(sch.id, "unchanged", detail=f"run {n} recorded by another scheduler")
        return self._finish_pending(run, sch.tenant)

    def _finish_pending(self, run: ScheduleRun, tenant: str) -> Outcome:
        """Create (or find) the run's job and wake a worker; safe to repeat."""
        spec = MergeSpec.model_validate(run.spec)
        queue = queue_for(spec.method_def(), self.settings)
        job, _ = self.store.create_job(tenant=tenant, spec=run.spec, method=spec.method, queue=queue,
                                       unique_key=job_key(run.schedule_id, run.n), source="schedule",
                                       max_attempts=self.settings.max_attempts)
        self.schedules.attach_job(run.id, job.id)
        run.job_id, run.status = job.id, "submitted"
        if job.state == QUEUED:  # a repeated wake-up is harmless: the worker's claim is conditional
            wake(self.store, self.enqueue, job.id, queue)
        return Outcome(run.schedule_id, "submitted", run, f"run {run.n} -> job {job.id}: {run.reason}")


def run_forever(settings: Settings, stop: threading.Event | None = None) -> None:
    Scheduler(Store(settings.database_url), settings).run_forever(stop)


if __name__ == "__main__":  # `alloy scheduler` runs this process
    raise SystemExit(run_until_signalled(run_forever))
