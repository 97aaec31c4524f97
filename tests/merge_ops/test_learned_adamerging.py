"""AdaMerging run(ctx) end to end (tiny BERT with per-task heads, tiny Llama) and calibration sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_ops.context import Callbacks, JobContext, ResolvedModel
from merge_ops.errors import CalibrationError
from merge_ops.learned.batches import BatchSampler, read_samples
from merge_ops.learned.coefficients import Coefficients
from merge_ops.methods.adamerging import entropy_loss
from merge_ops.runner import run_method
from merge_ops.spec import spec_from_dict
from tests.merge_ops.test_learned_engine import CLASSES, write_bert_family


def _calib(root: Path, tasks: list[str], vocab: int, labels: bool = False) -> dict[str, Path]:
    out = {}
    for i, t in enumerate(tasks):
        p = root / f"{t}.jsonl"
        rows = [{"input_ids": [(3 * j + i * 7 + m) % (vocab - 1) + 1 for m in range(3 + j % 5)],
                 **({"label": j % 2} if labels else {})} for j in range(24)]
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[t] = p
    return out


def _ctx(tmp: Path, base: Path, experts: dict[str, Path], cal: dict[str, Path], **params) -> tuple[JobContext, list]:
    spec = spec_from_dict({
        "method": "adamerging", "base": str(base),
        "experts": [{"model": str(p), "name": n} for n, p in experts.items()],
        "parameters": {"steps": 4, "batch_size": 4, "lr": 0.05, **params},
        "task_specific": [r"^classifier\."] if "a" in experts else [],
        "calibration": {"tasks": {n: str(p) for n, p in cal.items()}}, "seed": 7,
    })
    calls: list = []
    ctx = JobContext(spec=spec, base=ResolvedModel(str(base), base),
                     experts=[ResolvedModel(str(p), p) for p in experts.values()], out_dir=tmp,
                     calibration=cal, channel=Callbacks(lambda *a, **k: calls.append(a)))
    return ctx, calls


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bert_run")
    base, experts = write_bert_family(root)
    return base, experts, _calib(root, list(experts), 100)


def test_run_bert_with_heads_writes_loadable_checkpoint_heads_and_table(bert, tmp_path):
    base, experts, cal = bert
    ctx, calls = _ctx(tmp_path / "out", base, experts, cal, granularity="layer")
    res = run_method(ctx)
    out = ctx.out_dir
    assert res.artifacts == {"coefficients": "coefficients.json", "coefficients_png": "coefficients.png",
                             "heads": "heads"}
    assert [c for c in calls if c[0] == "learn" and c[1] > 0] == [("learn", s, 4, pytest.approx(
        res.metrics["loss_curve"][s - 1], abs=1e-5)) for s in range(1, 5)]
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(out))  # a checkpoint transformers loads
    assert model.config.hidden_size == 32
    table = Coefficients.load(out / "coefficients.json")
    assert table.experts == list(experts) and len(table.groups) == res.metrics["n_merged_tensors"]
    assert (out / "coefficients.png").stat().st_size > 1000
    # the written weights are θ₀ + Σ c τ with the saved table (float64 formula from the files)
    written = load_file(str(out / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    es = [load_file(str(p / "model.safetensors")) for p in experts.values()]
    name = "encoder.layer.1.attention.self.query.weight"
    row = table.groups.index(name)
    want = b[name].double() + sum(table.values[row, k] * (e[name].double() - b[name].double())
                                  for k, e in enumerate(es))
    torch.testing.assert_close(written[name].double(), want, atol=1e-6, rtol=0)
    assert not any(n.startswith("classifier") for n in written)
    # heads are not merged: each task keeps its own, saved by task name
    for t, p in experts.items():
        head = load_file(str(out / "heads" / f"{t}.safetensors"))
        assert head["classifier.weight"].shape == (CLASSES[t], 32)
        torch.testing.assert_close(head["classifier.weight"], load_file(str(p / "model.safetensors"))["classifier.weight"])
    assert res.metrics["steps"] == 4 and res.metrics["peak_rss_mib"] > 0
    assert set(res.metrics["class_share_max"]) == set(experts)


def test_run_is_deterministic_for_a_seed_and_plus_variant_runs(bert, tmp_path):
    base, experts, cal = bert
    a = run_method(_ctx(tmp_path / "a", base, experts, cal, granularity="task", plus=True)[0])
    b = run_method(_ctx(tmp_path / "b", base, experts, cal, granularity="task", plus=True)[0])
    assert a.metrics["loss_curve"] == b.metrics["loss_curve"]
    ta = Coefficients.load(tmp_path / "a" / "coefficients.json")
    assert ta.groups == ["all"]
    assert torch.equal(ta.values, Coefficients.load(tmp_path / "b" / "coefficients.json").values)


def test_run_tiny_llama_causal_lm(tiny_llama, tmp_path):
    base, experts = tiny_llama(2, hidden=32, layers=2, intermediate=64, vocab=64, heads=2)
    names = {f"e{i}": p for i, p in enumerate(experts)}
    cal = _calib(tmp_path, list(names), 64)
    ctx, _ = _ctx(tmp_path / "out", base, names, cal, granularity="block")
    res = run_method(ctx)
    assert "heads" not in res.artifacts
    assert Coefficients.load(ctx.out_dir / "coefficients.json").groups == ["other", "block.0", "block.1"]
    assert res.metrics["loss_final"] < res.metrics["loss_first"]
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(ctx.out_dir))
    logits = m(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_calibration_never_reads_labels_and_is_seeded(tmp_path):
    with_labels = _calib(tmp_path / "l", ["x"], 50, labels=True) if (tmp_path / "l").mkdir() is None else None
    without = _calib(tmp_path / "n", ["x"], 50) if (tmp_path / "n").mkdir() is None else None
    s1 = {"x": read_samples(with_labels["x"])}
    s2 = {"x": read_samples(without["x"])}
    assert s1 == s2  # the label column changes nothing
    draw = lambda s, seed: [BatchSampler(s, 5, seed=seed).next("x").input_ids.tolist() for _ in range(1)]  # noqa: E731
    sa, sb = BatchSampler(s1, 5, seed=3), BatchSampler(s2, 5, seed=3)
    for _ in range(7):  # crosses a reshuffle (24 samples, 5 per batch)
        assert torch.equal(sa.next("x").input_ids, sb.next("x").input_ids)
    assert draw(s1, 3) != draw(s1, 4)
    limited = read_samples(with_labels["x"], limit=5, seed=1)
    assert len(limited) == 5 and limited == read_samples(without["x"], limit=5, seed=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"label": 1}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: a line needs"):
        read_samples(bad, tokenizer=lambda x, **k: {"input_ids": [[1] for _ in x]})


def test_entropy_loss_formula_and_collapse_guard():
    logits = torch.tensor([[2.0, 0.0], [1.5, -0.5], [3.0, 0.1]], dtype=torch.float64)
    p = logits.softmax(-1)
    h = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(entropy_loss(logits, normalize=False), h.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy_loss(logits), (h / math.log(2)).float(), rtol=1e-6, atol=1e-6)
    pm = p.mean(0)
    want = (h + (pm * pm.log()).sum()) / math.log(2)
    torch.testing.assert_close(entropy_loss(logits, diversity=1.0), want.float(), rtol=1e-6, atol=1e-6)
    # a collapsed head (every input confidently one class) scores worse than confident varied predictions
    collapsed = torch.tensor([[9.0, 0.0]] * 4)
    varied = torch.tensor([[9.0, 0.0], [0.0, 9.0]] * 2)
    assert entropy_loss(collapsed, diversity=1.0) > entropy_loss(varied, diversity=1.0)
    assert entropy_loss(collapsed, diversity=0.0) == pytest.approx(float(entropy_loss(varied, diversity=0.0)))


def test_entropy_gradient_over_a_vocabulary_equals_the_float64_formula(monkeypatch):
    """The row-blocked entropy (it saves only the logits) against autograd on the formula in float64,
    with several row blocks over a 3000-token vocabulary."""
    from merge_ops.learned import entropy

    monkeypatch.setattr(entropy.MeanEntropy, "ROWS_BYTES", 5 * 4 * 3000)  # 5 rows per block
    z = 4 * torch.randn(23, 3000, generator=torch.Generator().manual_seed(1))
    z64 = z.double().requires_grad_(True)
    p = z64.softmax(-1)
    want = -(p * p.log()).sum(-1).mean() / math.log(3000)
    (g_want,) = torch.autograd.grad(want, z64)
    zz = z.clone().requires_grad_(True)
    got = entropy_loss(zz)
    (g_got,) = torch.autograd.grad(got, zz)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert g_want.abs().max() > 1e-6
    torch.testing.assert_close(g_got.double(), g_want, rtol=0, atol=2e-8)
    assert torch.isnan(entropy_loss(torch.zeros(0, 5)))  # no scored rows: NaN (the step fails with a message)
