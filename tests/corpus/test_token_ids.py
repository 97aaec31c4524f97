"""Token ids past the base's vocabulary are refused at submit, naming the line (not an IndexError in the job)."""

from __future__ import annotations

import json

from tests.corpus.test_spec_corpus import _root, client  # noqa: F401  (client is a fixture)
from tests.security.conftest import auth, spec_body


def test_out_of_vocabulary_input_ids_are_refused_at_submit(client):  # noqa: F811
    root = _root(client)
    (root / "base").mkdir()
    (root / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    ids = {}
    for name, rows in (("ok", b'{"input_ids": [0, 5, 99]}\n'), ("bad", b'{"input_ids": [1, 2]}\n{"input_ids": [3, 100]}\n')):
        r = client.post("/v1/calibration-sets", content=rows, headers=auth())
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    body = spec_body(root, method="adamerging", parameters={},
                     calibration={"tasks": {"e1": ids["ok"], "e2": ids["bad"]}})
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    assert msg.startswith("calibration.tasks.e2") and "line 2" in msg and "token id 100" in msg and "0..99" in msg
    body["calibration"]["tasks"]["e2"] = ids["ok"]
    assert client.post("/v1/jobs", json=body, headers=auth()).status_code == 202
