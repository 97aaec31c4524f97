"""Layer slices and mergekit `modules:`: stacked layer ranges (frankenmerges), per-slice methods and
parameters, gradients over each slice, against float64 references written here; and the refusals
(a bad range names its field: SpecError, CLI exit 2). mergekit itself runs the same configs in
`benchmarks/static_vs_mergekit.py --slices`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from merge_ops.errors import SpecError
from merge_ops.runner import run_merge
from merge_ops.spec import spec_from_dict
from tests.toy_models import read_float64, write_llama

DIMS = dict(hidden=32, intermediate=64, vocab=64, heads=2)
F32 = {"dtype": "float32", "out_dtype": "float32"}


@pytest.fixture(scope="module")
def m(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("slice-models")
    base = write_llama(root / "base", layers=4, seed=0, **DIMS)
    out = {"base": base, "deep": write_llama(root / "deep", layers=6, seed=5, **DIMS)}
    for i, k in enumerate(("e1", "e2")):
        out[k] = write_llama(root / k, layers=4, seed=10 + i, perturb_from=base, scale=0.01, **DIMS)
    return {k: str(v) for k, v in out.items()}


def merge(doc: dict, out: Path) -> dict[str, torch.Tensor]:
    run_merge(spec_from_dict(doc), out)
    return read_float64(out)


def lerp(values: list[float] | float, t: float) -> float:
    """mergekit's gradient: piecewise linear over evenly spaced points, t in [0, 1]."""
    if not isinstance(values, list):
        return values
    x = t * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    return values[i] + (x - i) * (values[i + 1] - values[i])


def block(name: str, i: int) -> str:
    return f"model.layers.{i}.{name}"


LAYER = ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
         "input_layernorm.weight")


def test_frankenmerge_stacks_ranges_of_two_depths(m, tmp_path) -> None:
    out = merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m["base"], "layer_range": [0, 3]}]},
        {"sources": [{"model": m["deep"], "layer_range": [2, 6]}]}]} | F32, tmp_path / "out")
    base, deep = read_float64(m["base"]), read_float64(m["deep"])
    stacked = [(base, i) for i in range(3)] + [(deep, i) for i in range(2, 6)]
    assert max(int(n.split(".")[2]) for n in out if n.startswith("model.layers.")) == 6
    for j, (src, i) in enumerate(stacked):
        for n in LAYER:
            assert torch.equal(out[block(n, j)], src[block(n, i)]), (j, n)
    assert len(out) == 2 + 1 + 7 * 9  # embeddings, norm, head, 7 blocks of 9 tensors
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # first slice's
    assert torch.equal(out["lm_head.weight"], deep["lm_head.weight"])  # the last slice's
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 7 and cfg["hidden_size"] == 32


def test_frankenmerge_loads_in_transformers(m, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m["e1"], "layer_range": [0, 2]}]},
        {"sources": [{"model": m["e1"], "layer_range": [1, 4]}]}]}, tmp_path / "out")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)


