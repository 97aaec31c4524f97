"""The reaper loop (`alloy reaper` runs `python -m workers.reaper`): expired leases back to the queue,
lost messages re-sent, webhooks delivered from the outbox. Any number may run: every step is a
conditional UPDATE."""

from __future__ import annotations

import logging
import threading

import httpx

from jobs.queue import EnqueueFn, producer, send
from jobs.settings import Settings
from jobs.store import Store
from jobs.webhooks import deliver_due
from workers.process import run_until_signalled

log = logging.getLogger("alloy.reaper")


def sweep(store: Store, settings: Settings, client: httpx.Client, enqueue: EnqueueFn) -> list[str]:
    """One pass; returns the job ids whose wake-up was (re)sent."""
    ids = store.reap(settings.requeue_after)
    for job_id in ids:
        job = store.get_job(job_id)
        if job is not None:
            try:
                enqueue(job_id, job.queue)
            except Exception:  # broker down: the job stays queued and is re-sent after requeue_after
                log.warning("job %s: could not send its message", job_id, exc_info=True)
    if ids:
        log.info("re-sent %d job(s): %s", len(ids), ", ".join(ids))
    deliver_due(store, settings, client)
    return ids


def run_forever(settings: Settings, stop: threading.Event | None = None) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines would log webhook URLs

    stop = stop or threading.Event()
    store = Store(settings.database_url)
    app = producer(settings)
    # trust_env=False: a proxy from the environment would connect to the webhook's name itself,
    # around the address jobs/egress.py checked and pinned
    with httpx.Client(trust_env=False) as client:
        while not stop.is_set():
            try:
                sweep(store, settings, client, lambda job_id, queue: send(job_id, queue, app))
            except Exception:  # keep going through DB or broker outages
                log.exception("reaper sweep failed")
            stop.wait(settings.reaper_interval)


if __name__ == "__main__":
    raise SystemExit(run_until_signalled(run_forever))
