"""Bad job specs against the API: each is a 4xx naming what to fix, and nothing is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
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


# -- checked when the spec is built: each was accepted with 202 and failed only in the worker --------
def _learned(r: Path, method: str, **params) -> dict:
    return {"method": method, "parameters": params, "calibration": {"tasks": {"e1": "cal_a", "e2": "cal_b"}}}


def _raw(text: str) -> str:
    """A JSON number the encoder refuses to write (NaN, Infinity), for bodies sent as text."""
    return f"__RAW__{text}__"


# (case, spec overrides given the allowed root, the field the message must name, what it says)
SUBMIT_CASES = [
    ("temperature_zero", lambda r: _learned(r, "expert_merging", temperature=0),
     "parameters.temperature", "must be above 0"),
    ("alpha0_zero", lambda r: _learned(r, "expert_merging", alpha0=0.0), "parameters.alpha0", "must be above 0"),
    ("alpha0_one", lambda r: _learned(r, "expert_merging", alpha0=1), "parameters.alpha0", "must be below 1"),
    ("alpha0_one_per_expert", lambda r: {**_learned(r, "expert_merging"), "experts": [
        {"model": str(r / "e1"), "name": "e1"}, {"model": str(r / "e2"), "name": "e2", "parameters": {"alpha0": 1.0}}]},
     "experts[1].parameters.alpha0", "must be below 1"),
    ("exclude_not_a_regex", lambda r: _learned(r, "expert_merging", exclude="(norm|embed"),
     "parameters.exclude", "is not a regex"),
    ("hidden_layers_bad", lambda r: _learned(r, "expert_merging", hidden_layers="middle,last"),
     "parameters.hidden_layers", "comma-separated"),
    ("ot_anchor_out_of_range", lambda r: {"method": "ot_fusion", "base": None, "parameters": {"anchor": 2}},
     "parameters.anchor", "not an expert index"),
    ("ot_anchor_negative", lambda r: {"method": "ot_fusion", "base": None, "parameters": {"anchor": -1}},
     "parameters.anchor", "below the minimum"),
    ("branch_dotdot", lambda r: {"publish": {"repo": "acme/x", "branch": "main/../../x"}}, "publish.branch", "'..'"),
    ("tag_dotdot", lambda r: {"publish": {"repo": "acme/x", "tag": "v1..v2"}}, "publish.tag", "'..'"),
    ("linear_weights_sum_to_zero", lambda r: {"method": "linear", "base": None, "parameters": {}, "experts": [
        {"model": str(r / "e1"), "parameters": {"weight": 1.0}},
        {"model": str(r / "e2"), "parameters": {"weight": -1.0}}]}, "parameters.weight", "sum to 0"),
    ("lambda_1e308", lambda r: {"parameters": {"lambda": 1e308}}, "parameters.lambda", "out of range"),
    ("weight_gradient_1e308", lambda r: {"experts": [
        {"model": str(r / "e1"), "parameters": {"weight": [0.5, 1e308]}}, {"model": str(r / "e2")}]},
     "experts[0].parameters.weight", "out of range"),
    ("steps_1e308", lambda r: _learned(r, "adamerging", steps=1e308), "parameters.steps", "out of range"),
    ("lambda_nan", lambda r: {"parameters": {"lambda": _raw("NaN")}}, "parameters.lambda", "not a finite number"),
    ("lambda_infinity", lambda r: {"parameters": {"lambda": _raw("Infinity")}}, "parameters.lambda",
     "not a finite number"),
    ("weight_minus_infinity", lambda r: {"experts": [
        {"model": str(r / "e1"), "parameters": {"weight": [0.5, _raw("-Infinity")]}}, {"model": str(r / "e2")}]},
     "experts[0].parameters.weight", "not a finite number"),
    ("seed_too_big", lambda r: {"seed": 2**70}, "seed", "less than or equal"),
    ("nul_in_base", lambda r: {"base": str(r / "base") + "\x00"}, "base", "control character"),
    ("newline_in_expert", lambda r: {"experts": [{"model": str(r / "e1") + "\n"}, {"model": str(r / "e2")}]},
     "experts.0.model", "control character"),
    ("nul_in_calibration_ref", lambda r: {**_learned(r, "adamerging"),
                                          "calibration": {"tasks": {"e1": "cal_a\x00", "e2": "cal_b"}}},
     "calibration.tasks.e1", "control character"),
    ("dotdot_in_revision", lambda r: {"base": "acme/base@main/../x"}, "base", "neither a local folder"),
    ("activations_without_calibration", lambda r: {"method": "ot_fusion", "base": None,
                                                   "parameters": {"ground_metric": "activations"}},
     "calibration", "calibration.tasks"),
    ("calibration_for_a_static_method", lambda r: {"calibration": {"tasks": {"e1": "cal_a"}}}, "calibration",
     "reads no calibration data"),
    ("too_many_gradient_entries", lambda r: {"parameters": {"lambda": 1, "weight": [1.0] * 300}},
     "parameters.weight", "at most 256"),
]


def _post_raw(client: TestClient, body: dict):
    text = json.dumps(body)
    for literal in ("NaN", "-Infinity", "Infinity"):
        text = text.replace(json.dumps(_raw(literal)), literal)
    return client.post("/v1/jobs", content=text, headers={**auth(), "content-type": "application/json"})


@pytest.mark.parametrize("name,over,field,needle", SUBMIT_CASES, ids=[c[0] for c in SUBMIT_CASES])
def test_bad_spec_is_refused_at_submit_naming_the_field(client, name, over, field, needle):
    root = _root(client)
    body = {**spec_body(root), **over(root)}
    body = {k: v for k, v in body.items() if v is not None}
    r = _post_raw(client, body)
    assert r.status_code == 422, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == "invalid_spec", (name, err)
    assert err["message"].startswith(field + ":") or f"; {field}:" in err["message"], (name, err)
    assert needle in err["message"], (name, err)
    assert "Traceback" not in r.text and "internal" not in err["code"]
    assert client.get("/v1/jobs", headers=auth("admin")).json()["data"] == []


def test_text_calibration_for_a_base_without_a_tokenizer_is_refused_at_submit(client):
    """A local base's files are visible at submit: text rows need its tokenizer files (a file check,
    no weights read). Token ids are fine, and so is text once the base has a tokenizer."""
    root = _root(client)
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    sets = {}
    for kind, line in (("text", b'{"text": "a sentence"}\n'), ("ids", b'{"input_ids": [5, 6, 7]}\n')):
        r = client.post("/v1/calibration-sets", content=line * 3, headers=auth())
        assert r.status_code == 201
        sets[kind] = r.json()["id"]
    body = spec_body(root, method="adamerging", parameters={},
                     calibration={"tasks": {"e1": sets["ids"], "e2": sets["text"]}})
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    assert msg.startswith("calibration.tasks.e2") and "no tokenizer" in msg and "input_ids" in msg, msg
    assert client.get("/v1/jobs", headers=auth("admin")).json()["data"] == []
    r = client.post("/v1/jobs", json={**body, "calibration": {"tasks": {"e1": sets["ids"], "e2": sets["ids"]}}},
                    headers=auth())
    assert r.status_code == 202, r.text
    (base / "tokenizer.json").write_text("{}")
    assert client.post("/v1/jobs", json=body, headers=auth()).status_code == 202


def test_upload_accepts_the_input_vectors_ot_fusion_reads(client):
    """One row format everywhere: `{"input": [...]}` rows (OT fusion of MLP/CNN models) upload; a set
    mixing them with token rows, or a non-finite number, is refused naming the line."""
    r = client.post("/v1/calibration-sets", content=b'{"input": [0.5, -1, 2e-3]}\n{"input": [1, 2, 3]}\n',
                    headers=auth())
    assert r.status_code == 201 and r.json()["lines"] == 2, r.text
    for bad, line in ((b'{"input": [1.0]}\n{"text": "x"}\n', 2), (b'{"input": [1.0, NaN]}\n', 1)):
        r = client.post("/v1/calibration-sets", content=bad, headers=auth())
        assert r.status_code == 422 and r.json()["error"]["message"].startswith(f"line {line}:"), r.text


# -- the CLI: the same checks, exit 2 with the field named, before any model is read ---------------------
def _cli(tmp_path: Path, spec: dict, capsys) -> tuple[int, str]:
    from service.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["merge", str(path), "--out", str(tmp_path / "out"), "-q"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name,spec,field", [
    ("temperature_zero", {"method": "expert_merging", "base": "./base", "experts": [{"model": "./a"}],
                          "parameters": {"temperature": 0}, "calibration": {"tasks": {"a": "./a.jsonl"}}},
     "parameters.temperature"),
    ("tag_dotdot", {"method": "ties", "base": "./base", "experts": [{"model": "./a"}],
                    "publish": {"repo": "acme/x", "tag": "../v1"}}, "publish.tag"),
    ("ot_anchor", {"method": "ot_fusion", "experts": [{"model": "./a"}, {"model": "./b"}],
                   "parameters": {"anchor": 5}}, "parameters.anchor"),
])
def test_cli_exits_2_naming_the_field(tmp_path, capsys, name, spec, field):
    code, err = _cli(tmp_path, spec, capsys)
    assert code == 2, (name, err)
    assert err.startswith(f"alloy: error: {field}:"), (name, err)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_text_calibration_for_a_base_without_a_tokenizer(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "a.jsonl").write_text('{"input_ids": [1, 2]}\n{"text": "words"}\n')
    spec = {"method": "adamerging", "base": "./base", "experts": [{"model": "./a"}],
            "calibration": {"tasks": {"a": "./a.jsonl"}}}
    code, err = _cli(tmp_path, spec, capsys)
    assert code == 2 and err.startswith("alloy: error: calibration.tasks.a"), err
    assert "line 2 holds text" in err and "no tokenizer" in err