def test_gradients_run_over_each_slice_and_outer_tensors_at_t0(m, tmp_path) -> None:
    """linear, weights as gradients: slice 0 (3 layers) at t = 0, 1/2, 1; slice 1 (1 layer) at t = 1;
    embeddings with slice 0's parameters and the final norm and head with slice 1's, both at t = 0."""
    w1, w2, w_slice1 = [1.0, 0.0], [0.0, 1.0], [0.2, 0.8]
    out = merge({"merge_method": "linear", "slices": [
        {"sources": [{"model": m["e1"], "layer_range": [0, 3], "parameters": {"weight": w1}},
                     {"model": m["e2"], "layer_range": [1, 4], "parameters": {"weight": w2}}]},
        {"sources": [{"model": m["e1"], "layer_range": [3, 4]}, {"model": m["e2"], "layer_range": [0, 1]}],
         "parameters": {"weight": w_slice1}}]} | F32, tmp_path / "out")
    e1, e2 = read_float64(m["e1"]), read_float64(m["e2"])

    def lin(a: torch.Tensor, b: torch.Tensor, wa: float, wb: float) -> torch.Tensor:
        return (wa * a + wb * b) / (wa + wb)

    for j, (i1, i2, t) in enumerate([(0, 1, 0.0), (1, 2, 0.5), (2, 3, 1.0)]):
        for n in LAYER:
            ref = lin(e1[block(n, i1)], e2[block(n, i2)], lerp(w1, t), lerp(w2, t))
            torch.testing.assert_close(out[block(n, j)], ref, rtol=0, atol=1e-6)
    for n in LAYER:  # a one-layer slice sits at t = 1: both weights 0.8, an even average
        torch.testing.assert_close(out[block(n, 3)], lin(e1[block(n, 3)], e2[block(n, 0)], 0.8, 0.8),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(out["model.embed_tokens.weight"], e1["model.embed_tokens.weight"], rtol=0, atol=1e-6)
    for n in ("model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(out[n], lin(e1[n], e2[n], 0.2, 0.2), rtol=0, atol=1e-6)


def test_parameter_precedence_and_filter_fall_through(m, tmp_path) -> None:
    """task_arithmetic: a source's weight beats the slice's, the slice's beats the top level's, and a
    slice filter list that matches nothing (attention tensors) falls through to the top level."""
    out = merge({"merge_method": "task_arithmetic", "base_model": m["base"], "slices": [
        {"sources": [{"model": m["base"], "layer_range": [0, 4]},
                     {"model": m["e1"], "layer_range": [0, 4], "parameters": {"weight": 0.9}},
                     {"model": m["e2"], "layer_range": [0, 4]}],
         "parameters": {"weight": [{"filter": "mlp", "value": [0.1, 0.4]}]}}],
        "parameters": {"weight": 0.3, "lambda": 0.5}} | F32, tmp_path / "out")
    b, e1, e2 = read_float64(m["base"]), read_float64(m["e1"]), read_float64(m["e2"])
    for i in range(4):
        t = i / 3
        for n in LAYER:
            w2 = lerp([0.1, 0.4], t) if "mlp" in n else 0.3
            name = block(n, i)
            ref = b[name] + 0.5 * (0.9 * (e1[name] - b[name]) + w2 * (e2[name] - b[name]))
            torch.testing.assert_close(out[name], ref, rtol=0, atol=1e-6)


def test_slice_base_and_a_per_slice_method(m, tmp_path) -> None:
    """Slice 0: task arithmetic on the spec's base; slice 1: e1 is its base; slice 2 (Alloy's own
    schema): another method, passthrough of e2 times 0.5."""
    doc = {"method": "task_arithmetic", "base": m["base"],
           "experts": [{"model": m["e1"], "name": "one"}, {"model": m["e2"], "name": "two"}],
           "parameters": {"lambda": 1.0},
           "slices": [
               {"sources": [{"model": m["base"], "layer_range": [0, 2]},
                            {"model": "two", "layer_range": [0, 2], "parameters": {"weight": 0.7}}]},
               {"base": "one", "sources": [{"model": "one", "layer_range": [2, 4]},
                                           {"model": "two", "layer_range": [2, 4], "parameters": {"weight": 0.3}}]},
               {"method": "passthrough", "sources": [{"model": "two", "layer_range": [3, 4]}],
                "parameters": {"scale": 0.5}}]} | F32
    out = merge(doc, tmp_path / "out")
    b, e1, e2 = read_float64(m["base"]), read_float64(m["e1"]), read_float64(m["e2"])
    for n in LAYER:
        for j in range(2):
            name = block(n, j)
            torch.testing.assert_close(out[name], b[name] + 0.7 * (e2[name] - b[name]), rtol=0, atol=1e-6)
        for j in (2, 3):
            name = block(n, j)
            torch.testing.assert_close(out[name], e1[name] + 0.3 * (e2[name] - e1[name]), rtol=0, atol=1e-6)
        torch.testing.assert_close(out[block(n, 4)], 0.5 * e2[block(n, 3)], rtol=0, atol=1e-6)
    # the head comes from the last slice: passthrough of e2 at t = 0
    torch.testing.assert_close(out["lm_head.weight"], 0.5 * e2["lm_head.weight"], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5


def test_modules_default_is_slices_with_module_parameters(m, tmp_path) -> None:
    """mergekit `modules: {default: ...}`: module parameters rank between the slice's and the top
    level's (a slice filter that matches nothing falls through to the module's value)."""
    slices = [{"sources": [{"model": m["base"], "layer_range": [0, 3]}, {"model": m["e1"], "layer_range": [0, 3]},
                           {"model": m["e2"], "layer_range": [1, 4]}],
               "parameters": {"weight": [{"filter": "mlp", "value": [0.2, 0.8]}]}}]
    out = merge({"merge_method": "task_arithmetic", "base_model": m["base"],
                 "modules": {"default": {"slices": slices, "parameters": {"weight": 0.45}}},
                 "parameters": {"weight": 0.1, "lambda": 0.9}} | F32, tmp_path / "mod")
    b, e1, e2 = read_float64(m["base"]), read_float64(m["e1"]), read_float64(m["e2"])
    for j in range(3):
        t = j / 2
        for n in LAYER:
            w = lerp([0.2, 0.8], t) if "mlp" in n else 0.45
            o, x1, x2 = b[block(n, j)], e1[block(n, j)], e2[block(n, j + 1)]
            torch.testing.assert_close(out[block(n, j)], o + 0.9 * w * ((x1 - o) + (x2 - o)), rtol=0, atol=1e-6)
    models = merge({"merge_method": "linear", "modules": {"default": {
        "models": [{"model": m["e1"], "parameters": {"weight": [1.0, 0.0]}}, {"model": m["e2"]}],
        "parameters": {"weight": 0.25}}}} | F32, tmp_path / "models")
    for i in range(4):
        w1 = 1.0 - i / 3
        for n in LAYER:
            name = block(n, i)
            ref = (w1 * e1[name] + 0.25 * e2[name]) / (w1 + 0.25)
            torch.testing.assert_close(models[name], ref, rtol=0, atol=1e-6)


def test_models_config_filter_list_falls_through_to_the_top_level(m, tmp_path) -> None:
    """Without slices too: an expert's filter list that matches nothing takes the top-level value
    (mergekit's resolve_parameter), not the default."""
    out = merge({"merge_method": "linear", "models": [
        {"model": m["e1"], "parameters": {"weight": [{"filter": "mlp", "value": 3.0}]}}, {"model": m["e2"]}],
        "parameters": {"weight": 1.0, "normalize": False}} | F32, tmp_path / "out")
    e1, e2 = read_float64(m["e1"]), read_float64(m["e2"])
    for n in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        w1 = 3.0 if "mlp" in n else 1.0
        torch.testing.assert_close(out[n], w1 * e1[n] + e2[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("slices,field", [
    ([{"sources": [{"model": "A", "layer_range": [3, 3]}]}], "slices[0].sources[0].layer_range: [3, 3] is empty"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}],
     "slices[0].sources: every source of a slice covers as many layers, got [2, 3]"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}]}, {"sources": [{"model": "C", "layer_range": [0, 2]}]}],
     "slices[1].sources[0].model: 'C' is not one of the merged models"),
    ([{"sources": [{"model": "A", "layer_range": [-1, 2]}]}], "slices.0.sources.0.layer_range.0"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2], "parameters": {"weihgt": 1}}]}],
     "slices[0].sources[0].parameters: method linear has no parameter 'weihgt'"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}], "method": "adamerging"}],
     "slices[0].method: 'adamerging' is not a static method"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}], "method": "ties"}], "slices[0]: method ties needs a base"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 2]}],
       "base": "A", "method": "ties"}], None),
])
def test_bad_slices_are_refused_naming_the_field(slices, field) -> None:
    doc = {"method": "linear", "experts": [{"model": "org/a", "name": "A"}, {"model": "org/b", "name": "B"}],
           "slices": slices}
    if field is None:  # the valid variant of the case before it
        assert spec_from_dict(doc).slices[0].base == "A"
        return
    with pytest.raises(SpecError) as e:
        spec_from_dict(doc)
    assert field in e.value.message, e.value.message


