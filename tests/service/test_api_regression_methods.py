"""RegMean, RegMean++, Fisher merging and STF through the job API: listed with their parameters, a job
with calibration sets accepted, bad values refused naming the field (the merges
themselves: tests/merge_ops/test_methods_regression.py and test_methods_stf.py)."""

from __future__ import annotations

from tests.service.conftest import spec_body
from tests.service.fixtures import auth


def _sets(client) -> dict[str, str]:
    ids = {}
    for name in ("e1", "e2"):
        r = client.post("/v1/calibration-sets", params={"name": name}, content=b'{"text": "a b c"}\n',
                        headers=auth())
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    return ids


def test_listed_by_the_api_with_their_parameters(client):
    from merge_ops.methods import METHODS

    r = client.get("/v1/methods", headers=auth())
    assert r.status_code == 200, r.text
    listed = {m["name"]: m for m in r.json()["data"]}
    for name in ("regmean", "regmean_plusplus", "fisher", "stf"):
        m = listed[name]
        assert "arXiv" in m["paper"]
        assert {p["name"]: p["default"] for p in m["parameters"]} == {p.name: p.default for p in METHODS[name].params}
    assert listed["regmean_plusplus"]["kind"] == "learned" and listed["regmean_plusplus"]["calibration"] != "none"
    assert listed["stf"]["kind"] == "static" and listed["stf"]["calibration"] == "none"


def test_jobs_accepted_and_refused(client, tmp_path):
    ids = _sets(client)
    cal = {"calibration": {"tasks": ids}}
    body = spec_body(tmp_path, method="regmean_plusplus", parameters={"alpha": 0.9},
                     experts=[{"model": str(tmp_path / "e1"), "name": "e1"}, {"model": str(tmp_path / "e2"), "name": "e2"}],
                     **cal)
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 202, r.text
    body["parameters"] = {"alpha": 2}
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 422 and "parameters.alpha" in r.json()["error"]["message"], r.text
    body.update(method="fisher", parameters={"estimator": "exact"})
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 422 and "'exact' is not one of" in r.json()["error"]["message"], r.text
    r = client.post("/v1/jobs", json=spec_body(tmp_path, method="stf", parameters={"ridge": 0.1}), headers=auth())
    assert r.status_code == 202, r.text
