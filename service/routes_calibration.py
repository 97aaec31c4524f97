"""/v1/calibration-sets: upload unlabelled JSONL once, reference it by id from job specs.

Each line is a JSON object with `text` (a non-empty string), `input_ids` (a list of token ids) or
`input` (a list of numbers, for OT fusion of MLP/CNN models): the rows of merge_ops/calibration.py;
blank lines are skipped. The body is streamed to disk and refused with 413 past the size limit.
Sets are content-addressed per tenant: uploading the same bytes again returns the same set (its id
derives from the tenant and the SHA-256), so a retried upload never makes a second copy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError

from jobs.models import CalibrationSet
from jobs.store import new_id
from merge_ops.calibration import validate_upload
from merge_ops.errors import CalibrationError
from service.auth import Reader, Writer
from service.errors import ApiError
from service.routes_jobs import ERRORS
from service.schemas import CalibrationSetList, CalibrationSetOut, calibration_out

router = APIRouter(prefix="/v1/calibration-sets", tags=["calibration sets"])
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}}}}}


def validate_jsonl(path: Path) -> int:
    """Count the samples; ApiError(422) naming the first bad line (merge_ops' one row parser)."""
    try:
        return validate_upload(path)
    except CalibrationError as e:
        raise ApiError(422, "invalid_calibration", e.message) from None


def validate_evaluation_jsonl(path: Path) -> int:
    """An evaluation set's rows (text / prompt+answer / text+label, one kind per set): ApiError(422)
    naming the first bad line. Evaluation sets share this endpoint and table (`?purpose=evaluation`)."""
    from merge_ops.evaluation import EvalSetError, parse_eval_set

    try:  # no source: messages say "line N", never the server's path
        return len(parse_eval_set(path.read_bytes()))
    except EvalSetError as e:
        raise ApiError(422, e.code, e.message) from None


@router.post("", status_code=201, response_model=CalibrationSetOut, openapi_extra=UPLOAD_BODY,
             responses={**ERRORS, 413: ERRORS[422]}, summary="Upload a calibration set (JSONL body)")
async def upload(request: Request, response: Response, p: Writer,
                 name: Annotated[str | None, Query(max_length=200)] = None,
                 purpose: Literal["calibration", "evaluation"] = "calibration") -> CalibrationSetOut:
    settings, store = request.app.state.settings, request.app.state.store
    limit = settings.max_upload_bytes
    too_big = ApiError(413, "too_large", f"calibration sets are limited to {limit} bytes; split or sample it")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    folder = settings.data_dir / "calibration" / p.tenant
    folder.mkdir(parents=True, exist_ok=True)
    path, size, digest = folder / f".upload-{new_id('cal')}.jsonl", 0, hashlib.sha256()
    try:
        with path.open("wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                digest.update(chunk)
                f.write(chunk)
        lines = await run_in_threadpool(validate_evaluation_jsonl if purpose == "evaluation" else validate_jsonl,
                                        path)
        cs, created = await run_in_threadpool(_keep, store, path, p.tenant, name, size, lines, digest.hexdigest())
    finally:
        path.unlink(missing_ok=True)  # renamed away when kept
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/calibration-sets/{cs.id}"
    return calibration_out(cs)


def content_id(tenant: str, sha256: str) -> str:
    """A set's id follows from its tenant and bytes: the same upload (a retry) names the same set, and
    two tenants' identical uploads stay two sets."""
    return "cal_" + hashlib.sha256(f"{tenant}\0{sha256}".encode()).hexdigest()[:32]


def _keep(store, tmp: Path, tenant: str, name: str | None, size: int, lines: int, sha256: str
          ) -> tuple[CalibrationSet, bool]:
    """The tenant's set with these bytes, made from `tmp` unless it exists; (set, created)."""
    set_id = content_id(tenant, sha256)
    found = store.get_calibration_set(set_id, tenant)
    if found is not None:
        return found, False
    final = tmp.with_name(f"{set_id}.jsonl")
    os.replace(tmp, final)  # same bytes under the same name: a concurrent twin's rename is harmless
    cs = CalibrationSet(id=set_id, tenant=tenant, name=name, path=str(final), size=size, lines=lines,
                        sha256=sha256)
    try:
        return store.add_calibration_set(cs), True
    except IntegrityError:  # a concurrent identical upload inserted it first
        found = store.get_calibration_set(set_id, tenant)
        if found is None:
            raise
        return found, False


@router.get("", response_model=CalibrationSetList, responses=ERRORS, summary="List calibration sets")
def list_sets(request: Request, p: Reader,
              after: Annotated[str | None, Query(max_length=64)] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> CalibrationSetList:
    rows, more = request.app.state.store.list_calibration_sets(p.tenant_filter, after=after, limit=limit)
    return CalibrationSetList(data=[calibration_out(c) for c in rows], has_more=more,
                              last_id=rows[-1].id if rows else None)


@router.get("/{set_id}", response_model=CalibrationSetOut, responses=ERRORS, summary="Get a calibration set")
def get_set(set_id: str, request: Request, p: Reader) -> CalibrationSetOut:
    cs = request.app.state.store.get_calibration_set(set_id, p.tenant_filter)
    if cs is None:
        raise ApiError(404, "not_found", f"no calibration set {set_id!r}")
    return calibration_out(cs)


@router.delete("/{set_id}", status_code=204, responses=ERRORS, summary="Delete a calibration set")
def delete_set(set_id: str, request: Request, p: Writer) -> Response:
    cs = request.app.state.store.delete_calibration_set(set_id, p.tenant_filter)
    if cs is None:
        raise ApiError(404, "not_found", f"no calibration set {set_id!r}")
    if os.path.exists(cs.path):
        os.unlink(cs.path)
    return Response(status_code=204)
