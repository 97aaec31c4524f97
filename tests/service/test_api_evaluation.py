"""`evaluate:` / `publish_if:` at the API: 422 naming the field, evaluation sets uploaded through
/v1/calibration-sets?purpose=evaluation and referenced by id (never by a server path)."""

from __future__ import annotations

from tests.service.conftest import spec_body
from tests.service.fixtures import auth

GOOD = b'{"prompt": "2+2=", "answer": "4"}\n{"prompt": "3+3=", "answer": "6"}\n'


def _submit(client, tmp_path, who="acme", **over):
    return client.post("/v1/jobs", json=spec_body(tmp_path, **over), headers=auth(who))


def _upload(client, body: bytes, who="acme"):
    return client.post("/v1/calibration-sets", params={"purpose": "evaluation"}, content=body, headers=auth(who))


def test_evaluation_fields_are_validated_with_the_field_named(client, tmp_path):
    cases = [
        ({"publish_if": [{"set": "x", "metric": "ppl", "max": 3}]}, "publish_if gates on evaluation results"),
        ({"evaluate": {"sets": {"x": "cal_a"}}, "publish_if": [{"set": "y", "metric": "ppl", "max": 3}]},
         "publish_if[0]: no evaluation set 'y'"),
        ({"evaluate": {"sets": {"x": "cal_a"}}, "publish_if": [{"set": "x", "metric": "ppl"}]},
         "needs `min` and/or `max`"),
        ({"evaluate": {"sets": {"x": "cal_a"}},
          "publish_if": [{"not_worse_than_published": {"set": "x", "metric": "ppl"}}]},
         "add `publish: {repo: ...}`"),
        ({"evaluate": {"sets": {"x": {"set": "cal_a", "expert": "nobody"}}}}, "evaluate.sets.x.expert"),
        ({"evaluate": {"sets": {}}}, "evaluate.sets"),
    ]
    for over, needle in cases:
        r = _submit(client, tmp_path, **over)
        assert r.status_code == 422, over
        assert needle in r.json()["error"]["message"], (over, r.json())


def test_evaluation_sets_upload_and_reference(client, tmp_path):
    r = _upload(client, GOOD)
    assert r.status_code == 201, r.text
    set_id = r.json()["id"]
    bad = _upload(client, b'{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("line 2:")
    # a calibration upload of the same rows is refused: they are not calibration rows
    assert client.post("/v1/calibration-sets", content=b'{"prompt": "c", "answer": "d"}\n',
                       headers=auth()).status_code == 422
    ok = _submit(client, tmp_path, evaluate={"sets": {"e1": set_id}},
                 publish_if=[{"set": "e1", "metric": "exact_match", "min": 0.5}])
    assert ok.status_code == 202, ok.text
    # a declared kind must match the rows
    r = _submit(client, tmp_path, evaluate={"sets": {"e1": {"set": set_id, "kind": "perplexity"}}})
    assert r.status_code == 422 and "evaluate.sets.e1" in r.json()["error"]["message"]
    # a server path is never read; another tenant's set is not found
    (tmp_path / "e.jsonl").write_bytes(GOOD)
    r = _submit(client, tmp_path, evaluate={"sets": {"e1": str(tmp_path / "e.jsonl")}})
    assert r.status_code == 422 and "no evaluation set" in r.json()["error"]["message"]
    r = _submit(client, tmp_path, who="other", evaluate={"sets": {"e1": set_id}})
    assert r.status_code == 422 and "no evaluation set" in r.json()["error"]["message"]
