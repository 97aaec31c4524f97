"""The schedule lifecycle on the scheduler side, with a stepped clock and fake hub heads/tags:
retries with backoff, health, `rejected` runs, run now, free tags, catch-up within the grace,
pruning skipped runs, load sharing between schedulers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import SecretStr

from jobs.models import Schedule
from jobs.schedule_store import ScheduleStore
from jobs.states import FAILED, REJECTED, SUCCEEDED
from service.routes_schedules import health
from tests.workers import test_scheduler as base
from tests.workers.test_scheduler import Heads, add, jobs, runs, scheduler, step

store, settings, migrated_sqlite = base.store, base.settings, base.migrated_sqlite  # the same fixtures


def end(store, job_id: str, state: str, message: str = "boom") -> None:
    """What a worker records at the end of a job (the `rejected` state has no producer yet: the
    evaluation gate will write it; here it is written through the store directly)."""
    claim = store.claim(job_id, "w", 60)
    assert store.finish(job_id, claim.attempt, state, error_code=None if state == SUCCEEDED else "x",
                        error_message=None if state == SUCCEEDED else message)


def sched(store, sid) -> Schedule:
    return ScheduleStore(store).get(sid)


def test_a_failed_run_is_retried_with_backoff_then_gives_up_and_health_says_so(store, settings):
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 3600}, tag_template="run-{n}").id
    s = scheduler(store, settings, Heads(), retry_max=2, retry_backoff_seconds=60)
    s.tick()
    [first] = runs(store, sid)
    end(store, first.job_id, FAILED, "hub said 500")
    s.tick()  # settled: failure counted, retry in 60 s
    r = runs(store, sid)[0]
    assert r.settled_at is not None and r.retry_at == store.clock() + timedelta(seconds=60)
    h = health(sched(store, sid))
    assert (h.status, h.consecutive_failures, h.last_outcome, h.last_success_at) == ("failing", 1, FAILED, None)
    step(store, s, 59, 1)
    assert len(runs(store, sid)) == 1  # not yet
    step(store, s, 1, 1)
    r = runs(store, sid)
    assert len(r) == 2 and r[0].retry_at is None
    retry = r[1]
    assert (retry.n, retry.attempt, retry.retry_of, retry.tag) == (2, 2, first.id, "run-2")
    assert retry.reason.startswith(f"retry 1 of 2 of run 1 (job {first.job_id} failed: hub said 500)")
    assert retry.inputs == first.inputs and jobs(store)[1].spec["publish"]["tag"] == "run-2"
    end(store, retry.job_id, FAILED)
    s.tick()
    assert runs(store, sid)[1].retry_at == store.clock() + timedelta(seconds=120)  # the backoff doubles
    step(store, s, 120, 1)
    third = runs(store, sid)[2]
    assert (third.n, third.attempt, third.retry_of) == (3, 3, first.id)
    end(store, third.job_id, FAILED)
    step(store, s, 10_000, 2)  # the last retry failed: no more
    assert len(runs(store, sid)) == 3 and runs(store, sid)[2].retry_at is None and len(jobs(store)) == 3
    assert health(sched(store, sid)).consecutive_failures == 3
    # a new input commit runs again; its success resets the failure count
    s.heads.commits["org/e1"] = "7" * 40
    step(store, s, 3600, 1)
    newest = runs(store, sid)[-1]
    assert newest.n == 4 and newest.attempt == 1
    end(store, newest.job_id, SUCCEEDED)
    s.tick()
    h = health(sched(store, sid))
    assert (h.status, h.consecutive_failures, h.last_outcome) == ("ok", 0, SUCCEEDED)
    assert h.last_success_at == store.clock()


@base.on_both_databases
def test_two_schedulers_settle_and_retry_a_failed_run_once(store, settings):
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 3600}).id
    a = scheduler(store, settings, Heads(), owner="a", retry_backoff_seconds=10)
    b = scheduler(store, settings, Heads(), owner="b", retry_backoff_seconds=10)
    a.tick()
    end(store, runs(store, sid)[0].job_id, FAILED)
    a.tick()
    b.tick()
    assert health(sched(store, sid)).consecutive_failures == 1  # counted once
    store.clock.advance(10)
    stale = ScheduleStore(store).retries_due(store.clock())
    a.tick()
    assert b._retry(*stale[0], store.clock()).status == "unchanged"  # b read the due retry before a took it
    assert [r.attempt for r in runs(store, sid)] == [1, 2] and len(jobs(store)) == 2


def test_a_rejected_job_makes_a_rejected_run_that_is_not_retried(store, settings):
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 60}).id
    s = scheduler(store, settings, Heads())
    s.tick()
    end(store, runs(store, sid)[0].job_id, REJECTED, "publish_if: accuracy 0.41 < 0.5")
    s.tick()
    r = runs(store, sid)
    assert [x.status for x in r] == ["rejected"] and r[0].retry_at is None
    h = health(sched(store, sid))
    assert (h.status, h.consecutive_failures, h.last_outcome) == ("rejected", 1, REJECTED)
    step(store, s, 3600, 3)
    assert len(runs(store, sid)) == 1  # same inputs: not run again, not retried


def test_a_cron_schedule_does_not_rerun_inputs_that_were_rejected(store, settings):
    sid = add(store, {"type": "cron", "cron": "0 * * * *"}).id
    s = scheduler(store, settings, Heads(), misfire_grace_seconds=1800)
    step(store, s, 1800, 2)  # 11:00 runs
    end(store, runs(store, sid)[0].job_id, REJECTED, "publish_if: accuracy 0.41 < 0.5")
    step(store, s, 1800, 2)  # 12:00: the same inputs were rejected: skipped, not merged again
    r = runs(store, sid)
    assert [x.status for x in r] == ["rejected", "skipped"] and len(jobs(store)) == 1
    assert r[1].reason.startswith(f"inputs unchanged since run 1 (job {r[0].job_id}, rejected)")


def test_run_now_runs_once_even_with_unchanged_inputs_and_when_paused(store, settings):
    ss = ScheduleStore(store)
    sid = add(store, {"type": "cron", "cron": "0 3 * * *"}, tag_template="run-{n}").id
    due = sched(store, sid).next_due_at
    s = scheduler(store, settings, Heads())
    ss.update(sid, None, run_requested_at=store.clock())
    s.tick()
    [r] = runs(store, sid)
    assert r.n == 1 and r.status == "submitted" and r.reason.startswith("run now") and r.tag == "run-1"
    assert sched(store, sid).run_requested_at is None and sched(store, sid).next_due_at == due  # cron untouched
    s.tick()
    assert len(runs(store, sid)) == 1  # once per request
    ss.update(sid, None, paused=True)
    ss.update(sid, None, run_requested_at=store.clock())
    s.tick()
    r = runs(store, sid)
    assert len(r) == 2 and r[1].n == 2 and r[1].inputs == r[0].inputs  # inputs unchanged: runs anyway


def test_a_tag_template_skips_tags_that_exist_on_the_target(store, settings):
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 30}, tag_template="run-{n}").id
    taken = {"run-1", "run-1-2", "run-2"}  # an older schedule of the same name published these
    s = scheduler(store, settings, Heads(bump=True))
    s.tags = lambda publish, tenant: taken if publish["repo"] == "org/merged" else set()
    s.tick()
    step(store, s, 30, 1)
    r = runs(store, sid)
    assert [x.tag for x in r] == ["run-1-3", "run-2-2"]
    assert "tag 'run-1' exists on org/merged, using 'run-1-3'" in r[0].reason
    assert [j.spec["publish"]["tag"] for j in jobs(store)] == ["run-1-3", "run-2-2"]


def test_catch_up_skip_keeps_a_due_time_still_within_the_grace(store, settings):
    sid = add(store, {"type": "cron", "cron": "*/5 * * * *"}, catch_up="skip").id
    s = scheduler(store, settings, Heads(bump=True), misfire_grace_seconds=60)
    store.clock.advance(53 * 60 + 30)  # down since 10:07; it is now 11:00:30, 30 s past a due time
    s.tick()
    [r] = runs(store, sid)
    assert r.status == "submitted" and r.due_at == datetime(2026, 1, 5, 11, 0, tzinfo=UTC)
    assert r.reason == "cron (10 earlier due time(s) skipped: catch_up is `skip`)"


def test_skipped_runs_are_pruned_after_the_retention(store, settings):
    sid = add(store, {"type": "cron", "cron": "0 * * * *"}).id
    s = scheduler(store, settings, Heads(), misfire_grace_seconds=1800, skipped_retention_seconds=3 * 3600)
    step(store, s, 1800, 12)  # to 16:07: run at 11:00, then "inputs unchanged" at 12:00 ... 16:00
    r = runs(store, sid)
    assert r[0].status == "submitted" and [x.status for x in r[1:]] == ["skipped"] * 4  # 12:00 is gone
    assert [x.due_at.hour for x in r] == [11, 13, 14, 15, 16]
    assert all(store.clock() - x.created_at <= timedelta(hours=3) for x in r[1:])


@base.on_both_databases
def test_schedulers_share_the_due_schedules(store, settings):
    ids = {add(store, {"type": "on_new_revision", "poll_seconds": 60}).id for _ in range(8)}
    heads = Heads()
    a = scheduler(store, settings, heads, owner="a", claim_limit=3)
    b = scheduler(store, settings, heads, owner="b", claim_limit=3)
    assert len([o for o in a.tick() if o.status == "submitted"]) == 3  # a takes its share, not all 8
    assert len([o for o in b.tick() if o.status == "submitted"]) == 3
    a.tick()
    by = {sid: runs(store, sid) for sid in ids}
    assert all(len(r) == 1 for r in by.values()) and len(jobs(store)) == 8
    owners = [r[0].scheduler for r in by.values()]
    assert owners.count("b") == 3 and owners.count("a") == 5


def test_a_failed_scheduled_job_with_notify_queues_its_webhook(store, settings):
    s_hooks = settings.model_copy(update={"webhook_secret": SecretStr("whsec-test")})
    spec = {**base.TEMPLATE, "notify": {"url": "https://hooks.example.com/alloy"}}
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 60}, spec=spec).id
    s = scheduler(store, s_hooks, Heads(), retry_max=0)
    s.tick()
    [run] = runs(store, sid)
    assert run.spec["notify"] == {"url": "https://hooks.example.com/alloy"}  # the pinned spec keeps it
    end(store, run.job_id, FAILED)
    job = store.get_job(run.job_id)
    assert job.webhook_state == "pending"  # the reaper POSTs it, signed, like any job's
    s.tick()
    assert health(sched(store, sid)).status == "failing"


def test_a_missing_input_repo_names_the_settings_the_service_reads(store, settings, hub_server):
    from tests.hub_fixtures import HUB_TEST_TOKEN

    hub_server.push("org/base", {"config.json": b"{}"})
    s_hub = settings.model_copy(update={"hub_endpoint": hub_server.url,
                                        "hub_tokens": {"acme": SecretStr(HUB_TEST_TOKEN)}})
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 60}).id
    s = scheduler(store, s_hub, None)  # the real hub reads: org/e1 does not exist there
    s.heads = s._hub_head
    s.tick()
    err = sched(store, sid).last_error
    assert "hub repo 'org/e1' not found" in err and "ALLOY_HUB_TOKENS" in err and "HF_TOKEN" not in err
    assert runs(store, sid) == []


def test_a_run_parses_the_schedule_spec_once_and_the_pinned_spec_once(store, settings, monkeypatch):
    """Issue #13 leftover: the template is parsed once per evaluation (not again to pin, nor again to
    create the job); the pinned spec once (the admission check needs the model)."""
    import jobs.triggers
    import workers.scheduler
    from merge_ops.spec import MergeSpec

    parsed: list[dict] = []

    class Counting(MergeSpec):
        @classmethod
        def model_validate(cls, obj, *args, **kwargs):
            parsed.append(obj)
            return MergeSpec.model_validate(obj, *args, **kwargs)

    monkeypatch.setattr(workers.scheduler, "MergeSpec", Counting)
    monkeypatch.setattr(jobs.triggers, "MergeSpec", Counting)
    sid = add(store, {"type": "on_new_revision", "poll_seconds": 60}, tag_template="run-{n}").id
    s = scheduler(store, settings, Heads())
    [outcome] = [o for o in s.tick() if o.schedule_id == sid]
    assert outcome.status == "submitted"
    template = sched(store, sid).spec
    assert parsed.count(template) == 1 and len(parsed) == 2  # the template, then the pinned spec
    assert parsed[1]["experts"][0]["model"] == "org/e1@" + "1" * 40
