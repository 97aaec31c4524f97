"""The scheduler against a real job store (SQLite; PostgreSQL too when ALLOY_TEST_POSTGRES_URL is set),
with a stepped clock and fake hub heads: no real minutes pass, no network."""

from __future__ import annotations

import shutil
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from jobs.migrate import upgrade
from jobs.models import Job, ScheduleRun
from jobs.schedule_store import ScheduleStore
from jobs.settings import Settings
from jobs.store import Store
from jobs.triggers import CronTrigger, RevisionTrigger, first_due
from tests.jobs.fixtures import PG, postgres_store
from workers.scheduler import Scheduler, SchedulerSettings

on_both_databases = pytest.mark.parametrize("store", ["sqlite"] + (["postgresql"] if PG else []), indirect=True)
TEMPLATE = {"method": "task_arithmetic", "base": "org/base",
            "experts": [{"model": "org/e1"}, {"model": "org/e2@dev"}], "parameters": {"lambda": 0.5},
            "publish": {"repo": "org/merged"}}


class Clock:
    def __init__(self, t: datetime):
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


class Heads:
    """Fake hub: ref -> commit. `bump=True` gives a new commit to every read (an expert retrained
    before every run)."""

    def __init__(self, bump: bool = False):
        self.commits = {"org/base": "b" * 40, "org/e1": "1" * 40, "org/e2@dev": "2" * 40}
        self.bump, self.reads, self.lock = bump, 0, threading.Lock()

    def __call__(self, ref: str, tenant: str) -> str:
        with self.lock:
            self.reads += 1
            if self.bump and ref == "org/e1":
                self.commits[ref] = f"{self.reads:040x}"
            return self.commits[ref]


@pytest.fixture(scope="module")
def migrated_sqlite(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "template.db"
    upgrade(f"sqlite:///{path}")  # once per module; each test gets a copy (migrations take ~0.7 s)
    return path


@pytest.fixture
def store(request, tmp_path, migrated_sqlite):
    """SQLite; the tests of concurrent schedulers also run on PostgreSQL (`on_both_databases`)."""
    clock = Clock(datetime(2026, 1, 5, 10, 7, tzinfo=UTC))
    if getattr(request, "param", "sqlite") == "sqlite":
        shutil.copyfile(migrated_sqlite, tmp_path / "store.db")
        yield Store(f"sqlite:///{tmp_path / 'store.db'}", clock=clock)  # the service's engine (WAL)
        return
    with postgres_store(clock, "alloy_sched") as store:
        yield store


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, database_url="sqlite://", allowed_roots=[tmp_path],
                    hub_namespaces={"acme": ["org"]})  # TEMPLATE publishes to org/merged


def scheduler(store, settings, heads, sent=None, owner="s1", **cfg) -> Scheduler:
    sent = [] if sent is None else sent
    conf = SchedulerSettings(**{"misfire_grace_seconds": 60, "lease_seconds": 30, **cfg})
    return Scheduler(store, settings, conf, heads=heads, owner=owner, enqueue=lambda j, q: sent.append(j))


def add(store, trigger, **kw):
    trig = CronTrigger(**trigger) if trigger.get("type") == "cron" else RevisionTrigger(**trigger)
    return ScheduleStore(store).create(tenant="acme", spec=kw.pop("spec", TEMPLATE),
                                       trigger=trig.model_dump(mode="json"),
                                       next_due_at=first_due(trig, store.clock()), **kw)


def runs(store, sid) -> list[ScheduleRun]:
    with store.tx() as s:
        return list(s.scalars(select(ScheduleRun).where(ScheduleRun.schedule_id == sid).order_by(ScheduleRun.seq)))


def jobs(store) -> list[Job]:
    with store.tx() as s:
        return list(s.scalars(select(Job).order_by(Job.seq)))


def step(store, sch: Scheduler, seconds: float, times: int) -> None:
    for _ in range(times):
        store.clock.advance(seconds)
        sch.tick()


def test_cron_fires_once_per_due_time(store, settings):
    sent: list[str] = []
    sid = add(store, {"type": "cron", "cron": "*/15 * * * *", "timezone": "America/New_York"},
              tag_template="run-{n}-{date}").id
    s = scheduler(store, settings, Heads(bump=True), sent, misfire_grace_seconds=300)
    step(store, s, 300, 24)  # two hours in 5-minute steps from 10:07 UTC
    done = runs(store, sid)
    expected = [datetime(2026, 1, 5, 10, 15, tzinfo=UTC) + timedelta(minutes=15 * i) for i in range(8)]
    assert [r.due_at for r in done] == expected
    assert [r.n for r in done] == list(range(1, 9)) and {r.status for r in done} == {"submitted"}
    js = jobs(store)
    assert [j.id for j in js] == [r.job_id for r in done] == sent  # one job per run, each woken once
    assert {j.source for j in js} == {"schedule"}
    assert js[0].unique_key == f"schedule:{sid}:1"
    # pinned to the commits read at run time, tagged per run (date in the schedule's time zone)
    assert js[0].spec["experts"][0]["model"] == f"org/e1@{done[0].inputs[1]['commit']}"
    assert js[0].spec["experts"][1] == {"model": "org/e2@" + "2" * 40, "name": "e2", "parameters": {}}
    assert js[0].spec["base"] == "org/base@" + "b" * 40
    assert js[0].spec["publish"]["tag"] == "run-1-2026-01-05"


