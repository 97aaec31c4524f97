"""Worker-side limits and re-checks: the wall-clock limit per job (ALLOY_JOB_TIMEOUT_SECONDS) fails a
job `timeout` with a clear message; the model sources and the publish target are checked again before
anything is read or published (settings may have changed since submit)."""

from __future__ import annotations

import itertools
import shutil

import pytest

from jobs.store import Store
from merge_ops.publish import LocalHub
from tests.security.conftest import make_settings
from workers import execute


@pytest.fixture
def world(tmp_path, tiny_llama):
    base, experts = tiny_llama(n_experts=2, hidden=16, layers=2, intermediate=32, vocab=32)
    s = make_settings(tmp_path)  # models in tmp_path/models: under the root, outside the data areas
    return s, Store(s.database_url), base, experts


def _job(store: Store, spec: dict, tenant: str = "acme") -> str:
    job, _ = store.create_job(tenant=tenant, spec=spec, method=spec["method"], queue="cpu")
    return job.id


def _spec(base, experts, **over) -> dict:
    return {"method": "task_arithmetic", "base": str(base), "experts": [{"model": str(e)} for e in experts],
            "parameters": {"lambda": 0.5}, **over}


def test_job_past_its_time_limit_fails_timeout(world, monkeypatch):
    s, store, base, experts = world
    s = s.model_copy(update={"job_timeout_seconds": 30.0})
    clock = itertools.chain([0.0], itertools.repeat(1e9))  # the attempt starts at 0; every later look is late
    monkeypatch.setattr(execute, "_now", lambda: next(clock))
    job_id = _job(store, _spec(base, experts, publish={"repo": "acme/slow"}))
    assert execute.run_job(job_id, store, s) == "timeout"
    job = store.get_job(job_id)
    assert job.state == "failed" and job.error_code == "timeout"
    assert "30 s" in job.error_message and "ALLOY_JOB_TIMEOUT_SECONDS" in job.error_message
    assert LocalHub(s.hub_root).find_commit("acme/slow", job_id) is None  # nothing published
    assert not (s.data_dir / "jobs" / job_id / "attempt-1").exists()


def test_within_the_limit_the_job_succeeds(world):
    s, store, base, experts = world
    job_id = _job(store, _spec(base, experts))
    assert execute.run_job(job_id, store, s) == "succeeded"


def test_a_step_that_never_checks_is_failed_by_the_heartbeat(world, monkeypatch):
    """The heartbeat thread records the timeout itself once the grace period is over; the fence then
    keeps the stuck attempt from writing anything."""
    s, store, base, experts = world
    s = s.model_copy(update={"job_timeout_seconds": 30.0, "heartbeat_seconds": 0.01})
    job_id = _job(store, _spec(base, experts))
    claim = store.claim(job_id, "w", 60)
    clock = itertools.chain([0.0], itertools.repeat(1e9))
    monkeypatch.setattr(execute, "_now", lambda: next(clock))
    rep = execute.Reporter(store, job_id, claim.attempt, s)
    rep._beat()  # returns once it has recorded the timeout
    job = store.get_job(job_id)
    assert job.state == "failed" and job.error_code == "timeout" and rep.timed_out
    assert not store.finish(job_id, claim.attempt, "succeeded", result={})  # fenced off


def test_worker_rechecks_sources_and_publish_target(world):
    s, store, base, experts = world
    hub_model = shutil.copytree(base, s.hub_root / "other" / "m")  # a model inside the data dir's hub
    elsewhere = s.data_dir / "models" / "via-link"
    elsewhere.symlink_to(hub_model, target_is_directory=True)  # a path outside it that leads there
    job_id = _job(store, _spec(elsewhere, experts))
    assert execute.run_job(job_id, store, s) == "failed"
    assert "never a model source" in store.get_job(job_id).error_message
    job_id = _job(store, _spec(hub_model, experts))
    assert execute.run_job(job_id, store, s) == "failed"
    assert "never a model source" in store.get_job(job_id).error_message
    job_id = _job(store, _spec(base, experts, publish={"repo": "other/taken"}))
    assert execute.run_job(job_id, store, s) == "failed"
    job = store.get_job(job_id)
    assert job.error_code == "invalid_spec" and "may not publish" in job.error_message
    assert LocalHub(s.hub_root).find_commit("other/taken", job_id) is None
