"""mergekit `modules:` on a multi-module model: a tiny Mistral3ForConditionalGeneration (the LLaVA
layout mergekit 0.1.5 defines: text_decoder / vision_tower / multi_modal_projector), built from a
config with random weights, and two perturbed copies.

The fast tests check a merge against a float64 formula written here, the per-module layer counts in
the output config, that transformers loads the result, and the refusals. The mergekit tests run the
same configs through mergekit 0.1.5 itself (benchmarks/.venv-peers, one subprocess) and compare
every tensor; they are skipped where that venv is absent (CI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_ops.errors import CheckpointError, SpecError
from merge_ops.runner import run_merge
from merge_ops.spec import load_spec, spec_from_dict
from tests.toy_models import read_float64

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / ".venv-peers"
TEXT = "language_model.model.layers.{}.mlp.up_proj.weight"
VISION = "vision_tower.transformer.layers.{}.attention.q_proj.weight"


def write_mistral3(folder: Path, seed: int) -> Path:
    transformers = pytest.importorskip("transformers")
    text = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, vocab_size=128, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    vision = transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                              num_attention_heads=2, head_dim=8, image_size=32, patch_size=8)
    cfg = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=120,
                                      spatial_merge_size=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.Mistral3ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def perturb(src: Path, dst: Path, seed: int) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    g = torch.Generator().manual_seed(seed)
    for f in src.glob("*.safetensors"):
        t = load_file(f)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in t.items()}, dst / f.name,
                  metadata={"format": "pt"})
    return dst


def write_gemma3(folder: Path, seed: int) -> Path:
    """A tiny Gemma3ForConditionalGeneration with the hub's tensor names (`vision_tower.vision_model.*`,
    mergekit's prefix; transformers 5 saves the tower without `vision_model.`)."""
    transformers = pytest.importorskip("transformers")
    text = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, vocab_size=128, max_position_embeddings=64,
                                         sliding_window=16)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=120, boi_token_index=121, eoi_token_index=122)
    torch.manual_seed(seed)
    transformers.Gemma3ForConditionalGeneration(cfg).save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        t = load_file(f)
        save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in t.items()}, f,
                  metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def g(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gemma3")
    base = write_gemma3(root / "base", 0)
    return {"a": str(perturb(base, root / "a", 1)), "b": str(perturb(base, root / "b", 2))}


@pytest.fixture(scope="module")
def m(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mistral3")
    base = write_mistral3(root / "base", 0)
    return {"base": str(base), "a": str(perturb(base, root / "a", 1)), "b": str(perturb(base, root / "b", 2))}


def config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def linear_doc(m: dict[str, str]) -> dict:
    """Per-module slices, models and parameters, with gradients, for `linear`."""
    return {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0}, "modules": {
        "text_decoder": {"parameters": {"weight": 0.5}, "slices": [
            {"sources": [{"model": m["a"], "layer_range": [0, 3], "parameters": {"weight": [1.0, 0.0]}},
                         {"model": m["b"], "layer_range": [1, 4]}]},
            {"sources": [{"model": m["a"], "layer_range": [3, 4]}, {"model": m["b"], "layer_range": [0, 1]}],
             "parameters": {"weight": 0.3}}]},
        "vision_tower": {"models": [{"model": m["a"], "parameters": {"weight": [0.2, 0.9]}}, {"model": m["b"]}]},
        "multi_modal_projector": {"models": [{"model": m["a"]}, {"model": m["b"], "parameters": {"weight": 3.0}}]}}}


def lin(x: torch.Tensor, y: torch.Tensor, wx: float, wy: float) -> torch.Tensor:
    return (wx * x + wy * y) / (wx + wy)


def test_modules_merge_each_module_by_its_own_slices_and_parameters(m, tmp_path) -> None:
    """float64 reference: text blocks at t = offset/(length-1) per slice, embeddings from the first
    text slice and norm/head from the last (t = 0), the vision tower over its own 3 layers (its
    gradient runs over the vision depth, not the text's), the projector at t = 0."""
    run_merge(spec_from_dict(linear_doc(m)), tmp_path / "out")
    out, a, b = read_float64(tmp_path / "out"), read_float64(m["a"]), read_float64(m["b"])
    assert set(out) == set(a)

    def close(name: str, ref: torch.Tensor) -> None:
        torch.testing.assert_close(out[name], ref, rtol=0, atol=1e-6, msg=name)

    for j in range(3):
        close(TEXT.format(j), lin(a[TEXT.format(j)], b[TEXT.format(j + 1)], 1 - j / 2, 0.5))
    close(TEXT.format(3), lin(a[TEXT.format(3)], b[TEXT.format(0)], 0.3, 0.3))
    emb = "language_model.model.embed_tokens.weight"
    close(emb, lin(a[emb], b[emb], 1.0, 0.5))
    for n in ("language_model.model.norm.weight", "language_model.lm_head.weight"):
        close(n, lin(a[n], b[n], 0.3, 0.3))
    for j in range(3):
        close(VISION.format(j), lin(a[VISION.format(j)], b[VISION.format(j)], 0.2 + 0.7 * j / 2, 1.0))
    close("vision_tower.patch_conv.weight", lin(a["vision_tower.patch_conv.weight"],
                                               b["vision_tower.patch_conv.weight"], 0.2, 1.0))
    for n in ("multi_modal_projector.linear_1.weight", "multi_modal_projector.patch_merger.merging_layer.weight"):
        close(n, lin(a[n], b[n], 1.0, 3.0))


def plain_doc(m: dict[str, str]) -> dict:
    return {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": m["a"], "parameters": {"weight": [1.0, 0.0]}}, {"model": m["b"], "parameters": {"weight": 1.0}}]}


def test_plain_models_gradients_run_over_each_modules_depth(m, tmp_path) -> None:
    """Without `modules`, mergekit still plans each module alone: a gradient's t is the block index
    over the module's own depth (vision block 2 of 3 sits at t = 1, not 2/3 of the text's 4)."""
    run_merge(spec_from_dict(plain_doc(m)), tmp_path / "out")
    out, a, b = read_float64(tmp_path / "out"), read_float64(m["a"]), read_float64(m["b"])
    for j in range(3):
        torch.testing.assert_close(out[VISION.format(j)], lin(a[VISION.format(j)], b[VISION.format(j)], 1 - j / 2, 1.0),
                                   rtol=0, atol=1e-6)
    for j in range(4):
        torch.testing.assert_close(out[TEXT.format(j)], lin(a[TEXT.format(j)], b[TEXT.format(j)], 1 - j / 3, 1.0),
                                   rtol=0, atol=1e-6)


def test_module_depths_go_to_their_config_keys_and_transformers_loads_it(m, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    doc = {"merge_method": "passthrough", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": m["a"], "layer_range": [0, 2]}]},
                                    {"sources": [{"model": m["b"], "layer_range": [1, 4]}]}]},
        "vision_tower": {"slices": [{"sources": [{"model": m["a"], "layer_range": [0, 3]}]},
                                    {"sources": [{"model": m["b"], "layer_range": [2, 3]}]}]},
        "multi_modal_projector": {"models": [{"model": m["b"]}]}}}
    run_merge(spec_from_dict(doc), tmp_path / "out")
    cfg = config(tmp_path / "out")
    assert cfg["text_config"]["num_hidden_layers"] == 5 and cfg["vision_config"]["num_hidden_layers"] == 4
    out, b = read_float64(tmp_path / "out"), read_float64(m["b"])
    assert torch.equal(out[VISION.format(3)], b[VISION.format(2)]) and torch.equal(out[TEXT.format(2)], b[TEXT.format(1)])
    model, info = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out",
                                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert len(model.model.language_model.layers) == 5 and len(model.model.vision_tower.transformer.layers) == 4
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()


