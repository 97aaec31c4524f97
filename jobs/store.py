"""The job store: every state change is one conditional UPDATE, so concurrent processes cannot clash.

Claim with fencing (design A of the service notes): a worker owns a job while `attempts` equals the
attempt it claimed and its lease has not expired. Every later write by that worker (progress, stage,
finish) carries the attempt number in its WHERE clause, so a worker whose lease was reaped and whose
job was claimed again cannot overwrite the new owner's record: its writes match no row and it stops.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, case, create_engine, delete, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from jobs.models import CalibrationSet, Job, JobEvent, WebhookDelivery, now
from jobs.states import ACTIVE, CANCELLED, CANCELLING, FAILED, QUEUED, REJECTED, RUNNING, SUCCEEDED, TERMINAL


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


class NotCancellable(Exception):
    """The job already reached a terminal state."""


class NotDeletable(Exception):
    """The job is still queued or running (cancel it first)."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def body_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        eng = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(eng, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL lets the API read while a worker writes
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return eng
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache(maxsize=8)
def _insert_lock(url: str) -> threading.Lock | nullcontext:
    """SQLite has one writer at a time and makes a blocked writer poll (sleeps of 1, 2, 5 … 25 ms):
    under load the API's submits, each a short insert, waited in those sleeps for one another. They
    queue on this lock instead and wake as soon as the previous insert commits (writes from other
    processes, the workers', still go through SQLite's own wait). PostgreSQL locks rows: no lock."""
    return threading.Lock() if url.startswith("sqlite") else nullcontext()


@dataclass
class Claim:
    job: Job
    attempt: int


