"""`alloy merge-adapters` against PEFT's own add_weighted_adapter on the same adapters: the merged
model (base + combined adapter, applied by Alloy's reader) equals PEFT's merge_and_unload of its
combined adapter, for cat, svd and ties_svd."""

from __future__ import annotations

import json

import pytest
import torch

from merge_ops.lora.combine import ties
from merge_ops.lora.reader import LoraReader
from service.cli import main

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny Llama and two adapters of it: different ranks (one with a rank pattern), one with an
    embedding LoRA, overlapping and distinct modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    specs = {"a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                             rank_pattern={"v_proj": 2}),
             "b": LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "up_proj"])}
    for name, lcfg in specs.items():
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), lcfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "lora_embedding" in n:  # PEFT starts B (embeddings: A) at zero
                    p.normal_(0, 0.2)
        pm.save_pretrained(root / name)
    return root


@pytest.mark.parametrize(("method", "extra"), [("cat", {}), ("svd", {"svd_rank": 3}), ("ties_svd", {"density": 0.5}),
                                               ("ties_svd", {"density": 0.7, "majority_sign_method": "frequency"})])
def test_matches_peft_add_weighted_adapter(adapters, tmp_path, method, extra):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    weights = [0.7, -0.4]
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(adapters / "base"), adapters / "a",
                                      adapter_name="a")
    model.load_adapter(adapters / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=method, **extra)
    model.set_adapter("m")
    want = model.merge_and_unload(adapter_names=["m"]).state_dict()

    argv = ["merge-adapters", str(adapters / "a"), str(adapters / "b"), "--weights", *map(str, weights),
            "--method", method, "--out", str(tmp_path / "m")]
    if "svd_rank" in extra:
        argv += ["--rank", str(extra["svd_rank"])]
    if "density" in extra:
        argv += ["--density", str(extra["density"]), "--majority-sign", extra.get("majority_sign_method", "total")]
    assert main(argv) == 0
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == {"cat": 6, "svd": 3}.get(method, 4)
    changed = 0
    with LoraReader(adapters / "base", tmp_path / "m") as r:
        base = LlamaForCausalLM.from_pretrained(adapters / "base").state_dict()
        for n in r.names():
            got = r.read(n)
            torch.testing.assert_close(got, want[n], rtol=0, atol=2e-6, msg=n)
            changed += not torch.equal(got, base[n])
    assert changed == 2 * 2 + 2 + 1  # q_proj and v_proj per layer, up_proj per layer, the embedding


def test_ties_float64_reference():
    """TIES by hand: prune to the top half per task, elect the sign of the pruned sum, average the agreeing."""
    d1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    d2 = torch.tensor([[-4.0, 2.0], [0.1, 1.0]], dtype=torch.float64)
    # top 2 of |d1|: 3, 2 -> [[3, 0], [0, 2]]; of |d2|: 4, 2 -> [[-4, 2], [0, 0]]
    # sums: [[-1, 2], [0, 2]] -> signs [[-, +], [+, +]]; weights 0.5 and 2
    want = torch.tensor([[-8.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(ties([d1, d2], [0.5, 2.0], 0.5), want, rtol=0, atol=1e-15)


def test_bad_input_exits_2(adapters, tmp_path, capsys):
    cases = [
        (["merge-adapters", str(adapters / "a"), "--weights", "1", "--out", str(tmp_path / "o")], "at least two"),
        (["merge-adapters", str(adapters / "a"), str(adapters / "b"), "--weights", "1", "--out", str(tmp_path / "o")],
         "1 weight(s) for 2 adapters"),
        (["merge-adapters", str(adapters / "a"), str(adapters / "b"), "--weights", "1", "1", "--method", "ties_svd",
          "--out", str(tmp_path / "o")], "--density"),
        (["merge-adapters", str(adapters / "a"), str(adapters / "base"), "--weights", "1", "1",
          "--out", str(tmp_path / "o")], "not a LoRA adapter"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert needle in capsys.readouterr().err, needle
