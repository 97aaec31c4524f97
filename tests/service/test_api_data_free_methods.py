"""The data-free per-matrix methods (tsv_m, iso_c, iso_cts, wudi) through the job API: listed with their
parameters, accepted, refused with a message that says what to fix (the merge itself: tests/merge_ops/
test_methods_data_free.py, through run_merge, which the worker runs)."""

from __future__ import annotations

import pytest

from tests.service.conftest import spec_body
from tests.service.fixtures import auth

ACCEPTED = [
    ("tsv_m", {"alpha": 0.9, "exclude": "embed"}),
    ("iso_c", {"alpha": 1.3}),
    ("iso_cts", {"alpha": 1.5, "common_space_fraction": 0.6}),
    ("wudi", {"solver": "closed_form", "fallback": "base"}),
    ("wudi", {"steps": 400, "lr": 2e-5}),
]
REFUSED = [
    ("iso_cts", {"common_space_fraction": 2}, "parameters.common_space_fraction: 2 is above the maximum 1.0"),
    ("wudi", {"solver": "lbfgs"}, "'lbfgs' is not one of ['adam', 'closed_form']"),
    ("tsv_m", {"lambda": 1.0}, "no parameter 'lambda'"),
    ("iso_c", {"exclude": "[unclosed"}, "is not a regex"),
]


@pytest.mark.parametrize("method,params", ACCEPTED)
def test_accepted_with_their_parameters(client, tmp_path, method, params):
    r = client.post("/v1/jobs", json=spec_body(tmp_path, method=method, parameters=params), headers=auth())
    assert r.status_code == 202, r.text
    job = client.get(r.headers["location"], headers=auth()).json()
    assert job["spec"]["method"] == method and job["spec"]["parameters"] == params
    assert job["queue"] == "cpu"  # static methods run on the cpu queue


@pytest.mark.parametrize("method,params,needle", REFUSED)
def test_refused_with_what_to_fix(client, tmp_path, method, params, needle):
    r = client.post("/v1/jobs", json=spec_body(tmp_path, method=method, parameters=params), headers=auth())
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"], r.json()


def test_listed_by_the_api_with_their_parameters(client):
    from merge_ops.methods import METHODS

    r = client.get("/v1/methods", headers=auth())
    assert r.status_code == 200, r.text
    listed = {m["name"]: m for m in r.json()["data"]}
    for name in ("tsv_m", "iso_c", "iso_cts", "wudi"):
        m = listed[name]
        assert m["kind"] == "static" and m["calibration"] == "none" and "arXiv" in m["paper"]
        got = {p["name"]: p["default"] for p in m["parameters"]}
        assert got == {p.name: p.default for p in METHODS[name].params}
    assert {p["name"]: p["choices"] for p in listed["wudi"]["parameters"]}["solver"] == ["adam", "closed_form"]
    assert listed["iso_c"]["parameters"][0] == {**listed["iso_c"]["parameters"][0], "name": "alpha",
                                                "default": 1.5, "range": ">= 0"}
