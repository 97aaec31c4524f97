"""TSV-M / Iso-C / Iso-CTS: α chosen on labelled evaluation rows when the spec gives them and does not
set `alpha` (static/alpha_select.py); the fixed default otherwise."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from merge_ops.evaluation.evaluate import evaluate_model, load_sets
from merge_ops.runner import run_merge
from merge_ops.spec import spec_from_dict
from tests.merge_ops.test_learned_engine import CLASSES, write_bert_family


def _spec(base, experts, sets, **params):
    return spec_from_dict({
        "method": "iso_c", "base": str(base), "parameters": params, "out_dtype": "float32",
        "experts": [{"model": str(p), "name": n} for n, p in experts.items()],
        "task_specific": [r"^classifier\."],
        "evaluate": {"sets": {n: str(p) for n, p in sets.items()}, "batch_size": 4}})


def test_alpha_is_the_best_on_the_labelled_sets_and_fixed_without_them(tmp_path, monkeypatch):
    from merge_ops.static import alpha_select

    monkeypatch.setattr(alpha_select, "COARSE", (0.6, 1.2, 1.8))  # the grid's logic, fewer evaluations
    base, experts = write_bert_family(tmp_path / "models", scale=0.2)
    sets = {}
    for i, t in enumerate(("a", "b")):
        rows = [{"input_ids": [(7 * j + 3 * i + m) % 99 + 1 for m in range(3 + j % 4)], "label": j % CLASSES[t]}
                for j in range(16)]
        sets[t] = tmp_path / f"{t}.jsonl"
        sets[t].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_merge(_spec(base, experts, sets), tmp_path / "auto")
    sel = out.result.metrics["alpha_selection"]
    curve = {float(a): v for a, v in sel["curve"].items()}
    assert sel["sets"] == ["a", "b"] and {0.6, 1.2, 1.8} <= set(curve) and len(curve) >= 4  # + refinement
    assert curve[sel["alpha"]] == max(curve.values())
    # the chosen merge is the merge with that α given explicitly
    fixed = run_merge(_spec(base, experts, sets, alpha=sel["alpha"]), tmp_path / "fixed")
    assert "alpha_selection" not in fixed.result.metrics
    got, want = load_file(str(tmp_path / "auto" / "model.safetensors")), load_file(str(tmp_path / "fixed" / "model.safetensors"))
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    # its curve value is the evaluation stage's score, normalised by each set's expert
    loaded = load_sets(sets)
    score = []
    for t in ("a", "b"):
        m = evaluate_model(tmp_path / "fixed", {t: loaded[t]}, heads={t: t}, batch_size=4,
                           task_specific=[r"^classifier\."]).sets[t].metrics["accuracy"]
        e = evaluate_model(experts[t], {t: loaded[t]}, batch_size=4,
                           task_specific=[r"^classifier\."]).sets[t].metrics["accuracy"]
        score.append(m / e)
    assert abs(sum(score) / 2 - curve[sel["alpha"]]) < 1e-6
