"""Celery tasks: a thin shell around workers.execute (which holds the job logic)."""

from __future__ import annotations

from functools import lru_cache

from jobs.queue import RUN_JOB
from jobs.settings import get_settings
from jobs.store import Store
from workers.app import app
from workers.execute import run_job


@lru_cache(maxsize=1)
def _store() -> Store:
    return Store(get_settings().database_url)


@app.task(name=RUN_JOB, ignore_result=True)
def run_job_task(job_id: str) -> str:
    return run_job(job_id, _store(), get_settings())
