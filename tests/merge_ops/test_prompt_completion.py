"""Prompt-completion calibration rows: parsed, tokenised apart, and scored on the completion only."""

from __future__ import annotations

import json
import math

import pytest
import torch

from merge_ops.calibration import parse_rows
from merge_ops.context import JobContext, ResolvedModel
from merge_ops.errors import CalibrationError
from merge_ops.learned import teacher_cache
from merge_ops.learned.adapters import build_adapter
from merge_ops.learned.batches import collate, sample, token_ids_by_line
from merge_ops.learned.engine import MergeEngine, load_merge_inputs
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.teacher_cache import build_teacher_cache
from merge_ops.methods import expert_merging
from merge_ops.runner import run_method
from merge_ops.spec import spec_from_dict
from tests.merge_ops.test_evaluation import write_byte_tokenizer
from tests.merge_ops.test_learned_expert_merging import llama  # noqa: F401  (a fixture)


def _lines(*objs) -> list[str]:
    return [json.dumps(o) for o in objs]


def test_rows_parse_and_bad_rows_name_their_line():
    rows = parse_rows(_lines({"prompt": "Q: 1+1?", "completion": " 2"},
                             {"input_ids": [5, 6, 7], "completion_mask": [0, 0, 1]}, {"text": "plain"}))
    assert (rows[0].text, rows[0].completion) == ("Q: 1+1?", " 2")
    assert rows[1].completion_mask == (0, 0, 1) and rows[2].completion is None
    for bad, what in [({"prompt": "Q"}, "prompt-completion"), ({"prompt": "Q", "completion": " "}, "non-empty"),
                      ({"input_ids": [5, 6], "completion_mask": [0]}, "one per input id"),
                      ({"input_ids": [5, 6], "completion_mask": [0, 0]}, "at least one"),
                      ({"input_ids": [5, 6], "completion_mask": [1, 0]}, "at least one"),  # nothing predicts it
                      ({"input_ids": [5, 6], "completion_mask": [0, 2]}, "0/1"),
                      ({"input_ids": [5, 6], "completion_mask": [0, True]}, "0/1")]:
        with pytest.raises(CalibrationError, match=what) as e:
            parse_rows(_lines({"text": "ok"}, bad), "cal.jsonl")
        assert e.value.message.startswith("cal.jsonl:2:")


