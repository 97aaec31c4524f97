"""A size cap on JSON request bodies (jobs, schedules): 413 before the body is parsed.

Calibration uploads stream to disk with their own limit (ALLOY_MAX_UPLOAD_BYTES); every other body is
a spec, which has no business being megabytes long, and would otherwise be read whole into memory
and parsed. A declared Content-Length past the cap is refused at once; a chunked body is read up to
the cap and refused as soon as it passes it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem

CAPPED_PREFIXES = ("/v1/jobs", "/v1/schedules")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, prefixes: tuple[str, ...] = CAPPED_PREFIXES):
        self.app, self.max_bytes, self.prefixes = app, max_bytes, prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH")
                or not scope["path"].startswith(self.prefixes)):
            await self.app(scope, receive, send)
            return
        too_big = problem(413, "too_large", f"request bodies are limited to {self.max_bytes} bytes "
                          "(ALLOY_MAX_BODY_BYTES); calibration data goes to POST /v1/calibration-sets")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_big(scope, receive, send)
            return
        chunks, size = [], 0
        while True:  # buffer up to the cap (small by design), then hand the body on in one piece
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                await too_big(scope, receive, send)
                return
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
