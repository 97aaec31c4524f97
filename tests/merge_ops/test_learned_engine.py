"""Learned-merge engine: functional merge vs a float64 task-arithmetic formula, groups, gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_ops.errors import SpecError
from merge_ops.learned.adapters import build_adapter
from merge_ops.learned.batches import collate
from merge_ops.learned.engine import MergeEngine, Step, fit, load_merge_inputs, ties_trim
from merge_ops.learned.groups import ParamGroups
from merge_ops.methods.adamerging import entropy_loss

BERT = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100,
        "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "pad_token_id": 0}
CLASSES = {"a": 2, "b": 3, "c": 4}


def write_bert_family(root: Path, scale: float = 0.05) -> tuple[Path, dict[str, Path]]:
    """A tiny BertModel base and three experts = base + noise, each with its own classifier head
    (2, 3 and 4 classes); the base has no head. Embeddings stay frozen in the experts (τ = 0)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    base_sd = {k: v.contiguous() for k, v in BertModel(BertConfig(**BERT)).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    folders = {}
    for name, sd in [("base", base_sd), *[(t, None) for t in CLASSES]]:
        d = root / name
        d.mkdir(parents=True)
        if sd is None:
            sd = {k: (v + scale * torch.randn(v.shape, generator=g)
                      if v.is_floating_point() and "embeddings" not in k else v.clone())
                  for k, v in base_sd.items()}
            sd["classifier.weight"] = torch.randn(CLASSES[name], 32, generator=g)
            sd["classifier.bias"] = torch.randn(CLASSES[name], generator=g) * 0.1
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(BERT))
        folders[name] = d
    return folders.pop("base"), folders


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return write_bert_family(tmp_path_factory.mktemp("bert"))


def _inputs(bert, dtype=torch.float64, adapter=None):
    base, experts = bert
    return load_merge_inputs(base, list(experts.values()), list(experts), task_specific=[r"^classifier\."],
                             dtype=dtype, only=adapter.used if adapter else None)


def _reference(bert, coeff) -> dict[str, torch.Tensor]:
    """θ₀ + Σ_k c_k(name) (θ_k − θ₀) in float64, straight from the files."""
    from safetensors.torch import load_file

    base, experts = bert
    b = load_file(str(base / "model.safetensors"))
    es = [load_file(str(p / "model.safetensors")) for p in experts.values()]
    return {n: b[n].double() + sum(coeff(n, k) * (e[n].double() - b[n].double()) for k, e in enumerate(es))
            for n in b if b[n].is_floating_point()}


def test_engine_at_init_equals_task_arithmetic_weights_and_logits(bert):
    adapter = build_adapter(bert[0], torch.float64)
    inputs = _inputs(bert, adapter=adapter)
    adapter.bind(inputs.base)
    init = [0.3, 0.5, 0.2]
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=init)
    ref = _reference(bert, lambda n, k: init[k])
    merged = engine.merged_params()
    assert set(merged) == set(ref)
    for n, t in ref.items():
        torch.testing.assert_close(merged[n].detach(), t, atol=1e-6, rtol=0)
    assert "embeddings.word_embeddings.weight" in inputs.constant  # frozen: τ = 0, no coefficient
    assert all(not n.startswith("classifier") for n in merged)
    # the functional forward equals a model loaded with the task-arithmetic weights
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(**BERT)).double().eval()
    m.load_state_dict(ref, strict=False)
    batch = collate([[5, 6, 7, 8], [9, 10]])
    head = inputs.heads["b"]
    got = adapter.forward(merged, head, batch).logits
    h = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    mask = batch.attention_mask.unsqueeze(-1).double()
    want = ((h * mask).sum(1) / mask.sum(1)) @ head["classifier.weight"].T + head["classifier.bias"]
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.detach(), want.detach(), atol=1e-6, rtol=0)


def test_gradients_reach_only_coefficients_and_steps_reduce_loss(bert):
    adapter = build_adapter(bert[0], torch.float32)
    inputs = _inputs(bert, torch.float32, adapter)
    adapter.bind(inputs.base)
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=0.3)
    assert [n for n, p in engine.named_parameters() if p.requires_grad] == ["raw"]
    batch = collate([[(7 * i + j) % 99 + 1 for j in range(6)] for i in range(8)])

    def loss_fn(step: int, s: Step) -> None:
        for t in CLASSES:
            s.backward(entropy_loss(adapter.forward(s.params, inputs.heads[t], batch).logits, diversity=0.0))

    # the two-phase backward (per-term model backward, one merge backward) = plain autograd
    step = Step(engine)
    loss_fn(0, step)
    step.finish()
    two_phase = engine.raw.grad.clone()
    engine.raw.grad = None
    params = engine.merged_params()
    sum(entropy_loss(adapter.forward(params, inputs.heads[t], batch).logits, diversity=0.0)
        for t in CLASSES).backward()
    torch.testing.assert_close(two_phase, engine.raw.grad, rtol=1e-4, atol=1e-7)
    opt = torch.optim.Adam(engine.parameters(), lr=0.05)
    res = fit(engine, loss_fn, steps=6, optimizer=opt)
    assert res.losses[-1] < res.losses[0] - 1e-3
    assert engine.raw.grad is not None and engine.raw.grad.abs().sum() > 0
    frozen = [*inputs.base.values(), *inputs.task_vectors.values(), *adapter.module.parameters(),
              *[t for h in inputs.heads.values() for t in h.values()]]
    assert all(t.grad is None and not t.requires_grad for t in frozen)
    assert res.peak_memory["peak_rss_mib"] > 0


