"""A causal LM's tasks without tensors of their own run as one forward per step (Adapter.task_groups):
the outputs, the Expert Merging loss and the coefficient gradients equal those of one forward per task
(float64), in memory and block-streamed from the files; tasks with heads keep one forward each."""

from __future__ import annotations

import pytest
import torch

from merge_ops.learned.batches import IndexSampler, collate, concat, sample
from merge_ops.learned.engine import MergeEngine, Step
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.teacher_cache import build_teacher_cache
from merge_ops.methods import expert_merging
from tests.merge_ops.test_learned_stream import _setup, llama  # noqa: F401
from tests.merge_ops.test_learned_stream_files import _setup_files


def _rows(task: int, n: int = 6) -> list[list[int]]:
    """Rows of mixed lengths; task 1's are prompt-completion rows (a loss mask), the others' plain."""
    rows = [[(5 * j + 11 * task + m) % 60 + 1 for m in range(3 + (2 * j + task) % 6)] for j in range(n)]
    if task == 1:
        return [sample(r, [0] * (len(r) // 2) + [1] * (len(r) - len(r) // 2)) for r in rows]
    return rows


def test_concat_pads_and_keeps_every_rows_mask():
    a, b = collate(_rows(0)[:2]), collate(_rows(1)[:3])
    c = concat([a, b])
    assert c.input_ids.shape == (5, max(a.input_ids.shape[1], b.input_ids.shape[1]))
    assert torch.equal(c.attention_mask.sum(1), torch.cat([a.attention_mask.sum(1), b.attention_mask.sum(1)]))
    assert torch.equal(c.scored(), torch.cat([a.attention_mask.bool()[a.attention_mask.bool()], b.scored()]))


def test_forward_many_equals_one_forward_per_batch(llama):  # noqa: F811
    adapter, inputs = _setup(llama)
    batches = [collate(_rows(t)[:4]) for t in range(3)]
    params = dict(inputs.base)
    together = adapter.forward_many(params, {}, batches, layers=[1, 3])
    for b, got in zip(batches, together, strict=True):
        want = adapter.forward(params, {}, b, layers=[1, 3])
        assert torch.allclose(got.logits, want.logits, rtol=0, atol=1e-10)
        assert all(torch.allclose(x, y, rtol=0, atol=1e-10) for x, y in zip(got.hidden, want.hidden, strict=True))
    assert adapter.task_groups([{}, {}, {}]) == [[0, 1, 2]]
    assert adapter.task_groups([{"lm_head.weight": torch.zeros(1)}, {}]) == [[0], [1]]


@pytest.mark.parametrize("files", [False, True], ids=["in_memory", "streamed_files"])
def test_expert_merging_step_equals_per_task_forwards(llama, files, monkeypatch):  # noqa: F811
    """One shared forward (what the Objective does now) against the joint loss written per task."""
    from merge_ops.learned import teacher_cache

    monkeypatch.setattr(teacher_cache, "CACHE_DTYPE", torch.float64)
    ref_adapter, ref_inputs = _setup(llama)
    adapter, inputs = _setup_files(llama) if files else (ref_adapter, ref_inputs)
    tasks = list(ref_inputs.experts)
    samples = {t: _rows(i, 8) for i, t in enumerate(tasks)}
    layers, beta, a0 = [2], [1.0, 0.5, 2.0], [0.2, 0.3, 0.4]
    cache = build_teacher_cache(ref_adapter, llama[1], {}, samples, layers, base=ref_inputs.base,
                                batch_size=4, dtype=torch.float64)

    def engine_for(inp):
        e = MergeEngine(inp, ParamGroups(inp.merged_shapes(), "layer"), init=a0, parameterisation="sigmoid").double()
        with torch.no_grad():
            e.raw.add_(0.5 * torch.randn(e.raw.shape, generator=torch.Generator().manual_seed(3)))
        return e

    engine = engine_for(inputs)
    if files:
        engine.stream(adapter)
    obj = expert_merging.Objective(engine, adapter, cache, IndexSampler(dict.fromkeys(tasks, 8), 3, seed=4),
                                   alpha0=torch.tensor(a0, dtype=torch.float64), beta=beta, temperature=2.0,
                                   hidden_weight=0.7, gamma=2.0)
    assert adapter.task_groups([{} for _ in tasks]) == [[0, 1, 2]]
    s = Step(engine)
    with engine.streamer.using(engine) if files else _Null():
        obj(0, s)
        s.finish()
    got, grad = s.total, engine.raw.grad.clone()

    ref = engine_for(ref_inputs)  # the same table, in memory, one forward per task
    replay = IndexSampler(dict.fromkeys(tasks, 8), 3, seed=4)
    params = ref.merged_params()
    joint = 2.0 * expert_merging.regulariser(ref.coefficients(), torch.tensor(a0, dtype=torch.float64))
    for k, t in enumerate(tasks):
        batch, tgt = cache.batch(t, replay.next(t))
        out = ref_adapter.forward(params, {}, batch, layers=layers)
        scored = batch.scored()
        if scored is not None:
            out.logits = out.logits[scored]
        lg, hd = expert_merging.alignment_loss(out, tgt, temperature=2.0, hidden_weight=0.7)
        joint = joint + beta[k] * (lg + hd) / len(tasks)
    joint.backward()
    assert ref.raw.grad.abs().max() > 1e-6
    torch.testing.assert_close(grad, ref.raw.grad, rtol=0, atol=1e-9)
    assert float(joint.detach()) == pytest.approx(got, rel=1e-10)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
