"""A job as clients see it: the body of the API's job responses; webhook POSTs carry the summary
(no spec: a receiver is another party, and a spec names the server's model folders).

Pure pydantic over the Job row, so the API and the reaper (which delivers webhooks) render the same
document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.models import Job, WebhookDelivery
from jobs.states import JobState


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


class JobSummary(BaseModel):
    """A job in a list: everything but its spec and deliveries (GET /v1/jobs/{id} has them)."""

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
    source: str
    webhook_state: str | None = None


class JobOut(JobSummary):
    spec: dict[str, Any]
    webhook_deliveries: list[Delivery] | None = None


def _fields(job: Job) -> dict[str, Any]:
    err = ErrorInfo(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return dict(
        id=job.id, state=job.state, stage=job.stage, method=job.method, queue=job.queue,
        progress=Progress(step=job.progress_step, total=job.progress_total, loss=job.progress_loss),
        attempts=job.attempts, max_attempts=job.max_attempts, cancel_requested=job.cancel_requested,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        result=job.result, error=err, source=job.source, webhook_state=job.webhook_state)


def job_summary(job: Job) -> JobSummary:
    return JobSummary(**_fields(job))


def job_out(job: Job, deliveries: list[WebhookDelivery] | None = None) -> JobOut:
    return JobOut(
        **_fields(job), spec=job.spec,
        webhook_deliveries=None if deliveries is None else [
            Delivery(webhook_id=d.webhook_id, attempt=d.attempt, status_code=d.status_code, error=d.error,
                     created_at=d.created_at) for d in deliveries],
    )
