"""The broker side of a job: queue names, the task name, and sending "run job X".

The API and the scheduler send by task *name* (Celery `send_task`), so neither imports the worker
code; workers/app.py registers its task under `RUN_JOB` and consumes `QUEUES`. Redis carries only
wake-ups: the jobs table is the source of truth, so a send that fails leaves the job `queued` and
the reaper sends it later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # celery, the settings and the store load only where they are used: the CLI reads names
    from celery import Celery

    from jobs.settings import Settings
    from jobs.store import Store
    from merge_ops.declare import MethodDef

log = logging.getLogger("alloy.queue")

CPU, GPU = "cpu", "gpu"
QUEUES = (CPU, GPU)
RUN_JOB = "alloy.run_job"  # the one task: run_job(job_id)

EnqueueFn = Callable[[str, str], None]  # (job id, queue) -> None


def parse_queues(text: str) -> list[str]:
    """A worker's `--queues` (`cpu`, `gpu` or `cpu,gpu`) as a list; ValueError saying what is wrong."""
    names = [q.strip() for q in text.split(",") if q.strip()]
    bad = [q for q in names if q not in QUEUES]
    if bad or not names:
        raise ValueError(f"--queues: unknown queue(s) {bad}; use cpu, gpu or cpu,gpu")
    return names


def queue_for(method: MethodDef, settings: Settings) -> str:
    """Learned and OT methods want an accelerator, static merges are memory-bound CPU work; without
    GPU workers (ALLOY_GPU_WORKERS) every job goes to the cpu queue."""
    return GPU if settings.gpu_workers and method.kind != "static" else CPU


def broker_conf(settings: Settings) -> dict[str, Any]:
    """What senders and workers must agree on: the broker, its transport options, the message format."""
    return dict(
        broker_url=settings.redis_url,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout,
                                  "socket_keepalive": True, "health_check_interval": 10},
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep reconnecting through a Redis restart
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=CPU,
        task_ignore_result=True,
        result_backend=None,
        task_send_sent_event=False,
    )


def producer(settings: Settings | None = None) -> Celery:
    """A Celery app that only sends (no tasks registered, no torch)."""
    from celery import Celery

    from jobs.settings import get_settings

    app = Celery("alloy")
    app.conf.update(broker_conf(settings or get_settings()))
    return app


def send(job_id: str, queue: str, app: Celery) -> None:
    """Send the wake-up for a job; raises when the broker stays unreachable (see `wake`)."""
    app.send_task(RUN_JOB, args=[job_id], queue=queue, retry=True,
                  retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                "interval_max": 0.5})


def wake(store: Store, enqueue: EnqueueFn, job_id: str, queue: str) -> None:
    """Send a job's wake-up; with the broker down the job stays recorded and the reaper sends it."""
    try:
        enqueue(job_id, queue)
    except Exception:
        log.warning("job %s: broker unavailable, left for the reaper", job_id, exc_info=True)
        store.mark_enqueued(job_id, sent=False)


def warm_up(app: Celery) -> None:
    """Connect the producer pool now, so that the first submit does not pay Celery's lazy setup."""
    try:
        with app.producer_or_acquire() as p:
            p.connection.ensure_connection(max_retries=1)
        app.amqp.router  # noqa: B018  (builds the router: another lazy first-send cost)
    except Exception:  # broker down at startup: /readyz reports it; submits still record jobs
        pass
