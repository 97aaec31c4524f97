"""Model Tinting: end to end on a tiny BERT family (merged weights in float64 from the table, tinted
heads written beside the model), gradients only in the table and the tinted layers, the filter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from merge_ops.errors import SpecError
from merge_ops.learned.adapters import build_adapter
from merge_ops.learned.batches import collate
from merge_ops.learned.engine import MergeEngine, Step, load_merge_inputs
from merge_ops.learned.groups import ParamGroups
from merge_ops.methods.model_tinting import tinting_loss
from merge_ops.runner import run_method
from tests.merge_ops.test_atlas import check_written, make_ctx, write_calibration
from tests.merge_ops.test_learned_engine import CLASSES, write_bert_family


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tint")
    base, experts = write_bert_family(root)
    return base, experts, write_calibration(root / "cal", labels=False)


def test_run_learns_coefficients_and_writes_tinted_heads(family, tmp_path):
    base, experts, cal = family
    out = tmp_path / "o"
    res = run_method(make_ctx(out, base, experts, cal, method="model_tinting", lr=0.02))
    curve = res.metrics["loss_curve"]
    assert len(curve) == 5 and curve[-1] < curve[0]
    assert res.artifacts["heads"] == "heads"
    table = check_written(out, base, experts)  # θ₀ + Σ clamp(c) τ, one row per tensor
    assert bool(((table.values >= 0) & (table.values <= 1)).all()) and table.meta["tinted"] == [
        "classifier.bias", "classifier.weight"]
    assert not (table.values == 0.3).all()
    for t, p in experts.items():
        head = load_file(str(out / "heads" / f"{t}.safetensors"))
        own = load_file(str(p / "model.safetensors"))
        assert head["classifier.weight"].shape == (CLASSES[t], 32)
        moved = (head["classifier.weight"] - own["classifier.weight"]).abs().max()
        assert 0 < float(moved) <= 5 * 0.02 + 1e-5  # tinted: trained from the expert's own head (Adam ≤ lr/step)
    assert set(res.metrics["kept_fraction_final"]) == set(CLASSES)


def test_only_tinted_layers_train_when_coefficients_are_frozen(family, tmp_path):
    base, experts, cal = family
    out = tmp_path / "o"
    res = run_method(make_ctx(out, base, experts, cal, method="model_tinting", train_coefficients=False))
    table = check_written(out, base, experts)
    assert bool((table.values == torch.tensor(0.3).double()).all())  # the float32 init, untouched
    assert res.metrics["loss_curve"][-1] < res.metrics["loss_curve"][0]  # the heads alone still learn
    for t, p in experts.items():
        head = load_file(str(out / "heads" / f"{t}.safetensors"))
        assert not torch.equal(head["classifier.weight"], load_file(str(p / "model.safetensors"))["classifier.weight"])


def test_gradients_reach_only_the_table_and_the_tinted_layers(family):
    base, experts, _ = family
    adapter = build_adapter(base, torch.float64)
    inputs = load_merge_inputs(base, list(experts.values()), list(experts), task_specific=[r"^classifier\."],
                               dtype=torch.float64, only=adapter.used)
    adapter.bind(inputs.held_base())
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=0.3)
    tint = {t: {n: torch.nn.Parameter(x.clone()) for n, x in inputs.heads[t].items()} for t in experts}
    st = Step(engine)
    batch = collate([[1, 2, 3], [4, 5, 6, 7], [9, 8]])
    for t in experts:
        teacher = torch.randn(3, CLASSES[t], dtype=torch.float64)
        loss = tinting_loss(adapter.forward(st.params, tint[t], batch).logits, teacher, confidence_filter=False)
        st.backward(loss)
    st.finish()
    assert engine.raw.grad is not None and float(engine.raw.grad.abs().sum()) > 0
    assert all(x.grad is not None and float(x.grad.abs().sum()) > 0 for h in tint.values() for x in h.values())
    assert all(p.grad is None for p in adapter.module.parameters())
    assert all(x.grad is None for h in inputs.heads.values() for x in h.values())  # the experts' heads: untouched
    assert all(x.grad is None for x in [*inputs.base.values(), *inputs.task_vectors.values()])


def test_confidence_filter_keeps_agreeing_or_less_confident_rows():
    t = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.2], [2.0, 0.0]], dtype=torch.float64)  # expert
    s = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [1.0, 0.0]], dtype=torch.float64)  # merged
    # row 0, 3: agree; row 1: disagree, merged more confident (0.88 > 0.73) -> dropped;
    # row 2: disagree, merged 0.62 > expert 0.55 -> dropped
    want = -s.log_softmax(-1)[[0, 3], 0].mean()
    assert tinting_loss(s, t).item() == pytest.approx(want.item(), rel=1e-9)
    everything = -s.log_softmax(-1)[[0, 1, 2, 3], [0, 1, 1, 0]].mean()
    assert tinting_loss(s, t, confidence_filter=False).item() == pytest.approx(everything.item(), rel=1e-9)
    assert tinting_loss(s[1:3], t[1:3]) is None


def test_needs_a_task_specific_layer(family, tmp_path):
    base, experts, cal = family
    ctx = make_ctx(tmp_path / "o", base, experts, cal, method="model_tinting")
    ctx = dataclasses.replace(ctx, spec=ctx.spec.model_copy(update={"task_specific": []}))
    with pytest.raises(SpecError, match="task_specific") as e:
        run_method(ctx)
    assert e.value.param == "task_specific"


def test_causal_lm_tints_a_named_layer(tiny_llama, tmp_path):
    base, paths = tiny_llama(2, hidden=32, layers=2, intermediate=64, vocab=64, heads=2)
    experts = {f"e{i}": p for i, p in enumerate(paths)}
    cal = write_calibration(tmp_path / "cal", vocab=64, labels=False)
    cal = {n: cal[t] for n, t in zip(experts, CLASSES, strict=False)}
    ctx = make_ctx(tmp_path / "o", base, experts, cal, method="model_tinting", batch_size=8, steps=3)
    ctx = dataclasses.replace(ctx, spec=ctx.spec.model_copy(update={"task_specific": [r"^lm_head\."]}))
    res = run_method(ctx)
    assert res.metrics["tinted_tensors"] == {n: ["lm_head.weight"] for n in experts}
    for n, p in experts.items():
        tinted = load_file(str(tmp_path / "o" / "heads" / f"{n}.safetensors"))["lm_head.weight"]
        own = load_file(str(p / "model.safetensors"))["lm_head.weight"]
        assert tinted.shape == own.shape and not torch.equal(tinted, own)
