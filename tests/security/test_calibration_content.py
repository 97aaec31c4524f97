"""Calibration sets are content-addressed per tenant: a re-upload of the same bytes (a retried
`alloy submit`) names the same set, so an idempotent retry of a spec with local calibration files
replays its job instead of failing 409; other tenants' identical bytes stay their own sets."""

from __future__ import annotations

from tests.security.conftest import auth, spec_body

ROWS = b'{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5, 6]}\n'


def _upload(c, body: bytes, who: str = "acme"):
    return c.post("/v1/calibration-sets", params={"name": "code.jsonl"}, content=body, headers=auth(who))


def _spec(root, set_id: str) -> dict:
    return spec_body(root, method="adamerging", parameters={"steps": 2},
                     calibration={"tasks": {"e1": set_id, "e2": set_id}})


def test_same_bytes_same_set(make_client):
    c = make_client()
    first, again = _upload(c, ROWS), _upload(c, ROWS)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"] and again.headers.get("idempotent-replayed") == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(c.get("/v1/calibration-sets", headers=auth()).json()["data"]) == 1
    other = _upload(c, ROWS + b'{"input_ids": [7]}\n')
    assert other.json()["id"] != first.json()["id"]
    theirs = _upload(c, ROWS, who="other")  # same bytes, another tenant: its own set
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    assert c.get(f"/v1/calibration-sets/{first.json()['id']}", headers=auth("other")).status_code == 404
    files = sorted(p.name for p in (c.app.state.settings.data_dir / "calibration" / "acme").iterdir())
    assert files == sorted(f"{i}.jsonl" for i in (first.json()["id"], other.json()["id"]))  # no temp files left


def test_idempotent_retry_with_reuploaded_calibration(make_client):
    c = make_client()
    root = c.app.state.settings.data_dir
    key = {"Idempotency-Key": "retry-me"}
    set_id = _upload(c, ROWS).json()["id"]
    r1 = c.post("/v1/jobs", json=_spec(root, set_id), headers={**auth(), **key})
    assert r1.status_code == 202, r1.text
    set_again = _upload(c, ROWS).json()["id"]  # the client retries the whole submit
    r2 = c.post("/v1/jobs", json=_spec(root, set_again), headers={**auth(), **key})
    assert r2.status_code == 202 and r2.json()["id"] == r1.json()["id"]


def test_deleted_set_can_be_uploaded_again(make_client):
    c = make_client()
    set_id = _upload(c, ROWS).json()["id"]
    assert c.delete(f"/v1/calibration-sets/{set_id}", headers=auth()).status_code == 204
    r = _upload(c, ROWS)
    assert r.status_code == 201 and r.json()["id"] == set_id
    assert c.get(f"/v1/calibration-sets/{set_id}", headers=auth()).json()["lines"] == 2
