"""The API accepts LoRA adapters where it accepts models (model+adapter, or an adapter alone with a
base) and refuses unusable ones at submit with a 422 naming the field."""

from __future__ import annotations

import json

import torch

from tests.merge_ops.test_lora import DIMS, llama_adapter
from tests.service.conftest import spec_body
from tests.service.fixtures import auth
from tests.toy_models import write_llama


def _submit(client, tmp_path, experts, **over):
    body = spec_body(tmp_path, experts=[{"model": m} for m in experts], **over)
    return client.post("/v1/jobs", json=body, headers=auth())


def test_adapter_refs_are_accepted_and_bad_ones_refused_at_submit(client, tmp_path):
    base = write_llama(tmp_path / "base", **DIMS, dtype=torch.float32)
    e1 = write_llama(tmp_path / "e1", **DIMS, dtype=torch.float32, seed=1)
    ad = llama_adapter(tmp_path / "ad")
    for experts in ([str(e1), f"{base}+{ad}"], [str(e1), str(ad)]):
        resp = _submit(client, tmp_path, experts)
        assert resp.status_code == 202, resp.json()
        assert resp.json()["spec"]["experts"][1]["model"] == experts[1]

    dora = llama_adapter(tmp_path / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    cases = [
        ([str(e1), f"{base}+{dora}"], {}, ["experts[1].model", "DoRA"]),
        ([str(e1), str(dora)], {}, ["experts[1].model", "DoRA"]),
        ([str(e1), f"{base}+{base}"], {}, ["experts[1].model", "not a PEFT LoRA adapter"]),
        ([str(e1), f"{base}+{outside}"], {}, ["allowed roots"]),
        ([str(e1), str(base)], {"base": str(ad)}, ["base:", "no model to apply it to"]),
        ([str(e1), f"{base}+{ad}+{ad}"], {}, ["experts.1.model", "one '+'"]),
    ]
    for experts, over, needles in cases:
        resp = _submit(client, tmp_path, experts, **over)
        assert resp.status_code == 422, (experts, resp.json())
        msg = resp.json()["error"]["message"]
        assert all(n in msg for n in needles), (needles, msg)
