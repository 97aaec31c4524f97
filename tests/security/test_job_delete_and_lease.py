"""DELETE /v1/jobs/{id}: a finished job's files and details go, a small audit row stays (admins read it);
and the default lease brings a killed worker's job back to the queue within 15 s, never while its
worker still renews it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobs.settings import Settings
from jobs.store import Store
from tests.security.conftest import auth, make_settings, spec_body


def _finished(c, *, state: str = "succeeded") -> tuple[str, Store]:
    s = c.app.state.settings
    r = c.post("/v1/jobs", json=spec_body(s.data_dir, notify={"url": "https://hooks.example.com/h"},
                                          publish={"repo": "acme/m"}),
               headers={**auth(), "Idempotency-Key": "once"})
    job_id = r.json()["id"]
    store = Store(s.database_url)
    claim = store.claim(job_id, "w", 30)
    out = s.data_dir / "jobs" / job_id / f"attempt-{claim.attempt}" / "model"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    (s.data_dir / "jobs" / job_id / "coefficients.json").write_text("[]")
    store.finish(job_id, claim.attempt, state, result={"published": {"repo": "acme/m", "commit": "c" * 40},
                                                       "output": str(out)})
    return job_id, store


def test_delete_a_finished_job(make_client):
    c = make_client(webhook_allow=["hooks.example.com"])
    job_id, store = _finished(c)
    root = c.app.state.settings.data_dir
    assert c.delete(f"/v1/jobs/{job_id}", headers=auth("other")).status_code == 404
    assert c.delete(f"/v1/jobs/{job_id}", headers=auth("acme-ro")).status_code == 403
    assert c.delete(f"/v1/jobs/{job_id}", headers=auth()).status_code == 204
    assert not (root / "jobs" / job_id).exists()  # outputs and coefficients removed
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/coefficients"):
        assert c.get(path, headers=auth()).status_code == 404, path
    assert c.get("/v1/jobs", headers=auth()).json()["data"] == []
    assert c.delete(f"/v1/jobs/{job_id}", headers=auth()).status_code == 404  # once
    # the audit row: who, what, how it ended, what it published; no spec, events or deliveries
    row = store.get_job(job_id)
    assert row.deleted_at is not None and row.tenant == "acme" and row.state == "succeeded"
    assert row.spec == {"method": "task_arithmetic", "deleted": True}
    assert row.result == {"published": {"repo": "acme/m", "commit": "c" * 40}}
    assert store.events_after(job_id, 0) == [] and store.deliveries(job_id) == []
    assert row.webhook_state is None  # a pending webhook is not sent for a deleted job
    audit = c.get(f"/v1/jobs/{job_id}", headers=auth("admin"))
    assert audit.status_code == 200 and audit.json()["state"] == "succeeded"
    # the Idempotency-Key is free again: a new submit with it makes a new job
    r = c.post("/v1/jobs", json=spec_body(root), headers={**auth(), "Idempotency-Key": "once"})
    assert r.status_code == 202 and r.json()["id"] != job_id


def test_active_jobs_cannot_be_deleted(make_client):
    c = make_client()
    job_id = c.post("/v1/jobs", json=spec_body(c.app.state.settings.data_dir), headers=auth()).json()["id"]
    r = c.delete(f"/v1/jobs/{job_id}", headers=auth())
    assert r.status_code == 409 and "cancel it" in r.json()["error"]["message"]
    Store(c.app.state.settings.database_url).claim(job_id, "w", 30)
    assert c.delete(f"/v1/jobs/{job_id}", headers=auth()).status_code == 409  # running
    assert c.get(f"/v1/jobs/{job_id}", headers=auth()).json()["state"] == "running"


def test_default_lease_requeues_a_dead_workers_job_within_15s(tmp_path):
    s = make_settings(tmp_path)
    defaults = Settings()
    t = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = Store(s.database_url, clock=lambda: t[0])
    job, _ = store.create_job(tenant="acme", spec=spec_body(tmp_path), method="task_arithmetic", queue="cpu")
    claim = store.claim(job.id, "w1", defaults.lease_seconds)
    # a live worker renews every heartbeat: its job is never handed out again
    for _ in range(10):
        t[0] += timedelta(seconds=defaults.heartbeat_seconds)
        assert store.heartbeat(job.id, claim.attempt, defaults.lease_seconds)[0]
        assert store.reap(defaults.requeue_after) == []
    # the worker is killed: no more heartbeats; reaper sweeps every reaper_interval
    dead_at, back_at = t[0], None
    while back_at is None and t[0] - dead_at < timedelta(seconds=60):
        t[0] += timedelta(seconds=defaults.reaper_interval)
        if store.reap(defaults.requeue_after) == [job.id]:
            back_at = t[0]
    assert back_at is not None and back_at - dead_at <= timedelta(seconds=15)
    assert store.get_job(job.id).state == "queued"
    assert not store.heartbeat(job.id, claim.attempt, defaults.lease_seconds)[0]  # the old attempt is fenced
    assert store.claim(job.id, "w2", defaults.lease_seconds).attempt == claim.attempt + 1


def test_heartbeat_must_fit_in_the_lease():
    with pytest.raises(ValueError, match="at most half"):
        Settings(lease_seconds=10, heartbeat_seconds=6)
