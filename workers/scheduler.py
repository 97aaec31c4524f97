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
   A schedule asked to "run now" (POST /v1/schedules/{id}/run) runs once at its next tick, whatever
   its trigger says, recorded like any run (reason "run now").
3. Release the lease with the next due time.

Also each tick, in this order before 2: runs whose job has ended are settled (the schedule's health:
last success, consecutive failures; a run whose job was `rejected` becomes `rejected`), a failed job
gets a retry time (backoff doubling from ALLOY_SCHEDULER_RETRY_BACKOFF_SECONDS, at most
ALLOY_SCHEDULER_RETRY_MAX retries), and due retries become new runs (same inputs, the next run
number, a fresh tag). Skipped-run rows older than the retention period are deleted.

Load sharing: a tick claims at most ALLOY_SCHEDULER_CLAIM_LIMIT schedules, drawn at random from the
due ones (SKIP LOCKED on PostgreSQL), so several schedulers each take a share.

Tags: a tag template never reuses a tag that exists on the target repo (a schedule deleted and
re-added restarts {n}): `run-3` taken -> `run-3-2`. The publisher checks again before committing.

The clock is the store's (`Store(url, clock=...)`), so tests step time instead of sleeping.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.admission import AdmissionError, check_admission, quota_used
from jobs.models import Schedule, ScheduleRun
from jobs.queue import EnqueueFn, producer, queue_for, send, wake
from jobs.schedule_store import ScheduleStore, job_key
from jobs.settings import Settings, worker_name
from jobs.states import FAILED, QUEUED
from jobs.store import Store
from jobs.triggers import (
    MAX_MISSED_COUNTED,
    CronTrigger,
    RevisionTrigger,
    changes,
    due_between,
    free_tag,
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

# what happens to a run refused for the tenant's job quota, by the kind of its run key
QUOTA_NEXT = {"due": "this due time is skipped; the schedule runs again at its next due time",
              "manual": "the run-now request is dropped: ask again once jobs have finished",
              "inputs": "deferred: the run is made at the first evaluation under the limit",
              "retry": "deferred: the retry is made at the first evaluation under the limit"}
HeadFn = Callable[[str, str], str]  # (model ref, tenant) -> the commit it points at now
TagsFn = Callable[[dict[str, Any], str], set[str]]  # (spec's publish target, tenant) -> tags on the repo


class SchedulerSettings(BaseSettings):
    """`ALLOY_SCHEDULER_*` environment variables."""

    # allow_inf_nan: `inf` seconds would stop the loop (or a lease) for good
    model_config = SettingsConfigDict(env_prefix="ALLOY_SCHEDULER_", env_ignore_empty=True, extra="ignore",
                                      allow_inf_nan=False)
    tick_seconds: float = Field(1.0, gt=0, description="how often a scheduler looks for due schedules")
    lease_seconds: float = Field(60.0, gt=0, description="a schedule being evaluated is held this long")
    misfire_grace_seconds: float = Field(
        60.0, ge=0, description="a cron run this late counts as missed (catch-up policy applies)")
    pending_after_seconds: float = Field(
        15.0, gt=0, description="a run left without a job this long is finished by any scheduler")
    claim_limit: int = Field(10, ge=1, description="schedules one scheduler takes per tick (the rest is "
                             "left to the other schedulers, or its next tick)")
    retry_max: int = Field(2, ge=0, description="retries of a run whose job failed (0: none)")
    retry_backoff_seconds: float = Field(60.0, gt=0, description="wait before the first retry; doubles "
                                         "for each further one")
    retry_backoff_max_seconds: float = Field(3600.0, gt=0, description="longest wait between retries")
    skipped_retention_seconds: float = Field(7 * 86400.0, gt=0,
                                             description="skipped-run records older than this are deleted")


@dataclass
class Outcome:
    """What one tick did with one schedule (for logs and tests)."""

    schedule_id: str
    status: str  # submitted | skipped | deferred | failed | unchanged | error | settled
    run: ScheduleRun | None = None
    detail: str = ""


def short(commit: str | None) -> str:
    if not commit:
        return "none"
    return commit[:19] if commit.startswith("local:") else commit[:12]


class Scheduler:
    def __init__(self, store: Store, settings: Settings, config: SchedulerSettings | None = None, *,
                 heads: HeadFn | None = None, enqueue: EnqueueFn | None = None, owner: str | None = None,
                 tags: TagsFn | None = None):
        self.store, self.settings = store, settings
        self.cfg = config or SchedulerSettings()
        self.schedules = ScheduleStore(store)
        self.heads = heads or self._hub_head
        self.tags = tags or self._hub_tags
        self._enqueue = enqueue
        self.owner = owner or f"scheduler:{worker_name()}"

    # -- the outside world ------------------------------------------------------------------------
    def _hub_head(self, ref: str, tenant: str) -> str:
        from merge_ops.sources import head_commit

        return head_commit(ref, token=self.settings.hub_token(tenant),  # the tenant's, as for its jobs
                           endpoint=self.settings.hub_endpoint, allowed_roots=self.settings.roots)

    def _hub_tags(self, publish: dict[str, Any], tenant: str) -> set[str]:
        """Tags on the publish target now (none when the repo does not exist yet)."""
        repo = publish["repo"]
        if publish.get("hub", "local") == "local":
            from merge_ops.publish import LocalHub

            return set(LocalHub(self.settings.hub_root).refs(repo)["tags"])
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            refs = HfApi(endpoint=self.settings.hub_endpoint, token=self.settings.hub_token(tenant)).list_repo_refs(repo)
        except RepositoryNotFoundError:
            return set()
        return {t.name for t in refs.tags}

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
            out.append(self._guard(run.schedule_id, lambda r=run, tn=tenant: self._finish_pending(r, tn), run))
        for run, job in self.schedules.unsettled():
            out.append(self._guard(run.schedule_id, lambda r=run, j=job: self._settle(r, j, t), run))
        for run, sch in self.schedules.retries_due(t):
            out.append(self._guard(sch.id, lambda r=run, sc=sch: self._retry(r, sc, t), run))
        for sch in self.schedules.claim_due(self.owner, t, self.cfg.lease_seconds, self.cfg.claim_limit):
            error, requested = None, sch.run_requested_at
            try:
                if requested is not None:  # run now; the trigger's own due time is left as it was
                    outcome, nxt = self._run_now(sch, requested), sch.next_due_at
                else:
                    outcome, nxt = self._evaluate(sch, t)
            except Exception as e:  # a DB blip or a bug: keep the loop alive, retry next tick
                log.exception("schedule %s: evaluation failed", sch.id)
                outcome, nxt = Outcome(sch.id, "error", detail=str(e)), t + timedelta(seconds=self.cfg.tick_seconds)
                error, requested = f"{type(e).__name__}: {e}"[:2000], None
            if outcome.status in ("error", "failed") and error is None:
                error = outcome.detail  # shown on the schedule until a later evaluation goes through
            self.schedules.release(sch.id, self.owner, nxt, last_error=error, requested=requested)
            out.append(outcome)
        self.schedules.prune_skipped(t - timedelta(seconds=self.cfg.skipped_retention_seconds))
        for o in out:
            if o.status != "unchanged" and not (o.status == "deferred" and o.run is None):  # logged once
                log.info("schedule %s: %s %s", o.schedule_id, o.status, o.detail)
        return out

    @staticmethod
    def _guard(schedule_id: str, step: Callable[[], Outcome], run: ScheduleRun) -> Outcome:
        try:
            return step()
        except Exception as e:  # one bad run must not stall every schedule
            log.exception("run %s of schedule %s: step failed", run.id, schedule_id)
            return Outcome(schedule_id, "error", run, str(e))

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
            if sch.catch_up == "skip" and (t - due).total_seconds() > self.cfg.misfire_grace_seconds:
                return self._record(sch, key, due, "skipped", f"{what}; catch_up is `skip`", []), nxt
            if sch.catch_up == "skip":  # the latest due time is still within the grace: it runs on time
                reason = f"cron ({count - 1} earlier due time(s) skipped: catch_up is `skip`)"
            else:
                reason = f"catch-up: {what}; catch_up `once` runs the latest"
        template = MergeSpec.model_validate(sch.spec)  # parsed once per evaluation
        try:
            inputs = self._read_inputs(sch, template)
        except AlloyError as e:
            return self._record(sch, key, due, "failed", f"could not read the inputs' commits: "
                                f"{self._hint(e.message)}", []), nxt
        prev = self.schedules.last_submitted(sch.id, ok_only=True)
        if prev is not None and same_commits(prev[0].inputs, inputs):
            run, state = prev
            why = (f"inputs unchanged since run {run.n} (job {run.job_id}, {state or 'pending'}): "
                   "nothing new to publish")
            return self._record(sch, key, due, "skipped", why, [], inputs=inputs), nxt
        return self._submit(sch, inputs, due, reason, key, changes(prev[0].inputs if prev else None, inputs),
                            template), nxt

    def _revision(self, sch: Schedule, trig: RevisionTrigger, t: datetime) -> tuple[Outcome, datetime]:
        nxt = t + timedelta(seconds=trig.poll_seconds)
        template = MergeSpec.model_validate(sch.spec)  # parsed once per evaluation
        try:
            inputs = self._read_inputs(sch, template)
        except AlloyError as e:  # the hub is down or refuses: keep polling, show why on the schedule
            return Outcome(sch.id, "error", detail=f"could not read the inputs' commits: {self._hint(e.message)}"), nxt
        prev = self.schedules.last_submitted(sch.id)
        if prev is not None and same_commits(prev[0].inputs, inputs):
            return Outcome(sch.id, "unchanged"), nxt
        moved = changes(prev[0].inputs if prev else None, inputs)
        reason = "first run" if prev is None else "new revision: " + ", ".join(
            f"{c['name']} {short(c['from'])} -> {short(c['to'])}" for c in moved)
        key = f"inputs:{inputs_key(inputs)}:after:{sch.run_count}"
        return self._submit(sch, inputs, t, reason, key, moved, template), nxt

    def _run_now(self, sch: Schedule, requested: datetime) -> Outcome:
        """POST /v1/schedules/{id}/run: one run now, even if no input moved (recorded like any run)."""
        key = f"manual:{requested.isoformat()}:after:{sch.run_count}"
        template = MergeSpec.model_validate(sch.spec)  # parsed once per evaluation
        try:
            inputs = self._read_inputs(sch, template)
        except AlloyError as e:
            return self._record(sch, key, requested, "failed", f"run now: could not read the inputs' commits: "
                                f"{self._hint(e.message)}", [])
        prev = self.schedules.last_submitted(sch.id)
        return self._submit(sch, inputs, requested, f"run now (requested {requested.isoformat()})", key,
                            changes(prev[0].inputs if prev else None, inputs), template)

    @staticmethod
    def _hint(message: str) -> str:
        # merge_ops names the library's variables; this process reads the service's settings
        return message.replace("(HF_TOKEN)", "(ALLOY_HUB_TOKENS, per tenant)").replace(
            "HF_TOKEN", "ALLOY_HUB_TOKENS").replace("HF_ENDPOINT", "ALLOY_HUB_ENDPOINT")

    def _read_inputs(self, sch: Schedule, spec: MergeSpec) -> list[dict[str, Any]]:
        return [{**row, "commit": self.heads(row["ref"], sch.tenant)} for row in input_refs(spec)]

    # -- recording --------------------------------------------------------------------------------
    def _record(self, sch: Schedule, key: str, due: datetime, status: str, reason: str,
                moved: list[dict[str, Any]], *, inputs: list[dict[str, Any]] | None = None) -> Outcome:
        run = self.schedules.record_run(self.schedules.new_run(
            sch, run_key=key, n=None, status=status, reason=reason, due_at=due, inputs=inputs or [],
            changes=moved, scheduler=self.owner))
        if run is None:
            return Outcome(sch.id, "unchanged", detail="recorded by another scheduler")
        return Outcome(sch.id, status, run, reason)

    def _tag(self, sch: Schedule, n: int, due: datetime) -> tuple[str | None, str]:
        """The run's tag (skipping tags that exist on the target repo) and a note for the reason."""
        publish = sch.spec.get("publish")
        if not sch.tag_template or not publish:
            return None, ""
        tag = render_tag(sch.tag_template, n, due, sch.trigger.get("timezone", "UTC"))
        try:
            taken = self.tags(publish, sch.tenant)
        except Exception as e:  # the hub is down: the publisher checks the tag again before committing
            log.warning("schedule %s: could not list the tags of %s: %s", sch.id, publish.get("repo"), e)
            return tag, ""
        free = free_tag(tag, taken)
        if free is None:
            raise AlloyError(f"tag {tag!r} and its suffixed forms all exist on {publish['repo']}: change tag_template")
        return free, "" if free == tag else f"; tag {tag!r} exists on {publish['repo']}, using {free!r}"

    def _submit(self, sch: Schedule, inputs: list[dict[str, Any]], due: datetime, reason: str, key: str,
                moved: list[dict[str, Any]], template: MergeSpec) -> Outcome:
        n = sch.run_count + 1
        try:
            tag, note = self._tag(sch, n, due)
        except AlloyError as e:
            return self._record(sch, key, due, "failed", e.message, moved, inputs=inputs)
        return self._create(sch, pin(sch.spec, inputs, tag, template), n=n, key=key, due=due, reason=reason + note,
                            inputs=inputs, moved=moved, tag=tag)

    def _create(self, sch: Schedule, pinned: dict[str, Any], *, n: int, key: str, due: datetime, reason: str,
                inputs: list[dict[str, Any]], moved: list[dict[str, Any]], tag: str | None,
                **extra: Any) -> Outcome:
        try:  # the same checks as POST /v1/jobs (rules may have changed since the schedule was made)
            spec = MergeSpec.model_validate(pinned)
            check_admission(spec, sch.tenant, self.store, self.settings)
        except ValidationError as e:
            return self._record(sch, key, due, "failed", f"the pinned spec is invalid: "
                                f"{format_validation_error(e)}", moved, inputs=inputs)
        except AdmissionError as e:
            return self._record(sch, key, due, "failed", e.message, moved, inputs=inputs)
        if (used := quota_used(self.store, self.settings, sch.tenant)) is not None:
            return self._over_quota(sch, key, due, used, moved, inputs)
        run = self.schedules.record_run(self.schedules.new_run(
            sch, run_key=key, n=n, status="pending", reason=reason, due_at=due, inputs=inputs, changes=moved,
            spec=spec.model_dump(mode="json"), tag=tag, scheduler=self.owner, **extra))
        if run is None:
            return Outcome(sch.id, "unchanged", detail=f"run {n} recorded by another scheduler")
        return self._finish_pending(run, sch.tenant, spec)

    def _over_quota(self, sch: Schedule, key: str, due: datetime, used: int, moved: list[dict[str, Any]],
                    inputs: list[dict[str, Any]]) -> Outcome:
        """The tenant is at its job quota: no job. A cron due time or a run-now request is recorded as
        skipped (the next due time runs); a new revision or a retry is deferred: recorded once as
        skipped (key `<run key>:quota`) and tried again at every evaluation until the quota allows it."""
        kind = key.split(":", 1)[0]
        then = QUOTA_NEXT.get(kind, QUOTA_NEXT["due"])
        reason = (f"over quota: tenant {sch.tenant!r} has {used} queued or running jobs, its limit "
                  f"(ALLOY_MAX_ACTIVE_JOBS_PER_TENANT={self.settings.max_active_jobs_per_tenant}); {then}")
        deferred = kind in ("inputs", "retry")
        out = self._record(sch, f"{key}:quota" if deferred else key, due, "skipped", reason, moved, inputs=inputs)
        if deferred:
            out.status, out.detail = "deferred", reason
        return out

    # -- outcomes and retries ---------------------------------------------------------------------
    def _settle(self, run: ScheduleRun, job: Any, t: datetime) -> Outcome:
        retry_at = None
        if job.state == FAILED and run.attempt <= self.cfg.retry_max:
            wait = min(self.cfg.retry_backoff_seconds * 2 ** (run.attempt - 1), self.cfg.retry_backoff_max_seconds)
            retry_at = (job.finished_at or t) + timedelta(seconds=wait)
        if not self.schedules.settle(run, job, t, retry_at):
            return Outcome(run.schedule_id, "unchanged", run, "settled by another scheduler")
        return Outcome(run.schedule_id, "settled", run, f"run {run.n}: job {job.id} {job.state}"
                       + (f", retry at {retry_at.isoformat()}" if retry_at else ""))

    def _retry(self, run: ScheduleRun, sch: Schedule, t: datetime) -> Outcome:
        """A new run for a failed one: same inputs, the next run number, a fresh tag."""
        attempt, root = run.attempt + 1, run.retry_of or run.id
        key = f"retry:{root}:{attempt}"
        job = self.store.get_job(run.job_id) if run.job_id else None
        why = f"job {run.job_id} failed" + (f": {job.error_message}" if job is not None and job.error_message else "")
        n = sch.run_count + 1
        try:
            tag, note = self._tag(sch, n, run.due_at)
        except AlloyError as e:
            tag, note = None, f"; {e.message}"
        pinned = dict(run.spec or {})
        if pinned.get("publish"):
            pinned["publish"] = {**pinned["publish"], "tag": tag}
        reason = f"retry {attempt - 1} of {self.cfg.retry_max} of run {run.n} ({why[:500]}){note}"
        outcome = self._create(sch, pinned, n=n, key=key, due=run.due_at, reason=reason, inputs=run.inputs,
                               moved=run.changes, tag=tag, attempt=attempt, retry_of=root)
        if outcome.status == "deferred":  # over quota: the retry stays due
            return outcome
        if outcome.run is not None or self.schedules.has_run(sch.id, key):
            self.schedules.clear_retry(run.id)  # done (by us or by another scheduler)
        return outcome

    def _finish_pending(self, run: ScheduleRun, tenant: str, spec: MergeSpec | None = None) -> Outcome:
        """Create (or find) the run's job and wake a worker; safe to repeat. `spec`: run.spec parsed
        (a run just recorded passes the model it validated; a left-over pending run is parsed here)."""
        spec = spec or MergeSpec.model_validate(run.spec)
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


def check_settings() -> str | None:
    """Why the ALLOY_* / ALLOY_SCHEDULER_* settings cannot start a scheduler (one line), or None."""
    from jobs.settings import get_settings

    for prefix, load in (("ALLOY_", get_settings), ("ALLOY_SCHEDULER_", SchedulerSettings)):
        try:
            load()
        except ValidationError as e:
            err = e.errors()[0]
            name = prefix + str(err["loc"][0]).upper() if err["loc"] else prefix + "*"
            # the value is shown for the scheduler's own numbers only: ALLOY_* holds tokens
            got = f" (got {str(err.get('input'))[:80]!r})" if prefix == "ALLOY_SCHEDULER_" else ""
            return f"{name}: {err['msg']}{got}"
    return None


def main() -> int:
    if (why := check_settings()) is not None:
        print(f"alloy scheduler: error: {why}", file=sys.stderr)
        return 2
    return run_until_signalled(run_forever)


if __name__ == "__main__":  # `alloy scheduler` runs this process
    raise SystemExit(main())
