"""A static merge of classifiers keeps each expert's task head (heads/<expert>.safetensors, the layout
a learned merge leaves), so its accuracy sets are scored per task with that task's own head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_ops.context import JobContext, ResolvedModel
from merge_ops.evaluation import parse_eval_set
from merge_ops.evaluation.evaluate import evaluate_model
from merge_ops.spec import MergeSpec
from merge_ops.static import driver
from tests.merge_ops.test_learned_engine import write_bert_family


def test_task_arithmetic_writes_each_experts_head(tmp_path: Path) -> None:
    base, experts = write_bert_family(tmp_path / "models")
    spec = MergeSpec(method="task_arithmetic", base=str(base), parameters={"lambda": 0.5},
                     experts=[{"model": str(p), "name": n} for n, p in experts.items()],
                     task_specific=[r"^classifier\."])
    out = tmp_path / "out"
    res = driver.run(JobContext(spec=spec, base=ResolvedModel(str(base), base),
                                experts=[ResolvedModel(str(p), p) for p in experts.values()], out_dir=out))
    assert res.artifacts == {"heads": "heads"}
    assert sorted(p.name for p in (out / "heads").iterdir()) == [f"{n}.safetensors" for n in sorted(experts)]
    for n, p in experts.items():
        want = {k: v for k, v in load_file(str(p / "model.safetensors")).items() if k.startswith("classifier.")}
        got = load_file(str(out / "heads" / f"{n}.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(k.startswith("classifier.") for k in load_file(str(out / "model.safetensors")))
    # the evaluation stage finds the head by the expert's name: every label equals the prediction
    # of the merged encoder with that head, computed here in float64 with transformers
    from transformers import AutoModel

    head = load_file(str(out / "heads" / "b.safetensors"))
    enc = AutoModel.from_pretrained(str(out), dtype=torch.float64).eval()
    rows = [[(7 * j + k) % 90 + 3 for k in range(2 + j % 5)] for j in range(6)]
    with torch.no_grad():
        labels = [int((enc(input_ids=torch.tensor([r])).last_hidden_state[0].mean(0)
                       @ head["classifier.weight"].double().T + head["classifier.bias"].double()).argmax())
                  for r in rows]
    s = parse_eval_set("".join(json.dumps({"input_ids": r, "label": y}) + "\n" for r, y in zip(rows, labels, strict=True)))
    assert evaluate_model(out, {"b": s}, heads={"b": "b"}).sets["b"].metrics["accuracy"] == pytest.approx(1.0)

