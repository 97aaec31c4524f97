"""Response bodies of the API (also the webhook payload). Pure pydantic: the reaper imports this too."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.models import CalibrationSet, Job, WebhookDelivery

JobState = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class Progress(BaseModel):
    step: int | None = None
    total: int | None = None
    loss: float | None = None


class ErrorInfo(BaseModel):
    code: str
    message: str


class Delivery(BaseModel):
    webhook_id: str
    attempt: int
    status_code: int | None
    error: str | None
    created_at: datetime


class JobOut(BaseModel):
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
    result: dict[str, Any] | None = Field(None, description="published {repo, branch, commit, url}, metrics")
    error: ErrorInfo | None
    spec: dict[str, Any]
    source: str
    webhook_state: str | None = None
    webhook_deliveries: list[Delivery] | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
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


def job_out(job: Job, deliveries: list[WebhookDelivery] | None = None) -> JobOut:
    err = ErrorInfo(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobOut(
        id=job.id, state=job.state, stage=job.stage, method=job.method, queue=job.queue,
        progress=Progress(step=job.progress_step, total=job.progress_total, loss=job.progress_loss),
        attempts=job.attempts, max_attempts=job.max_attempts, cancel_requested=job.cancel_requested,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        result=job.result, error=err, spec=job.spec, source=job.source, webhook_state=job.webhook_state,
        webhook_deliveries=None if deliveries is None else [
            Delivery(webhook_id=d.webhook_id, attempt=d.attempt, status_code=d.status_code, error=d.error,
                     created_at=d.created_at) for d in deliveries],
    )


def calibration_out(cs: CalibrationSet) -> CalibrationSetOut:
    return CalibrationSetOut(id=cs.id, name=cs.name, size=cs.size, lines=cs.lines, sha256=cs.sha256,
                             created_at=cs.created_at)
