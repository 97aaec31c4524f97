"""POST /v1/jobs validates `tokenizer` and `chat_template` at submit: 422 naming the field, or 202
with the settings kept in the stored spec (real SQLite store and Redis broker, no worker)."""

from __future__ import annotations

from tests.service.conftest import spec_body
from tests.service.fixtures import auth


def _submit(client, tmp_path, **over):
    return client.post("/v1/jobs", json=spec_body(tmp_path, **over), headers=auth())


def test_bad_tokenizer_settings_are_422_naming_the_field(client, tmp_path):
    cases = [
        ({"tokenizer": {"source": "org/elsewhere"}}, "tokenizer.source: 'org/elsewhere' is not one of the merged"),
        ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": {"kind": "model_token",
                                                                          "model": "e1"}}}}},
         "exactly one of `token` or `token_id`"),
        ({"tokenizer": {"pad_to_multiple_of": -8}}, "tokenizer.pad_to_multiple_of"),
        ({"chat_template": "chatm"}, "chat_template"),
    ]
    for over, needle in cases:
        resp = _submit(client, tmp_path, **over)
        assert resp.status_code == 422, over
        err = resp.json()["error"]
        assert needle in err["message"] and err["code"] == "invalid_spec", (over, err)
    assert client.get("/v1/jobs", headers=auth()).json()["data"] == []


def test_tokenizer_settings_are_accepted_and_kept(client, tmp_path):
    tok = {"source": "union", "tokens": {"<|im_start|>": {"source": "e1", "force": True}}, "pad_to_multiple_of": 64}
    resp = _submit(client, tmp_path, tokenizer=tok, chat_template="chatml")
    assert resp.status_code == 202, resp.json()
    spec = client.get(resp.headers["location"], headers=auth()).json()["spec"]
    assert spec["tokenizer"]["source"] == "union" and spec["chat_template"] == "chatml"
    assert spec["tokenizer"]["tokens"]["<|im_start|>"] == {"source": "e1", "force": True}
