"""Prometheus metrics: HTTP latency (measured here), jobs by state and job duration by method and
schedule health (read from the store at scrape time, so every API replica reports the same truth),
queue depth (Redis)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from starlette.types import ASGIApp, Receive, Scope, Send

from jobs.queue import QUEUES
from jobs.states import JOB_STATES
from jobs.store import Store

DURATION_BUCKETS = [1, 5, 15, 60, 300, 900, 3600, 4 * 3600]


def queue_depth(redis_client, queue: str) -> int:
    """kombu's Redis transport keeps one list per queue and priority step ("cpu", "cpu\\x06\\x163", ...)."""
    return sum(int(redis_client.llen(name)) for name in
               [queue] + [f"{queue}\x06\x16{p}" for p in range(1, 10)])


class StoreCollector:
    def __init__(self, store: Store, redis_client, queues: tuple[str, ...] = QUEUES):
        self.store, self.redis, self.queues = store, redis_client, queues

    def collect(self):
        states = GaugeMetricFamily("alloy_jobs", "jobs by state", labels=["state"])
        counts = self.store.count_by_state()
        for s in JOB_STATES:
            states.add_metric([s], counts.get(s, 0))
        yield states
        h = HistogramMetricFamily("alloy_job_duration_seconds", "run time of succeeded jobs",
                                  labels=["method"])
        for method, cum, count, total in self.store.duration_buckets(DURATION_BUCKETS):
            buckets = [(str(b), c) for b, c in zip(DURATION_BUCKETS, cum, strict=True)] + [("+Inf", count)]
            h.add_metric([method], buckets, total)
        yield h
        yield from schedule_metrics(self.store)
        depth = GaugeMetricFamily("alloy_queue_depth", "messages waiting in the broker", labels=["queue"])
        try:
            for q in self.queues:
                depth.add_metric([q], queue_depth(self.redis, q))
        except Exception:  # broker down: report what we can (readyz says why)
            pass
        yield depth


def schedule_metrics(store: Store):
    """Each schedule's health: consecutive failures, last success and next due time (unix seconds)."""
    from jobs.schedule_store import ScheduleStore

    labels = ["schedule", "tenant", "name"]
    fails = GaugeMetricFamily("alloy_schedule_consecutive_failures",
                              "failed or rejected runs in a row of a schedule", labels=labels)
    ok = GaugeMetricFamily("alloy_schedule_last_success_timestamp_seconds",
                           "when a run of the schedule last published (0: never)", labels=labels)
    due = GaugeMetricFamily("alloy_schedule_next_due_timestamp_seconds",
                            "the schedule's next due time or poll (0: paused)", labels=labels)
    for sch in ScheduleStore(store).all_health():
        lv = [sch.id, sch.tenant, sch.name or ""]
        fails.add_metric(lv, sch.consecutive_failures or 0)
        ok.add_metric(lv, sch.last_success_at.timestamp() if sch.last_success_at else 0)
        due.add_metric(lv, sch.next_due_at.timestamp() if sch.next_due_at and not sch.paused else 0)
    yield from (fails, ok, due)


class LatencyMiddleware:
    """Pure ASGI (no buffering, so SSE streams pass through); labels use the route template."""

    def __init__(self, app: ASGIApp, histogram: Histogram):
        self.app, self.hist = app, histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def _send(msg) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                route = scope.get("route")
                self.hist.labels(scope["method"], getattr(route, "path", "unmatched"),
                                 str(status["code"])).observe(time.perf_counter() - t0)
            await send(msg)

        await self.app(scope, receive, _send)


def make_registry(store: Store, redis_client) -> tuple[CollectorRegistry, Histogram]:
    reg = CollectorRegistry()
    hist = Histogram("alloy_http_request_duration_seconds", "time to response headers",
                     ["method", "route", "status"], registry=reg,
                     buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5])
    reg.register(StoreCollector(store, redis_client))
    return reg, hist
