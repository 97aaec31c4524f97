"""Jobs a scheduler makes count toward the tenant's quota (ALLOY_MAX_ACTIVE_JOBS_PER_TENANT) like
submitted ones: a scheduled run past it makes no job and is recorded with the reason. A cron due time is
skipped (the next one runs); a new revision is deferred, recorded once, and runs at the first poll under
the limit. Real job store (SQLite), stepped clock, fake hub heads."""

from __future__ import annotations

from jobs.states import SUCCEEDED
from jobs.store import Store
from tests.workers.test_scheduler import (  # noqa: F401  (migrated_sqlite, settings, store: fixtures)
    Heads,
    add,
    jobs,
    migrated_sqlite,
    runs,
    scheduler,
    settings,
    step,
    store,
)

QUOTA = "ALLOY_MAX_ACTIVE_JOBS_PER_TENANT=2"


def _api_job(store: Store) -> str:  # noqa: F811
    job, _ = store.create_job(tenant="acme", spec={"method": "task_arithmetic"}, method="task_arithmetic",
                              queue="cpu")
    return job.id


def _finish(store: Store, job_id: str) -> None:  # noqa: F811
    claim = store.claim(job_id, "w", 30)
    assert store.finish(job_id, claim.attempt, SUCCEEDED, result={})


def test_cron_run_over_quota_is_skipped_with_the_reason(store, settings):  # noqa: F811
    s = scheduler(store, settings.model_copy(update={"max_active_jobs_per_tenant": 2}), Heads(bump=True),
                  misfire_grace_seconds=1800, retry_max=0)
    sid = add(store, {"type": "cron", "cron": "0 * * * *"}).id
    held = [_api_job(store), _api_job(store)]  # the tenant's quota is full with submitted jobs
    step(store, s, 1800, 2)  # 10:37, 11:07: the 11:00 run
    (r,) = runs(store, sid)
    assert r.status == "skipped" and r.job_id is None and r.n is None
    assert r.reason.startswith("over quota: tenant 'acme' has 2 queued or running jobs") and QUOTA in r.reason
    assert "next due time" in r.reason
    assert [j.id for j in jobs(store)] == held  # no job was made
    _finish(store, held[0])
    step(store, s, 1800, 2)  # 12:00: one slot free -> the run goes through
    assert [x.status for x in runs(store, sid)] == ["skipped", "submitted"]
    step(store, s, 1800, 2)  # 13:00: the scheduler's own queued job counts too -> full again
    last = runs(store, sid)[-1]
    assert last.status == "skipped" and "has 2 queued or running jobs" in last.reason
    assert len(jobs(store)) == 3


def test_new_revision_over_quota_is_deferred_until_a_slot_frees(store, settings):  # noqa: F811
    s = scheduler(store, settings.model_copy(update={"max_active_jobs_per_tenant": 1}), Heads())
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 60}).id
    held = _api_job(store)
    out = [o for o in s.tick() if o.schedule_id == sid]
    assert [o.status for o in out] == ["deferred"] and "deferred" in out[0].detail
    step(store, s, 60, 3)  # three more polls while still full: one record, no job
    (r,) = runs(store, sid)
    assert r.status == "skipped" and "over quota" in r.reason and "deferred" in r.reason and QUOTA[:-1] in r.reason
    assert [j.id for j in jobs(store)] == [held]
    _finish(store, held)
    step(store, s, 60, 1)  # the first poll under the limit makes the run
    done = runs(store, sid)
    assert [x.status for x in done] == ["skipped", "submitted"] and done[-1].n == 1
    assert jobs(store)[-1].source == "schedule"
