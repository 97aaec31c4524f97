"""Response bodies of the API besides the job itself (jobs/job_view.py, shared with webhooks)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from jobs.job_view import ErrorInfo, Progress, job_out
from jobs.models import CalibrationSet, Job
from jobs.states import JobState


class JobSummary(BaseModel):
    """A job in a list: everything but its spec (GET /v1/jobs/{id} has it), so pages stay small."""

    id: str
    object: Literal["job"] = "job"
    state: JobState
    stage: str | None
    method: str
    queue: str
    progress: Progress
    attempts: int
    max_attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None
    error: ErrorInfo | None
    source: str
    webhook_state: str | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobSummary]
    has_more: bool
    last_id: str | None


class CalibrationSetOut(BaseModel):
    id: str
    object: Literal["calibration_set"] = "calibration_set"
    name: str | None
    size: int
    lines: int
    sha256: str
    created_at: datetime


class CalibrationSetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CalibrationSetOut]
    has_more: bool
    last_id: str | None


class Problem(BaseModel):
    """Every error body: a stable code and a message that says what to fix."""

    error: ErrorInfo


def job_summary(job: Job) -> JobSummary:
    return JobSummary(**job_out(job).model_dump(exclude={"spec", "webhook_deliveries"}))


def calibration_out(cs: CalibrationSet) -> CalibrationSetOut:
    return CalibrationSetOut(id=cs.id, name=cs.name, size=cs.size, lines=cs.lines, sha256=cs.sha256,
                             created_at=cs.created_at)
