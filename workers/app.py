"""The Celery app. Redis carries only "run job X" wake-ups; the jobs table is the source of truth.

Ack design (design A of the service notes), against the failure modes seen with Redis:

* `task_acks_late=False`: the message is acked when the task starts. Redis's visibility timeout
  then only covers messages a worker reserved but had not started, so a job that runs longer than
  the timeout is never delivered a second time while it runs (the duplicate-parallel-run hazard).
* A worker that dies mid-job (SIGKILL, OOM, node loss) has already acked: the job's database lease
  stops being renewed, the reaper (`alloy reaper`) sees it expire, puts the job back to `queued`
  and sends a new message. After `max_attempts` claims the job is `failed` (worker_lost) instead
  of looping. `task_reject_on_worker_lost` stays off: the reaper is the one redelivery path.
* Every delivery goes through `Store.claim`, a conditional UPDATE: a duplicate message (reaper
  resend, Redis restore) finds the job not claimable and returns at once.
* A Redis restart that loses queued messages (no AOF) leaves jobs `queued` in the database; the
  reaper re-sends messages of jobs nobody claimed for `requeue_after` seconds. Run Redis with
  `--appendonly yes` anyway (deploy/compose.yaml) so that this is the exception.
* `worker_prefetch_multiplier=1`: a worker reserves at most one extra message, so jobs are not
  hoarded by a busy worker. GPU workers run `-c 1 --max-tasks-per-child 1` (a fresh process per job
  releases the CUDA context); the parent never imports torch.
* No result backend: results live in the jobs table.
"""

from __future__ import annotations

from celery import Celery

from service.settings import Settings, get_settings

RUN_JOB = "alloy.run_job"


def make_app(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("alloy", broker=s.redis_url, include=["workers.tasks"])
    transport = {
        "visibility_timeout": s.visibility_timeout,
        "socket_keepalive": True,
        "health_check_interval": 10,
    }
    app.conf.update(
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_default_queue="cpu",
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport,
        visibility_timeout=s.visibility_timeout,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep reconnecting through a Redis restart
        # running jobs are acked and leased in the database: a broker outage must not kill them
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()


def enqueue(job_id: str, queue: str, celery_app: Celery | None = None) -> None:
    """Send the wake-up for a job. Failures are left to the reaper (the job stays `queued`)."""
    (celery_app or app).send_task(RUN_JOB, args=[job_id], queue=queue, retry=True,
                  retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                "interval_max": 0.5})


def warm_up(celery_app: Celery) -> None:
    """Connect the producer pool now, so that the first submit does not pay Celery's lazy setup."""
    try:
        with celery_app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)
        celery_app.amqp.router  # noqa: B018  (builds the router: another lazy first-send cost)
    except Exception:  # broker down at startup: /readyz reports it; submits still record jobs
        pass
