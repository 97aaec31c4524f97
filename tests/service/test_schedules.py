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
