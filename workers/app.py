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

Senders (the API, the scheduler, the reaper) use jobs/queue.py with the same broker settings.
"""

from __future__ import annotations

from celery import Celery

from jobs.queue import broker_conf
from jobs.settings import Settings, get_settings


def make_app(settings: Settings | None = None) -> Celery:
    app = Celery("alloy", include=["workers.tasks"])
    app.conf.update(
        broker_conf(settings or get_settings()),
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        # running jobs are acked and leased in the database: a broker outage must not kill them
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()
