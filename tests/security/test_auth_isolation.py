"""Every route but health and metrics needs a token; scopes hold; a tenant never reaches another's
resources (404, not 403). Routes are read from the OpenAPI schema, so a new route is covered at once."""

from __future__ import annotations

import re

import pytest

from tests.security.conftest import auth, spec_body

PUBLIC = {"/healthz", "/readyz", "/metrics"}
READ_METHODS = {"get"}
CATALOG = {"/v1/methods", "/v1/methods/{name}"}  # the same for every tenant: not a tenant's resource


def _routes(client) -> list[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return [(m, p) for p, ops in paths.items() for m in ops if m in ("get", "post", "put", "patch", "delete")]


@pytest.fixture
def world(make_client, tmp_path):
    """One app with a job, a calibration set and a schedule of tenant acme; ids by path parameter."""
    c = make_client()
    root = c.app.state.settings.data_dir
    job = c.post("/v1/jobs", json=spec_body(root), headers=auth())
    assert job.status_code == 202, job.text
    cal = c.post("/v1/calibration-sets", content=b'{"text": "x"}\n', headers=auth())
    assert cal.status_code == 201, cal.text
    sch = c.post("/v1/schedules", json={"spec": spec_body(root, publish={"repo": "acme/merged"}),
                                        "trigger": {"type": "cron", "cron": "0 3 * * *"}},
                 headers=auth())
    assert sch.status_code == 201, sch.text
    ids = {"job_id": job.json()["id"], "set_id": cal.json()["id"], "schedule_id": sch.json()["id"],
           "name": "ties"}
    return c, ids


def _fill(path: str, ids: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        assert m.group(1) in ids, f"no test resource for path parameter {m.group(1)} of {path}: add one"
        return ids[m.group(1)]
    return re.sub(r"\{(\w+)\}", sub, path)


def test_every_route_needs_a_token(world):
    c, ids = world
    routes = _routes(c)
    assert len(routes) >= 12  # jobs, events, coefficients, calibration sets, schedules, health
    for method, path in routes:
        if path in PUBLIC:
            continue
        url = _fill(path, ids)
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {auth()['Authorization'][7:]}"}):
            r = c.request(method.upper(), url, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    for path in PUBLIC:
        assert c.get(path).status_code in (200, 503)  # readyz: 503 here, no broker; but never 401


def test_scopes(world):
    """A read-only token reads everything and changes nothing (403 on every write route)."""
    c, ids = world
    for method, path in _routes(c):
        if path in PUBLIC or path.endswith("/events"):  # the stream of a queued job never ends
            continue
        r = c.request(method.upper(), _fill(path, ids), headers=auth("acme-ro"))
        if method in READ_METHODS:
            assert r.status_code != 403, (method, path)
        else:
            assert r.status_code == 403, (method, path, r.status_code)
            assert "jobs:write" in r.json()["error"]["message"]
    # nothing changed: the job is still queued, the set and the schedule still there
    assert c.get(f"/v1/jobs/{ids['job_id']}", headers=auth()).json()["state"] == "queued"
    assert c.get(f"/v1/calibration-sets/{ids['set_id']}", headers=auth()).status_code == 200
    assert c.get(f"/v1/schedules/{ids['schedule_id']}", headers=auth()).status_code == 200


def test_tenant_isolation_on_every_resource(world):
    """Another tenant gets 404 on each of acme's resources, for every method, and lists none of them."""
    c, ids = world
    for method, path in _routes(c):
        if path in PUBLIC or path in CATALOG:
            continue
        url = _fill(path, ids)
        if "{" in path:
            r = c.request(method.upper(), url, headers=auth("other"),
                          json={} if method in ("patch", "put") else None)
            assert r.status_code in (404, 422) if method in ("patch", "put") else r.status_code == 404, \
                (method, path, r.status_code, r.text[:200])
            if r.status_code == 404:
                assert r.json()["error"]["code"] == "not_found"
        elif method == "get":
            body = c.get(url, headers=auth("other")).text
            assert not any(v in body for v in ids.values()), (path, body[:300])
    # acme's resources are untouched and still acme's; the admin sees them
    assert c.get(f"/v1/jobs/{ids['job_id']}", headers=auth()).json()["state"] == "queued"
    for path in (f"/v1/jobs/{ids['job_id']}", f"/v1/calibration-sets/{ids['set_id']}",
                 f"/v1/schedules/{ids['schedule_id']}"):
        assert c.get(path, headers=auth()).status_code == 200
        assert c.get(path, headers=auth("admin")).status_code == 200


def test_patch_of_another_tenants_schedule_is_404(world):
    c, ids = world
    r = c.patch(f"/v1/schedules/{ids['schedule_id']}", json={"paused": True}, headers=auth("other"))
    assert r.status_code == 404
    assert c.get(f"/v1/schedules/{ids['schedule_id']}", headers=auth()).json()["paused"] is False


def test_jobs_cannot_use_another_tenants_calibration_set(world):
    c, ids = world
    root = c.app.state.settings.data_dir
    theirs = c.post("/v1/calibration-sets", content=b'{"text": "y"}\n', headers=auth("other")).json()["id"]
    body = spec_body(root, method="adamerging", parameters={},
                     experts=[{"model": str(root / "e1"), "name": "a"}, {"model": str(root / "e2"), "name": "b"}],
                     calibration={"tasks": {"a": ids["set_id"], "b": theirs}})
    r = c.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 422 and theirs in r.json()["error"]["message"]
    n_jobs = len(c.get("/v1/jobs", headers=auth("admin")).json()["data"])
    assert n_jobs == 1  # only the world's job
