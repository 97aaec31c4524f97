"""Scheduled re-merges end to end with real parts: redis-server, the API (uvicorn), a Celery worker,
the reaper, TWO scheduler processes, and the Hub-protocol test server holding the base and experts.

A new commit on an expert repo → exactly one new job, which publishes a new revision (tagged) whose
model card names the new expert commit; no change → no job; two schedulers → still one job per run.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from jobs.models import Job
from service.cli import main as alloy
from tests.service.fixtures import TOKENS, Procs, Service, auth, redis_url, service_env  # noqa: F401
from tests.toy_models import make_experts

pytestmark = pytest.mark.integration


def cli(svc: Service, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = alloy(["schedules", "--api", svc.url, "--token", TOKENS["acme"], *argv])
    return rc, out.getvalue()


def wait_for(what: str, fn, timeout: float = 90, procs: Procs | None = None):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            logs = "" if procs is None else "\n".join(
                f"--- {n}\n{procs.log(n)[-2000:]}" for n in ("sched0", "sched1", "worker0"))
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)



def _add_and_poll(svc, procs, env: dict, tmp_path: Path, name: str) -> tuple[str, dict]:
    """Add an on-new-revision schedule of org/e1 + org/e2 through the CLI; start two schedulers on it."""
    schedule = {"name": name, "trigger": {"type": "on_new_revision", "poll_seconds": 1},
                "tag_template": "run-{n}",
                "spec": {"method": "task_arithmetic", "base": "org/base", "parameters": {"lambda": 0.5},
                         "experts": [{"model": "org/e1"}, {"model": "org/e2"}],
                         "publish": {"repo": "org/merged", "hub": "hf"}}}
    (tmp_path / "schedule.yaml").write_text(yaml.safe_dump(schedule))
    rc, out = cli(svc, "--json", "add", str(tmp_path / "schedule.yaml"))
    assert rc == 0, out
    for i in range(2):
        procs.start(f"sched{i}", [sys.executable, "-m", "service.cli", "scheduler"], env)
    return json.loads(out)["id"], schedule

def test_new_expert_commit_triggers_exactly_one_republish(tmp_path, redis_url, hub_server, tiny_llama):  # noqa: F811
    base, experts = tiny_llama(2)
    hub_server.push_folder("org/base", base)
    e1_v1 = hub_server.push_folder("org/e1", experts[0])
    e2 = hub_server.push_folder("org/e2", experts[1])
    data = tmp_path / "data"
    (tmp_path / "logs").mkdir()
    data.mkdir()
    procs = Procs(tmp_path / "logs")
    env = service_env(data, redis_url, ALLOY_HUB_ENDPOINT=hub_server.url,
                      ALLOY_HUB_TOKENS=json.dumps({"acme": hub_server.token}),
                      ALLOY_SCHEDULER_TICK_SECONDS="0.2")
    try:
        svc = Service(procs, env)
        sid, _ = _add_and_poll(svc, procs, env, tmp_path, "fresh-merge")  # two schedulers poll it

        def runs() -> list[dict]:
            return svc.http.get(f"/v1/schedules/{sid}/runs", headers=auth()).json()["data"][::-1]

        def with_job(rs: list[dict]) -> list[dict]:  # a run is recorded just before its job exists
            return [r for r in rs if r["job_id"]]

        def jobs() -> list[dict]:
            return svc.http.get("/v1/jobs", headers=auth()).json()["data"][::-1]

        first = wait_for("the first run", lambda: with_job(runs()[:1]), procs=procs)[0]
        assert first["reason"] == "first run" and first["n"] == 1
        job1 = svc.wait_state(first["job_id"], ("succeeded", "failed"), timeout=90)
        assert job1["state"] == "succeeded", job1["error"]
        published = len(hub_server.commits("org/merged"))  # repo creation + the merge
        card1 = hub_server.read("org/merged", "README.md", revision="run-1").decode()
        assert e1_v1 in card1 and e2 in card1

        # the e1 team pushes a retrained expert
        retrained = make_experts(base, 1, tmp_path / "retrained", seed=7)[0]
        e1_v2 = hub_server.push_folder("org/e1", retrained, message="retrain e1")
        second = wait_for("a run for the new commit", lambda: with_job(runs()[1:2]), procs=procs)[0]
        assert second["n"] == 2 and second["changes"] == [
            {"role": "expert", "name": "e1", "ref": "org/e1", "from": e1_v1, "to": e1_v2}]
        job2 = svc.wait_state(second["job_id"], ("succeeded", "failed"), timeout=90)
        assert job2["state"] == "succeeded", job2["error"]
        assert job2["spec"]["experts"][0]["model"] == f"org/e1@{e1_v2}"
        merged = hub_server.commits("org/merged")
        assert len(merged) == published + 1 and merged[0].title.startswith("Merge")  # a new revision, same branch
        card2 = hub_server.read("org/merged", "README.md", revision="run-2").decode()
        assert e1_v2 in card2 and e1_v1 not in card2 and e2 in card2
        assert hub_server.read("org/merged", "README.md", revision="main").decode() == card2
        facts = json.loads(hub_server.read("org/merged", "alloy_merge.json"))
        assert {i["name"]: i["commit"] for i in facts["inputs"] if i["role"] == "expert"} == {"e1": e1_v2, "e2": e2}

        # nothing changes for several polls of both schedulers: no run, no job
        time.sleep(3)
        assert len(runs()) == 2 and len(jobs()) == 2 and len(hub_server.commits("org/merged")) == published + 1
        assert all(p.poll() is None for p in procs.procs if p.name.startswith("sched"))

        rc, out = cli(svc, "runs", sid)
        assert rc == 0 and f"new revision: e1 {e1_v1[:12]} -> {e1_v2[:12]}" in out and "succeeded" in out
        rc, out = cli(svc, "pause", sid)
        assert rc == 0 and "paused" in out
        rc, out = cli(svc, "list")
        assert rc == 0 and sid in out and "paused" in out
    finally:
        procs.stop_all()


def test_two_scheduler_processes_record_each_cron_time_once(tmp_path, redis_url, tiny_llama):  # noqa: F811
    """A cron schedule every second, two scheduler processes racing for ~5 due times."""
    from jobs.migrate import upgrade
    from jobs.models import ScheduleRun
    from jobs.schedule_store import ScheduleStore
    from jobs.store import Store
    from jobs.triggers import CronTrigger, first_due

    base, experts = tiny_llama(2)  # local folders: their "commit" is a content fingerprint
    env = service_env(tmp_path, redis_url, ALLOY_SCHEDULER_TICK_SECONDS="0.1")
    upgrade(env["ALLOY_DATABASE_URL"])
    store = Store(env["ALLOY_DATABASE_URL"])
    trig = CronTrigger(cron="* * * * * *")
    sid = ScheduleStore(store).create(
        tenant="acme", trigger=trig.model_dump(), next_due_at=first_due(trig, store.clock()),
        spec={"method": "task_arithmetic", "base": str(base), "parameters": {"lambda": 0.5},
              "experts": [{"model": str(e)} for e in experts]}).id
    procs = Procs(tmp_path)
    try:
        for i in range(2):
            procs.start(f"sched{i}", [sys.executable, "-m", "service.cli", "scheduler"], env)
        wait_for("5 cron runs", lambda: len(ScheduleStore(store).runs(sid, limit=5)[0]) >= 5, timeout=60,
                 procs=procs)
    finally:
        for p in procs.procs:
            procs.kill(p, signal.SIGTERM)
    with store.tx() as s:
        runs = list(s.scalars(select(ScheduleRun).where(ScheduleRun.schedule_id == sid).order_by(ScheduleRun.due_at)))
        jobs = list(s.scalars(select(Job).where(Job.source == "schedule")))
    assert len({r.due_at for r in runs}) == len(runs) >= 5  # each due second once
    assert [r.status for r in runs[:2]] == ["submitted", "skipped"] and [r.n for r in runs if r.n] == [1]
    assert all(r.reason.startswith("inputs unchanged since run 1") for r in runs[1:])
    assert [j.unique_key for j in jobs] == [f"schedule:{sid}:1"]  # the only job: inputs never changed
    for name in ("sched0", "sched1"):
        assert "Traceback" not in procs.log(name), procs.log(name)


def test_schedule_lifecycle_with_real_parts(tmp_path, redis_url, hub_server, tiny_llama):  # noqa: F811
    """Tags an older schedule left behind are skipped; run now; a failed commit moves nothing and is
    retried; health in the API, the CLI and /metrics; update keeps the numbering; bad input is refused."""
    base, experts = tiny_llama(2)
    hub_server.push_folder("org/base", base)
    for i, e in enumerate(experts):
        hub_server.push_folder(f"org/e{i + 1}", e)
    old = hub_server.push("org/merged", {"README.md": b"a merge by a deleted schedule"}, message="old run 1")
    hub_server.tag("org/merged", "run-1")  # the deleted schedule's run-1
    data = tmp_path / "data"
    (tmp_path / "logs").mkdir()
    data.mkdir()
    procs = Procs(tmp_path / "logs")
    env = service_env(data, redis_url, ALLOY_HUB_ENDPOINT=hub_server.url,
                      ALLOY_HUB_TOKENS=json.dumps({"acme": hub_server.token}),
                      ALLOY_SCHEDULER_TICK_SECONDS="0.2", ALLOY_SCHEDULER_RETRY_BACKOFF_SECONDS="1")
    try:
        svc = Service(procs, env)
        sid, schedule = _add_and_poll(svc, procs, env, tmp_path, "re-added")

        def runs() -> list[dict]:
            return svc.http.get(f"/v1/schedules/{sid}/runs", headers=auth()).json()["data"][::-1]

        def job_of(n: int) -> dict:
            run = wait_for(f"run {n} with its job", lambda: [r for r in runs() if r["n"] == n and r["job_id"]],
                           procs=procs)[0]
            return svc.wait_state(run["job_id"], ("succeeded", "failed"), timeout=120)

        job1 = job_of(1)
        assert job1["state"] == "succeeded", job1["error"]
        commit1 = job1["result"]["published"]["commit"]
        assert runs()[0]["tag"] == "run-1-2" and job1["result"]["published"]["revision"] == "run-1-2"
        assert hub_server.tags("org/merged") == {"run-1": old, "run-1-2": commit1} == {
            "run-1": old, "run-1-2": hub_server.head("org/merged")}

        # run now, while the hub fails the commit once: the job fails, nothing moved; the retry publishes
        fault = hub_server.inject("commit", status=500)
        rc, out = cli(svc, "run", sid)
        assert rc == 0 and "run_requested=" in out
        job2 = job_of(2)
        assert job2["state"] == "failed" and fault.hits == 1
        assert hub_server.head("org/merged") == commit1 and set(hub_server.tags("org/merged")) == {"run-1", "run-1-2"}
        assert runs()[1]["reason"].startswith("run now")
        job3 = job_of(3)
        assert job3["state"] == "succeeded", job3["error"]
        retry = runs()[2]
        assert retry["attempt"] == 2 and retry["retry_of"] == runs()[1]["id"]
        assert retry["reason"].startswith(f"retry 1 of 2 of run 2 (job {job2['id']} failed")
        assert hub_server.tags("org/merged")["run-3"] == job3["result"]["published"]["commit"] == hub_server.head(
            "org/merged")
        marked = [c for c in hub_server.all_commits("org/merged") if "Alloy-Job-Id" in c.message]
        assert len(marked) == 2  # run 1 and the retry: the failed run published nothing

        def healthy() -> dict | None:
            h = svc.http.get(f"/v1/schedules/{sid}", headers=auth()).json()["health"]
            return h if h["status"] == "ok" and h["last_success_at"] else None

        h = wait_for("health ok after the retry", healthy, procs=procs)
        assert h["consecutive_failures"] == 0 and h["last_outcome"] == "succeeded"
        rc, out = cli(svc, "show", sid)
        assert rc == 0 and "health=ok" in out and "failures_in_a_row=0" in out
        metrics = svc.http.get("/metrics").text
        assert f'alloy_schedule_consecutive_failures{{name="re-added",schedule="{sid}",tenant="acme"}} 0.0' in metrics
        rc, out = cli(svc, "runs", sid)
        assert rc == 0 and "retry 1 of 2 of run 2" in out and "run now" in out

        # update: a trigger that never fires is refused; a valid change keeps the run numbering
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"trigger": {"type": "cron", "cron": "0 0 30 2 *"}}))
        out = io.StringIO()
        with contextlib.redirect_stderr(out):
            rc, _ = cli(svc, "update", sid, str(tmp_path / "bad.yaml"))
        assert rc == 2 and "never fires" in out.getvalue()
        changed = {**schedule, "name": "renamed", "spec": {**schedule["spec"], "parameters": {"lambda": 0.3}}}
        (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
        rc, out = cli(svc, "--json", "update", sid, str(tmp_path / "changed.yaml"))
        assert rc == 0, out
        doc = json.loads(out)
        assert doc["name"] == "renamed" and doc["spec"]["parameters"] == {"lambda": 0.3} and doc["run_count"] == 3
        for name in ("sched0", "sched1"):
            assert "Traceback" not in procs.log(name), procs.log(name)
    finally:
        procs.stop_all()


def test_two_scheduler_processes_share_the_due_schedules(tmp_path, redis_url, tiny_llama):  # noqa: F811
    """Many due schedules, two scheduler processes taking a few per tick: both record runs, and every
    run has exactly one job."""
    from jobs.migrate import upgrade
    from jobs.models import ScheduleRun
    from jobs.schedule_store import ScheduleStore
    from jobs.store import Store
    from jobs.triggers import RevisionTrigger

    base, experts = tiny_llama(2)
    env = service_env(tmp_path, redis_url, ALLOY_SCHEDULER_TICK_SECONDS="0.1", ALLOY_SCHEDULER_CLAIM_LIMIT="2")
    upgrade(env["ALLOY_DATABASE_URL"])
    store = Store(env["ALLOY_DATABASE_URL"])
    procs = Procs(tmp_path)
    try:
        for i in range(2):
            procs.start(f"sched{i}", [sys.executable, "-m", "service.cli", "scheduler"], env)
        wait_for("both schedulers ticking", lambda: all("tick every" in procs.log(f"sched{i}") for i in range(2)),
                 procs=procs)
        trig = RevisionTrigger(poll_seconds=3600)
        ids = [ScheduleStore(store).create(
            tenant="acme", trigger=trig.model_dump(), next_due_at=store.clock(),
            spec={"method": "task_arithmetic", "base": str(base), "parameters": {"lambda": 0.5},
                  "experts": [{"model": str(e)} for e in experts]}).id for _ in range(40)]

        def all_ran() -> bool:
            with store.tx() as s:
                return len(set(s.scalars(select(ScheduleRun.schedule_id).where(ScheduleRun.job_id.is_not(None))))) \
                    == len(ids)

        wait_for("a run for every schedule", all_ran, timeout=120, procs=procs)
    finally:
        for p in procs.procs:
            procs.kill(p, signal.SIGTERM)
    with store.tx() as s:
        runs = list(s.scalars(select(ScheduleRun)))
        jobs = list(s.scalars(select(Job).where(Job.source == "schedule")))
    assert len(runs) == len(ids) and {r.schedule_id for r in runs} == set(ids)  # one run each (inputs never move)
    assert sorted(j.unique_key for j in jobs) == sorted(f"schedule:{r.schedule_id}:1" for r in runs)
    by = {r.scheduler for r in runs}
    assert len(by) == 2, by  # both processes took a share
    for name in ("sched0", "sched1"):
        assert "Traceback" not in procs.log(name), procs.log(name)
