"""Routes on a real SQLite store and a real Redis broker (TestClient; no worker consumes here)."""

from __future__ import annotations

import json

import redis
from fastapi.testclient import TestClient

from jobs.settings import Settings
from jobs.store import Store
from service.app import create_app
from service.metrics import queue_depth
from tests.service.conftest import spec_body
from tests.service.fixtures import auth


def submit(client, tmp_path, who="acme", headers=None, **over):
    return client.post("/v1/jobs", json=spec_body(tmp_path, **over), headers={**auth(who), **(headers or {})})


def test_submit_returns_202_location_and_wakes_a_worker(client, tmp_path, settings):
    r = redis.Redis.from_url(settings.redis_url)
    before = queue_depth(r, "cpu")
    resp = submit(client, tmp_path)
    assert resp.status_code == 202
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["attempts"] == 0 and job["queue"] == "cpu"
    assert queue_depth(r, "cpu") == before + 1
    got = client.get(resp.headers["location"], headers=auth()).json()
    assert got["id"] == job["id"] and got["spec"]["parameters"] == {"lambda": 0.5}


def test_validation_errors_say_what_to_fix(client, tmp_path):
    cases = [
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"parameters": {"lambda": 0.5, "densty": 1}}, "no parameter 'densty'"),
        ({"experts": []}, "experts"),
        ({"base": "not a repo!"}, "neither a local folder"),
        ({"publish": {"repo": "no-slash"}}, "is not a repo id"),
        ({"notify": {"url": "ftp://x/y"}}, "http:// or https://"),
        ({"experts": [{"model": "/etc/passwd"}, {"model": str(tmp_path / "e2")}]}, "allowed roots"),
    ]
    for over, needle in cases:
        resp = submit(client, tmp_path, **over)
        assert resp.status_code == 422, over
        err = resp.json()["error"]
        assert needle in err["message"], (over, err)
        assert err["code"] == "invalid_spec"
    cal = {"method": "adamerging", "parameters": {}, "calibration": {"tasks": {"e1": "cal_missing", "e2": "cal_missing2"}}}
    resp = submit(client, tmp_path, **cal)
    assert resp.status_code == 422 and "no calibration set 'cal_missing'" in resp.json()["error"]["message"]
    assert client.get("/v1/jobs", headers=auth()).json()["data"] == []  # nothing was recorded


def test_auth_scopes_and_tenant_isolation(client, tmp_path):
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert submit(client, tmp_path, who="acme-ro").status_code == 403
    job = submit(client, tmp_path).json()
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events",
                 f"/v1/jobs/{job['id']}/coefficients"):
        other = client.get(path, headers=auth("other"))
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth("other")).status_code == 404
    assert client.get("/v1/jobs", headers=auth("other")).json()["data"] == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth("acme-ro")).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth("admin")).status_code == 200
    assert client.get("/healthz").status_code == 200  # no token needed


def test_idempotency_key(client, tmp_path):
    h = {"Idempotency-Key": "abc"}
    a = submit(client, tmp_path, headers=h)
    b = submit(client, tmp_path, headers=h)
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"] and b.headers["idempotent-replayed"] == "true"
    c = submit(client, tmp_path, headers=h, parameters={"lambda": 0.7})
    assert c.status_code == 409 and c.json()["error"]["code"] == "idempotency_conflict"
    d = submit(client, tmp_path, who="other", headers=h)  # keys are scoped to the tenant
    assert d.status_code == 202 and d.json()["id"] != a.json()["id"]
    assert len(client.get("/v1/jobs", headers=auth()).json()["data"]) == 1


def test_list_cursor_and_state_filter(client, tmp_path):
    ids = [submit(client, tmp_path).json()["id"] for _ in range(5)]
    p1 = client.get("/v1/jobs", params={"limit": 3}, headers=auth()).json()
    p2 = client.get("/v1/jobs", params={"limit": 3, "after": p1["last_id"]}, headers=auth()).json()
    assert p1["has_more"] and not p2["has_more"]
    assert [j["id"] for j in p1["data"] + p2["data"]] == ids[::-1]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth())
    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}, headers=auth()).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/v1/jobs", params={"state": "bogus"}, headers=auth()).status_code == 422


def test_cancel_paths(client, tmp_path, settings):
    store = Store(settings.database_url)
    queued = submit(client, tmp_path).json()
    r = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth())
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert client.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth()).json()["state"] == "cancelled"

    running = submit(client, tmp_path).json()
    claim = store.claim(running["id"], "w", 30)
    assert client.post(f"/v1/jobs/{running['id']}/cancel", headers=auth()).json()["state"] == "cancelling"
    store.finish(running["id"], claim.attempt, "succeeded")
    # the worker finished before it saw the cancel: the job is done, and a new cancel is a conflict
    r = client.post(f"/v1/jobs/{running['id']}/cancel", headers=auth())
    assert r.status_code == 409 and "already succeeded" in r.json()["error"]["message"]
    assert client.post("/v1/jobs/job_nope/cancel", headers=auth()).status_code == 404