class Store:
    def __init__(self, url: str, *, clock: Callable[[], datetime] = now, engine: Engine | None = None):
        self.engine = engine or get_engine(url)
        self._inserting = _insert_lock(url)
        self.clock = clock
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def ping(self) -> None:
        with self.engine.connect() as c:
            c.exec_driver_sql("SELECT 1")

    # -- jobs: API side ---------------------------------------------------------------------------
    def create_job(self, *, tenant: str, spec: dict[str, Any], method: str, queue: str,
                   idempotency_key: str | None = None, unique_key: str | None = None,
                   source: str = "http", max_attempts: int = 3) -> tuple[Job, bool]:
        """Insert a queued job; returns (job, created). A repeated key returns the first job."""
        h = body_hash(spec)
        if idempotency_key is not None or unique_key is not None:
            found = self._find_existing(tenant, idempotency_key, unique_key)
            if found is not None:
                return self._replay(found, h), False
        t = self.clock()
        job = Job(id=new_id("job"), tenant=tenant, state=QUEUED, method=method, queue=queue, spec=spec,
                  spec_hash=h, idempotency_key=idempotency_key, unique_key=unique_key, source=source,
                  attempts=0, max_attempts=max_attempts, cancel_requested=False, created_at=t,
                  updated_at=t, enqueued_at=t, webhook_attempts=0)
        try:
            with self._inserting, self.tx() as s:
                s.add(job)
                s.flush()
                s.add(JobEvent(job_id=job.id, type="state", data={"state": QUEUED}, created_at=t))
        except IntegrityError:  # a concurrent request with the same key won the insert
            found = self._find_existing(tenant, idempotency_key, unique_key)
            if found is None:
                raise
            return self._replay(found, h), False
        return job, True

    def count_active(self, tenant: str) -> int:
        """Queued, running and cancelling jobs of a tenant (its quota counts these)."""
        with self.tx() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(
                Job.tenant == tenant, Job.state.in_((QUEUED, *ACTIVE)))) or 0)

    def find_by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        return self._find_existing(tenant, key, None)

    def _find_existing(self, tenant: str, key: str | None, unique_key: str | None) -> Job | None:
        with self.tx() as s:
            if unique_key is not None:
                return s.scalar(select(Job).where(Job.unique_key == unique_key))
            return s.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))

    @staticmethod
    def _replay(job: Job, h: str) -> Job:
        if job.spec_hash != h:
            raise IdempotencyConflict(job.id)
        return job

    def get_job(self, job_id: str, tenant: str | None = None) -> Job | None:
        """tenant=None reads any tenant's job (admin, workers)."""
        with self.tx() as s:
            q = select(Job).where(Job.id == job_id)
            if tenant is not None:
                q = q.where(Job.tenant == tenant)
            return s.scalar(q)

    def list_jobs(self, tenant: str | None, *, state: str | None = None, after: str | None = None,
                  limit: int = 20) -> tuple[list[Job], bool]:
        """Newest first; `after` is the last job id of the previous page."""
        with self.tx() as s:
            return page(s, Job, tenant, after, limit, Job.deleted_at.is_(None),
                        *([Job.state == state] if state is not None else []))

    def request_cancel(self, job_id: str, tenant: str | None) -> Job | None:
        """Queued → cancelled at once (no worker holds it); running → cancelling (the worker stops it).

        Idempotent on cancelling/cancelled; NotCancellable on succeeded/failed.
        """
        t = self.clock()
        with self.tx() as s:
            q = select(Job).where(Job.id == job_id)
            if tenant is not None:
                q = q.where(Job.tenant == tenant)
            job = s.scalar(q)
            if job is None:
                return None
            if job.state in (SUCCEEDED, FAILED, REJECTED):
                raise NotCancellable(job.state)
            if s.execute(update(Job).where(Job.id == job_id, Job.state == QUEUED).values(
                    state=CANCELLED, cancel_requested=True, finished_at=t, updated_at=t,
                    error_code="cancelled", error_message="cancelled before it started",
                    **self._webhook_values(job, t))).rowcount:
                s.add(JobEvent(job_id=job_id, type="state", data={"state": CANCELLED}, created_at=t))
            elif s.execute(update(Job).where(Job.id == job_id, Job.state == RUNNING).values(
                    state=CANCELLING, cancel_requested=True, updated_at=t)).rowcount:
                s.add(JobEvent(job_id=job_id, type="state", data={"state": CANCELLING}, created_at=t))
        return self.get_job(job_id)

    def delete_job(self, job_id: str, tenant: str | None) -> Job | None:
        """Mark a finished job deleted, keeping a small audit row (who, what method, how it ended, when,
        the spec's hash and the published ref) and dropping its spec, events and webhook deliveries.
        None when there is no such (undeleted) job; NotDeletable while it is queued or running. The
        caller removes the job's files."""
        t = self.clock()
        with self.tx() as s:
            q = select(Job).where(Job.id == job_id, Job.deleted_at.is_(None))
            if tenant is not None:
                q = q.where(Job.tenant == tenant)
            job = s.scalar(q)
            if job is None:
                return None
            if job.state not in TERMINAL:
                raise NotDeletable(job.state)
            published = (job.result or {}).get("published")
            n = s.execute(update(Job).where(Job.id == job_id, Job.state.in_(TERMINAL),
                                            Job.deleted_at.is_(None)).values(
                deleted_at=t, updated_at=t, spec={"method": job.method, "deleted": True},
                result={"published": published} if published else None, idempotency_key=None,
                webhook_state=None if job.webhook_state == "pending" else job.webhook_state,
                webhook_next_at=None)).rowcount
            if n != 1:
                return None
            s.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
            s.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
        return self.get_job(job_id)

    @staticmethod
    def _webhook_values(job: Job, t: datetime) -> dict[str, Any]:
        if (job.spec or {}).get("notify"):
            return {"webhook_state": "pending", "webhook_next_at": t}
        return {}

    def mark_enqueued(self, job_id: str, *, sent: bool = True) -> None:
        """sent=False: the broker was unreachable; the reaper re-sends on its next sweep."""
        with self.tx() as s:
            s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=self.clock() if sent else None))

    # -- jobs: worker side ------------------------------------------------------------------------
    def claim(self, job_id: str, worker: str, lease_seconds: float) -> Claim | None:
        """Take the job for one attempt, or None (duplicate delivery, cancelled, finished, capped)."""
        t = self.clock()
        with self.tx() as s:
            n = s.execute(update(Job).where(
                Job.id == job_id,
                (Job.state == QUEUED) | ((Job.state == RUNNING) & (Job.lease_until < t)),
                Job.cancel_requested.is_(False),
                Job.attempts < Job.max_attempts,
            ).values(state=RUNNING, attempts=Job.attempts + 1, worker=worker,
                     lease_until=t + timedelta(seconds=lease_seconds), updated_at=t,
                     started_at=func.coalesce(Job.started_at, t))).rowcount
            if n != 1:
                return None
            job = s.scalar(select(Job).where(Job.id == job_id))
            s.add(JobEvent(job_id=job_id, type="state", data={"state": RUNNING, "attempt": job.attempts},
                           created_at=t))
            return Claim(job, job.attempts)

    def heartbeat(self, job_id: str, attempt: int, lease_seconds: float, *, stage: str | None = None,
                  step: int | None = None, total: int | None = None, loss: float | None = None,
                  progress_event: bool = False) -> tuple[bool, bool]:
        """Renew the lease (and record progress). Returns (still_owner, cancel_requested)."""
        t = self.clock()
        vals: dict[str, Any] = {"lease_until": t + timedelta(seconds=lease_seconds), "updated_at": t}
        if stage is not None:
            vals.update(progress_step=step, progress_total=total, progress_loss=loss)
        with self.tx() as s:
            n = s.execute(update(Job).where(Job.id == job_id, Job.attempts == attempt,
                                            Job.state.in_(ACTIVE)).values(**vals)).rowcount
            if n != 1:
                return False, True
            if progress_event and stage is not None:
                s.add(JobEvent(job_id=job_id, type="progress", created_at=t,
                               data={"stage": stage, "step": step, "total": total, "loss": loss}))
            return True, bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def set_stage(self, job_id: str, attempt: int, stage: str) -> bool:
        t = self.clock()
        with self.tx() as s:
            n = s.execute(update(Job).where(Job.id == job_id, Job.attempts == attempt,
                                            Job.state.in_(ACTIVE)).values(
                stage=stage, progress_step=None, progress_total=None, progress_loss=None,
                updated_at=t)).rowcount
            if n == 1:
                s.add(JobEvent(job_id=job_id, type="stage", data={"stage": stage}, created_at=t))
            return n == 1

    def finish(self, job_id: str, attempt: int, state: str, *, result: dict[str, Any] | None = None,
               error_code: str | None = None, error_message: str | None = None) -> bool:
        """Record the terminal state if this attempt still owns the job (else False: fenced off)."""
        assert state in TERMINAL
        t = self.clock()
        with self.tx() as s:
            job = s.scalar(select(Job).where(Job.id == job_id))
            if job is None:
                return False
            dur = (t - job.started_at).total_seconds() if job.started_at else None
            n = s.execute(update(Job).where(Job.id == job_id, Job.attempts == attempt,
                                            Job.state.in_(ACTIVE)).values(
                state=state, result=result, error_code=error_code, error_message=error_message,
                finished_at=t, updated_at=t, lease_until=None, duration_s=dur,
                **self._webhook_values(job, t))).rowcount
            if n == 1:
                data: dict[str, Any] = {"state": state}
                if error_code:
                    data["error"] = {"code": error_code, "message": error_message}
                if result and result.get("evaluation"):  # the evaluate stage's results and gate table
                    data["evaluation"] = result["evaluation"]
                s.add(JobEvent(job_id=job_id, type="state", data=data, created_at=t))
            return n == 1

    # -- reaper ----------------------------------------------------------------------------------
    def reap(self, requeue_after: float) -> list[str]:
        """Expired leases go back to `queued` (or `failed` at the attempt cap); a `cancelling` job
        whose worker died becomes `cancelled`. Returns the ids whose message must be (re)sent:
        requeued jobs and queued jobs nobody claimed for `requeue_after` seconds (message lost)."""
        t = self.clock()
        out: list[str] = []
        with self.tx() as s:
            expired = list(s.scalars(select(Job).where(Job.state.in_(ACTIVE), Job.lease_until < t)))
            for job in expired:
                if job.state == CANCELLING:
                    vals: dict[str, Any] = dict(state=CANCELLED, error_code="cancelled",
                                                error_message="cancelled; its worker stopped", finished_at=t)
                elif job.attempts >= job.max_attempts:
                    vals = dict(state=FAILED, error_code="worker_lost", finished_at=t,
                                error_message=f"the worker running this job stopped responding "
                                              f"{job.attempts} times (attempt cap {job.max_attempts})")
                else:
                    vals = dict(state=QUEUED, enqueued_at=t)
                if vals["state"] != QUEUED:
                    vals.update(self._webhook_values(job, t))
                n = s.execute(update(Job).where(Job.id == job.id, Job.attempts == job.attempts,
                                                Job.state == job.state, Job.lease_until < t).values(
                    lease_until=None, worker=None, updated_at=t, **vals)).rowcount
                if n == 1:
                    data: dict[str, Any] = {"state": vals["state"], "reason": "lease expired"}
                    if vals.get("error_code"):
                        data["error"] = {"code": vals["error_code"], "message": vals["error_message"]}
                    s.add(JobEvent(job_id=job.id, type="state", data=data, created_at=t))
                    if vals["state"] == QUEUED:
                        out.append(job.id)
            stale = t - timedelta(seconds=requeue_after)
            lost = list(s.scalars(select(Job.id).where(
                Job.state == QUEUED, (Job.enqueued_at < stale) | Job.enqueued_at.is_(None))))
            if lost:
                s.execute(update(Job).where(Job.id.in_(lost), Job.state == QUEUED).values(enqueued_at=t))
            out.extend(lost)
        return out

    # -- events ----------------------------------------------------------------------------------
    def events_after(self, job_id: str, after: int, limit: int = 500) -> list[JobEvent]:
        with self.tx() as s:
            return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                  .order_by(JobEvent.id).limit(limit)))

    # -- webhooks (outbox) -----------------------------------------------------------------------
    def claim_webhook(self, hold_seconds: float) -> Job | None:
        """Take one due delivery; pushing webhook_next_at forward keeps other reapers off it."""
        t = self.clock()
        with self.tx() as s:
            job = s.scalar(select(Job).where(Job.webhook_state == "pending", Job.webhook_next_at <= t)
                           .order_by(Job.webhook_next_at).limit(1))
            if job is None:
                return None
            n = s.execute(update(Job).where(Job.id == job.id, Job.webhook_next_at == job.webhook_next_at,
                                            Job.webhook_state == "pending").values(
                webhook_next_at=t + timedelta(seconds=hold_seconds),
                webhook_attempts=Job.webhook_attempts + 1)).rowcount
            if n != 1:
                return None
            s.refresh(job)  # the UPDATE may or may not have synchronized the loaded object
            return job

    def record_delivery(self, job_id: str, *, webhook_id: str, attempt: int, url: str,
                        status_code: int | None, error: str | None, delivered: bool,
                        retry_in: float | None) -> None:
        t = self.clock()
        with self.tx() as s:
            s.add(WebhookDelivery(job_id=job_id, webhook_id=webhook_id, attempt=attempt, url=url,
                                  status_code=status_code, error=error, created_at=t))
            if delivered:
                vals: dict[str, Any] = {"webhook_state": "delivered", "webhook_next_at": None}
            elif retry_in is None:
                vals = {"webhook_state": "failed", "webhook_next_at": None}
            else:
                vals = {"webhook_next_at": t + timedelta(seconds=retry_in)}
            s.execute(update(Job).where(Job.id == job_id).values(**vals))

    def deliveries(self, job_id: str) -> list[WebhookDelivery]:
        with self.tx() as s:
            return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                  .order_by(WebhookDelivery.id)))

    # -- metrics ---------------------------------------------------------------------------------
    def count_by_state(self) -> dict[str, int]:
        with self.tx() as s:
            return dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())

    def duration_buckets(self, bounds: list[float]) -> list[tuple[str, list[int], int, float]]:
        """Per method: cumulative counts of finished jobs with duration <= each bound, count, sum."""
        cols = [func.sum(case((Job.duration_s <= b, 1), else_=0)) for b in bounds]
        with self.tx() as s:
            rows = s.execute(select(Job.method, func.count(), func.sum(Job.duration_s), *cols)
                             .where(Job.state == SUCCEEDED, Job.duration_s.is_not(None))
                             .group_by(Job.method)).all()
        return [(r[0], [int(x or 0) for x in r[3:]], int(r[1]), float(r[2] or 0.0)) for r in rows]

    # -- calibration sets --------------------------------------------------------------------------
    def add_calibration_set(self, cs: CalibrationSet) -> CalibrationSet:
        with self.tx() as s:
            s.add(cs)
        return cs

    def get_calibration_set(self, set_id: str, tenant: str | None) -> CalibrationSet | None:
        with self.tx() as s:
            q = select(CalibrationSet).where(CalibrationSet.id == set_id)
            if tenant is not None:
                q = q.where(CalibrationSet.tenant == tenant)
            return s.scalar(q)

    def list_calibration_sets(self, tenant: str | None, *, after: str | None = None, limit: int = 20
                              ) -> tuple[list[CalibrationSet], bool]:
        with self.tx() as s:
            return page(s, CalibrationSet, tenant, after, limit)

    def delete_calibration_set(self, set_id: str, tenant: str | None) -> CalibrationSet | None:
        with self.tx() as s:
            q = select(CalibrationSet).where(CalibrationSet.id == set_id)
            if tenant is not None:
                q = q.where(CalibrationSet.tenant == tenant)
            cs = s.scalar(q)
            if cs is not None:
                s.execute(delete(CalibrationSet).where(CalibrationSet.id == set_id))
            return cs


def page(s, model, tenant: str | None, after: str | None, limit: int, *where) -> tuple[list, bool]:
    """One cursor page of `model` rows, newest first (by `seq`); `after` is the previous page's last id.

    Returns (rows, has_more). An unknown cursor gives an empty page rather than restarting the list."""
    q = select(model).order_by(model.seq.desc()).limit(limit + 1).where(*where)
    if tenant is not None:
        q = q.where(model.tenant == tenant)
    if after is not None:
        seq = s.scalar(select(model.seq).where(model.id == after))
        if seq is None:
            return [], False
        q = q.where(model.seq < seq)
    rows = list(s.scalars(q))
    return rows[:limit], len(rows) > limit
