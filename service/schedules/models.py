"""The schedule tables, on the job store's declarative Base (one metadata, one Alembic history).

A `schedule_runs` row is written *before* its job (status `pending`, with the pinned spec), in the
same transaction that advances the schedule's run counter with a compare-and-set; the job is then
created with `unique_key = schedule:<id>:<n>`. The counter CAS and the unique constraints make a run
exist once; the job's unique key makes its job exist once, even if the scheduler dies between the
two steps (whichever scheduler finds the pending run later creates the same job, or finds it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.models import Base, SeqInt, UTCDateTime, now

RUN_STATUSES = ("pending", "submitted", "skipped", "failed")


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


class ScheduleRun(Base):
    __tablename__ = "schedule_runs"
    __table_args__ = (
        UniqueConstraint("schedule_id", "run_key", name="uq_schedule_runs_key"),
        UniqueConstraint("schedule_id", "n", name="uq_schedule_runs_n"),
        Index("ix_schedule_runs_schedule_seq", "schedule_id", "seq"),
        Index("ix_schedule_runs_status", "status", "created_at"),
    )

    seq: Mapped[int] = mapped_column(SeqInt, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    schedule_id: Mapped[str] = mapped_column(String(40), ForeignKey("schedules.id", ondelete="CASCADE"))
    # cron: due:<UTC time>; on_new_revision: inputs:<hash of the commit set>:after:<previous n>
    run_key: Mapped[str] = mapped_column(String(200))
    n: Mapped[int | None] = mapped_column(Integer)  # 1, 2, ... for runs that create a job; None if skipped
    status: Mapped[str] = mapped_column(String(16))  # pending | submitted | skipped | failed
    reason: Mapped[str] = mapped_column(Text)  # why it ran, or why it was skipped / failed
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{role, name, ref, commit}]
    changes: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{role, name, ref, from, to}]
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the pinned spec of the job
    tag: Mapped[str | None] = mapped_column(String(200))
    job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
