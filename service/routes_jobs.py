"""/v1/jobs: submit, read, list, cancel, events (SSE), coefficients."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from jobs.admission import check_admission, quota_used
from jobs.job_view import JobOut, job_out, job_summary
from jobs.models import Job
from jobs.queue import queue_for, wake
from jobs.settings import Settings
from jobs.states import TERMINAL, JobState
from jobs.store import IdempotencyConflict, NotCancellable, NotDeletable, Store
from merge_ops.spec import MergeSpec
from service.auth import Principal, Reader, Writer
from service.errors import ApiError
from service.schemas import JobList, Problem

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_EVENT_ID = 2**63 - 1  # event ids are BIGINT
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem} for code in (400, 401, 403, 404, 409, 422, 503)}  # 400: unparsable body; 503: store down
SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS, 413: {"model": Problem, "description": "body larger than ALLOY_MAX_BODY_BYTES"},
    429: {"model": Problem, "description": "too many queued or running jobs for this tenant (Retry-After)"}}
QUOTA_RETRY_AFTER = "30"  # seconds: a merge takes minutes; polling faster only adds load


def _store(request: Request) -> Store:
    return request.app.state.store


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _job_or_404(request: Request, job_id: str, p: Principal) -> Job:
    job = _store(request).get_job(job_id, p.tenant_filter)
    if job is None or (job.deleted_at is not None and not p.is_admin):  # admins read the audit row
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return job


@router.post("", status_code=202, response_model=JobOut, responses=SUBMIT_ERRORS,
             summary="Submit a merge job (body: a MergeSpec)")
def submit(spec: MergeSpec, request: Request, response: Response, p: Writer, background: BackgroundTasks,
           idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    """Validate fully, record the job as `queued`, and wake a worker. Returns 202 and `Location`."""
    store, settings = _store(request), _settings(request)
    check_admission(spec, p.tenant, store, settings, admin=p.is_admin)
    _check_quota(store, settings, p.tenant, idempotency_key)
    queue = queue_for(spec.method_def(), settings)
    try:
        job, created = store.create_job(tenant=p.tenant, spec=spec.model_dump(mode="json"),
                                        method=spec.method, queue=queue, idempotency_key=idempotency_key,
                                        max_attempts=settings.max_attempts)
    except IdempotencyConflict as e:
        raise ApiError(409, "idempotency_conflict", f"Idempotency-Key was already used for job {e} with a "
                       "different body: use a new key for a different job") from None
    if created:  # after the answer: the broker round trip was the largest part of a submit's time
        # under load; the job is recorded, and a wake-up that never goes out is re-sent by the reaper
        background.add_task(wake, store, request.app.state.enqueue, job.id, queue)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


def _check_quota(store: Store, settings: Settings, tenant: str, idempotency_key: str | None) -> None:
    """429 past the tenant's queued + running quota; a retry of an accepted submit is still answered.
    Checked before the insert, so concurrent submits may pass it together: a soft cap, by a few."""
    if quota_used(store, settings, tenant) is None:
        return
    cap = settings.max_active_jobs_per_tenant
    if idempotency_key is not None and store.find_by_idempotency_key(tenant, idempotency_key) is not None:
        return
    raise ApiError(429, "too_many_jobs", f"this tenant already has {cap} queued or running jobs (the "
                   "server's limit): wait for some to finish or cancel some, then submit again",
                   headers={"Retry-After": QUOTA_RETRY_AFTER})


@router.get("", response_model=JobList, responses=ERRORS, summary="List jobs, newest first")
def list_jobs(request: Request, p: Reader, state: JobState | None = None,
              after: Annotated[str | None, Query(max_length=64, description="last id of the previous page")] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    rows, more = _store(request).list_jobs(p.tenant_filter, state=state, after=after, limit=limit)
    return JobList(data=[job_summary(j) for j in rows], has_more=more, last_id=rows[-1].id if rows else None)


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS, summary="Get a job")
def get_job(job_id: str, request: Request, p: Reader) -> JobOut:
    job = _job_or_404(request, job_id, p)
    return job_out(job, _store(request).deliveries(job.id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ERRORS, summary="Cancel a job")
def cancel(job_id: str, request: Request, p: Writer) -> JobOut:
    """Idempotent. A running job becomes `cancelling` until its worker stops it; a finished one is 409."""
    try:
        job = _store(request).request_cancel(job_id, p.tenant_filter)
    except NotCancellable as e:
        raise ApiError(409, "not_cancellable", f"job {job_id} already {e}; nothing to cancel") from None
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return job_out(job)


@router.delete("/{job_id}", status_code=204, responses=ERRORS, summary="Delete a finished job")
def delete_job(job_id: str, request: Request, p: Writer) -> Response:
    """Removes the job's files (an unpublished model, coefficients) and its spec, events and webhook
    deliveries; a small audit record stays (tenant, method, final state, times, published ref). A
    published model stays on its hub. 409 while the job is queued or running: cancel it first."""
    store = _store(request)
    try:
        job = store.delete_job(job_id, p.tenant_filter)
    except NotDeletable as e:
        raise ApiError(409, "not_finished", f"job {job_id} is {e}: cancel it and wait for it to stop, "
                       "then delete it") from None
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    shutil.rmtree(_settings(request).data_dir / "jobs" / job.id, ignore_errors=True)
    return Response(status_code=204)


@router.get("/{job_id}/events", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
            response_class=StreamingResponse, summary="Server-Sent Events of state changes and progress")
async def events(job_id: str, request: Request, p: Reader,
                 last_event_id: Annotated[str | None, Header()] = None,
                 after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID, description="resume after this event id")] = None):
    """Each event: `id` (resume with `Last-Event-ID`), `event` (state | stage | progress), JSON `data`.
    The stream ends after the job's terminal state."""
    store, settings = _store(request), _settings(request)
    await run_in_threadpool(_job_or_404, request, job_id, p)
    # an id past the 64-bit column range would overflow the query mid-stream: treat it as "from the start"
    header_id = int(last_event_id) if (last_event_id or "").isdigit() else 0
    cursor = after if after is not None else header_id if header_id <= MAX_EVENT_ID else 0

    async def stream():
        nonlocal cursor
        idle = 0.0
        while True:
            rows = await run_in_threadpool(store.events_after, job_id, cursor)
            for ev in rows:
                cursor = ev.id
                yield f"id: {ev.id}\nevent: {ev.type}\ndata: {json.dumps(ev.data)}\n\n"
                if ev.type == "state" and ev.data.get("state") in TERMINAL:
                    return
            if not rows:
                job = await run_in_threadpool(store.get_job, job_id)
                if job is None or job.state in TERMINAL:
                    return
                if await request.is_disconnected():
                    return
                idle += settings.sse_poll_seconds
                if idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(settings.sse_poll_seconds)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _artifact(request: Request, job_id: str, p: Principal, name: str) -> Path:
    job = _job_or_404(request, job_id, p)
    fname = ((job.result or {}).get("artifacts") or {}).get(name)
    path = _settings(request).data_dir / "jobs" / job.id / fname if fname else None
    if path is None or not path.is_file():
        raise ApiError(404, "not_found", f"job {job_id} has no learned coefficients (only learned "
                       "methods produce them, once the job has succeeded)")
    return path


@router.get("/{job_id}/coefficients", responses=ERRORS, summary="Learned coefficients (JSON)")
def coefficients(job_id: str, request: Request, p: Reader) -> FileResponse:
    return FileResponse(_artifact(request, job_id, p, "coefficients"), media_type="application/json")


@router.get("/{job_id}/coefficients.png", responses={**ERRORS, 200: {"content": {"image/png": {}}}},
            response_class=FileResponse, summary="Learned coefficients as a heatmap")
def coefficients_png(job_id: str, request: Request, p: Reader) -> FileResponse:
    return FileResponse(_artifact(request, job_id, p, "coefficients_png"), media_type="image/png")