@pytest.mark.parametrize("grouping,expected", [("task", 1), ("block", 3)])
def test_task_and_block_groupings(bert, grouping, expected):
    inputs = _inputs(bert)
    groups = ParamGroups(inputs.merged_shapes(), grouping)
    assert groups.n_groups == expected  # block: block.0, block.1 and "other" (the pooler)
    init = [0.1, 0.2, 0.4]
    engine = MergeEngine(inputs, groups, init=init)
    with torch.no_grad():
        engine.raw[:, 0] = torch.linspace(0.0, 0.9, expected, dtype=torch.float32)
    ref = _reference(bert, lambda n, k: float(engine.coefficients()[groups.slots[n].row, k]) if n in groups.slots else 0.0)
    merged = engine.merged_params()
    for n in inputs.task_vectors:
        torch.testing.assert_close(merged[n].detach(), ref[n], atol=1e-6, rtol=0)


def test_chunks_are_exact_and_each_scales_its_slice():
    # numel 6 in 4 chunks: torch.chunk would give 3 chunks of 2; we must get exactly 4 (2, 2, 1, 1)
    assert len(torch.chunk(torch.zeros(6), 4)) == 3
    base = {"w": torch.zeros(2, 3, dtype=torch.float64), "v": torch.zeros(5, dtype=torch.float64)}
    tv = {"w": torch.arange(12, dtype=torch.float64).view(2, 2, 3) + 1,
          "v": torch.ones(2, 5, dtype=torch.float64)}
    from merge_ops.learned.engine import MergeInputs

    inputs = MergeInputs(["x", "y"], base, tv)
    groups = ParamGroups(inputs.merged_shapes(), "chunk", chunks={"w": 4, "v": 0})
    assert groups.slots["w"].chunk_sizes() == [2, 2, 1, 1]
    assert groups.n_groups == 4 and groups.slots["v"].chunks == 0
    engine = MergeEngine(inputs, groups, init=[0.5, 0.25], parameterisation="sigmoid", fixed=[0.1, 0.2])
    c = engine.coefficients().detach().double()
    torch.testing.assert_close(c, torch.tensor([[0.5, 0.25]] * 4, dtype=torch.float64))
    with torch.no_grad():
        engine.raw.copy_(torch.randn(4, 2))
    c = engine.coefficients().detach().double()
    per_entry = torch.stack([c[[0, 0, 1, 1, 2, 3], k] for k in range(2)])  # slice sizes 2, 2, 1, 1
    want_w = (per_entry * tv["w"].view(2, -1)).sum(0).view(2, 3)
    torch.testing.assert_close(engine.merged_tensor("w").detach(), want_w)
    torch.testing.assert_close(engine.merged_tensor("v").detach(), torch.full((5,), 0.1 + 0.2, dtype=torch.float64))
    with pytest.raises(SpecError, match="cannot be cut into 7 chunks"):
        ParamGroups([("w", (2, 3))], "chunk", chunks=7)


def test_ties_trim_matches_formula():
    from merge_ops.learned.engine import MergeInputs

    g = torch.Generator().manual_seed(3)
    tv = {"a": torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
          "b": torch.randn(3, 7, generator=g, dtype=torch.float64)}
    orig = {n: t.clone() for n, t in tv.items()}
    inputs = MergeInputs(["x", "y", "z"], {n: torch.zeros(t.shape[1:], dtype=torch.float64) for n, t in tv.items()}, tv)
    ties_trim(inputs, 0.3)
    flat = torch.cat([orig[n].reshape(3, -1) for n in ("a", "b")], 1)  # [K, N]
    keep = int(0.3 * flat.shape[1])
    trimmed = torch.zeros_like(flat)
    for k in range(3):
        idx = flat[k].abs().argsort(descending=True)[:keep]
        trimmed[k, idx] = flat[k, idx]
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum()) or 1.0
    want = trimmed * (torch.sign(trimmed) == sign)
    got = torch.cat([tv[n].reshape(3, -1) for n in ("a", "b")], 1)
    torch.testing.assert_close(got, want)


def test_fixed_coefficient_tensors_train_beside_chunked_ones():
    """A tensor given 0 chunks keeps a fixed coefficient: the two-phase step must skip it, not fail."""
    from merge_ops.learned.engine import MergeEngine, MergeInputs, Step

    gen = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(4, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    tvs = {"a": 0.1 * torch.randn(2, 4, 4, generator=gen), "b": 0.1 * torch.randn(2, 4, generator=gen)}
    inputs = MergeInputs(experts=["x", "y"], base=base, task_vectors=tvs)
    groups = ParamGroups(inputs.merged_shapes(), "chunk", chunks={"a": 2, "b": 0})
    engine = MergeEngine(inputs, groups, init=0.3, parameterisation="sigmoid")
    step = Step(engine)
    step.backward((step.params["a"] ** 2).sum() + (step.params["b"] ** 2).sum())
    step.finish()
    assert engine.raw.grad is not None and torch.isfinite(engine.raw.grad).all()
    assert engine.raw.grad.abs().sum() > 0  # the chunked tensor's coefficients learn
