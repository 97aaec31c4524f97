"""The FastAPI app: `create_app()` (uvicorn: `uvicorn service.app:create_app --factory`).

No torch on any request path: specs are validated with the torch-free merge_ops.spec/catalog.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobs.queue import EnqueueFn, producer, send, warm_up
from jobs.settings import Settings, get_settings
from jobs.store import Store
from service import errors, routes_calibration, routes_jobs, routes_methods, routes_schedules, spec_schema
from service.limits import BodyLimit
from service.metrics import LatencyMiddleware, make_registry


def _celery_enqueue(settings: Settings) -> tuple[EnqueueFn, Callable[[], None]]:
    app = producer(settings)
    # one send at a time: concurrent sends (wake-ups run after the answer, in the thread pool) each
    # took a producer from kombu's pool, which opened a new broker connection and channel for them;
    # serialised, every send reuses the one warm connection
    lock = threading.Lock()

    def enqueue(job_id: str, queue: str) -> None:
        with lock:
            send(job_id, queue, app)

    return enqueue, (lambda: warm_up(app))


def create_app(settings: Settings | None = None, *, enqueue: EnqueueFn | None = None) -> FastAPI:
    """`enqueue` sends a job's wake-up (default: the Celery app)."""
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level)
    warm: Callable[[], None] = lambda: None  # noqa: E731
    if enqueue is None:
        enqueue, warm = _celery_enqueue(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await run_in_threadpool(warm)
        yield

    app = FastAPI(title="Alloy", version="0.1.0", lifespan=lifespan,
                  description="Merge fine-tuned experts into one model and publish it. "
                  "Authenticate with `Authorization: Bearer <token>`.")
    store = Store(settings.database_url)
    broker = redis.Redis.from_url(settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
    registry, latency = make_registry(store, broker)
    app.state.settings, app.state.store, app.state.enqueue = settings, store, enqueue
    app.add_middleware(LatencyMiddleware, histogram=latency)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    errors.install(app)
    app.include_router(routes_jobs.router)
    app.include_router(routes_calibration.router)
    app.include_router(routes_schedules.router)
    app.include_router(routes_methods.router)
    spec_schema.install(app)  # POST /v1/jobs documented per method (validation stays MergeSpec)

    @app.get("/healthz", tags=["health"], summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Database and broker reachable (else 503)",
             responses={503: {"description": "a dependency is down"}})
    def readyz() -> JSONResponse:
        checks = {}
        for name, probe in (("database", store.ping), ("broker", broker.ping)):
            try:
                probe()
                checks[name] = "ok"
            except Exception as e:
                checks[name] = f"unreachable: {type(e).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
