"""ScheduleStore: schedules and their runs in the job store's database.

API side: create / get / list / update / delete, tenant-filtered like jobs.
Scheduler side: every step is a conditional UPDATE or a unique insert, so any number of scheduler
processes can run; the one whose UPDATE matched owns the step.

    claim_due(...)   lease up to `limit` due schedules (WHERE lease free; on PostgreSQL the candidates
                     are locked with SKIP LOCKED, elsewhere taken in random order), so several
                     schedulers share the due schedules instead of the fastest one taking them all
    record_run(...)  insert the run + advance run_count WHERE run_count = n-1 (compare-and-set),
                     in one transaction; unique (schedule_id, run_key) and (schedule_id, n) back it up
    attach_job(...)  pending -> submitted once the job (unique_key schedule:<id>:<n>) exists
    release(id)      next due time + lease dropped, WHERE the lease is still ours
    settle(...)      a submitted run whose job ended: counted once in the schedule's health
                     (WHERE settled_at IS NULL), a failed job's retry time set in the same transaction
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from jobs.models import Job, Schedule, ScheduleRun
from jobs.states import CANCELLED, FAILED, REJECTED, SUCCEEDED, TERMINAL
from jobs.store import Store, new_id, page


def job_key(schedule_id: str, n: int) -> str:
    """The job's unique key: one job per schedule run number, enforced by the jobs table."""
    return f"schedule:{schedule_id}:{n}"


