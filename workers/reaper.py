"""The reaper loop (`alloy reaper`): expired leases back to the queue, lost messages re-sent,
webhooks delivered from the outbox. Any number may run: every step is a conditional UPDATE."""

from __future__ import annotations

import logging
import threading

import httpx

from service.settings import Settings
from service.store import Store
from service.webhooks import deliver_due

log = logging.getLogger("alloy.reaper")


def sweep(store: Store, settings: Settings, client: httpx.Client, celery_app=None) -> list[str]:
    """One pass; returns the job ids whose wake-up was (re)sent."""
    from workers.app import enqueue

    ids = store.reap(settings.requeue_after)
    for job_id in ids:
        job = store.get_job(job_id)
        if job is not None:
            try:
                enqueue(job_id, job.queue, celery_app)
            except Exception:  # broker down: the job stays queued and is re-sent next time
                log.warning("job %s: could not send its message", job_id, exc_info=True)
    if ids:
        log.info("re-sent %d job(s): %s", len(ids), ", ".join(ids))
    deliver_due(store, settings, client)
    return ids


def run_forever(settings: Settings, stop: threading.Event | None = None) -> None:
    from workers.app import make_app

    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines would log webhook URLs

    stop = stop or threading.Event()
    store = Store(settings.database_url)
    celery_app = make_app(settings)
    with httpx.Client() as client:
        while not stop.is_set():
            try:
                sweep(store, settings, client, celery_app)
            except Exception:  # keep going through DB or broker outages
                log.exception("reaper sweep failed")
            stop.wait(settings.reaper_interval)
