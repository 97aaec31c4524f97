"""LoRA adapters as inputs: materialisation against hand-computed float64 tensors and against PEFT's own
merge_and_unload, refusals, resolution (model+adapter, an adapter alone, roots and links), and static
and learned merges with an adapter expert equal to the same merge with the materialised model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_ops.checkpoint import CheckpointReader, CheckpointWriter, TensorSpec
from merge_ops.errors import CheckpointError, InputError, SpecError
from merge_ops.lora.reader import LoraReader, open_checkpoint
from merge_ops.runner import ResolveOptions, resolve_inputs, run_merge
from merge_ops.sources import head_commit, resolve
from merge_ops.spec import spec_from_dict
from tests.toy_models import write_llama

P = "base_model.model."
DIMS = dict(hidden=16, layers=2, intermediate=32, vocab=32, heads=2)


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def rand(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def llama_adapter(folder: Path, *, seed: int = 0, scale: float = 0.1) -> Path:
    """q_proj (r 4) and v_proj (r 2 by rank_pattern) of every layer, float32."""
    t = {}
    for i in range(DIMS["layers"]):
        for j, (mod, r) in enumerate((("q_proj", 4), ("v_proj", 2))):
            m = f"{P}model.layers.{i}.self_attn.{mod}"
            t[f"{m}.lora_A.weight"] = rand(r, 16, seed=seed + 10 * i + j) * scale
            t[f"{m}.lora_B.weight"] = rand(16, r, seed=seed + 10 * i + j + 5) * scale
    return write_adapter(folder, t, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})


# -- materialisation --------------------------------------------------------------------------------
def test_llama_adapter_matches_hand_computed_float64(tmp_path):
    base = write_llama(tmp_path / "base", **DIMS, dtype=torch.float64)
    A0, B0 = rand(4, 16, seed=1, dtype=torch.float64), rand(16, 4, seed=2, dtype=torch.float64)
    A1, B1 = rand(2, 16, seed=3, dtype=torch.float64), rand(16, 2, seed=4, dtype=torch.float64)
    EA, EB = rand(4, 32, seed=5, dtype=torch.float64), rand(16, 4, seed=6, dtype=torch.float64)
    head = rand(32, 16, seed=7)  # float32: converted to the base's float64
    ad = write_adapter(tmp_path / "ad", {
        f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": A0, f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": B0,
        f"{P}model.layers.1.self_attn.v_proj.lora_A.weight": A1, f"{P}model.layers.1.self_attn.v_proj.lora_B.weight": B1,
        f"{P}model.embed_tokens.lora_embedding_A": EA, f"{P}model.embed_tokens.lora_embedding_B": EB,
        f"{P}lm_head.weight": head},
        r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 3})
    with CheckpointReader(base) as b, LoraReader(base, ad) as r:
        want = {
            "model.layers.0.self_attn.q_proj.weight": b.read("model.layers.0.self_attn.q_proj.weight") + 2.0 * B0 @ A0,
            "model.layers.1.self_attn.v_proj.weight": b.read("model.layers.1.self_attn.v_proj.weight") + 1.5 * B1 @ A1,
            "model.embed_tokens.weight": b.read("model.embed_tokens.weight") + 2.0 * (EB @ EA).T,
            "lm_head.weight": head.double(),
        }
        assert r.names() == b.names()
        for n in b.names():
            got = r.read(n)
            assert got.dtype == torch.float64 and got.shape == b.read(n).shape
            if n in want:
                torch.testing.assert_close(got, want[n], rtol=0, atol=1e-12)
            else:
                assert torch.equal(got, b.read(n)), n
        buf = torch.empty(10_000, dtype=torch.uint8)  # the driver's reused buffers: the result is a view of it
        got = r.read("model.layers.0.self_attn.q_proj.weight", buf)
        assert got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        torch.testing.assert_close(got, want["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=1e-12)


def test_rslora_scale_and_bf16_rounding(tmp_path):
    base = write_llama(tmp_path / "base", **DIMS, dtype=torch.bfloat16)
    A, B = rand(4, 16, seed=1), rand(16, 4, seed=2)
    ad = write_adapter(tmp_path / "ad", {f"{P}model.layers.0.mlp.up_proj.lora_A.weight": rand(4, 16, seed=3),
                                         f"{P}model.layers.0.mlp.up_proj.lora_B.weight": rand(32, 4, seed=4),
                                         f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": A,
                                         f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": B},
                       r=4, lora_alpha=6, use_rslora=True)
    n = "model.layers.0.self_attn.q_proj.weight"
    with CheckpointReader(base) as b, LoraReader(base, ad) as r:
        want = (b.read(n).double() + 6 / math.sqrt(4) * B.double() @ A.double()).to(torch.bfloat16)
        got = r.read(n)
        assert got.dtype == torch.bfloat16
        # added in float32 and rounded once: at most one bf16 step from the float64 sum, rounded
        assert (got.double() - want.double()).abs().max() <= want.double().abs().max() * 2 ** -8


def write_gpt2_like(folder: Path) -> Path:
    """GPT-2's Conv1D layout (weight [in, out]) without transformers: c_attn [16, 48], square c_proj."""
    folder.mkdir(parents=True)
    save_file({"transformer.h.0.attn.c_attn.weight": rand(16, 48, seed=1, dtype=torch.float64),
               "transformer.h.0.attn.c_attn.bias": rand(48, seed=2, dtype=torch.float64),
               "transformer.h.0.attn.c_proj.weight": rand(16, 16, seed=3, dtype=torch.float64)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return folder


def test_conv1d_fan_in_fan_out_and_lora_bias_float64(tmp_path):
    base = write_gpt2_like(tmp_path / "gpt")
    A, B, bias = rand(2, 16, seed=4, dtype=torch.float64), rand(48, 2, seed=5, dtype=torch.float64), \
        rand(48, seed=6, dtype=torch.float64)
    A2, B2 = rand(2, 16, seed=7, dtype=torch.float64), rand(16, 2, seed=8, dtype=torch.float64)
    m = f"{P}transformer.h.0.attn."
    # fan_in_fan_out false in the config, as PEFT writes it when it forced it on for Conv1D itself
    ad = write_adapter(tmp_path / "ad", {f"{m}c_attn.lora_A.weight": A, f"{m}c_attn.lora_B.weight": B,
                                         f"{m}c_attn.lora_B.bias": bias,
                                         f"{m}c_proj.lora_A.weight": A2, f"{m}c_proj.lora_B.weight": B2},
                       r=2, lora_alpha=5, lora_bias=True, fan_in_fan_out=False)
    with CheckpointReader(base) as b, LoraReader(base, ad) as r:
        p = "transformer.h.0.attn."
        torch.testing.assert_close(r.read(p + "c_attn.weight"), b.read(p + "c_attn.weight") + 2.5 * (B @ A).T,
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(r.read(p + "c_attn.bias"), b.read(p + "c_attn.bias") + 2.5 * bias, rtol=0, atol=1e-12)
        torch.testing.assert_close(r.read(p + "c_proj.weight"), b.read(p + "c_proj.weight") + 2.5 * (B2 @ A2).T,
                                   rtol=0, atol=1e-12)


def test_reader_matches_peft_merge_and_unload(tmp_path):
    """The peer: PEFT's own merge on real transformers models (Llama with an embedding LoRA, rank and
    alpha patterns and a modules_to_save head; GPT-2's Conv1D with trained biases)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    cases = [
        ("llama", llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"],
                                    modules_to_save=["lm_head"], rank_pattern={"v_proj": 2},
                                    alpha_pattern={"layers.1.self_attn.q_proj": 3})),
        ("gpt2", gpt2, LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_proj", "c_fc"],
                                  fan_in_fan_out=True, bias="lora_only")),
    ]
    for name, model, cfg in cases:
        model.save_pretrained(tmp_path / f"{name}_base")
        base = {k: v.clone() for k, v in model.state_dict().items()}
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            for p in pm.parameters():  # the trainable ones (PEFT starts B, and an embedding's A, at zero)
                if p.requires_grad:
                    p.normal_(0, 0.1)
        pm.save_pretrained(tmp_path / f"{name}_ad")
        merged = pm.merge_and_unload().state_dict()
        with LoraReader(tmp_path / f"{name}_base", tmp_path / f"{name}_ad") as r:
            changed = 0
            for n in r.names():
                got = r.read(n)
                torch.testing.assert_close(got, merged[n], rtol=0, atol=1e-6, msg=f"{name}: {n}")
                changed += not torch.equal(got, base[n])
            # every LoRA module (and the head copy, the trained biases) really changed its tensor
            assert changed == len(r.plan.deltas) + sum(n.endswith(("lm_head.weight", ".bias")) for n in r.plan.replaced)


@pytest.mark.parametrize(("change", "needle"), [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"init_lora_weights": "pissa"}, "residual base"),
    ({"r": 0}, "r must be a positive integer"),
    ({"lora_alpha": "x"}, "lora_alpha"),
])
def test_unsupported_configs_are_refused(tmp_path, change, needle):
    base = write_llama(tmp_path / "base", **DIMS, dtype=torch.float32)
    ad = llama_adapter(tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match="adapter_config.json") as e:
        LoraReader(base, ad)
    assert needle in e.value.message


def test_unplaceable_tensors_and_pickles_are_refused(tmp_path):
    base = write_llama(tmp_path / "base", **DIMS, dtype=torch.float32)
    q = f"{P}model.layers.0.self_attn.q_proj"
    cases = [
        ({f"{q}.lora_A.weight": rand(4, 16, seed=1), f"{q}.lora_B.weight": rand(16, 4, seed=2),
          f"{q}.lora_magnitude_vector": rand(16, seed=3)}, "DoRA"),
        ({f"{q}.lora_A.weight": rand(4, 16, seed=1)}, "lora_B tensor missing"),
        ({f"{P}model.layers.0.self_attn.x_proj.lora_A.weight": rand(4, 16, seed=1),
          f"{P}model.layers.0.self_attn.x_proj.lora_B.weight": rand(16, 4, seed=1)}, "does not have"),
        ({f"{q}.lora_A.weight": rand(4, 20, seed=1), f"{q}.lora_B.weight": rand(16, 4, seed=2)}, "shape [16, 16]"),
        ({f"{q}.lora_A.weight": rand(3, 16, seed=1), f"{q}.lora_B.weight": rand(16, 3, seed=2)}, "rank 4"),
        ({f"{P}lm_head.weight": rand(40, 16, seed=1)}, "resized vocabulary"),
        ({"model.layers.0.self_attn.q_proj.lora_A.weight": rand(4, 16, seed=1)}, "not a PEFT LoRA tensor"),
    ]
    for i, (tensors, needle) in enumerate(cases):
        ad = write_adapter(tmp_path / f"ad{i}", tensors)
        with pytest.raises(CheckpointError) as e:
            LoraReader(base, ad, what="experts[1].model")
        assert needle in e.value.message and "experts[1].model" in e.value.message, (needle, e.value.message)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(CheckpointError, match="never unpickles"):
        resolve(f"{base}+{pickled}")


# -- resolution -------------------------------------------------------------------------------------
def test_resolve_model_plus_adapter_and_an_adapter_alone(tmp_path):
    base = write_llama(tmp_path / "base", **DIMS, dtype=torch.float32)
    ad = llama_adapter(tmp_path / "ad")
    m = resolve(f"{base}+{ad}", allowed_roots=[tmp_path])
    assert m.path == base and m.adapter == ad and m.repo_id is None
    b = resolve(str(base))
    assert m.commit.startswith(b.commit + "+local:") and m.commit != b.commit
    assert head_commit(f"{base}+{ad}") == m.commit
    alone = resolve(str(ad), lora_base=b)
    assert alone.adapter == ad and alone.path == base and alone.commit == m.commit
    with pytest.raises(InputError, match="no base model to apply it to"):
        resolve(str(ad))
    with pytest.raises(InputError, match="is not a PEFT adapter"):
        resolve(f"{base}+{base}")
    with pytest.raises(InputError, match="itself a LoRA adapter"):
        resolve(f"{ad}+{ad}")
    # alpha lives in the config: changing it changes the adapter's fingerprint (and the job's inputs)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 9}))
    assert resolve(f"{base}+{ad}").commit != m.commit


def test_adapter_folders_pass_the_root_and_link_checks(tmp_path):
    root = tmp_path / "root"
    base = write_llama(root / "base", **DIMS, dtype=torch.float32)
    outside = llama_adapter(tmp_path / "outside")
    with pytest.raises(InputError, match="outside the folders this server may read"):
        resolve(f"{base}+{outside}", allowed_roots=[root])
    linked = root / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    os.symlink(outside / "adapter_model.safetensors", linked / "adapter_model.safetensors")
    with pytest.raises(InputError, match="link to a file outside"):
        resolve(f"{base}+{linked}", allowed_roots=[root])


def test_spec_ref_syntax(tmp_path):
    spec = spec_from_dict({"method": "task_arithmetic", "base": "org/base",
                           "experts": [{"model": "org/base+org/code-lora@v1"}, {"model": "./a+./b/math-lora"}]})
    assert spec.expert_names() == ["code-lora", "math-lora"]
    for bad, needle in (("org/base+", "one '+'"), ("a/b+c/d+e/f", "one '+'"), ("org/base+not a repo", "neither")):
        with pytest.raises(SpecError, match="experts.0.model") as e:
            spec_from_dict({"method": "task_arithmetic", "base": "org/base", "experts": [{"model": bad}]})
        assert needle in e.value.message
    # relative folders on both sides are anchored at the spec file's folder
    (tmp_path / "s.yaml").write_text("merge_method: task_arithmetic\nbase_model: org/base\n"
                                     "models:\n  - model: ./m+./ad\n    parameters: {weight: 1.0}\n")
    from merge_ops.spec import load_spec

    assert load_spec(tmp_path / "s.yaml").experts[0].model == f"{tmp_path / 'm'}+{tmp_path / 'ad'}"


# -- merges -----------------------------------------------------------------------------------------
def materialise(base: Path, adapter: Path, out: Path) -> Path:
    """The full merged copy Alloy never writes, for comparison."""
    with LoraReader(base, adapter) as r:
        layout = [TensorSpec(n, r.shape(n), r.dtype(n)) for n in r.names()]
        with CheckpointWriter(out, layout, 1 << 40) as w:
            for n in r.names():
                w.write(n, r.read(n))
    (out / "config.json").write_text((base / "config.json").read_text())
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_static_merge_with_an_adapter_equals_the_materialised_model(tiny_llama, tmp_path, method):
    base, (e0, _) = tiny_llama(2, **DIMS)
    ad = llama_adapter(tmp_path / "ad", scale=0.05)
    full = materialise(base, ad, tmp_path / "full")
    params = {"density": 0.5} if method == "ties" else {}

    def merge(ref: str, out: str) -> dict[str, torch.Tensor]:
        spec = spec_from_dict({"method": method, "base": str(base), "parameters": params,
                               "experts": [{"model": str(e0)}, {"model": ref, "name": "ad"}]})
        run_merge(spec, tmp_path / out)
        return tensors(tmp_path / out)

    want = merge(str(full), "want")
    for ref, out in ((f"{base}+{ad}", "plus"), (str(ad), "alone")):
        got = merge(ref, out)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want), out
    card = json.loads((tmp_path / "plus" / "alloy_merge.json").read_text())
    assert "+" in json.dumps(card)  # the input's commit records the model's and the adapter's


@pytest.mark.parametrize("mode", ["in_memory", "streamed"])
def test_learned_merge_accepts_an_adapter_expert(tiny_llama, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("ALLOY_LEARNED_MODE", mode)
    base, (e0, _) = tiny_llama(2, **DIMS)
    ad = llama_adapter(tmp_path / "ad", scale=0.05)
    full = materialise(base, ad, tmp_path / "full")
    cal = {}
    for i, t in enumerate(("e0", "ad")):
        p = tmp_path / f"{t}.jsonl"
        p.write_text("".join(json.dumps({"input_ids": [(3 * j + 7 * i + m) % 31 + 1 for m in range(4 + j % 3)]}) + "\n"
                             for j in range(8)))
        cal[t] = str(p)

    def merge(ref: str, out: str):
        spec = spec_from_dict({"method": "adamerging", "base": str(base), "seed": 3,
                               "parameters": {"steps": 3, "batch_size": 2, "lr": 0.05},
                               "experts": [{"model": str(e0), "name": "e0"}, {"model": ref, "name": "ad"}],
                               "calibration": {"tasks": cal}})
        outcome = run_merge(spec, tmp_path / out)
        return outcome, tensors(tmp_path / out), json.loads((tmp_path / out / "coefficients.json").read_text())

    o_want, want, c_want = merge(str(full), "want")
    o_got, got, c_got = merge(str(ad), "got")
    assert o_got.result.metrics["learned_mode"] == mode
    assert c_got["values"] == c_want["values"]
    assert o_got.result.metrics["loss_curve"] == o_want.result.metrics["loss_curve"]
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_resolve_inputs_applies_a_bare_adapter_to_the_base(tiny_llama, tmp_path):
    base, (e0, _) = tiny_llama(2, **DIMS)
    ad = llama_adapter(tmp_path / "ad")
    spec = spec_from_dict({"method": "task_arithmetic", "base": str(base),
                           "experts": [{"model": str(e0)}, {"model": str(ad)}]})
    b, (x0, x1) = resolve_inputs(spec, ResolveOptions())
    assert x0.adapter is None and x1.adapter == ad and x1.path == b.path
    with open_checkpoint(x1) as r:
        assert isinstance(r, LoraReader)
    no_base = spec_from_dict({"method": "linear", "experts": [{"model": str(e0)}, {"model": str(ad)}]})
    with pytest.raises(InputError, match="model\\+adapter"):
        resolve_inputs(no_base, ResolveOptions())


def test_schedules_pin_both_sides_of_a_model_with_an_adapter():
    from jobs.triggers import pin

    spec = {"method": "task_arithmetic", "base": "org/base",
            "experts": [{"model": "org/base+org/lora"}, {"model": "/m/base+org/lora2@dev"}, {"model": "org/lora3"}]}
    inputs = [{"ref": "org/base", "commit": "a" * 40}, {"ref": "org/base+org/lora", "commit": f"{'a' * 40}+{'b' * 40}"},
              {"ref": "/m/base+org/lora2@dev", "commit": f"local:ff+{'c' * 40}"}, {"ref": "org/lora3", "commit": "d" * 40}]
    out = pin(spec, inputs, None)
    assert [e["model"] for e in out["experts"]] == [
        f"org/base@{'a' * 40}+org/lora@{'b' * 40}", f"/m/base+org/lora2@{'c' * 40}", f"org/lora3@{'d' * 40}"]
    assert [e["name"] for e in out["experts"]] == ["lora", "lora2", "lora3"]  # names stay the template's


def test_alloy_eval_scores_a_model_with_an_adapter_as_the_materialised_model(tmp_path, capsys):
    from service.cli import main

    base = write_llama(tmp_path / "base", **DIMS, dtype=torch.float32)
    ad = llama_adapter(tmp_path / "ad", scale=0.5)
    full = materialise(base, ad, tmp_path / "full")
    rows = tmp_path / "ppl.jsonl"
    rows.write_text("".join(json.dumps({"input_ids": [(5 * j + m) % 31 + 1 for m in range(6)]}) + "\n"
                            for j in range(4)))

    def ppl(model: str) -> float:
        assert main(["eval", model, "--sets", f"ppl={rows}", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["sets"]["ppl"]["metrics"]["nll"]

    with_adapter, materialised, bare = ppl(f"{base}+{ad}"), ppl(str(full)), ppl(str(base))
    assert with_adapter == pytest.approx(materialised, rel=1e-6)
    assert abs(with_adapter - bare) > 1e-3 * bare  # the adapter really changed the model


def test_hub_model_plus_hub_adapter_resolve_pinned_and_refuse_pickles(hub_server, tmp_path):
    from tests.hub_fixtures import HUB_TEST_TOKEN

    base = write_llama(tmp_path / "base", **DIMS, dtype=torch.float32)
    ad = llama_adapter(tmp_path / "ad")
    b_sha = hub_server.push_folder("org/base", base, message="v1")
    a_sha = hub_server.push_folder("org/lora", ad, message="v1")
    kw = dict(token=HUB_TEST_TOKEN, endpoint=hub_server.url, cache_dir=tmp_path / "cache")
    m = resolve("org/base+org/lora", **kw)
    assert m.commit == f"{b_sha}+{a_sha}" == head_commit("org/base+org/lora", token=HUB_TEST_TOKEN,
                                                          endpoint=hub_server.url)
    assert m.repo_id == "org/lora" and m.adapter is not None
    with LoraReader(base, ad) as want, open_checkpoint(m) as got:
        n = "model.layers.1.self_attn.v_proj.weight"
        assert torch.equal(got.read(n), want.read(n))
    hub_server.push("org/pickled", {"adapter_config.json": (ad / "adapter_config.json").read_bytes(),
                                    "adapter_model.bin": b"\x80\x04not read"})
    with pytest.raises(CheckpointError, match="never unpickles"):
        resolve("org/base+org/pickled", **kw)


def test_ranged_reads_equal_slices_and_adapter_tensors_are_read_whole(tmp_path):
    """A streamed merge reads a plain stored tensor piece by piece (`read_range`, `RangedTensor`); a
    tensor an adapter changes is formed whole (base + scale·B·A), so it is not ranged."""
    from merge_ops.learned.store import ExpertTensors, RangedTensor, TensorFiles

    base = write_llama(tmp_path / "base", **DIMS, dtype=torch.bfloat16)
    ad = llama_adapter(tmp_path / "ad")
    q, emb = "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"
    with CheckpointReader(base) as b, LoraReader(base, ad) as r:
        flat = b.read(emb).view(-1)
        for lo, hi in [(0, 7), (5, 300), (flat.numel() - 3, flat.numel()), (4, 4)]:
            got = b.read_range(emb, lo, hi, torch.empty(hi - lo, dtype=torch.bfloat16))
            assert torch.equal(got, flat[lo:hi])
        with pytest.raises(ValueError):
            b.read_range(emb, 0, 4, torch.empty(4, dtype=torch.float32))  # not the stored dtype
        assert b.ranged(q) and r.ranged(emb) and not r.ranged(q)
    files = TensorFiles(base, [base, base], ["lora", "plain"])
    files.experts[0].close()
    files.experts[0] = LoraReader(base, ad)  # as open_checkpoint gives for `base+adapter`
    try:
        lora, plain = ExpertTensors(files, q).flat(0), ExpertTensors(files, q).flat(1)
        assert not isinstance(lora, RangedTensor) and isinstance(plain, RangedTensor)
        with LoraReader(base, ad) as r:
            assert torch.equal(lora, r.read(q).view(-1))
        with CheckpointReader(base) as b:
            assert torch.equal(plain[3:40], b.read(q).view(-1)[3:40])
    finally:
        files.close()
