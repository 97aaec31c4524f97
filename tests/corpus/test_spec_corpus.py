"""Bad job specs against the API: each is a 4xx naming what to fix, and nothing is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.security.conftest import auth, make_settings, spec_body


@pytest.fixture
def client(tmp_path: Path):
    with TestClient(create_app(make_settings(tmp_path / "srv"), enqueue=lambda job_id, queue: None)) as c:
        yield c


def _root(c: TestClient) -> Path:
    return c.app.state.settings.data_dir


def _experts(root: Path, *names: str) -> list[dict]:
    return [{"model": str(root / n)} for n in names]


# (case, spec overrides given the allowed root, the message must contain)
CASES = [
    ("unknown_method", lambda r: {"method": "frankenmerge"}, "unknown method 'frankenmerge'"),
    ("density_1_5", lambda r: {"method": "ties", "parameters": {"density": 1.5}}, "above the maximum 1.0"),
    ("density_1_5_per_expert", lambda r: {"method": "ties", "experts": [
        {"model": str(r / "e1"), "parameters": {"density": 1.5}}, {"model": str(r / "e2")}]},
     "experts[0].parameters.density: 1.5 is above the maximum"),
    ("negative_lambda", lambda r: {"parameters": {"lambda": -0.5}}, "below the minimum 0.0"),
    ("negative_ot_weight", lambda r: {"method": "ot_fusion", "base": None, "parameters": {}, "experts": [
        {"model": str(r / "e1"), "parameters": {"weight": -1}}, {"model": str(r / "e2")}]},
     "below the minimum 0.0"),
    ("duplicate_experts", lambda r: {"experts": _experts(r, "e1", "e1")}, "listed twice"),
    ("base_is_an_expert", lambda r: {"experts": _experts(r, "base", "e2")}, "both the base and an expert"),
    ("relative_escape", lambda r: {"experts": [{"model": "../../etc"}, {"model": str(r / "e2")}]},
     "allowed roots"),
    ("absolute_escape", lambda r: {"base": str(r / ".." / ".." / ".." / "etc")}, "allowed roots"),
    ("outside_root", lambda r: {"base": "/etc"}, "allowed roots"),
    ("file_url_escape", lambda r: {"base": "file:///etc"}, "allowed roots"),
    ("symlink_escape", lambda r: {"base": str(r / "link-to-etc")}, "allowed roots"),
    ("home_escape", lambda r: {"base": "~/models"}, "allowed roots"),
    ("bad_hub_id_three_parts", lambda r: {"base": "org/name/extra"}, "is neither a local folder"),
    ("bad_hub_id_dots", lambda r: {"base": "org/..name"}, "neither a local folder"),
    ("bad_hub_id_space", lambda r: {"base": "org/na me"}, "neither a local folder"),
    ("bad_hub_revision", lambda r: {"base": "org/name@../../x"}, "neither a local folder"),
    ("bad_publish_repo", lambda r: {"publish": {"repo": "../escape"}}, "is not a repo id"),
    ("unknown_parameter", lambda r: {"parameters": {"lambda": 1, "densty": 0.5}}, "no parameter 'densty'"),
    ("wrong_type", lambda r: {"parameters": {"lambda": "lots"}}, "must be a number"),
    ("unknown_field", lambda r: {"mystery": 1}, "mystery"),
    ("too_few_experts", lambda r: {"method": "slerp", "parameters": {"t": 0.5}, "experts": []}, "experts"),
    ("calibration_missing", lambda r: {"method": "adamerging", "parameters": {}, "calibration": None},
     "calibration"),
    ("hf_publish_without_token", lambda r: {"publish": {"repo": "acme/x", "hub": "hf"}}, "no hub token"),
]


@pytest.mark.parametrize("name,over,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_is_refused_and_nothing_written(client, name, over, needle):
    root = _root(client)
    if name == "symlink_escape":
        os.symlink("/etc", root / "link-to-etc")
    body = {**spec_body(root), **over(root)}
    body = {k: v for k, v in body.items() if v is not None}
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert 400 <= r.status_code < 500 and r.status_code == 422, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert needle in err["message"], (name, err)
    assert "Traceback" not in r.text
    assert client.get("/v1/jobs", headers=auth("admin")).json()["data"] == []
    assert not (root / "jobs").exists()


def test_another_tenants_calibration_set_is_unknown(client):
    root = _root(client)
    theirs = client.post("/v1/calibration-sets", content=b'{"text": "secret data"}\n', headers=auth("other"))
    assert theirs.status_code == 201
    set_id = theirs.json()["id"]
    body = spec_body(root, method="adamerging", parameters={},
                     experts=[{"model": str(root / "e1"), "name": "a"}, {"model": str(root / "e2"), "name": "b"}],
                     calibration={"tasks": {"a": set_id, "b": set_id}})
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 422 and f"no calibration set {set_id!r}" in r.json()["error"]["message"]
    assert client.get(f"/v1/calibration-sets/{set_id}", headers=auth()).status_code == 404
    assert client.get("/v1/jobs", headers=auth("admin")).json()["data"] == []


def test_calibration_lines_are_validated_with_line_numbers(client):
    bad = b'{"text": "ok"}\n{"input_ids": [1, -2]}\n'
    r = client.post("/v1/calibration-sets", content=bad, headers=auth())
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("line 2:")
    assert not list((_root(client) / "calibration").rglob("*.jsonl"))


def test_event_cursor_past_64_bits(client):
    """Found by schemathesis: a cursor past the BIGINT range broke the SSE stream mid-response."""
    job = client.post("/v1/jobs", json=spec_body(_root(client)), headers=auth()).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth())  # terminal: the stream ends
    huge = "172554431038449319863623090176"
    r = client.get(f"/v1/jobs/{job['id']}/events", params={"after": huge}, headers=auth())
    assert r.status_code == 422 and "after" in r.json()["error"]["message"]
    r = client.get(f"/v1/jobs/{job['id']}/events", headers={**auth(), "Last-Event-ID": huge})
    assert r.status_code == 200 and r.text.count("event: state") == 2  # queued, cancelled: from the start
