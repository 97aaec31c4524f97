"""Response bodies of the API besides the job itself (jobs/job_view.py, shared with webhooks)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from jobs.job_view import ErrorInfo, JobSummary
from jobs.models import CalibrationSet


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


def calibration_out(cs: CalibrationSet) -> CalibrationSetOut:
    return CalibrationSetOut(id=cs.id, name=cs.name, size=cs.size, lines=cs.lines, sha256=cs.sha256,
                             created_at=cs.created_at)