def test_cron_reads_its_time_zone_across_a_dst_change(store, settings):
    store.clock.t = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)
    sid = add(store, {"type": "cron", "cron": "0 9 * * *", "timezone": "Europe/Paris"}).id
    s = scheduler(store, settings, Heads(bump=True), misfire_grace_seconds=4 * 3600)
    step(store, s, 3 * 3600, 8 * 4)  # four days in 3-hour steps
    # 09:00 in Paris is 08:00 UTC before the switch to summer time (29 March 2026), 07:00 after
    assert [r.due_at for r in runs(store, sid)] == [
        datetime(2026, 3, 28, 8, tzinfo=UTC), datetime(2026, 3, 29, 7, tzinfo=UTC),
        datetime(2026, 3, 30, 7, tzinfo=UTC), datetime(2026, 3, 31, 7, tzinfo=UTC)]


def test_cron_run_with_unchanged_inputs_is_skipped_not_published(store, settings):
    heads = Heads()
    sid = add(store, {"type": "cron", "cron": "0 * * * *"}).id
    s = scheduler(store, settings, heads, misfire_grace_seconds=1800, retry_max=0)  # retries: their own test
    step(store, s, 1800, 6)  # 11:00, 12:00, 13:00
    r = runs(store, sid)
    assert [x.status for x in r] == ["submitted", "skipped", "skipped"] and len(jobs(store)) == 1
    assert r[1].reason.startswith(f"inputs unchanged since run 1 (job {r[0].job_id}")
    assert r[1].n is None and r[1].job_id is None
    heads.commits["org/e1"] = "3" * 40  # the expert was retrained
    step(store, s, 1800, 2)
    r = runs(store, sid)
    assert r[-1].status == "submitted" and r[-1].n == 2
    assert [(c["name"], c["from"], c["to"]) for c in r[-1].changes] == [("e1", "1" * 40, "3" * 40)]
    # the last run's job failed: the same inputs are tried again at the next due time
    job = jobs(store)[-1]
    claim = store.claim(job.id, "w", 60)
    assert store.finish(job.id, claim.attempt, "failed", error_code="x", error_message="boom")
    step(store, s, 1800, 2)
    assert runs(store, sid)[-1].status == "submitted" and len(jobs(store)) == 3


@pytest.mark.parametrize("policy", ["once", "skip"])
def test_missed_runs_follow_the_catch_up_policy(store, settings, policy):
    sid = add(store, {"type": "cron", "cron": "*/5 * * * *"}, catch_up=policy).id
    s = scheduler(store, settings, Heads(bump=True))
    store.clock.advance(3600)  # everything was down for an hour: 12 due times passed
    s.tick()
    r = runs(store, sid)
    assert len(r) == 1 and r[0].due_at == datetime(2026, 1, 5, 11, 5, tzinfo=UTC)
    assert "12 due time(s)" in r[0].reason
    if policy == "once":
        assert r[0].status == "submitted" and r[0].reason.startswith("catch-up") and len(jobs(store)) == 1
    else:
        assert r[0].status == "skipped" and "catch_up is `skip`" in r[0].reason and jobs(store) == []
    step(store, s, 60, 5)  # back to normal: 11:10 fires on time under either policy
    r = runs(store, sid)
    assert len(r) == 2 and r[1].status == "submitted" and r[1].reason == "cron"
    # one due time, but found later than the misfire grace, is a missed one too
    store.clock.advance(5 * 60 + 120)
    s.tick()
    assert runs(store, sid)[-1].status == ("submitted" if policy == "once" else "skipped")


def test_a_cron_faster_than_the_tick_coalesces_without_counting_as_missed(store, settings):
    sid = add(store, {"type": "cron", "cron": "* * * * * *"}, catch_up="skip").id  # every second
    step(store, scheduler(store, settings, Heads(bump=True), misfire_grace_seconds=5), 2.5, 8)
    r = runs(store, sid)
    assert len(r) == 8 and {x.status for x in r} == {"submitted"}
    assert {x.reason for x in r} <= {"cron (2 due times coalesced)", "cron (3 due times coalesced)"}
    assert r[-1].due_at == store.clock().replace(microsecond=0)  # the latest due time runs


