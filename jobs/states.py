"""Job states and schedule-run statuses, defined once (the API schema, the store, the CLI read these).

    queued → running → succeeded | failed | cancelled     (`cancelling` while a cancel is in flight)
                     → rejected   (the merge ran but failed its `publish_if` gate: nothing published)

A job whose worker died goes back to `queued` (the reaper) until its attempt cap. Pure Python, so
the CLI client can import it without the database layer.
"""

from __future__ import annotations

from typing import Literal, get_args

JobState = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled", "rejected"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED, REJECTED = JOB_STATES

ACTIVE = (RUNNING, CANCELLING)  # a worker holds the job (lease, heartbeat)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED, REJECTED)  # nothing changes it any more
UNSUCCESSFUL = (FAILED, CANCELLED, REJECTED)  # ended without publishing

# a schedule run: pending (recorded, job not yet created) -> submitted; or skipped / failed at once.
# A submitted run whose job ended `rejected` (its publish_if gate) becomes `rejected` when settled.
RunStatus = Literal["pending", "submitted", "skipped", "failed", "rejected"]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