def test_module_refusals(m, tmp_path) -> None:
    mods = linear_doc(m)["modules"]
    # checked when the spec is read (no checkpoint needed)
    with pytest.raises(SpecError, match="modules.default` is the single-module layout") as e:
        spec_from_dict({"merge_method": "linear", "modules": {"default": mods["vision_tower"], **mods}})
    assert e.value.param == "modules.default"
    with pytest.raises(SpecError, match="exactly one of `slices` or `models`") as e:
        spec_from_dict({"merge_method": "linear", "modules": {
            "vision_tower": {**mods["vision_tower"], "slices": mods["text_decoder"]["slices"]}}})
    assert e.value.param == "modules.vision_tower"
    with pytest.raises(SpecError, match="does not read"):
        spec_from_dict({"merge_method": "linear", "modules": {"vision_tower": {**mods["vision_tower"], "weight": 1}}})
    with pytest.raises(SpecError, match=r"slices\[0\].module: give every slice a module"):
        spec_from_dict({"method": "linear", "experts": [{"model": m["a"]}, {"model": m["b"]}], "slices": [
            {"sources": [{"model": m["a"], "layer_range": [0, 1]}, {"model": m["b"], "layer_range": [0, 1]}]},
            {"module": "vision_tower", "sources": [{"model": m["a"]}, {"model": m["b"]}]}]})
    with pytest.raises(SpecError, match=r"slices\[0\].sources\[0\].layer_range: required"):
        spec_from_dict({"method": "passthrough", "experts": [{"model": m["a"]}], "slices": [
            {"sources": [{"model": m["a"]}]}]})
    # checked against the architecture: at load for local models (CLI, API admission), else at run time
    cases = [
        ({k: v for k, v in mods.items() if k != "multi_modal_projector"}, "['multi_modal_projector'] missing",
         "modules.multi_modal_projector"),
        ({**mods, "vision": mods["vision_tower"]}, "has no module(s) ['vision']", "modules.vision"),
        ({**mods, "vision_tower": {"slices": [{"sources": [{"model": m["a"], "layer_range": [0, 4]},
                                                           {"model": m["b"], "layer_range": [0, 4]}]}]}},
         "(modules.vision_tower.slices[0]).sources[0].layer_range: [0, 4] reaches past the 3 layers of module "
         "vision_tower", "slices[3].sources[0].layer_range"),  # our schema's index: modules in sorted order
    ]
    for i, (modules, needle, param) in enumerate(cases):
        doc = {"merge_method": "linear", "modules": modules}
        spec_file = tmp_path / f"spec{i}.yaml"
        spec_file.write_text(yaml.safe_dump(doc))
        with pytest.raises(SpecError) as e:
            load_spec(spec_file)
        assert needle in e.value.message and e.value.param == param, e.value.message
        with pytest.raises(SpecError) as e:
            run_merge(spec_from_dict(doc), tmp_path / f"run{i}")
        assert needle in e.value.message, e.value.message
        assert not (tmp_path / f"run{i}").exists()
    # the service's submit check refuses it alike (the API answers invalid_spec, 422)
    from jobs.admission import AdmissionError, check_admission
    from jobs.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://", allowed_roots=[Path(m["a"]).parent])
    with pytest.raises(AdmissionError, match=r"\['multi_modal_projector'\] missing") as e:
        check_admission(spec_from_dict({"merge_method": "linear", "modules": cases[0][0]}), "acme", None, settings)
    assert e.value.code == "invalid_spec"
    check_admission(spec_from_dict(linear_doc(m)), "acme", None, settings)
    # top-level slices cannot say which module a layer is in (mergekit refuses too)
    flat = {"merge_method": "passthrough", "slices": [{"sources": [{"model": m["a"], "layer_range": [0, 2]}]}]}
    with pytest.raises(SpecError, match="has several modules") as e:
        run_merge(spec_from_dict(flat), tmp_path / "flat")
    assert e.value.param == "slices"


