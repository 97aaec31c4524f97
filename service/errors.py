"""API errors: every 4xx/5xx body is `{"error": {"code", "message"}}` with a message naming the fix."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from merge_ops.errors import AlloyError

log = logging.getLogger("alloy.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def problem(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _loc(err: dict) -> str:
    parts = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
    return ".".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return problem(e.status, e.code, e.message, e.headers)

    @app.exception_handler(AlloyError)  # incl. jobs.admission.AdmissionError: 422 invalid_spec
    async def _alloy(_: Request, e: AlloyError) -> JSONResponse:
        return problem(422, e.code, e.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        msgs, in_body = [], False
        for err in e.errors():
            in_body = in_body or (err.get("loc") or ("",))[0] == "body"
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            loc = _loc(err)
            msgs.append(f"{loc}: {msg}" if loc else msg)
        return problem(422, "invalid_spec" if in_body else "invalid_request", "; ".join(msgs) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return problem(e.status_code, code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _db_down(_: Request, e: Exception) -> JSONResponse:
        # a dropped connection or a database restart: transient, the client may retry (never a 500)
        log.warning("database unavailable: %s", type(getattr(e, "orig", e)).__name__)
        return problem(503, "unavailable", "the job store is unreachable; retry shortly", {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem(500, "internal_error", "the server hit an unexpected error; it has been logged")