class ScheduleStore:
    def __init__(self, store: Store):
        self.store = store

    @property
    def clock(self):
        return self.store.clock

    # -- API side ---------------------------------------------------------------------------------
    def create(self, *, tenant: str, spec: dict[str, Any], trigger: dict[str, Any], next_due_at: datetime,
               name: str | None = None, catch_up: str = "once", tag_template: str | None = None,
               paused: bool = False) -> Schedule:
        t = self.clock()
        sch = Schedule(id=new_id("sch"), tenant=tenant, name=name, spec=spec, trigger=trigger,
                       catch_up=catch_up, tag_template=tag_template, paused=paused, next_due_at=next_due_at,
                       run_count=0, created_at=t, updated_at=t)
        with self.store.tx() as s:
            s.add(sch)
        return sch

    def get(self, schedule_id: str, tenant: str | None = None) -> Schedule | None:
        with self.store.tx() as s:
            q = select(Schedule).where(Schedule.id == schedule_id)
            if tenant is not None:
                q = q.where(Schedule.tenant == tenant)
            return s.scalar(q)

    def list(self, tenant: str | None, *, after: str | None = None, limit: int = 20
             ) -> tuple[list[Schedule], bool]:
        """Newest first; `after` is the last id of the previous page."""
        with self.store.tx() as s:
            return page(s, Schedule, tenant, after, limit)

    def update(self, schedule_id: str, tenant: str | None, **values: Any) -> Schedule | None:
        with self.store.tx() as s:
            q = update(Schedule).where(Schedule.id == schedule_id)
            if tenant is not None:
                q = q.where(Schedule.tenant == tenant)
            if s.execute(q.values(updated_at=self.clock(), **values)).rowcount != 1:
                return None
        return self.get(schedule_id)

    def delete(self, schedule_id: str, tenant: str | None) -> bool:
        """The schedule and its run records go; the jobs it created stay."""
        with self.store.tx() as s:
            q = select(Schedule.id).where(Schedule.id == schedule_id)
            if tenant is not None:
                q = q.where(Schedule.tenant == tenant)
            if s.scalar(q) is None:
                return False
            s.execute(delete(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id))
            s.execute(delete(Schedule).where(Schedule.id == schedule_id))
            return True

    def runs(self, schedule_id: str, *, after: str | None = None, limit: int = 20
             ) -> tuple[list[tuple[ScheduleRun, str | None]], bool]:
        """Newest first, each with its job's current state (None if it created no job)."""
        with self.store.tx() as s:
            q = (select(ScheduleRun, Job.state).outerjoin(Job, Job.id == ScheduleRun.job_id)
                 .where(ScheduleRun.schedule_id == schedule_id).order_by(ScheduleRun.seq.desc()).limit(limit + 1))
            if after is not None:
                seq = s.scalar(select(ScheduleRun.seq).where(ScheduleRun.id == after))
                if seq is None:
                    return [], False
                q = q.where(ScheduleRun.seq < seq)
            rows = [(r, st) for r, st in s.execute(q).all()]
        return rows[:limit], len(rows) > limit

    # -- scheduler side ---------------------------------------------------------------------------
    @staticmethod
    def _claimable(t: datetime):
        """Due (or asked to run now) and not leased. Paused schedules only run when asked to."""
        wanted = (Schedule.paused.is_(False) & (Schedule.next_due_at <= t)) | Schedule.run_requested_at.is_not(None)
        return wanted & (Schedule.lease_until.is_(None) | (Schedule.lease_until < t))

    def due(self, t: datetime, limit: int = 100) -> list[str]:
        """Ids of schedules due at t (or asked to run now) whose lease is free, in random order."""
        with self.store.tx() as s:
            ids = list(s.scalars(select(Schedule.id).where(self._claimable(t))
                                 .order_by(Schedule.next_due_at).limit(limit)))
        random.shuffle(ids)
        return ids

    def claim(self, schedule_id: str, owner: str, t: datetime, lease_seconds: float) -> Schedule | None:
        """Lease a due schedule; None if another process holds it (or it was paused / is not due)."""
        with self.store.tx() as s:
            n = s.execute(update(Schedule).where(Schedule.id == schedule_id, self._claimable(t))
                          .values(lease_owner=owner, lease_until=t + timedelta(seconds=lease_seconds))).rowcount
            return s.scalar(select(Schedule).where(Schedule.id == schedule_id)) if n == 1 else None

    def claim_due(self, owner: str, t: datetime, lease_seconds: float, limit: int) -> list[Schedule]:
        """Lease up to `limit` due schedules. PostgreSQL: the candidate rows are locked with
        FOR UPDATE SKIP LOCKED, so concurrent schedulers take disjoint sets without waiting; other
        databases: a random sample of the due ones, each taken by a conditional UPDATE."""
        if self.store.engine.dialect.name != "postgresql":
            out = []
            for sid in self.due(t, limit=max(limit * 4, 20)):
                if len(out) >= limit:
                    break
                if (sch := self.claim(sid, owner, t, lease_seconds)) is not None:
                    out.append(sch)
            return out
        with self.store.tx() as s:
            ids = list(s.scalars(select(Schedule.id).where(self._claimable(t)).order_by(func.random())
                                 .limit(limit).with_for_update(skip_locked=True)))
            if not ids:
                return []
            s.execute(update(Schedule).where(Schedule.id.in_(ids))
                      .values(lease_owner=owner, lease_until=t + timedelta(seconds=lease_seconds)))
            return list(s.scalars(select(Schedule).where(Schedule.id.in_(ids))))

    def release(self, schedule_id: str, owner: str, next_due_at: datetime, *,
                last_error: str | None = None, requested: datetime | None = None) -> bool:
        """Set the next due time and drop the lease, if this owner still holds it. A PATCH that
        changed the trigger meanwhile cleared the lease, so its due time is not overwritten.
        `requested`: the run-now request this evaluation served (cleared unless a newer one came)."""
        with self.store.tx() as s:
            ok = s.execute(update(Schedule).where(Schedule.id == schedule_id, Schedule.lease_owner == owner)
                           .values(next_due_at=next_due_at, lease_owner=None, lease_until=None,
                                   last_error=last_error)).rowcount == 1
            if requested is not None:
                s.execute(update(Schedule).where(Schedule.id == schedule_id,
                                                 Schedule.run_requested_at == requested)
                          .values(run_requested_at=None))
            return ok

    def record_run(self, run: ScheduleRun) -> ScheduleRun | None:
        """Insert a run; a run with a number `n` also advances run_count from n-1 to n in the same
        transaction. None when another process recorded this run first."""
        try:
            with self.store.tx() as s:
                if run.n is not None:
                    moved = s.execute(update(Schedule).where(
                        Schedule.id == run.schedule_id, Schedule.run_count == run.n - 1,
                    ).values(run_count=run.n)).rowcount
                    if moved != 1:
                        return None
                s.add(run)
        except IntegrityError:  # same run_key (due time / input set) recorded by another process
            return None
        return run

    def new_run(self, schedule: Schedule, **fields: Any) -> ScheduleRun:
        fields.setdefault("changes", [])
        return ScheduleRun(id=new_id("run"), schedule_id=schedule.id, created_at=self.clock(), **fields)

    def attach_job(self, run_id: str, job_id: str) -> None:
        with self.store.tx() as s:
            s.execute(update(ScheduleRun).where(ScheduleRun.id == run_id)
                      .values(job_id=job_id, status="submitted"))

    def pending(self, older_than: datetime) -> list[tuple[ScheduleRun, str]]:
        """Runs recorded but left without a job (their scheduler died in between), with the tenant."""
        with self.store.tx() as s:
            return [(r, tenant) for r, tenant in s.execute(
                select(ScheduleRun, Schedule.tenant).join(Schedule, Schedule.id == ScheduleRun.schedule_id)
                .where(ScheduleRun.status == "pending", ScheduleRun.created_at < older_than)).all()]

    # -- outcomes, retries, health ------------------------------------------------------------
    def unsettled(self, limit: int = 100) -> list[tuple[ScheduleRun, Job]]:
        """Submitted runs whose job has ended but whose outcome is not counted yet."""
        with self.store.tx() as s:
            return [(r, j) for r, j in s.execute(
                select(ScheduleRun, Job).join(Job, Job.id == ScheduleRun.job_id)
                .where(ScheduleRun.status == "submitted", ScheduleRun.settled_at.is_(None),
                       Job.state.in_(TERMINAL)).order_by(ScheduleRun.seq).limit(limit)).all()]

    def settle(self, run: ScheduleRun, job: Job, t: datetime, retry_at: datetime | None) -> bool:
        """Count the run's job outcome in the schedule's health, once (the UPDATE that sets
        settled_at wins); a failed job gets its retry time in the same transaction. A `rejected`
        job (the publish_if gate said no) makes the run `rejected`: it failed, but is not retried
        (the same inputs would be rejected again). A cancelled job is neither success nor failure."""
        when = job.finished_at or t
        status = REJECTED if job.state == REJECTED else run.status
        with self.store.tx() as s:
            if s.execute(update(ScheduleRun).where(ScheduleRun.id == run.id, ScheduleRun.settled_at.is_(None))
                         .values(settled_at=t, status=status, retry_at=retry_at)).rowcount != 1:
                return False
            q = update(Schedule).where(Schedule.id == run.schedule_id)
            if job.state == SUCCEEDED:
                s.execute(q.values(last_success_at=when, last_outcome=job.state, consecutive_failures=0))
            elif job.state == CANCELLED:
                s.execute(q.values(last_outcome=job.state))
            else:
                s.execute(q.values(last_failure_at=when, last_outcome=job.state,
                                   consecutive_failures=Schedule.consecutive_failures + 1))
        return True

    def retries_due(self, t: datetime, limit: int = 100) -> list[tuple[ScheduleRun, Schedule]]:
        """Failed runs whose retry is due, with their (unpaused) schedule."""
        with self.store.tx() as s:
            return [(r, sch) for r, sch in s.execute(
                select(ScheduleRun, Schedule).join(Schedule, Schedule.id == ScheduleRun.schedule_id)
                .where(ScheduleRun.retry_at <= t, Schedule.paused.is_(False))
                .order_by(ScheduleRun.retry_at).limit(limit)).all()]

    def has_run(self, schedule_id: str, run_key: str) -> bool:
        with self.store.tx() as s:
            return s.scalar(select(ScheduleRun.id).where(ScheduleRun.schedule_id == schedule_id,
                                                         ScheduleRun.run_key == run_key)) is not None

    def clear_retry(self, run_id: str) -> None:
        with self.store.tx() as s:
            s.execute(update(ScheduleRun).where(ScheduleRun.id == run_id).values(retry_at=None))

    def prune_skipped(self, before: datetime, limit: int = 1000) -> int:
        """Delete skipped-run rows recorded before `before` (they only say "nothing to do")."""
        with self.store.tx() as s:
            ids = list(s.scalars(select(ScheduleRun.id).where(ScheduleRun.status == "skipped",
                                                               ScheduleRun.created_at < before).limit(limit)))
            if ids:
                s.execute(delete(ScheduleRun).where(ScheduleRun.id.in_(ids)))
            return len(ids)

    def all_health(self) -> list[Schedule]:
        """Every schedule (for /metrics)."""
        with self.store.tx() as s:
            return list(s.scalars(select(Schedule).order_by(Schedule.seq)))

    def last_submitted(self, schedule_id: str, *, ok_only: bool = False
                       ) -> tuple[ScheduleRun, str | None] | None:
        """The newest run that creates a job (pending or submitted), with the job's state. ok_only: skip runs whose job
        failed or was cancelled (they published nothing; the same inputs may go through next time). A
        rejected run counts: the publish_if gate would reject the same inputs again."""
        with self.store.tx() as s:
            q = (select(ScheduleRun, Job.state).outerjoin(Job, Job.id == ScheduleRun.job_id)
                 .where(ScheduleRun.schedule_id == schedule_id, ScheduleRun.n.is_not(None))
                 .order_by(ScheduleRun.n.desc()).limit(1))
            if ok_only:  # a pending run (no job yet) counts as in flight
                q = q.where(Job.state.is_(None) | Job.state.not_in((FAILED, CANCELLED)))
            row = s.execute(q).first()
            return None if row is None else (row[0], row[1])