def test_an_architecture_without_module_prefixes_is_refused(m, tmp_path) -> None:
    """LLaVA: mergekit 0.1.5 has no module definition (it infers modules named by tensor prefixes)."""
    llava = tmp_path / "llava"
    llava.mkdir()
    for f in Path(m["a"]).iterdir():
        if f.name != "config.json":
            (llava / f.name).symlink_to(f)
    (llava / "config.json").write_text(json.dumps(config(m["a"]) | {"architectures": ["LlavaForConditionalGeneration"]}))
    doc = {"merge_method": "linear", "modules": {"text_decoder": {"models": [{"model": str(llava)}, {"model": m["b"]}]}}}
    with pytest.raises(SpecError, match="'LlavaForConditionalGeneration', but it is not a multi-module architecture"):
        run_merge(spec_from_dict(doc), tmp_path / "out")
    # a tensor no module claims is refused rather than dropped from the output
    extra = tmp_path / "extra"
    shutil.copytree(m["a"], extra)
    save_file(load_file(extra / "model.safetensors") | {"stray.weight": torch.zeros(2)},
              extra / "model.safetensors", metadata={"format": "pt"})
    doc = {"merge_method": "passthrough", "modules": {k: {"models": [{"model": str(extra)}]} for k in
                                                      ("text_decoder", "vision_tower", "multi_modal_projector")}}
    with pytest.raises(CheckpointError, match="'stray.weight' .* is in none of the modules"):
        run_merge(spec_from_dict(doc), tmp_path / "out2")


