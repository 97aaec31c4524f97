"""MergeSpec: our YAML, mergekit's YAML, and every refusal names the field to fix."""

from __future__ import annotations

import pytest

from merge_ops.errors import SpecError
from merge_ops.spec import load_spec, parse_size, spec_from_dict


def ties(**kw):
    doc = {"method": "ties", "base": "./base", "experts": [{"model": "./a"}, {"model": "org/b@v2"}]}
    doc.update(kw)
    return doc


def test_defaults_and_helpers():
    s = spec_from_dict(ties(parameters={"density": 0.5}))
    assert s.expert_names() == ["a", "b"]
    assert s.global_param("lambda") == 1.0 and s.global_param("normalize") is True
    assert s.model_param_value(0, "density") == 0.5  # global value is the per-expert default
    assert s.model_param_value(1, "weight") == 1.0


def test_per_expert_overrides_global():
    s = spec_from_dict(ties(experts=[{"model": "./a", "parameters": {"density": 0.3}}, {"model": "./b"}],
                            parameters={"density": 0.7}))
    assert s.model_param_value(0, "density") == 0.3
    assert s.model_param_value(1, "density") == 0.7


def test_mergekit_yaml_is_translated(tmp_path):
    (tmp_path / "m.yaml").write_text(
        "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./base\n"
        "  - model: ./code\n    parameters: {weight: [0, 1], density: 0.5}\n"
        "  - model: ./math\n    parameters: {weight: 0.5, density: 0.5}\n"
        "parameters: {normalize: true}\ndtype: bfloat16\n")
    s = load_spec(tmp_path / "m.yaml")
    assert s.method == "ties" and s.dtype == "bfloat16"
    assert [e.model for e in s.experts] == [str(tmp_path / "code"), str(tmp_path / "math")]
    assert s.base == str(tmp_path / "base")  # relative paths anchor at the spec's folder
    assert s.experts[0].parameters["weight"] == [0, 1]


@pytest.mark.parametrize("doc, needle", [
    ({"method": "nope", "experts": [{"model": "./a"}]}, "unknown method 'nope'"),
    (ties(parameters={"densty": 0.5}), "no parameter 'densty'"),
    (ties(parameters={"density": 1.5}), "parameters.density: 1.5 is above the maximum 1.0"),
    (ties(parameters={"lambda": -1}), "below the minimum"),
    (ties(parameters={"normalize": "yes"}), "must be true or false"),
    (ties(parameters={"lambda": [0.1, 0.2]}), "takes a single value"),
    (ties(experts=[{"model": "./a", "parameters": {"lambda": 2}}]), "global parameter"),
    (ties(experts=[{"model": "./a"}, {"model": "./a"}]), "listed twice"),
    (ties(experts=[{"model": "not a repo"}]), "neither a local folder"),
    (ties(experts=[]), "experts"),
    (ties(base=None), "needs a base model"),
    (ties(publish={"repo": "bad repo"}), "is not a repo id"),
    (ties(notify={"url": "ftp://x"}), "http:// or https://"),
    (ties(shard_size="tiny"), "cannot read size"),
    (ties(extra_field=1), "extra_field"),
    ({"method": "slerp", "base": "./b", "experts": [{"model": "./a"}]}, "needs parameter 't'"),
    ({"method": "slerp", "base": "./b", "experts": [{"model": "./a"}, {"model": "./c"}],
      "parameters": {"t": 0.5}}, "at most 1"),
    ({"method": "adamerging", "base": "./b", "experts": [{"model": "./a"}]}, "calibration.tasks"),
    ({"method": "adamerging", "base": "./b", "experts": [{"model": "./a"}],
      "calibration": {"tasks": {"x": "c.jsonl"}}}, "no data for expert(s) ['a']"),
    ({"merge_method": "ties", "slices": []}, "slices"),
    ({"merge_method": "della", "models": []}, "not supported"),
    ("just a string", "mapping"),
])
def test_refusals_name_what_to_fix(doc, needle):
    with pytest.raises(SpecError) as e:
        spec_from_dict(doc)
    assert needle in str(e.value)


def test_gradient_and_filter_values_are_range_checked():
    ok = spec_from_dict(ties(parameters={"density": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]}))
    assert ok.parameters["density"][1]["value"] == 0.5
    with pytest.raises(SpecError, match="above the maximum"):
        spec_from_dict(ties(parameters={"density": [{"filter": "mlp", "value": [0.2, 1.8]}]}))


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size(1234) == 1234


def test_spec_round_trips_through_yaml(tmp_path):
    s = spec_from_dict(ties(base="/m/base", experts=[{"model": "/m/a"}, {"model": "org/b@v2"}],
                            parameters={"density": 0.5}, seed=3))
    p = tmp_path / "s.yaml"
    p.write_text(s.to_yaml())
    assert load_spec(p).model_dump() == s.model_dump()