def test_events_replay_and_resume(client, tmp_path, settings):
    store = Store(settings.database_url)
    job = submit(client, tmp_path).json()
    c = store.claim(job["id"], "w", 30)
    store.set_stage(job["id"], c.attempt, "merge")
    store.heartbeat(job["id"], c.attempt, 30, stage="merge", step=1, total=2, progress_event=True)
    store.finish(job["id"], c.attempt, "succeeded", result={"published": None})
    events = parse_sse(client.get(f"/v1/jobs/{job['id']}/events", headers=auth()).text)
    assert [(e["event"], e["data"].get("state") or e["data"].get("stage")) for e in events] == [
        ("state", "queued"), ("state", "running"), ("stage", "merge"), ("progress", "merge"),
        ("state", "succeeded")]
    resumed = parse_sse(client.get(f"/v1/jobs/{job['id']}/events",
                                   headers={**auth(), "Last-Event-ID": str(events[2]["id"])}).text)
    assert [e["id"] for e in resumed] == [e["id"] for e in events[3:]]


def parse_sse(text: str) -> list[dict]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "id" in fields:
            out.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return out


def test_calibration_sets(client, settings):
    ok = b'{"text": "hello"}\n\n{"input_ids": [1, 2, 3]}\n'
    r = client.post("/v1/calibration-sets", params={"name": "mini"}, content=ok, headers=auth())
    assert r.status_code == 201, r.text
    cs = r.json()
    assert (cs["lines"], cs["size"], cs["name"]) == (2, len(ok), "mini")
    assert r.headers["location"] == f"/v1/calibration-sets/{cs['id']}"
    assert client.get(f"/v1/calibration-sets/{cs['id']}", headers=auth()).json()["sha256"] == cs["sha256"]
    assert client.get(f"/v1/calibration-sets/{cs['id']}", headers=auth("other")).status_code == 404
    assert [x["id"] for x in client.get("/v1/calibration-sets", headers=auth()).json()["data"]] == [cs["id"]]

    bad = b'{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n'
    r = client.post("/v1/calibration-sets", content=bad, headers=auth())
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("line 3:")
    r = client.post("/v1/calibration-sets", content=b'{"text": "a"}\nnot json\n', headers=auth())
    assert r.status_code == 422 and "line 2: not valid JSON" in r.json()["error"]["message"]
    big = b'{"text": "' + b"x" * settings.max_upload_bytes + b'"}\n'
    r = client.post("/v1/calibration-sets", content=big, headers=auth())
    assert r.status_code == 413 and str(settings.max_upload_bytes) in r.json()["error"]["message"]
    # streamed without a Content-Length: the limit is enforced while reading
    r = client.post("/v1/calibration-sets", content=iter([big[:3000], big[3000:]]), headers=auth())
    assert r.status_code == 413
    assert len(list((settings.data_dir / "calibration" / "acme").iterdir())) == 1  # nothing else kept

    assert client.delete(f"/v1/calibration-sets/{cs['id']}", headers=auth("other")).status_code == 404
    assert client.delete(f"/v1/calibration-sets/{cs['id']}", headers=auth("acme-ro")).status_code == 403
    assert client.delete(f"/v1/calibration-sets/{cs['id']}", headers=auth()).status_code == 204
    assert client.get(f"/v1/calibration-sets/{cs['id']}", headers=auth()).status_code == 404


def test_readyz_metrics_and_openapi(client, tmp_path, settings):
    assert client.get("/readyz").json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
    submit(client, tmp_path)
    text = client.get("/metrics").text
    assert 'alloy_jobs{state="queued"} 1.0' in text
    assert 'alloy_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert "alloy_queue_depth" in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/calibration-sets"} <= set(paths)

    dead = Settings(**{**settings.model_dump(), "redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(dead)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("unreachable")
        # the job is still recorded when the broker is down; the reaper sends it later
        resp = c.post("/v1/jobs", json=spec_body(tmp_path), headers=auth())
        assert resp.status_code == 202
        assert Store(settings.database_url).get_job(resp.json()["id"]).enqueued_at is None


def test_routing_and_webhook_allow_list(settings, tmp_path):
    s = Settings(**{**settings.model_dump(), "gpu_workers": True, "webhook_allow": ["hooks.example"]})
    with TestClient(create_app(s)) as c:
        learned = {"method": "adamerging", "parameters": {}}
        cal = {}
        for name in ("e1", "e2"):
            r = c.post("/v1/calibration-sets", content=b'{"text": "x"}\n', headers=auth())
            cal[name] = r.json()["id"]
        r = c.post("/v1/jobs", json=spec_body(tmp_path, **learned, calibration={"tasks": cal}), headers=auth())
        assert r.status_code == 202 and r.json()["queue"] == "gpu"
        assert submit(c, tmp_path).json()["queue"] == "cpu"  # static merges stay on CPU workers
        r = submit(c, tmp_path, notify={"url": "https://elsewhere.example/hook"})
        assert r.status_code == 422 and "not in the allowed webhook hosts" in r.json()["error"]["message"]
        assert submit(c, tmp_path, notify={"url": "https://hooks.example/h"}).status_code == 202
    # another tenant's calibration set cannot be referenced
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/jobs", json=spec_body(tmp_path, **learned, calibration={"tasks": cal}),
                   headers=auth("other"))
        assert r.status_code == 422 and "no calibration set" in r.json()["error"]["message"]


def test_webhooks_refused_without_a_secret(settings, tmp_path):
    s = Settings(**{**settings.model_dump(), "webhook_secret": None})
    with TestClient(create_app(s)) as c:
        r = submit(c, tmp_path, notify={"url": "https://hooks.example/h"})
        assert r.status_code == 422 and "ALLOY_WEBHOOK_SECRET" in r.json()["error"]["message"]
