"""The evaluate stage of a merge: spec validation of `evaluate:` / `publish_if:`, gates through
run_merge and publish, `alloy eval` / `alloy merge` exit codes, and the card's model-index."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from merge_ops.card import CARD_FILE, FACTS_FILE
from merge_ops.publish import LocalHub
from merge_ops.runner import REJECTED_EXIT, Rejected, publish_result, published_evaluation, run_merge
from merge_ops.spec import load_spec, spec_from_dict
from tests.toy_models import write_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    base = write_llama(root / "base", hidden=32, layers=2, intermediate=64, vocab=64, heads=2, seed=1)
    out = {"base": base}
    for i, n in enumerate(("code", "math")):
        out[n] = write_llama(root / n, hidden=32, layers=2, intermediate=64, vocab=64, heads=2,
                             perturb_from=base, seed=10 + i, scale=0.01)
    rng = random.Random(0)
    for n in ("code", "math"):
        rows = [{"input_ids": [rng.randrange(4, 64) for _ in range(12)]} for _ in range(6)]
        (root / f"{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[f"{n}_set"] = root / f"{n}.jsonl"
    return out


def _spec(models: dict[str, Path], **extra) -> dict:
    return {"method": "task_arithmetic", "base": str(models["base"]),
            "experts": [{"model": str(models["code"]), "name": "code"},
                        {"model": str(models["math"]), "name": "math"}],
            "parameters": {"lambda": 0.5},
            "evaluate": {"sets": {"code": str(models["code_set"]), "math": str(models["math_set"])},
                         "batch_size": 4},
            **extra}


# -- validation at spec build -------------------------------------------------------------------
def _error(doc: dict) -> str:
    with pytest.raises(Exception) as e:
        spec_from_dict(doc)
    return str(e.value)


def test_publish_if_without_evaluate_is_refused(models):
    doc = _spec(models, publish_if=[{"set": "code", "metric": "ppl", "max": 10}])
    del doc["evaluate"]
    assert "publish_if gates on evaluation results" in _error(doc)


def test_gate_on_unknown_set_or_metric_is_refused(models):
    assert "no evaluation set 'prose'" in _error(_spec(models, publish_if=[{"set": "prose", "metric": "ppl",
                                                                             "max": 3}]))
    assert "unknown metric 'bleu'" in _error(_spec(models, publish_if=[{"set": "code", "metric": "bleu",
                                                                         "min": 3}]))


def test_not_worse_than_published_needs_publish(models):
    doc = _spec(models, publish_if=[{"not_worse_than_published": {"set": "code", "metric": "ppl"}}])
    assert "add `publish: {repo: ...}`" in _error(doc)
    doc["publish"] = {"repo": "team/m"}
    assert spec_from_dict(doc).publish_if[0].not_worse_than_published.metric == "ppl"


def test_spec_file_anchors_evaluation_paths(tmp_path, models):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "c.jsonl").write_text(models["code_set"].read_text())
    doc = _spec(models)
    doc["evaluate"]["sets"] = {"code": "./eval/c.jsonl", "math": {"set": "eval/c.jsonl", "kind": "perplexity"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    sets = load_spec(tmp_path / "s.yaml").evaluate.set_specs()
    assert sets["code"].set == str((tmp_path / "eval" / "c.jsonl").resolve())
    assert sets["math"].set == str((tmp_path / "eval" / "c.jsonl").resolve())
    assert sets["math"].kind == "perplexity"


# -- the stage --------------------------------------------------------------------------------------
def test_pass_publishes_with_model_index(tmp_path, models):
    from huggingface_hub import ModelCard

    spec = spec_from_dict(_spec(models, publish={"repo": "team/merged"},
                                publish_if=[{"set": "code", "metric": "ppl", "max": 1e6},
                                            {"not_worse_than_published": {"set": "code", "metric": "ppl"}}]))
    hub = LocalHub(tmp_path / "hub")
    out = run_merge(spec, tmp_path / "out", eval_cache_dir=tmp_path / "cache",
                    published_evaluation=lambda: published_evaluation(hub, "team/merged"))
    assert not out.rejected
    gates = out.evaluation["gates"]
    assert gates["passed"] and gates["checks"][1]["note"] == "nothing published yet"
    facts = json.loads((out.out_dir / FACTS_FILE).read_text())
    assert facts["evaluation"]["results"]["sets"]["code"]["metrics"]["ppl"] > 1
    assert set(facts["evaluation"]["baselines"]) == {"base", "expert:code", "expert:math"}
    card = ModelCard.load(out.out_dir / CARD_FILE)
    results = card.data.eval_results
    assert results and {r.dataset_name for r in results} == {"code", "math"}
    assert "## Evaluation" in card.text
    ref = publish_result(out, spec, hub)
    pub = published_evaluation(hub, "team/merged")
    assert pub is not None and pub["sets"]["code"]["metrics"]["ppl"] == pytest.approx(
        facts["evaluation"]["results"]["sets"]["code"]["metrics"]["ppl"])
    assert hub.resolve_revision("team/merged") == ref.commit
    # baselines are cached per input commit: the cache has entries now
    assert any((tmp_path / "cache").rglob("*.json"))


def test_reject_publishes_nothing(tmp_path, models):
    spec = spec_from_dict(_spec(models, publish={"repo": "team/merged"},
                                publish_if=[{"set": "code", "metric": "ppl", "max": 1.0}]))
    hub = LocalHub(tmp_path / "hub")
    out = run_merge(spec, tmp_path / "out")
    assert out.rejected
    with pytest.raises(Rejected) as e:
        publish_result(out, spec, hub)
    assert e.value.code == "rejected" and "code.ppl" in e.value.message
    assert e.value.report["passed"] is False and "code.ppl" in e.value.report["table"]
    assert published_evaluation(hub, "team/merged") is None
    assert not (tmp_path / "hub" / "team" / "merged").exists()


def test_not_worse_than_published_rejects_a_worse_merge(tmp_path, models):
    hub = LocalHub(tmp_path / "hub")
    rule = [{"not_worse_than_published": {"set": "code", "metric": "ppl", "tolerance": 0.0}}]
    good = spec_from_dict(_spec(models, publish={"repo": "team/m"}, publish_if=rule))
    first = run_merge(good, tmp_path / "a", published_evaluation=lambda: published_evaluation(hub, "team/m"))
    publish_result(first, good, hub)
    # lambda 40 pushes far past the experts: a worse perplexity than the published lambda 0.5
    worse = spec_from_dict(_spec(models, publish={"repo": "team/m"}, publish_if=rule,
                                 parameters={"lambda": 40.0}))
    second = run_merge(worse, tmp_path / "b", published_evaluation=lambda: published_evaluation(hub, "team/m"))
    check = second.evaluation["gates"]["checks"][0]
    assert second.rejected, check
    assert check["published"] == pytest.approx(first.evaluation["results"]["sets"]["code"]["metrics"]["ppl"])
    with pytest.raises(Rejected):
        publish_result(second, worse, hub)
    assert len(hub.commits("team/m")) == 1


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_eval_and_rejected_exit_code(tmp_path, models, capsys):
    import argparse

    from merge_ops.cli import cmd_eval, cmd_merge

    args = argparse.Namespace(model=str(models["base"]), sets=[f"code={models['code_set']}"], kind=None,
                              device="cpu", max_length=64, batch_size=4, json=True)
    assert cmd_eval(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sets"]["code"]["kind"] == "perplexity" and doc["sets"]["code"]["metrics"]["ppl"] > 1

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(models, publish_if=[{"set": "code", "metric": "ppl", "max": 1.0}])))
    margs = argparse.Namespace(spec=str(spec_file), out=str(tmp_path / "o"), publish="team/x", hub="local",
                               hub_root=tmp_path / "hub", device="cpu", shard_size=None, dtype=None,
                               out_dtype=None, quiet=True, eval_cache=tmp_path / "cache")
    assert cmd_merge(margs) == REJECTED_EXIT
    captured = capsys.readouterr()
    assert "rejected" in captured.err and "code.ppl" in captured.out
    assert not (tmp_path / "hub" / "team" / "x").exists()
