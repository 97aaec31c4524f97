"""Model card and alloy_merge.json: front matter, provenance, recipe, coefficients, no secrets."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from merge_ops.card import coefficient_summary, write_card
from merge_ops.context import MethodResult, ResolvedModel
from merge_ops.spec import MergeSpec, spec_from_dict

SECRET_URL = "https://hooks.example.com/alloy?token=s3cr3t-webhook-key"


def _spec(method: str = "ties", **extra) -> MergeSpec:
    doc = {"name": "code-math", "method": method, "base": "org/base@v1",
           "experts": [{"model": "org/code@main", "name": "code"}, {"model": "/models/math", "name": "math"}],
           "publish": {"repo": "team/code-math"}, "notify": {"url": SECRET_URL}, **extra}
    if method == "ties":
        doc["parameters"] = {"lambda": 0.8}
        doc["experts"][0]["parameters"] = {"density": 0.5}
    return spec_from_dict(doc)


def _inputs(tmp_path: Path) -> tuple[ResolvedModel, list[ResolvedModel]]:
    base = ResolvedModel("org/base@v1", tmp_path / "b", repo_id="org/base", revision="v1", commit="a" * 40)
    code = ResolvedModel("org/code@main", tmp_path / "c", repo_id="org/code", revision="main", commit="b" * 40)
    math = ResolvedModel("/models/math", Path("/models/math"), commit="local:" + "c" * 64)
    return base, [code, math]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_card_front_matter_body_and_facts(tmp_path):
    spec = _spec()
    base, experts = _inputs(tmp_path)
    result = MethodResult(metrics={"seconds": 1.25, "tensors": 42})
    out = tmp_path / "out"
    out.mkdir()
    write_card(out, spec, base, experts, result, job_id="job-7")
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    # base_model lists hub ids only; the local expert is named by its fingerprint, never its folder
    assert meta == {"base_model": ["org/base", "org/code"], "base_model_relation": "merge",
                    "tags": ["merge", "alloy", "ties"], "library_name": "transformers"}
    assert "/models/math" not in card and "local:cccccccccccc" in card
    assert "# code-math" in card and "https://arxiv.org/abs/2306.01708" in card
    for commit in ("a" * 40, "b" * 40, "local:" + "c" * 64):
        assert commit in card
    assert "job `job-7`" in card and "| tensors | 42 |" in card
    recipe = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe["experts"][1]["model"] == "local:cccccccccccc"
    recipe["experts"][1]["model"] = "/models/math"
    assert MergeSpec.model_validate(recipe).model_dump(exclude={"notify"}) == spec.model_dump(exclude={"notify"})
    assert "s3cr3t" not in card and "hooks.example.com" not in card

    facts = json.loads((out / "alloy_merge.json").read_text())
    assert facts["method"] == "ties" and facts["job_id"] == "job-7" and facts["metrics"] == result.metrics
    assert [(i["role"], i["name"], i["repo"], i["revision"], i["commit"]) for i in facts["inputs"]] == [
        ("base", "org/base", "org/base", "v1", "a" * 40), ("expert", "code", "org/code", "main", "b" * 40),
        ("expert", "math", None, None, "local:" + "c" * 64)]
    assert facts["inputs"][2]["ref"] == facts["spec"]["experts"][1]["model"] == "local:cccccccccccc"
    assert "/models/math" not in json.dumps(facts)
    assert "s3cr3t" not in json.dumps(facts) and facts["created_at"] and facts["alloy_version"]


def test_card_embeds_learned_coefficients(tmp_path):
    spec = _spec("adamerging", calibration={"tasks": {"code": "./c.jsonl", "math": "./m.jsonl"}})
    base, experts = _inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "coefficients.json").write_text(json.dumps(
        {"experts": ["code", "math"], "groups": ["layers.0", "layers.1"], "values": [[0.25, 0.5], [0.75, 1.0]]}))
    (out / "coefficients.png").write_bytes(b"\x89PNG")
    result = MethodResult(metrics={"final_loss": 0.123},
                          artifacts={"coefficients": "coefficients.json", "coefficients_png": "coefficients.png"})
    write_card(out, spec, base, experts, result)
    card = (out / "README.md").read_text()
    assert "](coefficients.png)" in card and "## Learned coefficients" in card
    # values are groups × experts (as coefficients.json is written); the card shows experts × groups
    assert "| expert | layers.0 | layers.1 |" in card
    assert "| code | 0.25 | 0.75 |" in card and "| math | 0.5 | 1 |" in card
    assert _front_matter(card)["tags"] == ["merge", "alloy", "adamerging"]
    facts = json.loads((out / "alloy_merge.json").read_text())
    assert facts["artifacts"] == result.artifacts and facts["method_kind"] == "learned" and facts["job_id"] is None


def test_coefficient_summary_many_groups():
    values = [[float(j), 1.0] for j in range(20)]  # 20 groups × 2 experts
    table = coefficient_summary({"experts": ["a", "b"], "groups": [f"t{j}" for j in range(20)], "values": values})
    # mean/min/max per expert: a -> 9.5, 0, 19
    assert "| a | 20 | 9.5 | 0 | 19 |" in table and "| b | 20 | 1 | 1 | 1 |" in table
    assert coefficient_summary({"values": []}) is None and coefficient_summary([1, 2]) is None
