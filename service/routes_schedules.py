"""/v1/schedules: create, read, list, change (pause/resume, spec, trigger), run now, delete, and a
schedule's runs.

Same auth as jobs (`jobs:write` to change, `jobs:read` to read); a tenant sees only its own
schedules (404 for others'). The spec template is validated like a job body when the schedule is
created or changed, and again (pinned to its input commits) at every run. A schedule must publish
(its runs exist to refresh a published model). Changing the spec or trigger keeps the schedule's
runs and its run numbering. A schedule shows its health: last success, consecutive failures (failed
or rejected runs in a row), the next due time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobs.admission import check_admission
from jobs.models import Schedule, ScheduleRun
from jobs.schedule_store import ScheduleStore
from jobs.states import REJECTED, RunStatus
from jobs.triggers import CronTrigger, RevisionTrigger, Trigger, check_tag_template, first_due, parse_trigger
from merge_ops.spec import MergeSpec
from service.auth import Principal, Reader, Writer
from service.errors import ApiError
from service.routes_jobs import ERRORS

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])
CatchUp = Literal["skip", "once"]


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200)
    spec: MergeSpec = Field(description="the MergeSpec submitted at every run; hub refs are pinned to "
                            "the commits read at run time")
    trigger: Trigger
    catch_up: CatchUp = Field("once", description="cron runs missed while no scheduler ran: `once` runs the "
                              "latest of them when a scheduler starts, `skip` records them as skipped")
    tag_template: str | None = Field(None, max_length=200, description="tag each run's published commit: "
                                     "{n} run number, {date} YYYY-MM-DD, {time} HHMMSS", examples=["run-{n}"])
    paused: bool = False

    @field_validator("tag_template")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        return None if v is None else check_tag_template(v)


class SchedulePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200)
    spec: MergeSpec | None = Field(None, description="a new MergeSpec template, checked like a new schedule's; "
                                   "the run history and numbering stay")
    trigger: Trigger | None = None
    catch_up: CatchUp | None = None
    tag_template: str | None = Field(None, max_length=200)
    paused: bool | None = Field(None, description="false resumes: the next run is the next due time from "
                                "now (runs due while paused are not caught up)")

    @field_validator("tag_template")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        return None if v is None else check_tag_template(v)


class Health(BaseModel):
    status: Literal["ok", "failing", "rejected", "no_finished_run"] = Field(
        description="ok: the last finished run published; failing / rejected: the last one(s) failed or "
                    "were rejected by the publish_if gate; no_finished_run: no run's job has ended yet")
    last_success_at: datetime | None = Field(description="when a run's job last published")
    last_failure_at: datetime | None
    last_outcome: str | None = Field(description="the state of the last finished run's job")
    consecutive_failures: int = Field(description="failed or rejected runs in a row (retries count)")
    next_due_at: datetime | None = Field(description="cron: next due time; on_new_revision: next poll")


class ScheduleOut(BaseModel):
    id: str
    object: Literal["schedule"] = "schedule"
    name: str | None
    spec: dict[str, Any]
    trigger: dict[str, Any]
    catch_up: CatchUp
    tag_template: str | None
    paused: bool
    next_due_at: datetime | None = Field(description="cron: next due time; on_new_revision: next poll")
    run_count: int = Field(description="runs that created a job")
    last_error: str | None = Field(description="the last problem reading the inputs' commits, if any")
    run_requested_at: datetime | None = Field(None, description="a run-now request not yet taken by a scheduler")
    health: Health
    created_at: datetime
    updated_at: datetime


class ScheduleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ScheduleOut]
    has_more: bool
    last_id: str | None


class Change(BaseModel):
    role: str
    name: str
    ref: str
    from_: str | None = Field(alias="from")
    to: str

    model_config = ConfigDict(populate_by_name=True)


class RunOut(BaseModel):
    id: str
    object: Literal["schedule_run"] = "schedule_run"
    schedule_id: str
    n: int | None = Field(description="run number (runs that created a job)")
    status: RunStatus
    reason: str = Field(description="why it ran (cron, catch-up, which input changed, run now, retry) or "
                        "was skipped")
    attempt: int = Field(1, description="2, 3, ... for automatic retries of a run whose job failed")
    retry_of: str | None = Field(None, description="the id of the first attempt this run retries")
    retry_at: datetime | None = Field(None, description="when this failed run is retried")
    due_at: datetime
    created_at: datetime
    inputs: list[dict[str, Any]] = Field(description="[{role, name, ref, commit}] read at run time")
    changes: list[Change] = Field(description="inputs whose commit differs from the previous run's")
    tag: str | None
    job_id: str | None
    job_state: str | None


class RunList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RunOut]
    has_more: bool
    last_id: str | None


def health(s: Schedule) -> Health:
    if s.last_outcome is None:
        status = "no_finished_run"
    elif not s.consecutive_failures:
        status = "ok"
    else:
        status = "rejected" if s.last_outcome == REJECTED else "failing"
    return Health(status=status, last_success_at=s.last_success_at, last_failure_at=s.last_failure_at,
                  last_outcome=s.last_outcome, consecutive_failures=s.consecutive_failures or 0,
                  next_due_at=None if s.paused else s.next_due_at)


def schedule_out(s: Schedule) -> ScheduleOut:
    return ScheduleOut(id=s.id, name=s.name, spec=s.spec, trigger=s.trigger, catch_up=s.catch_up,
                       tag_template=s.tag_template, paused=s.paused, next_due_at=s.next_due_at,
                       run_count=s.run_count, last_error=s.last_error, run_requested_at=s.run_requested_at,
                       health=health(s), created_at=s.created_at, updated_at=s.updated_at)


def run_out(r: ScheduleRun, job_state: str | None) -> RunOut:
    return RunOut(id=r.id, schedule_id=r.schedule_id, n=r.n, status=r.status, reason=r.reason, due_at=r.due_at,
                  created_at=r.created_at, inputs=r.inputs, changes=[Change.model_validate(c) for c in r.changes],
                  tag=r.tag, job_id=r.job_id, job_state=job_state, attempt=r.attempt or 1, retry_of=r.retry_of,
                  retry_at=r.retry_at)


def _schedules(request: Request) -> ScheduleStore:
    return ScheduleStore(request.app.state.store)


def _get_or_404(request: Request, schedule_id: str, p: Principal) -> Schedule:
    s = _schedules(request).get(schedule_id, p.tenant_filter)
    if s is None:
        raise ApiError(404, "not_found", f"no schedule {schedule_id!r}")
    return s


def _check_publish(body_spec: MergeSpec, tag_template: str | None) -> None:
    if body_spec.publish is None:
        raise ApiError(422, "invalid_spec", "spec has no `publish` target: a schedule re-merges to refresh a "
                       "published model, so add `publish: {repo: org/name}` (and optionally tag_template)")
    if body_spec.publish.tag is not None:
        raise ApiError(422, "invalid_spec", "spec.publish.tag would be reused by every run of the schedule "
                       "(the second run would fail on an existing tag): remove it and set `tag_template`, "
                       "e.g. run-{n}")
    if tag_template is not None and body_spec.publish is None:
        raise ApiError(422, "invalid_spec", "tag_template is set but spec has no `publish` target to tag")


@router.post("", status_code=201, response_model=ScheduleOut, responses=ERRORS,
             summary="Create a schedule (a MergeSpec template and a trigger)")
def create(body: ScheduleIn, request: Request, response: Response, p: Writer) -> ScheduleOut:
    check_admission(body.spec, p.tenant, request.app.state.store, request.app.state.settings)
    _check_publish(body.spec, body.tag_template)
    store = _schedules(request)
    sch = store.create(tenant=p.tenant, name=body.name, spec=body.spec.model_dump(mode="json"),
                       trigger=body.trigger.model_dump(mode="json"), catch_up=body.catch_up,
                       tag_template=body.tag_template, paused=body.paused,
                       next_due_at=first_due(body.trigger, store.clock()))
    response.headers["Location"] = f"/v1/schedules/{sch.id}"
    return schedule_out(sch)


@router.get("", response_model=ScheduleList, responses=ERRORS, summary="List schedules, newest first")
def list_schedules(request: Request, p: Reader,
                   after: Annotated[str | None, Query(max_length=64, description="last id of the previous page")] = None,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20) -> ScheduleList:
    rows, more = _schedules(request).list(p.tenant_filter, after=after, limit=limit)
    return ScheduleList(data=[schedule_out(s) for s in rows], has_more=more, last_id=rows[-1].id if rows else None)


@router.get("/{schedule_id}", response_model=ScheduleOut, responses=ERRORS, summary="Get a schedule")
def get(schedule_id: str, request: Request, p: Reader) -> ScheduleOut:
    return schedule_out(_get_or_404(request, schedule_id, p))


@router.patch("/{schedule_id}", response_model=ScheduleOut, responses=ERRORS,
              summary="Pause, resume, or change the trigger, catch-up policy, tag template or name")
def patch(schedule_id: str, body: SchedulePatch, request: Request, p: Writer) -> ScheduleOut:
    sch = _get_or_404(request, schedule_id, p)
    store = _schedules(request)
    values: dict[str, Any] = body.model_dump(exclude_unset=True, exclude={"trigger", "spec"})
    for k in ("catch_up", "paused", "spec"):  # these are not nullable
        if k in body.model_fields_set and getattr(body, k) is None:
            raise ApiError(422, "invalid_request", f"{k} cannot be null")
    if body.spec is not None:  # checked like a new schedule's
        check_admission(body.spec, p.tenant, request.app.state.store, request.app.state.settings)
        _check_publish(body.spec, values.get("tag_template", sch.tag_template))
        values["spec"] = body.spec.model_dump(mode="json")
    elif values.get("tag_template") is not None and not sch.spec.get("publish"):
        raise ApiError(422, "invalid_spec", "tag_template is set but the spec has no `publish` target to tag")
    trigger: CronTrigger | RevisionTrigger | None = body.trigger
    if trigger is not None:
        values["trigger"] = trigger.model_dump(mode="json")
    resumed = values.get("paused") is False and sch.paused
    if body.spec is not None:  # a scheduler evaluating the old spec cannot release over this change
        values.update(lease_owner=None, lease_until=None)
    if trigger is not None or resumed:
        # start afresh from now (no catch-up for times due while paused); dropping the lease makes a
        # scheduler that is evaluating the old trigger unable to overwrite this due time
        t = trigger or parse_trigger(sch.trigger)
        values.update(next_due_at=first_due(t, store.clock()), lease_owner=None, lease_until=None)
    out = store.update(schedule_id, p.tenant_filter, **values)
    if out is None:
        raise ApiError(404, "not_found", f"no schedule {schedule_id!r}")
    return schedule_out(out)


@router.post("/{schedule_id}/run", status_code=202, response_model=ScheduleOut, responses=ERRORS,
             summary="Run now: the next scheduler tick records a run and submits its job, even if no "
                     "input moved (also for a paused schedule)")
def run_now(schedule_id: str, request: Request, p: Writer) -> ScheduleOut:
    _get_or_404(request, schedule_id, p)
    store = _schedules(request)
    out = store.update(schedule_id, p.tenant_filter, run_requested_at=store.clock())
    if out is None:
        raise ApiError(404, "not_found", f"no schedule {schedule_id!r}")
    return schedule_out(out)


@router.delete("/{schedule_id}", status_code=204, responses=ERRORS,
               summary="Delete a schedule and its run records (the jobs it created stay)")
def remove(schedule_id: str, request: Request, p: Writer) -> Response:
    if not _schedules(request).delete(schedule_id, p.tenant_filter):
        raise ApiError(404, "not_found", f"no schedule {schedule_id!r}")
    return Response(status_code=204)


@router.get("/{schedule_id}/runs", response_model=RunList, responses=ERRORS,
            summary="A schedule's runs, newest first: when, why, which input changed, the job")
def runs(schedule_id: str, request: Request, p: Reader,
         after: Annotated[str | None, Query(max_length=64, description="last id of the previous page")] = None,
         limit: Annotated[int, Query(ge=1, le=100)] = 20) -> RunList:
    _get_or_404(request, schedule_id, p)
    rows, more = _schedules(request).runs(schedule_id, after=after, limit=limit)
    return RunList(data=[run_out(r, st) for r, st in rows], has_more=more, last_id=rows[-1][0].id if rows else None)
