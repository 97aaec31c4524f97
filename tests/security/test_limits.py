"""Limits a tenant cannot talk its way past: request body size (413), queued + running jobs per tenant
(429 with Retry-After), learned-method steps; job lists leave the spec out."""

from __future__ import annotations

import json

from jobs.store import Store
from tests.security.conftest import auth, spec_body


def test_job_and_schedule_bodies_are_capped(make_client):
    c = make_client(max_body_bytes=2048)
    root = c.app.state.settings.data_dir
    big = spec_body(root, name="x" * 3000)  # refused by size before anything parses it
    for path, body in (("/v1/jobs", big), ("/v1/schedules", {"spec": big, "trigger": {"type": "cron",
                                                                                      "cron": "0 3 * * *"}})):
        r = c.post(path, json=body, headers=auth())
        assert r.status_code == 413, (path, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "too_large" and "2048" in r.json()["error"]["message"]
        # chunked, without a Content-Length: counted while read
        data = json.dumps(body).encode()
        r = c.post(path, content=iter([data[:1000], data[1000:]]),
                   headers={**auth(), "content-type": "application/json"})
        assert r.status_code == 413, (path, "chunked", r.status_code)
    # under the cap: accepted, also when chunked
    ok = json.dumps(spec_body(root)).encode()
    assert c.post("/v1/jobs", content=iter([ok[:50], ok[50:]]),
                  headers={**auth(), "content-type": "application/json"}).status_code == 202
    assert c.get("/v1/jobs", headers=auth()).status_code == 200
    # calibration uploads keep their own (larger) limit
    assert c.post("/v1/calibration-sets", content=b'{"text": "' + b"y" * 3000 + b'"}\n',
                  headers=auth()).status_code == 201


def test_per_tenant_quota_on_active_jobs(make_client):
    c = make_client(max_active_jobs_per_tenant=2)
    root = c.app.state.settings.data_dir
    ids = []
    for seed in (1, 2):
        r = c.post("/v1/jobs", json=spec_body(root, seed=seed), headers={**auth(), "Idempotency-Key": f"k{seed}"})
        assert r.status_code == 202
        ids.append(r.json()["id"])
    r = c.post("/v1/jobs", json=spec_body(root, seed=3), headers=auth())
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs"
    assert int(r.headers["retry-after"]) > 0 and "2" in r.json()["error"]["message"]
    # a retry of an accepted submit still gets its job
    r = c.post("/v1/jobs", json=spec_body(root, seed=1), headers={**auth(), "Idempotency-Key": "k1"})
    assert r.status_code == 202 and r.json()["id"] == ids[0]
    # the quota is per tenant
    assert c.post("/v1/jobs", json=spec_body(root), headers=auth("other")).status_code == 202
    # a finished (here: cancelled) job frees its slot; running ones count
    store = Store(c.app.state.settings.database_url)
    assert store.claim(ids[1], "w", 60) is not None  # running
    assert c.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth()).json()["state"] == "cancelled"
    assert c.post("/v1/jobs", json=spec_body(root, seed=4), headers=auth()).status_code == 202
    assert c.post("/v1/jobs", json=spec_body(root, seed=5), headers=auth()).status_code == 429


def test_no_quota_when_zero(make_client):
    c = make_client(max_active_jobs_per_tenant=0)
    root = c.app.state.settings.data_dir
    assert all(c.post("/v1/jobs", json=spec_body(root, seed=i), headers=auth()).status_code == 202
               for i in range(5))


def test_list_leaves_the_spec_out(make_client):
    c = make_client()
    root = c.app.state.settings.data_dir
    job = c.post("/v1/jobs", json=spec_body(root), headers=auth()).json()
    (item,) = c.get("/v1/jobs", headers=auth()).json()["data"]
    assert item["id"] == job["id"] and item["state"] == "queued" and "spec" not in item
    assert str(root / "base") not in json.dumps(item)
    assert c.get(f"/v1/jobs/{job['id']}", headers=auth()).json()["spec"]["base"] == str(root / "base")


def test_learned_steps_and_batch_size_have_maxima(make_client):
    c = make_client()
    root = c.app.state.settings.data_dir
    for param, value in (("steps", 10**6), ("batch_size", 10**5)):
        body = spec_body(root, method="adamerging", parameters={param: value})
        r = c.post("/v1/jobs", json=body, headers=auth())
        assert r.status_code == 422 and f"parameters.{param}" in r.json()["error"]["message"] \
            and "above the maximum" in r.json()["error"]["message"], r.text