def test_on_new_revision_runs_only_when_a_commit_moves(store, settings):
    heads, sent = Heads(), []
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 30}, tag_template="run-{n}").id
    s = scheduler(store, settings, heads, sent)
    s.tick()  # first poll: nothing published yet -> a first run
    step(store, s, 30, 10)  # ten polls, no change -> no job
    assert heads.reads == 3 * 11
    r = runs(store, sid)
    assert len(r) == 1 and r[0].reason == "first run" and len(sent) == 1
    heads.commits["org/e2@dev"] = "c" * 40  # a new commit on e2's `dev` branch
    step(store, s, 30, 5)
    r = runs(store, sid)
    assert len(r) == 2 and len(jobs(store)) == 2 and len(sent) == 2
    assert r[1].reason == f"new revision: e2 {'2' * 12} -> {'c' * 12}"
    assert r[1].changes == [{"role": "expert", "name": "e2", "ref": "org/e2@dev", "from": "2" * 40, "to": "c" * 40}]
    spec = jobs(store)[1].spec
    assert spec["experts"][1]["model"] == "org/e2@" + "c" * 40 and spec["publish"]["tag"] == "run-2"


def test_paused_schedules_do_not_run(store, settings):
    ss = ScheduleStore(store)
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 30}, paused=True).id
    s = scheduler(store, settings, Heads(bump=True))
    step(store, s, 30, 4)
    assert runs(store, sid) == []
    ss.update(sid, None, paused=False)
    step(store, s, 30, 1)
    assert len(runs(store, sid)) == 1


@on_both_databases
def test_a_scheduler_whose_lease_expired_cannot_make_a_second_job(store, settings):
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 30}).id
    heads = Heads()
    a, b = scheduler(store, settings, heads, owner="a"), scheduler(store, settings, heads, owner="b")
    t = store.clock()
    stale = ScheduleStore(store).claim(sid, "a", t, 30)
    assert stale is not None and ScheduleStore(store).claim(sid, "b", t, 30) is None  # the lease excludes
    store.clock.advance(31)  # a stalls past its lease (a slow hub); b takes over and runs
    assert [o.status for o in b.tick()] == ["submitted"]
    heads.commits["org/e1"] = "9" * 40  # and an expert moves before `a` reads the heads
    outcome, _ = a._evaluate(stale, t)  # a wakes up with its stale view (run_count 0): run 1 is taken
    assert outcome.status == "unchanged" and "another scheduler" in outcome.detail
    assert len(jobs(store)) == 1 and len(runs(store, sid)) == 1
    step(store, b, 30, 1)  # the move is picked up by the next poll of the lease holder, as run 2
    assert [r.n for r in runs(store, sid)] == [1, 2] and len(jobs(store)) == 2


@on_both_databases
def test_a_run_left_without_its_job_gets_exactly_one(store, settings, monkeypatch):
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 30}).id
    s = scheduler(store, settings, Heads(), pending_after_seconds=10)
    real = store.create_job

    def crash(**kw):  # the scheduler dies after recording the run, before creating its job
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "create_job", crash)
    with pytest.raises(KeyboardInterrupt):
        s.tick()
    monkeypatch.setattr(store, "create_job", real)
    assert [r.status for r in runs(store, sid)] == ["pending"] and jobs(store) == []
    other = scheduler(store, settings, Heads(), owner="s2", pending_after_seconds=10)
    store.clock.advance(11)
    other.tick()  # finishes the pending run; the schedule's lease (30 s) is still held by the dead one
    store.clock.advance(30)
    other.tick()
    other.tick()
    r = runs(store, sid)
    assert [x.status for x in r] == ["submitted"] and [j.id for j in jobs(store)] == [r[0].job_id]


@on_both_databases
def test_concurrent_schedulers_make_one_job_per_due_run(store, settings):
    """Four schedulers tick at the same instants from threads (barrier-aligned) for 20 due times."""
    ids = [add(store, {"type": "cron", "cron": "* * * * *"}).id for _ in range(2)]
    heads = Heads(bump=True)
    scheds = [scheduler(store, settings, heads, owner=f"s{i}") for i in range(4)]
    barrier, errors = threading.Barrier(len(scheds)), []
    times = [store.clock() + timedelta(minutes=m, seconds=1) for m in range(1, 21)]

    def loop(sch):
        try:
            for t in times:
                barrier.wait()
                store.clock.t = t  # the same value from every thread
                barrier.wait()
                sch.tick()
        except Exception as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=loop, args=(x,)) for x in scheds]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for sid in ids:
        r = runs(store, sid)
        assert len(r) == 20 and len({x.due_at for x in r}) == 20 and [x.n for x in r] == list(range(1, 21))
    js = jobs(store)
    assert len(js) == 40 and len({j.unique_key for j in js}) == 40
