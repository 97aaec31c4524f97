"""aTLAS: run end to end on a tiny BERT family (both objectives), per-tensor coefficients checked in
float64 against the files, gradients only in the table, the trust filter and the loss formulas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from merge_ops.context import Callbacks, JobContext, ResolvedModel
from merge_ops.errors import CalibrationError, SpecError
from merge_ops.learned.adapters import build_adapter
from merge_ops.learned.batches import collate
from merge_ops.learned.coefficients import Coefficients
from merge_ops.learned.engine import MergeEngine, Step, load_merge_inputs
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.pseudo_labels import trusted_rows
from merge_ops.methods.atlas import unsupervised_loss
from merge_ops.runner import run_method
from merge_ops.spec import spec_from_dict
from tests.merge_ops.test_learned_engine import CLASSES, write_bert_family

N_ROWS = 24


def write_calibration(root: Path, vocab: int = 100, labels: bool = True,
                      bad_label: str | None = None) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (t, c) in enumerate(CLASSES.items()):
        rows = []
        for j in range(N_ROWS):
            ids = [(3 * j + 7 * i + m) % (vocab - 1) + 1 for m in range(3 + j % 5)]
            rows.append({"input_ids": ids, **({"label": (ids[0] + j) % c} if labels else {})})
        if t == bad_label:
            rows[5]["label"] = c  # one past the head's classes
        (p := root / f"{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[t] = p
    return out


def make_ctx(out: Path, base: Path, experts: dict[str, Path], cal: dict[str, Path], method: str = "atlas",
             **params) -> JobContext:
    spec = spec_from_dict({
        "method": method, "base": str(base),
        "experts": [{"model": str(p), "name": n} for n, p in experts.items()],
        "parameters": {"steps": 5, "batch_size": N_ROWS, "lr": 0.05, **params},
        "task_specific": [r"^classifier\."],
        "calibration": {"tasks": {n: str(p) for n, p in cal.items()}}, "seed": 3,
    })
    return JobContext(spec=spec, base=ResolvedModel(str(base), base),
                      experts=[ResolvedModel(str(p), p) for p in experts.values()], out_dir=out,
                      calibration=cal, channel=Callbacks(lambda *a, **k: None))


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("atlas")
    base, experts = write_bert_family(root)
    return base, experts, write_calibration(root / "cal")


def check_written(out: Path, base: Path, experts: dict[str, Path]) -> Coefficients:
    """Every written tensor is θ₀ + Σ_k λ[k, tensor] τ_k (float64, from the files), with one row of
    the table per changed tensor; returns the table."""
    table = Coefficients.load(out / "coefficients.json")
    written = load_file(str(out / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    es = [load_file(str(p / "model.safetensors")) for p in experts.values()]
    changed = [n for n in b if any(not torch.equal(e[n], b[n]) for e in es)]
    assert table.groups == changed  # one coefficient per parameter tensor per task vector
    for n in b:
        want = b[n].double()
        if n in changed:
            row = table.groups.index(n)
            want = want + sum(table.values[row, k] * (e[n].double() - b[n].double()) for k, e in enumerate(es))
        torch.testing.assert_close(written[n].double(), want, atol=1e-6, rtol=0)
    return table


def test_supervised_learns_per_tensor_coefficients_from_zero(family, tmp_path):
    base, experts, cal = family
    res = run_method(make_ctx(tmp_path / "o", base, experts, cal, objective="supervised"))
    curve = res.metrics["loss_curve"]
    assert len(curve) == 5 and curve[-1] < curve[0]  # full-batch steps: the labelled CE goes down
    table = check_written(tmp_path / "o", base, experts)
    assert table.meta["parameterisation"] == "none" and table.meta["objective"] == "supervised"
    # unconstrained from 0: every tensor on the head's path moved (the pooler is not on it: mean pooling)
    on_path = torch.tensor([not g.startswith("pooler.") for g in table.groups])
    assert bool((table.values[on_path] != 0).all()) and bool((table.values[~on_path] == 0).all())
    assert float(table.values.abs().max()) <= 5 * 0.05 + 1e-6 and bool((table.values < 0).any())
    assert res.metrics["labelled_rows"] == dict.fromkeys(CLASSES, N_ROWS)


@pytest.mark.parametrize("labeller", ["expert", "initial"])
def test_unsupervised_loss_decreases_and_trusts_few_rows(family, tmp_path, labeller):
    base, experts, _ = family
    cal = write_calibration(tmp_path / "cal", labels=False)  # no labels needed
    res = run_method(make_ctx(tmp_path / "o", base, experts, cal, objective="unsupervised",
                              pseudo_labels=labeller, threshold=0.5))
    curve = res.metrics["loss_curve"]
    assert curve[-1] < curve[0]
    # the trust filter works: per predicted class only its top-k (k = max(1, 24/C/10) = 1) rows
    trusted = res.metrics["trusted_rows"]
    assert all(1 <= trusted[t] <= CLASSES[t] for t in CLASSES)
    check_written(tmp_path / "o", base, experts)


def test_gradients_reach_only_the_table(family):
    base, experts, _ = family
    adapter = build_adapter(base, torch.float64)
    inputs = load_merge_inputs(base, list(experts.values()), list(experts), task_specific=[r"^classifier\."],
                               dtype=torch.float64, only=adapter.used)
    adapter.bind(inputs.held_base())
    for h in inputs.heads.values():
        for t in h.values():
            t.requires_grad_(False)
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=0.0, parameterisation="none")
    st = Step(engine)
    batch = collate([[1, 2, 3], [4, 5, 6, 7]])
    for t in experts:
        logits = adapter.forward(st.params, inputs.heads[t], batch).logits
        fixed = logits.detach().argmax(-1)
        st.backward(unsupervised_loss(logits, fixed, torch.tensor([True, False]), 0.0))
    st.finish()
    g = engine.raw.grad
    assert g is not None and g.shape == (len(inputs.task_vectors), 3) and bool((g.abs().sum(0) > 0).all())
    assert [n for n, p in engine.named_parameters()] == ["raw"]
    assert all(p.grad is None and not p.requires_grad for p in adapter.module.parameters())
    tensors = [*inputs.base.values(), *inputs.task_vectors.values(), *(x for h in inputs.heads.values() for x in h.values())]
    assert all(t.grad is None for t in tensors)


def test_trusted_rows_are_per_class_top_k_not_everything():
    cls = torch.tensor([0, 0, 0, 1, 1, 2, 0, 1] * 5)
    conf = torch.linspace(0.1, 0.9, 40)
    mask = trusted_rows(cls, conf, n_classes=2)  # k = min(40 // 2 // 10, 100) = 2
    for c in (0, 1, 2):
        rows = (cls == c).nonzero().flatten()
        want = rows[conf[rows].argsort(descending=True)[:2]]
        assert set(mask.nonzero().flatten().tolist()) >= set(want.tolist())
    assert int(mask.sum()) == 6  # the reference's bug flags all 40


def test_unsupervised_loss_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64) * 4
    fixed = torch.tensor([0, 1, 2, 0, 1, 2])
    trusted = torch.tensor([True, False, False, True, False, False])
    p = logits.softmax(-1)
    want = 0.0
    for i in range(6):
        if trusted[i]:
            want += -float(p[i, fixed[i]].log())
        elif float(p[i].max()) > 0.9:
            want += -float(p[i].max().log())
    got = unsupervised_loss(logits, fixed, trusted, 0.9)
    assert got.item() == pytest.approx(want / 6, rel=1e-6)
    assert F.cross_entropy(logits, fixed).item() != pytest.approx(got.item())


def test_supervised_rejects_missing_or_out_of_range_labels(family, tmp_path):
    base, experts, _ = family
    unlabelled = write_calibration(tmp_path / "n", labels=False)
    with pytest.raises(CalibrationError, match=r"supervised objective needs a class \"label\""):
        run_method(make_ctx(tmp_path / "o1", base, experts, unlabelled, objective="supervised"))
    bad = write_calibration(tmp_path / "b", bad_label="b")
    with pytest.raises(SpecError, match=r"label 3, but its head has 3 classes") as e:
        run_method(make_ctx(tmp_path / "o2", base, experts, bad, objective="supervised"))
    assert e.value.param == "calibration.tasks.b"
