"""OT fusion building blocks against hand computations, different widths, refusals, and the job runner."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import save_file

from merge_ops.checkpoint import CheckpointReader
from merge_ops.context import Callbacks, JobContext, ResolvedModel
from merge_ops.errors import CheckpointError, SpecError
from merge_ops.methods.ot_fusion import run
from merge_ops.ot import FusionOptions, fuse
from merge_ops.ot.align import apply_map
from merge_ops.ot.arch import build_module
from merge_ops.ot.graph import Layout, UnsupportedArchitecture, build_graph
from merge_ops.ot.ground_metric import correct, cost_matrix, transport_map
from merge_ops.spec import spec_from_dict


def test_cost_matrix_by_hand():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    eu = torch.tensor([[0.0, 1.0, math.sqrt(10)], [5.0, math.sqrt(18), 3.0]], dtype=torch.float64)
    torch.testing.assert_close(cost_matrix(x, y, normalize="none"), eu)
    torch.testing.assert_close(cost_matrix(x, y, squared=True, normalize="none"), eu**2)
    torch.testing.assert_close(cost_matrix(x, y), eu / 5.0)


def test_transport_and_both_corrections_by_hand():
    # 2 model neurons, 3 anchor neurons: the middle anchor neuron takes 1/6 from each model neuron
    cost = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    t = transport_map(cost)
    torch.testing.assert_close(t, torch.tensor([[1 / 3, 1 / 6, 0.0], [0.0, 1 / 6, 1 / 3]], dtype=torch.float64))
    # out side: n_anchor·T (columns sum to 1); in side: n_model·T (rows sum to 1)
    torch.testing.assert_close(correct(t, "out"), 3 * t)
    torch.testing.assert_close(correct(t, "in"), 2 * t)
    soft = transport_map(cost, solver="sinkhorn", reg=0.05)
    assert abs(float(soft.sum()) - 1) < 1e-6 and (soft > 0).all()
    torch.testing.assert_close(soft.sum(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_apply_map_is_t_transpose_w_t_in():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    t_out = torch.rand(3, 2, generator=g, dtype=torch.float64)
    t_in = torch.rand(4, 5, generator=g, dtype=torch.float64)
    got = apply_map(apply_map(w, 0, Layout(), t_out), 1, Layout(), t_in)
    torch.testing.assert_close(got, t_out.T @ w @ t_in)
    # conv: the same map at every kernel position
    k = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    got = apply_map(k, 1, Layout(), t_in)
    torch.testing.assert_close(got, torch.einsum("oipq,ij->ojpq", k, t_in))
    # flatten: channel c owns positions c·P … c·P+P−1 of the FC input
    fc = torch.randn(2, 4 * 3, generator=g, dtype=torch.float64)
    got = apply_map(fc, 1, Layout(repeat=3), t_in)
    want = torch.einsum("ocp,cj->ojp", fc.reshape(2, 4, 3), t_in).reshape(2, 15)
    torch.testing.assert_close(got, want)


def test_gqa_layout_groups_query_heads_of_one_kv_head():
    # 4 query heads, 2 kv heads, head_dim 3: unit (kv 1, dim 2) owns dim 2 of query heads 2 and 3
    rows = Layout(head_dim=3, group=2).rows(12)
    assert rows.shape == (6, 2)
    assert rows[1 * 3 + 2].tolist() == [2 * 3 + 2, 3 * 3 + 2]


def _mlp(hidden: int) -> dict:
    return {"alloy_arch": "mlp", "input_dim": 6, "hidden": [hidden], "num_classes": 3}


def test_different_widths_widened_copy():
    """B is A with every hidden unit duplicated and its outgoing weights halved (the same function).
    Exact OT sends each A unit to its two copies: fusing into either shape returns that model."""
    torch.manual_seed(0)
    a = {k: v.detach().clone() for k, v in build_module(_mlp(4)).state_dict().items()}
    b = {"layers.0.weight": a["layers.0.weight"].repeat(2, 1), "layers.0.bias": a["layers.0.bias"].repeat(2),
         "layers.1.weight": a["layers.1.weight"].repeat(1, 2) / 2, "layers.1.bias": a["layers.1.bias"]}
    x = torch.randn(10, 6)
    torch.testing.assert_close(build_module(_mlp(8), b)(x), build_module(_mlp(4), a)(x))
    into_a = fuse([a, b], [_mlp(4), _mlp(8)], anchor=0).state_dict
    into_b = fuse([a, b], [_mlp(4), _mlp(8)], anchor=1).state_dict
    for k in a:
        torch.testing.assert_close(into_a[k], a[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(into_b[k], b[k], atol=1e-6, rtol=0)


def test_different_widths_shapes_and_costs():
    torch.manual_seed(1)
    sds = [build_module(_mlp(w)).state_dict() for w in (5, 7, 9)]
    res = fuse(sds, [_mlp(5), _mlp(7), _mlp(9)], anchor=1, options=FusionOptions(solver="sinkhorn"))
    assert {k: tuple(v.shape) for k, v in res.state_dict.items()} == {k: tuple(v.shape) for k, v in sds[1].items()}
    assert res.maps[0]["h0"].shape == (5, 7) and res.maps[2]["h0"].shape == (9, 7)
    assert res.costs["h0"][1] == 0.0 and res.costs["h0"][0] > 0


def test_refuses_unsupported_architecture_naming_the_module():
    shapes = {"transformer.wte.weight": (10, 4), "transformer.h.0.attn.c_attn.weight": (4, 12)}
    with pytest.raises(UnsupportedArchitecture, match="'transformer.h.0.attn.c_attn'.*gpt2"):
        build_graph({"model_type": "gpt2"}, shapes)
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=8, max_position_embeddings=8)
    shapes = {k: tuple(v.shape) for k, v in transformers.BertForMaskedLM(cfg).state_dict().items()}
    with pytest.raises(UnsupportedArchitecture, match="cannot align module 'cls.predictions"):
        build_graph(cfg.to_dict(), shapes)
    with pytest.raises(UnsupportedArchitecture, match="alloy_arch 'rnn'"):
        build_graph({"alloy_arch": "rnn"}, {"cell.weight": (2, 2)})


def test_refuses_bad_inputs():
    a, b = build_module(_mlp(4)).state_dict(), build_module({**_mlp(4), "num_classes": 5}).state_dict()
    with pytest.raises(CheckpointError, match="only hidden widths may differ"):
        fuse([a, b], [_mlp(4), {**_mlp(4), "num_classes": 5}])
    with pytest.raises(SpecError, match="calibration"):
        fuse([a, a], _mlp(4), options=FusionOptions(ground_metric="activations"))
    with pytest.raises(SpecError, match="at least 2"):
        fuse([a], _mlp(4))
    with pytest.raises(SpecError, match="solver 'lp'"):
        fuse([a, a], _mlp(4), options=FusionOptions(solver="lp"))


def _write(folder, sd, config):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return ResolvedModel(ref=str(folder), path=folder)


def test_run_writes_fused_checkpoint_with_activations(tmp_path):
    torch.manual_seed(2)
    cfg = _mlp(6)
    sd = {k: v.detach().clone() for k, v in build_module(cfg).state_dict().items()}
    p = torch.randperm(6)
    perm = {"layers.0.weight": sd["layers.0.weight"][p], "layers.0.bias": sd["layers.0.bias"][p],
            "layers.1.weight": sd["layers.1.weight"][:, p], "layers.1.bias": sd["layers.1.bias"]}
    experts = [_write(tmp_path / "a", sd, cfg), _write(tmp_path / "b", perm, cfg)]
    calib = tmp_path / "cal.jsonl"
    calib.write_text("".join(json.dumps({"input": torch.randn(6).tolist()}) + "\n" for _ in range(20)))
    spec = spec_from_dict({"method": "ot_fusion", "experts": [{"model": str(e.path)} for e in experts],
                           "parameters": {"ground_metric": "activations"}, "calibration": {"tasks": {"a": str(calib)}}})
    steps = []
    ctx = JobContext(spec=spec, base=None, experts=experts, out_dir=tmp_path / "out",
                     calibration={"a": calib}, channel=Callbacks(lambda *a, **k: steps.append(a)))
    result = run(ctx)
    with CheckpointReader(tmp_path / "out") as r:
        for k, v in sd.items():
            torch.testing.assert_close(r.read(k), v, atol=1e-6, rtol=0)
        assert r.config()["hidden"] == [6]
    assert result.metrics["settings"]["ground_metric"] == "activations"
    assert set(result.metrics["transport_cost"]["b"]) == {"h0"}
    assert ("merge", 1, 1) in steps


def test_run_bert_output_loads_in_transformers(tmp_path):
    torch.manual_seed(3)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=12, max_position_embeddings=8, num_labels=2)
    models = [transformers.BertForSequenceClassification(cfg) for _ in range(2)]
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / f"m{i}")
    experts = [ResolvedModel(ref=str(tmp_path / f"m{i}"), path=tmp_path / f"m{i}") for i in range(2)]
    spec = spec_from_dict({"method": "ot_fusion", "experts": [{"model": str(e.path)} for e in experts],
                           "parameters": {"solver": "sinkhorn", "reg": 0.05, "anchor": 1}})
    run(JobContext(spec=spec, base=None, experts=experts, out_dir=tmp_path / "out"))
    fused = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.isfinite(fused(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    # the classifier's class axis is never moved: its bias is the plain average
    torch.testing.assert_close(fused.classifier.bias,
                               (models[0].classifier.bias + models[1].classifier.bias).detach() / 2)


def test_recompute_batchnorm_statistics():
    torch.manual_seed(5)
    cfg = {"alloy_arch": "cnn", "in_channels": 1, "image_size": 4, "channels": [3], "num_classes": 2}
    sd = {k: v.detach().clone() for k, v in build_module(cfg).state_dict().items()}
    x = torch.randn(16, 1, 4, 4)
    res = fuse([sd, sd], cfg, inputs=x, options=FusionOptions(recompute_bn=True))
    conv = torch.nn.functional.conv2d(x.double(), sd["convs.0.weight"].double(), sd["convs.0.bias"].double(),
                                      padding=1)
    torch.testing.assert_close(res.state_dict["bns.0.running_mean"].double(), conv.mean((0, 2, 3)))
    torch.testing.assert_close(res.state_dict["bns.0.running_var"].double(), conv.var((0, 2, 3), unbiased=True))
