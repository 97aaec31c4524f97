"""The job store's tables. The `jobs` table is the source of truth; Redis only carries wake-ups.

Alembic migrations in jobs/migrations/ create exactly these (a test compares them).

Schedules: a `schedule_runs` row is written *before* its job (status `pending`, with the pinned spec),
in the same transaction that advances the schedule's run counter with a compare-and-set; the job is
then created with `unique_key = schedule:<id>:<n>`. The counter CAS and the unique constraints make a
run exist once; the job's unique key makes its job exist once, even if the scheduler dies between the
two steps (whichever scheduler finds the pending run later creates the same job, or finds it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from jobs.states import QUEUED

# SQLite has no BIGINT autoincrement; PostgreSQL gets a bigserial.
SeqInt = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator):
    """Stored as naive UTC (portable across SQLite and PostgreSQL), returned tz-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idem"),
        Index("ix_jobs_tenant_seq", "tenant", "seq"),
        Index("ix_jobs_tenant_state", "tenant", "state", "seq"),  # quota counts, lists by state
        Index("ix_jobs_state_lease", "state", "lease_until"),
        Index("ix_jobs_webhook_due", "webhook_state", "webhook_next_at"),
    )

    seq: Mapped[int] = mapped_column(SeqInt, primary_key=True, autoincrement=True)  # list order, cursors
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=QUEUED)
    stage: Mapped[str | None] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # unique key for submitters that must create one job per event (schedules: schedule id + due time)
    unique_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(16), default="http")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress_step: Mapped[int | None] = mapped_column(Integer)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    progress_loss: Mapped[float | None] = mapped_column(Float)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # webhook outbox: pending -> delivered | failed; the reaper loop delivers due ones
    webhook_state: Mapped[str | None] = mapped_column(String(16))
    webhook_next_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # DELETE /v1/jobs/{id}: outputs removed, the row kept as an audit record (hidden from the API)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobEvent(Base):
    """State changes and (throttled) progress, written with the transition: the SSE stream replays these."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(SeqInt, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))  # state | stage | progress
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_job_id", "job_id"),)

    id: Mapped[int] = mapped_column(SeqInt, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    webhook_id: Mapped[str] = mapped_column(String(80))  # stable across retries (receiver dedupe)
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class CalibrationSet(Base):
    __tablename__ = "calibration_sets"
    __table_args__ = (Index("ix_calibration_sets_tenant_seq", "tenant", "seq"),
                      Index("ix_calibration_sets_tenant_sha256", "tenant", "sha256"))  # content lookup

    seq: Mapped[int] = mapped_column(SeqInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)  # server-side file; never shown to clients
    size: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


# -- schedules ---------------------------------------------------------------------------------
class Schedule(Base):
    __tablename__ = "schedules"
    __table_args__ = (
        Index("ix_schedules_tenant_seq", "tenant", "seq"),
        Index("ix_schedules_due", "paused", "next_due_at"),
    )

    seq: Mapped[int] = mapped_column(SeqInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the MergeSpec template (refs unpinned)
    trigger: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"type": "cron", ...} | {"type": "on_new_revision", ...}
    catch_up: Mapped[str] = mapped_column(String(8), default="once")  # skip | once
    tag_template: Mapped[str | None] = mapped_column(String(200))
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # cron: the next due time; on_new_revision: the next poll
    next_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    run_count: Mapped[int] = mapped_column(Integer, default=0)  # runs that created a job
    last_error: Mapped[str | None] = mapped_column(Text)  # last polling problem (hub down, bad token)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    # health, written when a run's job ends (the scheduler settles it): see ScheduleStore.settle
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_outcome: Mapped[str | None] = mapped_column(String(16))  # the last settled job's state
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)  # failed or rejected, in a row
    run_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # POST .../run, until taken


class ScheduleRun(Base):
    __tablename__ = "schedule_runs"
    __table_args__ = (
        UniqueConstraint("schedule_id", "run_key", name="uq_schedule_runs_key"),
        UniqueConstraint("schedule_id", "n", name="uq_schedule_runs_n"),
        Index("ix_schedule_runs_schedule_seq", "schedule_id", "seq"),
        Index("ix_schedule_runs_status", "status", "created_at"),
        Index("ix_schedule_runs_retry", "retry_at"),
    )

    seq: Mapped[int] = mapped_column(SeqInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    schedule_id: Mapped[str] = mapped_column(String(40), ForeignKey("schedules.id", ondelete="CASCADE"))
    # cron: due:<UTC time>; on_new_revision: inputs:<hash of the commit set>:after:<previous n>
    run_key: Mapped[str] = mapped_column(String(200))
    n: Mapped[int | None] = mapped_column(Integer)  # 1, 2, ... for runs that create a job; None if skipped
    status: Mapped[str] = mapped_column(String(16))  # pending | submitted | skipped | failed | rejected
    reason: Mapped[str] = mapped_column(Text)  # why it ran, or why it was skipped / failed
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{role, name, ref, commit}]
    changes: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{role, name, ref, from, to}]
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the pinned spec of the job
    tag: Mapped[str | None] = mapped_column(String(200))
    job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    attempt: Mapped[int] = mapped_column(Integer, default=1)  # 2, 3, ... for retries of a failed run
    retry_of: Mapped[str | None] = mapped_column(String(40))  # the first attempt's run id
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # when its retry is due (failed job)
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # its job's end was counted in health
    scheduler: Mapped[str | None] = mapped_column(String(200))  # the scheduler process that recorded it
