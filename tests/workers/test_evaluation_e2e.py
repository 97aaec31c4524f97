"""Publish gates end to end with real parts (redis-server, uvicorn, Celery worker processes, the
local hub): a passing job publishes a card whose model-index parses with huggingface_hub's
ModelCard; a failing gate ends the job `rejected` with its table and publishes nothing; a job worse
than the published revision is rejected by `not_worse_than_published`."""

from __future__ import annotations

import json
import random

import pytest

from merge_ops.publish import LocalHub
from tests.service.fixtures import Procs, Service, auth, service_env
from tests.service.test_api import parse_sse
from tests.toy_models import make_experts, write_llama

pytestmark = pytest.mark.integration
END = ("succeeded", "failed", "cancelled", "rejected")


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("eval-e2e")
    base = write_llama(root / "models" / "base", hidden=32, layers=2, intermediate=64, vocab=64)
    experts = make_experts(base, 2, root / "models")
    procs = Procs(root)
    try:
        svc = Service(procs, service_env(root, redis_url))
        rng = random.Random(0)
        rows = "".join(json.dumps({"input_ids": [rng.randrange(4, 64) for _ in range(10)]}) + "\n" for _ in range(6))
        r = svc.http.post("/v1/calibration-sets", params={"purpose": "evaluation"}, content=rows.encode(),
                          headers=auth())
        assert r.status_code == 201, r.text
        yield {"svc": svc, "base": base, "experts": experts, "root": root, "set": r.json()["id"]}
    finally:
        procs.stop_all()


def spec(w, repo: str, gates: list, lam: float = 0.5) -> dict:
    return {"method": "task_arithmetic", "base": str(w["base"]),
            "experts": [{"model": str(e)} for e in w["experts"]], "parameters": {"lambda": lam},
            "evaluate": {"sets": {"held": w["set"]}, "batch_size": 3},
            "publish_if": gates, "publish": {"repo": repo, "hub": "local"}}


def run(w, body: dict) -> dict:
    r = w["svc"].http.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 202, r.text
    return w["svc"].wait_state(r.json()["id"], END, timeout=120)


def test_pass_publishes_card_with_model_index(world):
    from huggingface_hub import ModelCard

    done = run(world, spec(world, "acme/gated", [{"set": "held", "metric": "ppl", "max": 1e6}]))
    assert done["state"] == "succeeded", done
    ev = done["result"]["evaluation"]
    assert ev["gates"]["passed"] and ev["results"]["sets"]["held"]["metrics"]["ppl"] > 1
    hub = LocalHub(world["root"] / "hub")
    folder = hub.path("acme/gated")
    card = ModelCard.load(folder / "README.md")
    assert [r.dataset_name for r in card.data.eval_results] == ["held"] * len(card.data.eval_results)
    assert any(r.metric_type == "perplexity" for r in card.data.eval_results)
    assert json.loads((folder / "alloy_merge.json").read_text())["evaluation"]["gates"]["passed"]
    events = parse_sse(world["svc"].http.get(f"/v1/jobs/{done['id']}/events", headers=auth()).text)
    final = [e for e in events if e["event"] == "state" and e["data"]["state"] == "succeeded"]
    assert final and final[0]["data"]["evaluation"]["results"]["sets"]["held"]["kind"] == "perplexity"


def test_reject_publishes_nothing_and_keeps_the_table(world):
    done = run(world, spec(world, "acme/never", [{"set": "held", "metric": "ppl", "max": 1.0}]))
    assert done["state"] == "rejected", done
    assert done["error"]["code"] == "rejected" and "held.ppl" in done["error"]["message"]
    assert "held.ppl" in done["result"]["table"] and done["result"]["gates"]["passed"] is False
    assert not (world["root"] / "hub" / "acme" / "never").exists()


def test_not_worse_than_published(world):
    rule = [{"not_worse_than_published": {"set": "held", "metric": "ppl"}}]
    first = run(world, spec(world, "acme/steady", rule))
    assert first["state"] == "succeeded", first
    assert first["result"]["evaluation"]["gates"]["checks"][0]["note"] == "nothing published yet"
    worse = run(world, spec(world, "acme/steady", rule, lam=40.0))
    assert worse["state"] == "rejected", worse
    check = worse["result"]["gates"]["checks"][0]
    assert check["published"] == pytest.approx(
        first["result"]["evaluation"]["results"]["sets"]["held"]["metrics"]["ppl"])
    assert len(LocalHub(world["root"] / "hub").commits("acme/steady")) == 1
