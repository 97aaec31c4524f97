"""Fusing a model with a neuron-permuted copy of itself (exact OT) must return the model.

Each test first checks that the permuted copy computes the same function as the original (so the
permutation is a true symmetry of the architecture), then fuses in weight and activation mode.
The permutations are written here from the architecture, independently of the alignment graph.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from merge_ops.ot import FusionOptions, fuse
from merge_ops.ot.arch import build_module

MODES = [FusionOptions(), FusionOptions(ground_metric="activations"),
         FusionOptions(resid_policy="joint"), FusionOptions(qk="shared")]


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _check_fuse(sd, perm, config, inputs, modes=MODES):
    for opt in modes:
        res = fuse([sd, perm], config, options=opt, inputs=inputs)
        assert _max_diff(res.state_dict, sd) < 1e-6, opt
    # and the other way round: the original aligned onto the permuted anchor gives the copy
    res = fuse([sd, perm], config, anchor=1, inputs=inputs)
    assert _max_diff(res.state_dict, perm) < 1e-6
    # plain averaging is far off: the test would catch an identity map
    assert _max_diff({k: (sd[k] + perm[k]) / 2 for k in sd if sd[k].is_floating_point()},
                     {k: sd[k] for k in sd if sd[k].is_floating_point()}) > 1e-2


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_mlp():
    torch.manual_seed(0)
    cfg = {"alloy_arch": "mlp", "input_dim": 12, "hidden": [10, 8], "num_classes": 4}
    m = build_module(cfg)
    sd = _state(m)
    p0, p1 = torch.randperm(10), torch.randperm(8)
    perm = dict(sd)
    perm["layers.0.weight"], perm["layers.0.bias"] = sd["layers.0.weight"][p0], sd["layers.0.bias"][p0]
    perm["layers.1.weight"] = sd["layers.1.weight"][p1][:, p0]
    perm["layers.1.bias"] = sd["layers.1.bias"][p1]
    perm["layers.2.weight"] = sd["layers.2.weight"][:, p1]
    x = torch.randn(64, 12)
    torch.testing.assert_close(build_module(cfg, perm)(x), m(x))
    _check_fuse(sd, perm, cfg, x)


def test_cnn_with_batchnorm():
    torch.manual_seed(1)
    cfg = {"alloy_arch": "cnn", "in_channels": 2, "image_size": 8, "channels": [6, 5], "hidden": [7],
           "num_classes": 3}
    m = build_module(cfg)
    for bn in m.bns:  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    sd = _state(m)
    p0, p1, pf = torch.randperm(6), torch.randperm(5), torch.randperm(7)
    perm = dict(sd)
    for name in ("convs.0.weight", "convs.0.bias", *(f"bns.0.{t}" for t in ("weight", "bias", "running_mean",
                                                                            "running_var"))):
        perm[name] = sd[name][p0]
    perm["convs.1.weight"] = sd["convs.1.weight"][p1][:, p0]
    for name in ("convs.1.bias", *(f"bns.1.{t}" for t in ("weight", "bias", "running_mean", "running_var"))):
        perm[name] = sd[name][p1]
    side = 8 // 4
    w = sd["fcs.0.weight"].reshape(7, 5, side * side)[pf][:, p1]  # flatten is channel-major
    perm["fcs.0.weight"], perm["fcs.0.bias"] = w.reshape(7, -1), sd["fcs.0.bias"][pf]
    perm["fcs.1.weight"] = sd["fcs.1.weight"][:, pf]
    x = torch.randn(32, 2, 8, 8)
    torch.testing.assert_close(build_module(cfg, perm)(x), m(x))
    _check_fuse(sd, perm, cfg, x)


def _bert():
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3,
                                  architectures=["BertForSequenceClassification"])
    return cfg, transformers.BertForSequenceClassification(cfg).eval()


def _permute_bert(sd: dict, cfg) -> dict:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    hd = d // h
    pr = torch.randperm(d)
    perm = dict(sd)
    for k, v in sd.items():
        if k.startswith("bert.embeddings.") and k.endswith("embeddings.weight"):
            perm[k] = v[:, pr]
        elif "LayerNorm" in k:
            perm[k] = v[pr]
    for i in range(cfg.num_hidden_layers):
        p = f"bert.encoder.layer.{i}"
        qk = torch.cat([j * hd + torch.randperm(hd) for j in range(h)])  # within heads, shared by Q and K
        v_ = torch.cat([j * hd + torch.randperm(hd) for j in range(h)])
        pm = torch.randperm(cfg.intermediate_size)
        for name, rows in (("attention.self.query", qk), ("attention.self.key", qk), ("attention.self.value", v_),
                           ("intermediate.dense", pm)):
            perm[f"{p}.{name}.weight"] = sd[f"{p}.{name}.weight"][rows][:, pr]
            perm[f"{p}.{name}.bias"] = sd[f"{p}.{name}.bias"][rows]
        for name, cols in (("attention.output.dense", v_), ("output.dense", pm)):
            perm[f"{p}.{name}.weight"] = sd[f"{p}.{name}.weight"][pr][:, cols]
            perm[f"{p}.{name}.bias"] = sd[f"{p}.{name}.bias"][pr]
    pp = torch.randperm(d)
    perm["bert.pooler.dense.weight"] = sd["bert.pooler.dense.weight"][pp][:, pr]
    perm["bert.pooler.dense.bias"] = sd["bert.pooler.dense.bias"][pp]
    perm["classifier.weight"] = sd["classifier.weight"][:, pp]
    return perm


def _text_inputs(vocab: int, n: int = 24, s: int = 10) -> dict:
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(n, s, dtype=torch.long)
    mask[::3, 7:] = 0
    return {"input_ids": torch.randint(0, vocab, (n, s), generator=g), "attention_mask": mask}


def test_bert_encoder():
    cfg, m = _bert()
    sd = _state(m)
    perm = _permute_bert(sd, cfg)
    x = _text_inputs(cfg.vocab_size)
    m2 = transformers.BertForSequenceClassification(cfg).eval()
    m2.load_state_dict(perm)
    with torch.no_grad():
        torch.testing.assert_close(m2(**x).logits, m(**x).logits, atol=1e-5, rtol=1e-5)
    _check_fuse(sd, perm, cfg.to_dict(), x)


def _llama(tied: bool = False):
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=40, max_position_embeddings=32,
                                   tie_word_embeddings=tied, architectures=["LlamaForCausalLM"])
    return cfg, transformers.LlamaForCausalLM(cfg).eval()


def _permute_llama(sd: dict, cfg) -> dict:
    d, h, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd, g = d // h, h // kv
    pr = torch.randperm(d)
    perm = dict(sd)
    perm["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:, pr]
    if "lm_head.weight" in sd:
        perm["lm_head.weight"] = sd["lm_head.weight"][:, pr]
    perm["model.norm.weight"] = sd["model.norm.weight"][pr]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        for n in ("input_layernorm", "post_attention_layernorm"):
            perm[f"{p}.{n}.weight"] = sd[f"{p}.{n}.weight"][pr]
        # RoPE pins each dimension pair to its frequency: permute whole kv heads (with their query
        # heads), and V's dimensions freely within each kv head (o_proj's columns follow, per query head)
        sigma = torch.randperm(kv)
        k_rows = torch.cat([s * hd + torch.arange(hd) for s in sigma])
        q_rows = torch.cat([(s * g + j) * hd + torch.arange(hd) for s in sigma for j in range(g)])
        inner = [torch.randperm(hd) for _ in range(kv)]
        v_rows = torch.cat([s * hd + inner[s] for s in sigma])
        o_cols = torch.cat([(s * g + j) * hd + inner[s] for s in sigma for j in range(g)])
        pm = torch.randperm(cfg.intermediate_size)
        for n, rows in (("self_attn.q_proj", q_rows), ("self_attn.k_proj", k_rows), ("self_attn.v_proj", v_rows),
                        ("mlp.gate_proj", pm), ("mlp.up_proj", pm)):
            perm[f"{p}.{n}.weight"] = sd[f"{p}.{n}.weight"][rows][:, pr]
        perm[f"{p}.self_attn.o_proj.weight"] = sd[f"{p}.self_attn.o_proj.weight"][pr][:, o_cols]
        perm[f"{p}.mlp.down_proj.weight"] = sd[f"{p}.mlp.down_proj.weight"][pr][:, pm]
    return perm


@pytest.mark.parametrize("tied", [False, True])
def test_llama_decoder_gqa_rope(tied):
    cfg, m = _llama(tied)
    sd = _state(m)
    if tied:  # as saved to safetensors: the LM head is the embedding, stored once
        sd.pop("lm_head.weight", None)
    perm = _permute_llama(sd, cfg)
    x = _text_inputs(cfg.vocab_size)
    m2 = transformers.LlamaForCausalLM(cfg).eval()
    m2.load_state_dict(perm, strict=not tied)
    assert not tied or m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(m2(**x).logits, m(**x).logits, atol=1e-5, rtol=1e-5)
    _check_fuse(sd, perm, cfg.to_dict(), x, MODES if not tied else MODES[:1])


def test_llama_moving_a_rope_pair_is_not_a_symmetry():
    """Why Q/K are aligned per whole head: swapping two RoPE pairs inside a head (in Q and K alike)
    changes the function, because each pair rotates at its own frequency."""
    cfg, m = _llama()
    sd = _state(m)
    hd = cfg.hidden_size // cfg.num_attention_heads
    swap = torch.arange(hd)
    swap[[0, 1]], swap[[hd // 2, hd // 2 + 1]] = swap[[1, 0]], swap[[hd // 2 + 1, hd // 2]]
    perm = dict(sd)
    for n, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
        rows = torch.cat([j * hd + swap for j in range(heads)])
        perm[f"model.layers.0.self_attn.{n}.weight"] = sd[f"model.layers.0.self_attn.{n}.weight"][rows]
    m2 = transformers.LlamaForCausalLM(cfg).eval()
    m2.load_state_dict(perm)
    x = _text_inputs(cfg.vocab_size)
    with torch.no_grad():
        assert (m2(**x).logits - m(**x).logits).abs().max() > 1e-4


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_three_models_weighted(solver):
    """N = 3 with weights: every model aligned to the anchor, then the weighted average."""
    torch.manual_seed(4)
    cfg = {"alloy_arch": "mlp", "input_dim": 6, "hidden": [5], "num_classes": 2}
    sd = _state(build_module(cfg))
    perms = []
    for _ in range(2):
        p = torch.randperm(5)
        perms.append({"layers.0.weight": sd["layers.0.weight"][p], "layers.0.bias": sd["layers.0.bias"][p],
                      "layers.1.weight": sd["layers.1.weight"][:, p], "layers.1.bias": sd["layers.1.bias"]})
    opt = FusionOptions(solver=solver, reg=0.002)
    res = fuse([sd, *perms], cfg, weights=[2.0, 1.0, 1.0], options=opt)
    assert _max_diff(res.state_dict, sd) < (1e-6 if solver == "exact" else 1e-3)
