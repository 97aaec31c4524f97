"""`alloy extract-lora` round trips through PEFT: PeftModel.from_pretrained loads the adapter and its
merged weights reproduce each module's difference to exactly the truncation error of its rank
(√Σ_{i>r} σᵢ², from float64 singular values computed here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_ops.lora.reader import LoraReader
from service.cli import main

peft = pytest.importorskip("peft")
RANK = 3


def _svd_error(d: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(d.double())
    return float(s[r:].square().sum().sqrt())


def _pair(tmp_path: Path, model, changes) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Save `model` as the base and a copy with `changes(name, tensor) -> new tensor | None` applied."""
    base_dir, merged_dir = tmp_path / "base", tmp_path / "merged"
    model.save_pretrained(base_dir)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    diffs = {}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            new = changes(n, p, gen)
            if new is not None:
                diffs[n] = (new - p).double()
                p.copy_(new)
    model.save_pretrained(merged_dir)
    model.load_state_dict(sd)
    return base_dir, merged_dir, diffs


def _peft_merged(model_cls, base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    m = PeftModel.from_pretrained(model_cls.from_pretrained(base_dir), adapter)
    return {k: v.double() for k, v in m.merge_and_unload().state_dict().items()}


def test_llama_round_trip_through_peft(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    low_rank = "model.layers.1.self_attn.k_proj.weight"

    def changes(n, p, gen):
        if n == low_rank:  # a rank-2 difference: rank 3 holds it exactly
            return p + torch.randn(p.shape[0], 2, generator=gen) @ torch.randn(2, p.shape[1], generator=gen) * 0.05
        if n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
            return p + torch.randn(p.shape, generator=gen) * 0.05
        if n == "model.layers.0.input_layernorm.weight":  # a norm: no LoRA holds it
            return p + 0.1
        return None

    base_dir, merged_dir, diffs = _pair(tmp_path, model, changes)
    out = tmp_path / "lora"
    assert main(["extract-lora", str(merged_dir), "--base", str(base_dir), "--rank", str(RANK), "--out", str(out),
                 "-q"]) == 0
    assert "left out" in capsys.readouterr().err
    summary = json.loads((out / "alloy_extract.json").read_text())
    assert summary["left_out"].keys() == {"model.layers.0.input_layernorm.weight"}
    assert summary["modules"]["model.embed_tokens"]["kind"] == "embedding"
    assert summary["modules"][low_rank.removesuffix(".weight")]["rank"] == RANK
    base = {k: v.double() for k, v in model.state_dict().items()}
    got = _peft_merged(LlamaForCausalLM, base_dir, out)
    for n, b in base.items():
        if n not in diffs or n == "model.layers.0.input_layernorm.weight":
            assert torch.equal(got[n], b), n  # PEFT touched nothing else
            continue
        d = diffs[n]
        err = float((got[n] - b - d).norm())
        want = _svd_error(d, RANK)
        assert abs(err - want) <= 1e-4 * float(d.norm()) + 1e-6, (n, err, want)
        assert want > 0.1 * float(d.norm()) or n == low_rank  # the full-rank ones really are truncated
        rec = summary["modules"][n.removesuffix(".weight")]
        assert rec["error_fro"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert float((got[low_rank] - base[low_rank] - diffs[low_rank]).norm()) < 1e-5
    # Alloy's own reader applies the extracted adapter as PEFT does
    with LoraReader(base_dir, out) as r:
        for n in diffs:
            torch.testing.assert_close(r.read(n).double(), got[n], rtol=0, atol=1e-6)


def test_gpt2_conv1d_round_trip_through_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))

    def changes(n, p, gen):
        if n.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight")):
            return p + torch.randn(p.shape, generator=gen) * 0.05
        return None

    base_dir, merged_dir, diffs = _pair(tmp_path, model, changes)
    out = tmp_path / "lora"
    assert main(["extract-lora", str(merged_dir), "--base", str(base_dir), "--rank", str(RANK), "--out", str(out),
                 "-q"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert {m["kind"] for m in json.loads((out / "alloy_extract.json").read_text())["modules"].values()} == {"conv1d"}
    base = {k: v.double() for k, v in model.state_dict().items()}
    got = _peft_merged(GPT2LMHeadModel, base_dir, out)
    for n, d in diffs.items():
        err = float((got[n] - base[n] - d).norm())
        assert abs(err - _svd_error(d, RANK)) <= 1e-4 * float(d.norm()) + 1e-6, n
    with LoraReader(base_dir, out) as r:
        for n in diffs:
            torch.testing.assert_close(r.read(n).double(), got[n], rtol=0, atol=1e-6)


def test_bad_input_exits_2(tmp_path, capsys):
    from tests.toy_models import write_llama

    a = write_llama(tmp_path / "a", hidden=16, layers=1, intermediate=32, vocab=32, heads=2)
    wide = write_llama(tmp_path / "wide", hidden=16, layers=1, intermediate=32, vocab=40, heads=2)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    cases = [
        (["extract-lora", str(a), "--base", str(a), "--rank", "0"], "--rank must be at least 1"),
        (["extract-lora", str(a), "--base", str(a), "--rank", "2", "--out", str(full)], "not empty"),
        (["extract-lora", str(a), "--base", str(tmp_path / "missing"), "--rank", "2", "--out", str(tmp_path / "o1")],
         "does not exist"),
        (["extract-lora", str(wide), "--base", str(a), "--rank", "2", "--out", str(tmp_path / "o2")],
         "resized vocabulary"),
        (["extract-lora", str(a), "--base", str(a), "--rank", "2", "--out", str(tmp_path / "o3")], "no LoRA to extract"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert needle in capsys.readouterr().err, needle
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()  # nothing half-written
    with pytest.raises(SystemExit) as e:  # argparse: a missing --rank
        main(["extract-lora", str(a), "--base", str(a)])
    assert e.value.code == 2