# -- against mergekit 0.1.5 ---------------------------------------------------------------------
def mergekit_cases(m: dict[str, str], g: dict[str, str]) -> dict[str, dict]:
    return {
        "gemma3": {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0}, "modules": {
            "text_decoder": linear_doc(g)["modules"]["text_decoder"],
            "vision_tower": {"slices": [  # two slices: the post-layernorm comes from the last
                {"sources": [{"model": g["a"], "layer_range": [0, 2]}, {"model": g["b"], "layer_range": [1, 3]}],
                 "parameters": {"weight": [0.1, 0.6]}},
                {"sources": [{"model": g["a"], "layer_range": [2, 3]}, {"model": g["b"], "layer_range": [2, 3]}],
                 "parameters": {"weight": 0.7}}]},
            "multi_modal_projector": {"models": [{"model": g["a"]}, {"model": g["b"], "parameters": {"weight": 3.0}}]}}},
        "linear": linear_doc(m),
        "plain_models": plain_doc(m),
        "ties": {"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
                 "parameters": {"density": 0.6, "weight": 0.5}, "modules": {
                     "text_decoder": {"slices": [{"sources": [
                         {"model": m["base"], "layer_range": [0, 4]}, {"model": m["a"], "layer_range": [0, 4]},
                         {"model": m["b"], "layer_range": [0, 4], "parameters": {"weight": [0.2, 1.0]}}]}]},
                     "vision_tower": {"models": [{"model": m["a"]}, {"model": m["b"], "parameters": {"density": 0.3}}],
                                      "parameters": {"weight": 0.8}},
                     "multi_modal_projector": {"models": [{"model": m["a"]}, {"model": m["b"]}]}}},
        "slerp": {"merge_method": "slerp", "base_model": m["a"], "dtype": "float32", "parameters": {"t": 0.5},
                  "modules": {
                      "text_decoder": {"slices": [
                          {"sources": [{"model": m["a"], "layer_range": [0, 2]}, {"model": m["b"], "layer_range": [2, 4]}],
                           "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}]}},
                          {"sources": [{"model": m["a"], "layer_range": [1, 4]}, {"model": m["b"], "layer_range": [1, 4]}]}],
                          "parameters": {"t": 0.25}},
                      "vision_tower": {"slices": [
                          {"sources": [{"model": m["a"], "layer_range": [0, 3]}, {"model": m["b"], "layer_range": [0, 3]}]},
                          {"sources": [{"model": m["a"], "layer_range": [1, 2]}, {"model": m["b"], "layer_range": [2, 3]}],
                           "parameters": {"t": 0.9}}]},
                      "multi_modal_projector": {"models": [{"model": m["a"]}, {"model": m["b"]}],
                                                "parameters": {"t": [0.3, 0.7]}}}},
    }


RUN_MERGEKIT = textwrap.dedent("""
    import sys, yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
        with open(cfg) as f:
            config = MergeConfiguration.model_validate(yaml.safe_load(f))
        run_merge(config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                            random_seed=0))
""")


@pytest.mark.skipif(not (PEERS / "bin" / "python").is_file(),
                    reason="mergekit 0.1.5 is not installed in benchmarks/.venv-peers")
def test_modules_match_mergekit(m, g, tmp_path) -> None:
    cases = mergekit_cases(m, g)
    args = []
    for name, doc in cases.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        args += [str(tmp_path / f"{name}.yaml"), str(tmp_path / f"mk-{name}")]
    done = subprocess.run([str(PEERS / "bin" / "python"), "-c", RUN_MERGEKIT, *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, doc in cases.items():
        run_merge(spec_from_dict(doc), tmp_path / f"alloy-{name}")
        ours, theirs = read_float64(tmp_path / f"alloy-{name}"), read_float64(tmp_path / f"mk-{name}")
        assert set(ours) == set(theirs), (name, set(ours) ^ set(theirs))
        worst = max(((ours[k] - theirs[k]).abs().max().item(), k) for k in theirs)
        assert worst[0] <= 1e-6, (name, worst)
        for key in ("text_config", "vision_config"):  # every config key of the output's layer counts
            got, want = config(tmp_path / f"alloy-{name}")[key], config(tmp_path / f"mk-{name}")[key]
            assert got["num_hidden_layers"] == want["num_hidden_layers"], (name, key)
        print(f"{name}: {len(theirs)} tensors, max |alloy - mergekit| = {worst[0]:.2e}", file=sys.stderr)