def test_mergekit_slices_refusals() -> None:
    src = [{"sources": [{"model": "org/a", "layer_range": [0, 2]}]}]
    cases = [
        ({"slices": src, "models": [{"model": "org/a"}]}, "exactly one of `models`, `slices` or `modules`"),
        ({"modules": {"default": {"slices": src}, "vision_tower": {"slices": src}}}, "single-module layout: it goes"),
        ({"modules": {"default": {"slices": src, "models": [{"model": "org/a"}]}}}, "exactly one of `slices` or"),
        ({"slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}], "weight": 1}]}, "does not read"),
        ({"slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}, {"model": "org/b", "layer_range": [0, 2]}],
                      "base_model": "org/c"}], "merge_method": "ties"}, "slices[0].base: 'org/c'"),
        ({"slices": src, "tokenizer_source": "union"}, "tokenizer: Alloy does not merge vocabularies"),
        ({"slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}, {"model": "org/b", "layer_range": [0, 2]}]}]},
         "method passthrough takes at most 1 non-base source"),
    ]
    for over, needle in cases:
        doc = {"merge_method": "passthrough"} | over
        with pytest.raises(SpecError) as e:
            spec_from_dict(doc)
        assert needle in e.value.message, (over, e.value.message)


def test_mergekit_slices_translate_to_our_schema() -> None:
    spec = spec_from_dict({"merge_method": "slerp", "base_model": "org/base", "slices": [
        {"sources": [{"model": "org/base", "layer_range": [0, 2]}, {"model": "org/x", "layer_range": [2, 4]}],
         "parameters": {"t": [0, 1]}}], "parameters": {"t": 0.5}})
    assert spec.base == "org/base" and [e.model for e in spec.experts] == ["org/x"]
    s = spec.slices[0]
    assert [(x.model, x.layer_range) for x in s.sources] == [("org/base", (0, 2)), ("org/x", (2, 4))]
    assert s.parameters == {"t": [0, 1]} and spec.parameters == {"t": 0.5}
    # a frankenmerge of the base alone: the one model is an input, not a base
    solo = spec_from_dict({"merge_method": "passthrough", "base_model": "org/base", "slices": [
        {"sources": [{"model": "org/base", "layer_range": [0, 2]}]},
        {"sources": [{"model": "org/base", "layer_range": [1, 3]}]}]})
    assert solo.base is None and [e.model for e in solo.experts] == ["org/base"]
    # mergekit writes its compute dtype when `out_dtype` is unset
    assert solo.dtype == "float32" and solo.out_dtype is None
    # residual_weight is read nowhere in mergekit 0.1.5: refused by name rather than silently a no-op
    with pytest.raises(SpecError, match="residual_weight` has no effect") as e:
        spec_from_dict({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "org/base", "layer_range": [0, 2]}], "residual_weight": 0.5}]})
    assert e.value.param == "slices[0].residual_weight"
    f16 = spec_from_dict({"merge_method": "passthrough", "dtype": "float16", "slices": [
        {"sources": [{"model": "org/base", "layer_range": [0, 2]}]}]})
    assert f16.dtype == "float16" and f16.out_dtype == "float16"


