"""/openapi.json documents POST /v1/jobs as a union of per-method specs discriminated on `method`, with
typed, bounded `parameters` from the declarations, so a generated client refuses a bad spec before
sending it; the server still validates with the one MergeSpec."""

from __future__ import annotations

import jsonschema_rs  # installed with schemathesis (dev dependency)
import pytest

from merge_ops.methods import METHODS
from tests.service.fixtures import auth


@pytest.fixture
def openapi(client) -> dict:
    return client.get("/openapi.json").json()


def _validator(openapi: dict):
    # the body schema with the components beside it, as a client generator reads it
    root = {**openapi["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"],
            "components": openapi["components"]}
    return jsonschema_rs.Draft202012Validator(root)


def test_body_is_a_union_discriminated_on_method(openapi):
    body = openapi["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    union = openapi["components"]["schemas"][body["$ref"].split("/")[-1]]
    assert union["discriminator"]["propertyName"] == "method"
    assert set(union["discriminator"]["mapping"]) == set(METHODS) and len(union["oneOf"]) == len(METHODS)
    ties = openapi["components"]["schemas"]["TiesParameters"]["properties"]
    assert set(ties) == {p.name for p in METHODS["ties"].params}
    scalar = ties["density"]["anyOf"][0]
    assert scalar == {"type": "number", "minimum": 0.0, "maximum": 1.0} and ties["density"]["default"] == 1.0
    ada = openapi["components"]["schemas"]["AdamergingParameters"]["properties"]
    steps = next(s for s in ada["steps"].get("anyOf", [ada["steps"]]) if s.get("type") == "integer")
    assert steps["maximum"] == METHODS["adamerging"].param("steps").max
    assert ada["granularity"]["enum"] == ["task", "layer", "block"]


def test_generated_schema_refuses_what_the_server_refuses(openapi, client, tmp_path):
    v = _validator(openapi)
    good = {"method": "ties", "base": "acme/base", "experts": [{"model": "acme/e1", "parameters": {"density": 0.5}},
                                                               {"model": "acme/e2"}],
            "parameters": {"lambda": 1.0}}
    assert v.is_valid(good), [e.message for e in v.iter_errors(good)]
    bad = [
        {**good, "parameters": {"density": 1.5}},  # above the maximum
        {**good, "parameters": {"nope": 1}},  # not a ties parameter
        {**good, "experts": [{"model": "acme/e1", "parameters": {"lambda": 2.0}}]},  # global, not per expert
        {**good, "method": "adamerging", "parameters": {"steps": 10**12}},  # more steps than the server runs
        {**good, "method": "adamerging", "parameters": {"granularity": "row"}},
        {**good, "method": "slerp", "base": None},  # slerp needs a base
    ]
    for body in bad:
        assert not v.is_valid(body), body
        # and the server, which validates with MergeSpec only, refuses the same bodies
        r = client.post("/v1/jobs", json=body, headers=auth())
        assert r.status_code == 422, (body, r.text)