def test_text_pairs_tokenise_apart_and_only_completion_predictions_are_scored(tmp_path):
    tok = write_byte_tokenizer(tmp_path)
    rows = parse_rows(_lines({"prompt": "ab", "completion": "cd"}, {"text": "xyz"},
                             {"input_ids": [9, 8, 7, 6], "completion_mask": [0, 1, 1, 0]}))
    ids = token_ids_by_line(rows, tok, 16, "cal")
    a, b, c, d = (tok.convert_tokens_to_ids(ch) for ch in "abcd")
    assert list(ids[1]) == [1, a, b, c, d] and ids[1].completion == (0, 0, 0, 1, 1)  # BOS on the prompt only
    assert ids[2].completion is None and ids[3].completion == (0, 1, 1, 0)
    batch = collate([ids[1], ids[2], ids[3]], pad_id=0)
    # position t predicts token t + 1: scored when that token belongs to the completion
    want = [[0, 0, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]  # row 2 (plain text): every real position
    assert batch.loss_mask.long().tolist() == want
    assert batch.scored().tolist() == [False, False, True, True, False, True, True, True, True, True, True,
                                       False, False]
    assert collate([ids[2]]).loss_mask is None  # no prompt-completion row: nothing changes
    with pytest.raises(CalibrationError, match="prompt fills max_length"):
        token_ids_by_line(parse_rows(_lines({"prompt": "abcdef", "completion": "g"})), tok, 4, "cal")


def test_teacher_cache_alignment_and_nll_use_completion_positions_only(llama, monkeypatch):  # noqa: F811
    """Against float64 computations on the plain HF models: the cache keeps the teacher's logits at
    completion-predicting positions only, the soft CE is over those, the NLL over completion tokens."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(teacher_cache, "CACHE_DTYPE", torch.float64)
    base, experts, _ = llama
    tasks = list(experts)
    adapter = build_adapter(base, torch.float64)
    inputs = load_merge_inputs(base, list(experts.values()), tasks, dtype=torch.float64, only=adapter.used)
    adapter.bind(inputs.base)
    rows = [sample([3 + j, 4 + j, 5, 6 + j % 3, 7], [0, 0, 1, 1, 1] if j % 2 else [0, 0, 0, 0, 1]) for j in range(6)]
    rows.append(sample([9, 10, 11]))  # a plain row among them: all of its positions count
    samples = dict.fromkeys(tasks, rows)
    cache = build_teacher_cache(adapter, experts, {}, samples, [1], base=inputs.base, batch_size=3,
                                dtype=torch.float64)
    scored = [sum(x.completion[1:]) if x.completion else len(x) for x in rows]
    assert [t.shape[0] for t in cache.tasks["x"].logits] == scored
    teacher = AutoModelForCausalLM.from_pretrained(str(experts["x"]), dtype=torch.float64).eval()
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "task"), init=[0.3, 0.6],
                         parameterisation="none")
    student = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64).eval()
    student.load_state_dict({n: p.detach() for n, p in engine.merged_params().items()}, strict=False)
    idx = [1, 6, 2, 4]
    batch, tgt = cache.batch("x", idx)
    out = adapter.forward(engine.merged_params(), {}, batch, layers=[1])
    obj = expert_merging.Objective(engine, adapter, cache, None, alpha0=torch.tensor([0.3, 0.6]), beta=[1, 1],
                                   temperature=2.0, hidden_weight=0.0, gamma=0.0)
    [(lg, _)] = obj.align(engine.merged_params(), ["x"], [idx])
    ce, n, nll, m = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for i in idx:
            x = torch.tensor([rows[i]])
            c = rows[i].completion  # plain rows: every position, as before
            keep = list(range(len(rows[i]))) if c is None else [t for t in range(len(c) - 1) if c[t + 1]]
            zt, zs = teacher(input_ids=x).logits[0, keep] / 2.0, student(input_ids=x).logits[0, keep] / 2.0
            ce += float(-(zt.softmax(-1) * zs.log_softmax(-1)).sum()) * 4.0
            n += len(keep)
            nxt = [t for t in keep if t + 1 < len(rows[i])]
            nll -= float(student(input_ids=x).logits[0, nxt].log_softmax(-1).gather(
                -1, x[0, [t + 1 for t in nxt], None]).sum())
            m += len(nxt)
    assert float(lg.detach()) == pytest.approx(ce / n, rel=1e-9)
    total, count = expert_merging.next_token_nll(out, batch)
    assert count == m and float(total) == pytest.approx(nll, rel=1e-9)


@pytest.mark.parametrize("method", ["expert_merging", "adamerging"])
def test_prompt_completion_calibration_runs_a_learned_merge(llama, tmp_path, method):  # noqa: F811
    """From a {"input_ids", "completion_mask"} file through the driver to a written model."""
    base, experts, _ = llama
    cal = {}
    for i, t in enumerate(experts):
        cal[t] = tmp_path / f"{t}.jsonl"
        cal[t].write_text("".join(json.dumps({"input_ids": [3 + i, 4 + j % 5, 5, 6 + j % 7],
                                              "completion_mask": [0, 0, 1, 1]}) + "\n" for j in range(8)))
    spec = spec_from_dict({"method": method, "base": str(base),
                           "experts": [{"model": str(p), "name": n} for n, p in experts.items()],
                           "parameters": {"steps": 2, "batch_size": 4},
                           "calibration": {"tasks": {n: str(p) for n, p in cal.items()}}})
    ctx = JobContext(spec=spec, base=ResolvedModel(str(base), base),
                     experts=[ResolvedModel(str(p), p) for p in experts.values()], out_dir=tmp_path / "out",
                     calibration=cal)
    res = run_method(ctx)
    assert (ctx.out_dir / "model.safetensors").exists()
    assert math.isfinite(res.metrics["loss_final"]) and res.metrics["loss_final"] > 0
