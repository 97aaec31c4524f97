"""/v1/schedules on a real SQLite store (TestClient): validation, tenant scoping, pause/resume,
trigger changes, runs as recorded by the scheduler."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml

from jobs.store import Store
from tests.service.fixtures import auth
from workers.scheduler import Scheduler, SchedulerSettings

SPEC = {"method": "task_arithmetic", "base": "org/base", "experts": [{"model": "org/e1"}, {"model": "org/e2"}],
        "parameters": {"lambda": 0.5}, "publish": {"repo": "org/merged"}}
CRON = {"type": "cron", "cron": "0 3 * * *", "timezone": "Europe/Paris"}


def create(client, who="acme", **over):
    body = {"name": "nightly", "spec": SPEC, "trigger": CRON, "tag_template": "run-{n}", **over}
    return client.post("/v1/schedules", json=body, headers=auth(who))


def test_create_get_list_and_tenant_isolation(client):
    r = create(client)
    assert r.status_code == 201, r.text
    sch = r.json()
    assert r.headers["location"] == f"/v1/schedules/{sch['id']}"
    assert sch["trigger"] == CRON and sch["catch_up"] == "once" and not sch["paused"] and sch["run_count"] == 0
    due = datetime.fromisoformat(sch["next_due_at"])
    assert (due.hour, due.minute) in ((1, 0), (2, 0))  # 03:00 in Paris is 01:00 or 02:00 UTC
    assert due > datetime.now(UTC) and due - datetime.now(UTC) <= timedelta(days=1)
    assert client.get(f"/v1/schedules/{sch['id']}", headers=auth()).json()["id"] == sch["id"]
    assert [s["id"] for s in client.get("/v1/schedules", headers=auth()).json()["data"]] == [sch["id"]]
    # another tenant sees nothing and gets 404 (not 403) for the id; the admin sees it
    assert client.get("/v1/schedules", headers=auth("other")).json()["data"] == []
    for method, path in (("GET", ""), ("GET", "/runs"), ("DELETE", "")):
        assert client.request(method, f"/v1/schedules/{sch['id']}{path}", headers=auth("other")).status_code == 404
    assert client.patch(f"/v1/schedules/{sch['id']}", json={"paused": True}, headers=auth("other")).status_code == 404
    assert client.get(f"/v1/schedules/{sch['id']}", headers=auth("admin")).status_code == 200
    assert client.get("/v1/schedules").status_code == 401
    assert create(client, who="acme-ro").status_code == 403


def test_invalid_schedules_are_refused_with_what_to_fix(client):
    cases = [
        ({"trigger": {"type": "cron", "cron": "every day"}}, "is not a cron expression"),
        ({"trigger": {"type": "cron", "cron": "0 3 * * *", "timezone": "Mars/Olympus"}}, "unknown time zone"),
        ({"trigger": {"type": "on_new_revision", "poll_seconds": 0.1}}, "poll_seconds"),
        ({"trigger": {"type": "hourly"}}, "trigger"),
        ({"tag_template": "release"}, "no placeholder"),
        ({"tag_template": "run-{id}"}, "placeholders are {n}, {date}, {time}"),
        ({"spec": {**SPEC, "method": "nope"}}, "unknown method 'nope'"),
        ({"spec": {**SPEC, "publish": {"repo": "org/merged", "tag": "v1"}}}, "set `tag_template`"),
        ({"spec": {k: v for k, v in SPEC.items() if k != "publish"}}, "no `publish` target"),
        ({"catch_up": "all"}, "catch_up"),
    ]
    for over, needle in cases:
        r = create(client, **over)
        assert r.status_code == 422, (over, r.text)
        assert needle in r.json()["error"]["message"], (over, r.json())
    assert client.get("/v1/schedules", headers=auth()).json()["data"] == []


def test_pause_resume_change_trigger_and_delete(client):
    sid = create(client).json()["id"]
    url = f"/v1/schedules/{sid}"
    assert client.patch(url, json={"paused": True}, headers=auth()).json()["paused"] is True
    resumed = client.patch(url, json={"paused": False}, headers=auth()).json()
    assert resumed["paused"] is False
    before = datetime.now(UTC)
    changed = client.patch(url, json={"trigger": {"type": "on_new_revision", "poll_seconds": 60},
                                      "catch_up": "skip"}, headers=auth()).json()
    assert changed["trigger"] == {"type": "on_new_revision", "poll_seconds": 60.0} and changed["catch_up"] == "skip"
    assert datetime.fromisoformat(changed["next_due_at"]) <= datetime.now(UTC)  # polls at once
    assert datetime.fromisoformat(changed["next_due_at"]) >= before - timedelta(seconds=1)
    r = client.patch(url, json={"trigger": {"type": "cron", "cron": "61 * * * *"}}, headers=auth())
    assert r.status_code == 422 and "is not a cron expression" in r.json()["error"]["message"]
    assert client.patch(url, json={"paused": None}, headers=auth()).status_code == 422
    assert client.delete(url, headers=auth("acme-ro")).status_code == 403
    assert client.delete(url, headers=auth()).status_code == 204
    assert client.get(url, headers=auth()).status_code == 404


def test_runs_show_when_why_and_the_job(client, settings):
    sid = create(client, trigger={"type": "on_new_revision", "poll_seconds": 30}).json()["id"]
    heads = {"org/base": "b" * 40, "org/e1": "1" * 40, "org/e2": "2" * 40}
    sent: list[str] = []
    sched = Scheduler(Store(settings.database_url), settings, SchedulerSettings(),
                      heads=lambda ref, tenant: heads[ref], enqueue=lambda j, q: sent.append(j))
    sched.tick()
    heads["org/e1"] = "3" * 40
    sched.store.clock = lambda: datetime.now(UTC) + timedelta(seconds=31)
    sched.tick()
    data = client.get(f"/v1/schedules/{sid}/runs", headers=auth()).json()["data"]
    assert [r["n"] for r in data] == [2, 1] and [r["status"] for r in data] == ["submitted", "submitted"]
    newest = data[0]
    assert newest["reason"] == f"new revision: e1 {'1' * 12} -> {'3' * 12}"
    assert newest["changes"] == [{"role": "expert", "name": "e1", "ref": "org/e1", "from": "1" * 40, "to": "3" * 40}]
    assert newest["tag"] == "run-2" and newest["job_id"] == sent[1] and newest["job_state"] == "queued"
    job = client.get(f"/v1/jobs/{newest['job_id']}", headers=auth()).json()
    assert job["source"] == "schedule" and job["spec"]["experts"][0]["model"] == "org/e1@" + "3" * 40
    assert client.get(f"/v1/schedules/{sid}", headers=auth()).json()["run_count"] == 2
    page = client.get(f"/v1/schedules/{sid}/runs", params={"limit": 1}, headers=auth()).json()
    assert page["has_more"] and [r["n"] for r in page["data"]] == [2]
    page = client.get(f"/v1/schedules/{sid}/runs", params={"limit": 1, "after": page["last_id"]},
                      headers=auth()).json()
    assert not page["has_more"] and [r["n"] for r in page["data"]] == [1]


def test_schedule_file_reads_its_spec_like_alloy_submit(tmp_path):
    from merge_ops.errors import InputError
    from service.cli_schedules import load_schedule_file

    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(
        {"method": "task_arithmetic", "base": "./models/base", "experts": [{"model": "org/e1"}],
         "parameters": {"lambda": 0.5}}))
    f = tmp_path / "nightly.yaml"
    f.write_text(yaml.safe_dump({"trigger": CRON, "catch_up": "skip", "spec": "merge.yaml"}))
    body = load_schedule_file(f)
    assert body["trigger"] == CRON and body["catch_up"] == "skip"
    assert body["spec"]["base"] == str(tmp_path / "models" / "base")  # relative to the file, as for submit
    f.write_text(yaml.safe_dump({"spec": "merge.yaml"}))
    with pytest.raises(InputError, match="a schedule file is a mapping with `trigger` and `spec`"):
        load_schedule_file(f)


# -- lifecycle -----------------------------------------------------------------------------------
def test_cron_expressions_that_never_fire_are_refused_on_create_and_patch(client):
    for cron in ("0 0 30 2 *", "0 0 31 4 *"):
        r = create(client, trigger={"type": "cron", "cron": cron})
        assert r.status_code == 422, r.text
        assert "never fires" in r.json()["error"]["message"]
    sid = create(client).json()["id"]
    r = client.patch(f"/v1/schedules/{sid}", json={"trigger": {"type": "cron", "cron": "0 0 31 4 *"}},
                     headers=auth())
    assert r.status_code == 422 and "never fires" in r.json()["error"]["message"]
    assert client.get(f"/v1/schedules/{sid}", headers=auth()).json()["trigger"] == CRON  # unchanged


def test_patch_changes_the_spec_checked_like_a_new_one_and_keeps_the_history(client, settings):
    sid = create(client, trigger={"type": "on_new_revision", "poll_seconds": 30}).json()["id"]
    heads = {"org/base": "b" * 40, "org/e1": "1" * 40, "org/e2": "2" * 40, "org/e3": "3" * 40}
    sched = Scheduler(Store(settings.database_url), settings, SchedulerSettings(),
                      heads=lambda ref, tenant: heads[ref], enqueue=lambda j, q: None, tags=lambda p, t: set())
    sched.tick()
    url = f"/v1/schedules/{sid}"
    new_spec = {**SPEC, "experts": [{"model": "org/e1"}, {"model": "org/e3"}]}
    for bad, needle in (({**SPEC, "method": "nope"}, "unknown method"),
                        ({k: v for k, v in SPEC.items() if k != "publish"}, "no `publish` target"),
                        ({**SPEC, "publish": {"repo": "org/merged", "tag": "v1"}}, "set `tag_template`"),
                        (None, "spec cannot be null")):
        r = client.patch(url, json={"spec": bad}, headers=auth())
        assert r.status_code == 422 and needle in r.json()["error"]["message"], (bad, r.text)
    r = client.patch(url, json={"spec": new_spec}, headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["experts"][1]["model"] == "org/e3" and r.json()["run_count"] == 1
    sched.store.clock = lambda: datetime.now(UTC) + timedelta(seconds=31)
    sched.tick()  # the new spec's inputs differ: run 2, numbered after the old runs
    data = client.get(f"{url}/runs", headers=auth()).json()["data"]
    assert [r["n"] for r in data] == [2, 1] and data[0]["tag"] == "run-2"
    assert [c["name"] for c in data[0]["changes"]] == ["e3"]


def test_run_now_health_and_metrics(client, settings):
    sid = create(client).json()["id"]
    assert client.post(f"/v1/schedules/{sid}/run", headers=auth("other")).status_code == 404
    assert client.post(f"/v1/schedules/{sid}/run", headers=auth("acme-ro")).status_code == 403
    r = client.post(f"/v1/schedules/{sid}/run", headers=auth())
    assert r.status_code == 202 and r.json()["run_requested_at"] is not None
    assert r.json()["health"] == {"status": "no_finished_run", "last_success_at": None, "last_failure_at": None,
                                  "last_outcome": None, "consecutive_failures": 0,
                                  "next_due_at": r.json()["next_due_at"]}
    heads = {"org/base": "b" * 40, "org/e1": "1" * 40, "org/e2": "2" * 40}
    store = Store(settings.database_url)
    sched = Scheduler(store, settings, SchedulerSettings(retry_max=0), heads=lambda ref, tenant: heads[ref],
                      enqueue=lambda j, q: None, tags=lambda p, t: set())
    sched.tick()
    [run] = client.get(f"/v1/schedules/{sid}/runs", headers=auth()).json()["data"]
    assert run["reason"].startswith("run now") and run["n"] == 1 and run["job_id"]
    claim = store.claim(run["job_id"], "w", 60)
    store.finish(run["job_id"], claim.attempt, "failed", error_code="x", error_message="boom")
    sched.tick()
    h = client.get(f"/v1/schedules/{sid}", headers=auth()).json()["health"]
    assert h["status"] == "failing" and h["consecutive_failures"] == 1 and h["last_outcome"] == "failed"
    text = client.get("/metrics").text
    assert f'alloy_schedule_consecutive_failures{{name="nightly",schedule="{sid}",tenant="acme"}} 1.0' in text
    assert f'alloy_schedule_last_success_timestamp_seconds{{name="nightly",schedule="{sid}",tenant="acme"}} 0.0' \
        in text
    assert "alloy_schedule_next_due_timestamp_seconds{" in text


def test_list_and_runs_page_with_has_more(client):
    ids = [create(client, name=f"s{i}").json()["id"] for i in range(5)]
    seen, after = [], None
    while True:
        page = client.get("/v1/schedules", params={"limit": 2, **({"after": after} if after else {})},
                          headers=auth()).json()
        seen += [s["id"] for s in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]


def _cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from service.cli import main as alloy

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = alloy(["schedules", *argv])
    return rc, out.getvalue(), err.getvalue()


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    from service.cli_service import free_port

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rc, out, err = _cli("--api", down, "--token", "t", "list")
    assert rc == 2 and err.startswith("alloy: error: cannot reach the API at") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(SPEC))
    for bad in (".inf", ".nan"):
        f = tmp_path / "s.yaml"
        f.write_text(f"trigger: {{type: on_new_revision, poll_seconds: {bad}}}\nspec: merge.yaml\n")
        rc, out, err = _cli("--api", down, "--token", "t", "add", str(f))
        assert rc == 2 and "poll_seconds: Input should be a finite number" in err and "Traceback" not in err


def test_inline_spec_takes_relative_paths_like_a_spec_file(tmp_path):
    from service.cli_schedules import load_schedule_file

    f = tmp_path / "nightly.yaml"
    f.write_text(yaml.safe_dump({"trigger": CRON, "spec": {
        "method": "task_arithmetic", "base": "./models/base", "experts": [{"model": "../shared/e1"}],
        "parameters": {"lambda": 0.5}, "publish": {"repo": "acme/m"}}}))
    body = load_schedule_file(f)
    assert body["spec"]["base"] == str(tmp_path / "models" / "base")
    assert body["spec"]["experts"][0]["model"] == str(tmp_path.parent / "shared" / "e1")


def test_scheduler_refuses_bad_settings_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}, "ALLOY_DATA_DIR": str(tmp_path)}
    for var, value in (("ALLOY_SCHEDULER_TICK_SECONDS", "-1"), ("ALLOY_SCHEDULER_LEASE_SECONDS", "soon"),
                       ("ALLOY_SCHEDULER_TICK_SECONDS", "inf"), ("ALLOY_SCHEDULER_RETRY_MAX", "nan"),
                       ("ALLOY_MAX_ATTEMPTS", "0")):
        p = subprocess.run([sys.executable, "-m", "workers.scheduler"], env={**env, var: value},
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, (var, p.stderr)
        assert p.stderr.startswith(f"alloy scheduler: error: {var}:") and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
