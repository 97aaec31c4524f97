"""The job store's state machine: claim with fencing, leases, reaper, attempt cap, cancel, idempotency.

Runs on SQLite, and on PostgreSQL too when ALLOY_TEST_POSTGRES_URL is set (in a throwaway schema).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine

from jobs.migrate import upgrade
from jobs.store import IdempotencyConflict, NotCancellable, Store
from tests.jobs.fixtures import PG, postgres_store

SPEC = {"method": "task_arithmetic", "experts": [{"model": "org/a"}], "base": "org/base"}


class Clock:
    def __init__(self):
        self.t = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite"] + (["postgresql"] if PG else []))
def store(request, tmp_path):
    clock = Clock()
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        upgrade(url)
        yield Store(url, clock=clock, engine=create_engine(url))
        return
    with postgres_store(clock, "alloy_test") as store:
        yield store


def new_job(store: Store, **kw):
    job, created = store.create_job(tenant=kw.pop("tenant", "acme"), spec=kw.pop("spec", SPEC),
                                    method="task_arithmetic", queue="cpu", **kw)
    assert created
    return job


def test_claim_is_exclusive_and_fenced_after_reaping(store):
    job = new_job(store)
    first = store.claim(job.id, "w1", lease_seconds=10)
    assert first is not None and first.attempt == 1
    assert store.claim(job.id, "w2", lease_seconds=10) is None  # duplicate delivery
    assert store.heartbeat(job.id, 1, 10, stage="merge", step=3, total=9) == (True, False)

    store.clock.advance(11)  # w1 stalls past its lease
    assert store.reap(requeue_after=300) == [job.id]
    assert store.get_job(job.id).state == "queued"
    second = store.claim(job.id, "w2", lease_seconds=10)
    assert second is not None and second.attempt == 2
    # the stale worker is fenced off: its writes match no row
    assert store.heartbeat(job.id, 1, 10) == (False, True)
    assert store.set_stage(job.id, 1, "publish") is False
    assert store.finish(job.id, 1, "succeeded", result={"x": 1}) is False
    assert store.finish(job.id, 2, "succeeded", result={"ok": True}) is True
    done = store.get_job(job.id)
    assert (done.state, done.attempts, done.result) == ("succeeded", 2, {"ok": True})
    states = [e.data.get("state") for e in store.events_after(job.id, 0) if e.type == "state"]
    assert states == ["queued", "running", "queued", "running", "succeeded"]


def test_attempt_cap_fails_a_job_that_keeps_losing_its_worker(store):
    job = new_job(store, max_attempts=2)
    for attempt in (1, 2):
        assert store.claim(job.id, "w", lease_seconds=5).attempt == attempt
        store.clock.advance(6)
        store.reap(requeue_after=300)
    failed = store.get_job(job.id)
    assert failed.state == "failed" and failed.error_code == "worker_lost"
    assert "2 times" in failed.error_message
    assert store.claim(job.id, "w", lease_seconds=5) is None


def test_cancel_queued_running_and_finished(store):
    queued = new_job(store)
    assert store.request_cancel(queued.id, "acme").state == "cancelled"
    assert store.claim(queued.id, "w", 10) is None

    running = new_job(store)
    c = store.claim(running.id, "w", 10)
    assert store.request_cancel(running.id, "acme").state == "cancelling"
    assert store.request_cancel(running.id, "acme").state == "cancelling"  # idempotent
    assert store.heartbeat(running.id, c.attempt, 10) == (True, True)
    assert store.finish(running.id, c.attempt, "cancelled", error_code="cancelled") is True
    assert store.request_cancel(running.id, "acme").state == "cancelled"

    done = new_job(store)
    c = store.claim(done.id, "w", 10)
    store.finish(done.id, c.attempt, "succeeded")
    with pytest.raises(NotCancellable):
        store.request_cancel(done.id, "acme")
    assert store.request_cancel(done.id, "other") is None  # another tenant's job: not found


def test_cancelling_job_whose_worker_died_ends_cancelled(store):
    job = new_job(store)
    store.claim(job.id, "w", 5)
    store.request_cancel(job.id, None)
    store.clock.advance(6)
    assert store.reap(requeue_after=300) == []
    assert store.get_job(job.id).state == "cancelled"


def test_idempotency_key_and_unique_key(store):
    a = new_job(store, idempotency_key="k1")
    again, created = store.create_job(tenant="acme", spec=dict(SPEC), method="task_arithmetic",
                                      queue="cpu", idempotency_key="k1")
    assert (again.id, created) == (a.id, False)
    with pytest.raises(IdempotencyConflict):
        store.create_job(tenant="acme", spec={**SPEC, "seed": 1}, method="task_arithmetic", queue="cpu",
                         idempotency_key="k1")
    # keys are per tenant
    b = new_job(store, tenant="other", idempotency_key="k1")
    assert b.id != a.id
    s1 = new_job(store, unique_key="sched_1@2026-01-01T00:00")
    s2, created = store.create_job(tenant="acme", spec=SPEC, method="task_arithmetic", queue="cpu",
                                   unique_key="sched_1@2026-01-01T00:00")
    assert (s2.id, created) == (s1.id, False)


def test_lost_messages_are_resent_and_list_pagination(store):
    ids = [new_job(store).id for _ in range(5)]
    assert store.reap(requeue_after=60) == []
    store.clock.advance(61)
    assert sorted(store.reap(requeue_after=60)) == sorted(ids)
    assert store.reap(requeue_after=60) == []  # re-sent once per period, not every sweep
    page1, more = store.list_jobs("acme", limit=2)
    page2, more2 = store.list_jobs("acme", after=page1[-1].id, limit=10)
    assert more and not more2
    assert [j.id for j in page1 + page2] == ids[::-1]
    assert store.list_jobs("other")[0] == []


def test_webhook_outbox_is_claimed_once(store):
    job = new_job(store, spec={**SPEC, "notify": {"url": "http://example.invalid/hook"}})
    c = store.claim(job.id, "w", 10)
    store.finish(job.id, c.attempt, "succeeded")
    got = store.claim_webhook(hold_seconds=30)
    assert got is not None and got.id == job.id and got.webhook_attempts == 1
    assert store.claim_webhook(hold_seconds=30) is None  # held by the first claimer
    store.record_delivery(job.id, webhook_id="w1", attempt=1, url="u", status_code=500, error="HTTP 500",
                          delivered=False, retry_in=2)
    store.clock.advance(2)
    assert store.claim_webhook(hold_seconds=30).webhook_attempts == 2
    store.record_delivery(job.id, webhook_id="w1", attempt=2, url="u", status_code=204, error=None,
                          delivered=True, retry_in=None)
    assert store.get_job(job.id).webhook_state == "delivered"
    assert [d.status_code for d in store.deliveries(job.id)] == [500, 204]


def test_concurrent_submits_with_one_key_make_one_job(store):
    from concurrent.futures import ThreadPoolExecutor

    def create(_):
        return store.create_job(tenant="acme", spec=SPEC, method="task_arithmetic", queue="cpu",
                                idempotency_key="race")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(16)))
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list_jobs("acme")[0]) == 1
