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
    ({"merge_method": "no_such_method", "models": []}, "not supported"),
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


def em(**params):
    return {"method": "expert_merging", "base": "./b", "experts": [{"model": "./a"}, {"model": "./c"}],
            "parameters": params, "calibration": {"tasks": {"a": "cal_1", "c": "cal_2"}}}


@pytest.mark.parametrize("doc, needle", [
    (em(temperature=0), "parameters.temperature: must be above 0"),
    (em(temperature=-1), "parameters.temperature: -1 is below the minimum 0.0"),
    (em(alpha0=0), "parameters.alpha0: must be above 0"),
    (em(alpha0=1.0), "parameters.alpha0: must be below 1"),
    (em(exclude="[a-"), "parameters.exclude: '[a-' is not a regex"),
    (em(hidden_layers="2,last"), "parameters.hidden_layers: '2,last': use 'middle'"),
    (em(lr=float("nan")), "parameters.lr: nan is not a finite number"),
    (em(steps=10**7), "parameters.steps: 1e+07 is out of range"),
    (em(exclude="x" * 2000), "parameters.exclude: 2000 characters"),
    (ties(parameters={"lambda": float("-inf")}), "parameters.lambda: -inf is not a finite number"),
    (ties(experts=[{"model": "./a", "parameters": {"density": [{"filter": "mlp", "value": [{"value": 1}]}]}}]),
     "a filter entry's value is a number or a per-layer list"),
    (ties(experts=[{"model": "./a", "parameters": {"density": [{"filter": "", "value": 0.5}]}}]),
     "a filter is a non-empty substring"),
    ({"method": "ot_fusion", "experts": [{"model": "./a"}, {"model": "./c"}], "parameters": {"anchor": 2}},
     "parameters.anchor: 2 is not an expert index (0..1)"),
    ({"method": "ot_fusion", "experts": [{"model": "./a"}, {"model": "./c"}],
      "parameters": {"solver": "sinkhorn", "reg": 0}}, "parameters.reg: Sinkhorn needs reg > 0"),
    ({"method": "ot_fusion", "experts": [{"model": "./a"}, {"model": "./c"}],
      "parameters": {"ground_metric": "activations"}}, "calibration: ground_metric activations"),
    ({"method": "linear", "experts": [{"model": "./a", "parameters": {"weight": [1, -1]}}, {"model": "./c",
                                                                                         "parameters": {"weight": 0}}]},
     "parameters.weight: the experts' weights sum to 0 at some depth"),
    (ties(publish={"repo": "a/b", "branch": "../main"}), "publish.branch: '../main'"),
    (ties(publish={"repo": "a/b", "tag": "v1/"}), "publish.tag: 'v1/'"),
    (ties(base="./b\x00"), "base: './b\\x00' holds a control character"),
    (ties(base="org/b@v1/../v2"), "neither a local folder"),
    (ties(seed=-1), "seed: Input should be greater than or equal to 0"),
    (ties(shard_size="100000000000000000GB"), "shard_size"),
    (ties(calibration={"tasks": {"a": "cal_1"}}), "calibration: method ties reads no calibration data"),
    (ties(experts=[{"model": f"./e{i}"} for i in range(65)]), "experts"),
])
def test_submit_time_rules_name_the_field(doc, needle):
    with pytest.raises(SpecError) as e:
        spec_from_dict(doc)
    assert needle in str(e.value)


def test_valid_edges_pass_and_parameters_resolve():
    s = spec_from_dict(em(alpha0=0.5, temperature=1e-3, hidden_layers="0, 2", exclude=""))
    p = s.method_params()
    assert p["alpha0"] == [0.5, 0.5] and p["temperature"] == 1e-3 and p["steps"] == 100
    lin = spec_from_dict({"method": "linear", "experts": [{"model": "./a", "parameters": {"weight": [1, 0]}},
                                                          {"model": "./c", "parameters": {"weight": [0, 1]}}]})
    assert lin.method_params()["weight"] == [[1, 0], [0, 1]]  # sums to 1 at every depth
    assert spec_from_dict({**lin.model_dump(), "parameters": {"normalize": False},
                           "experts": [{"model": "./a", "parameters": {"weight": 1}},
                                       {"model": "./c", "parameters": {"weight": -1}}]}).method == "linear"
    assert spec_from_dict(ties(seed=2**32 - 1)).seed == 2**32 - 1
