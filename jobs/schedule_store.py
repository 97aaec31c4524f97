"""ScheduleStore: schedules and their runs in the job store's database.

API side: create / get / list / update / delete, tenant-filtered like jobs.
Scheduler side: every step is a conditional UPDATE or a unique insert, so any number of scheduler
processes can run; the one whose UPDATE matched owns the step.

    claim(id)        lease a due schedule (WHERE lease free): one process polls / evaluates it
    record_run(...)  insert the run + advance run_count WHERE run_count = n-1 (compare-and-set),
                     in one transaction; unique (schedule_id, run_key) and (schedule_id, n) back it up
    attach_job(...)  pending -> submitted once the job (unique_key schedule:<id>:<n>) exists
    release(id)      next due time + lease dropped, WHERE the lease is still ours
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from jobs.models import Job, Schedule, ScheduleRun
from jobs.states import UNSUCCESSFUL
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
    def due(self, t: datetime, limit: int = 100) -> list[str]:
        """Ids of unpaused schedules due at t whose lease is free."""
        with self.store.tx() as s:
            return list(s.scalars(select(Schedule.id).where(
                Schedule.paused.is_(False), Schedule.next_due_at <= t,
                Schedule.lease_until.is_(None) | (Schedule.lease_until < t),
            ).order_by(Schedule.next_due_at).limit(limit)))

    def claim(self, schedule_id: str, owner: str, t: datetime, lease_seconds: float) -> Schedule | None:
        """Lease a due schedule; None if another process holds it (or it was paused / is not due)."""
        with self.store.tx() as s:
            n = s.execute(update(Schedule).where(
                Schedule.id == schedule_id, Schedule.paused.is_(False), Schedule.next_due_at <= t,
                Schedule.lease_until.is_(None) | (Schedule.lease_until < t),
            ).values(lease_owner=owner, lease_until=t + timedelta(seconds=lease_seconds))).rowcount
            return s.scalar(select(Schedule).where(Schedule.id == schedule_id)) if n == 1 else None

    def release(self, schedule_id: str, owner: str, next_due_at: datetime, *,
                last_error: str | None = None) -> bool:
        """Set the next due time and drop the lease, if this owner still holds it. A PATCH that
        changed the trigger meanwhile cleared the lease, so its due time is not overwritten."""
        with self.store.tx() as s:
            return s.execute(update(Schedule).where(Schedule.id == schedule_id, Schedule.lease_owner == owner)
                             .values(next_due_at=next_due_at, lease_owner=None, lease_until=None,
                                     last_error=last_error)).rowcount == 1

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

    def last_submitted(self, schedule_id: str, *, ok_only: bool = False
                       ) -> tuple[ScheduleRun, str | None] | None:
        """The newest run that creates a job (pending or submitted), with the job's state. ok_only: skip runs whose job
        failed or was cancelled (they published nothing)."""
        with self.store.tx() as s:
            q = (select(ScheduleRun, Job.state).outerjoin(Job, Job.id == ScheduleRun.job_id)
                 .where(ScheduleRun.schedule_id == schedule_id, ScheduleRun.n.is_not(None))
                 .order_by(ScheduleRun.n.desc()).limit(1))
            if ok_only:  # a pending run (no job yet) counts as in flight
                q = q.where(Job.state.is_(None) | Job.state.not_in(UNSUCCESSFUL))
            row = s.execute(q).first()
            return None if row is None else (row[0], row[1])
