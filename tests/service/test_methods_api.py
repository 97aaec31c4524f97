"""GET /v1/methods and /v1/methods/{name}: the torch-free registry as the API shows it."""

from __future__ import annotations

import subprocess
import sys

from merge_ops.methods import METHODS
from tests.service.fixtures import auth


def test_list_matches_the_registry(client):
    r = client.get("/v1/methods", headers=auth("acme-ro"))
    assert r.status_code == 200
    data = {m["name"]: m for m in r.json()["data"]}
    assert set(data) == set(METHODS)
    for name, m in METHODS.items():
        out = data[name]
        assert out["kind"] == m.kind and out["paper"] == m.paper and out["summary"] == m.summary
        assert [p["name"] for p in out["parameters"]] == [p.name for p in m.params]
    ties = {p["name"]: p for p in data["ties"]["parameters"]}
    assert ties["density"] == {**ties["density"], "type": "number", "default": 1.0, "min": 0.0, "max": 1.0,
                               "range": "[0, 1]", "scope": "model", "per_layer": True}
    assert data["ties"]["calibration"] == "none" and data["ties"]["mergekit_name"] == "ties"
    ada = data["adamerging"]
    assert ada["kind"] == "learned" and ada["calibration"] == "required" and ada["mergekit_name"] is None
    steps = next(p for p in ada["parameters"] if p["name"] == "steps")
    assert steps["type"] == "integer" and steps["default"] == 500 and steps["max"] is not None
    assert data["ot_fusion"]["calibration"] == "optional"


def test_one_method_and_unknown(client):
    r = client.get("/v1/methods/slerp", headers=auth())
    assert r.status_code == 200 and r.json()["name"] == "slerp" and r.json()["object"] == "method"
    r = client.get("/v1/methods/nope", headers=auth())
    assert r.status_code == 404 and "ties" in r.json()["error"]["message"]
    assert client.get("/v1/methods").status_code == 401


def test_methods_route_does_not_import_torch():
    code = ("import sys; from fastapi.testclient import TestClient; from service.app import create_app;"
            "from jobs.settings import Settings;"
            "s = Settings(database_url='sqlite://', tokens=[{'token': 't', 'tenant': 'a', 'scopes': ['jobs:read']}]);"
            "c = TestClient(create_app(s, enqueue=lambda j, q: None));"
            "assert c.get('/v1/methods', headers={'Authorization': 'Bearer t'}).status_code == 200;"
            "assert c.get('/v1/methods/adamerging', headers={'Authorization': 'Bearer t'}).status_code == 200;"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