def test_range_past_a_models_depth(m, tmp_path, capsys) -> None:
    """Local models: refused when the spec is loaded (CLI exit 2, the field named); at run time
    (a hub model's depth is known only once it is downloaded) the driver refuses it alike."""
    from service.cli import main

    doc = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m["base"], "layer_range": [0, 2]}]},
        {"sources": [{"model": m["deep"], "layer_range": [4, 7]}]}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    code = main(["merge", str(path), "--out", str(tmp_path / "cli"), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("alloy: error: slices[1].sources[0].layer_range: [4, 7] reaches past the 6 layers"), err
    assert not (tmp_path / "cli").exists()
    with pytest.raises(SpecError, match=r"slices\[1\]\.sources\[0\]\.layer_range: \[4, 7\] reaches past"):
        run_merge(spec_from_dict(doc), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # the service's submit check (the API answers an invalid_spec error with 422)
    from jobs.admission import AdmissionError, check_admission
    from jobs.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://", allowed_roots=[Path(m["base"]).parent])
    with pytest.raises(AdmissionError, match=r"^slices\[1\]\.sources\[0\]\.layer_range: \[4, 7\] reaches past") as e:
        check_admission(spec_from_dict(doc), "acme", None, settings)
    assert e.value.code == "invalid_spec"
    doc["slices"][1]["sources"][0]["layer_range"] = [3, 6]
    check_admission(spec_from_dict(doc), "acme", None, settings)


def test_output_config_depth_and_layer_types(m, tmp_path) -> None:
    """The layer count is set where the config keeps it (top level, or `text_config`), and per-block
    `layer_types` follow each output block's source block."""
    from merge_ops.checkpoint import set_depth
    from merge_ops.errors import CheckpointError

    doc = {"text_config": {"num_hidden_layers": 4, "layer_types": ["a", "b", "a", "b"]}, "model_type": "x"}
    set_depth(doc, 3, ["b", "b", "a"])
    assert doc["text_config"] == {"num_hidden_layers": 3, "layer_types": ["b", "b", "a"]}
    gpt2 = {"n_layer": 12}
    set_depth(gpt2, 20)
    assert gpt2 == {"n_layer": 20}
    with pytest.raises(CheckpointError, match="no layer count"):
        set_depth({"hidden_size": 8}, 3)
    # a sliced merge of models whose configs list layer types: each output block keeps its source's
    for k, types in (("base", ["s", "f", "s", "f"]), ("deep", ["f", "f", "s", "s", "f", "s"])):
        src = tmp_path / k
        src.mkdir()
        for f in Path(m[k]).iterdir():
            if f.name != "config.json":
                (src / f.name).symlink_to(f)
        cfg = json.loads((Path(m[k]) / "config.json").read_text()) | {"layer_types": types}
        (src / "config.json").write_text(json.dumps(cfg))
    merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp_path / "base"), "layer_range": [1, 3]}]},
        {"sources": [{"model": str(tmp_path / "deep"), "layer_range": [3, 6]}]}]}, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5 and cfg["layer_types"] == ["f", "s", "s", "f", "s"]
