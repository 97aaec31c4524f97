"""Job states and schedule-run statuses, defined once (the API schema, the store, the CLI read these).

    queued → running → succeeded | failed | cancelled     (`cancelling` while a cancel is in flight)

A job whose worker died goes back to `queued` (the reaper) until its attempt cap. Pure Python, so
the CLI client can import it without the database layer.
"""

from __future__ import annotations

from typing import Literal, get_args

JobState = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED = JOB_STATES

ACTIVE = (RUNNING, CANCELLING)  # a worker holds the job (lease, heartbeat)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)  # nothing changes it any more
UNSUCCESSFUL = (FAILED, CANCELLED)  # ended without publishing

# a schedule run: pending (recorded, job not yet created) -> submitted; or skipped / failed at once
RunStatus = Literal["pending", "submitted", "skipped", "failed"]
