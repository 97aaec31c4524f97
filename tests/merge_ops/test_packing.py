"""Sequence packing: packed batches give the padded batch's outputs and gradients, in fewer rows."""

from __future__ import annotations

import pytest
import torch

from merge_ops.learned.adapters import build_adapter
from merge_ops.learned.batches import collate
from merge_ops.learned.engine import MergeEngine, load_merge_inputs
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.packing import pack
from tests.merge_ops.test_learned_engine import write_bert_family
from tests.toy_models import make_experts, write_llama

ROWS = [[(3 * i + j) % 97 + 1 for j in range(n)] for i, n in enumerate([2, 30, 9, 3, 10, 2, 30, 9, 17])]


def test_pack_places_every_token_once_in_fewer_rows():
    batch = collate(ROWS)
    pk = pack(batch.input_ids, batch.attention_mask)
    assert pk is not None
    assert pk.input_ids.shape[1] == 30 and pk.input_ids.shape[0] < len(ROWS)
    assert pk.input_ids.numel() < 0.7 * batch.input_ids.numel()
    m = batch.attention_mask.bool()
    assert torch.equal(pk.tokens(pk.input_ids), batch.input_ids[m])  # batch order, row-major
    assert torch.equal(pk.tokens(pk.position_ids), torch.cat([torch.arange(len(r)) for r in ROWS]))
    # a token attends exactly to its own sequence (and, causal, to the tokens before it)
    mask = pk.attention_mask(torch.float32, causal=True)[:, 0] == 0
    seg = pk.segments
    for p in range(seg.shape[0]):
        for q in range(seg.shape[1]):
            keys = mask[p, q].nonzero().flatten().tolist()
            if seg[p, q] >= 0:
                assert keys == [k for k in range(q + 1) if seg[p, k] == seg[p, q]]
            else:
                assert keys == [q]  # padding sees only itself: no fully masked row, no NaN
    equal = collate([[1, 2, 3]] * 4)
    assert pack(equal.input_ids, equal.attention_mask) is None  # equal rows: nothing to gain
    assert pack(torch.ones(2, 3, dtype=torch.long), torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left-padded


def _merged(base, experts, dtype, task_specific=()):
    adapter = build_adapter(base, dtype)
    inputs = load_merge_inputs(base, experts, [f"e{i}" for i in range(len(experts))],
                               task_specific=task_specific, dtype=dtype, only=adapter.used)
    adapter.bind(inputs.base)
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=0.3)
    return adapter, inputs, engine


def _both_ways(adapter, engine, head, batch):
    """(outputs, coefficient grads) packed, then padded."""
    res = []
    for packs in (None, False):  # None: the adapter probes (and packs); False: padded as given
        adapter._packs = packs
        engine.raw.grad = None
        out = adapter.forward(engine.merged_params(), head, batch, layers=(0, 1, 2))
        (out.logits.square().mean() + out.hidden[-1].square().mean()).backward()
        res.append((out, engine.raw.grad.clone(), adapter._packs))
    return res


@pytest.mark.parametrize("kind", ["encoder", "causal_lm"])
def test_packed_forward_equals_padded_forward(kind, tmp_path):
    if kind == "encoder":
        base, experts = write_bert_family(tmp_path)
        adapter, inputs, engine = _merged(base, list(experts.values()), torch.float64, [r"^classifier\."])
        head = inputs.heads["e1"]
    else:
        base = write_llama(tmp_path / "base", hidden=32, layers=2, intermediate=64, vocab=100, heads=4,
                           dtype=torch.float32)
        adapter, inputs, engine = _merged(base, make_experts(base, 2, tmp_path, scale=0.02,
                                                             dtype=torch.float32), torch.float64)
        head = {}
    batch = collate(ROWS)
    (got, g_packed, probed), (want, g_padded, _) = _both_ways(adapter, engine, head, batch)
    assert probed is True  # this architecture honours position ids and 4-D masks
    n_pred = len(ROWS) if kind == "encoder" else int(batch.attention_mask.sum())
    assert got.logits.shape == want.logits.shape and got.logits.shape[0] == n_pred
    torch.testing.assert_close(got.logits, want.logits, atol=1e-9, rtol=1e-9)
    assert len(got.hidden) == len(want.hidden) == 3  # every layer: embeddings and both blocks
    for a, b in zip(got.hidden, want.hidden, strict=True):
        assert a.shape == b.shape == (int(batch.attention_mask.sum()), 32)
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g_packed, g_padded, atol=1e-9, rtol=1e-7)
    assert g_packed.abs().sum() > 0


def test_architecture_that_ignores_position_ids_runs_padded(tmp_path):
    base, experts = write_bert_family(tmp_path)
    adapter, inputs, engine = _merged(base, list(experts.values()), torch.float64, [r"^classifier\."])
    emb = adapter.module.embeddings
    own = emb.forward
    emb.forward = lambda *a, position_ids=None, **k: own(*a, **k)  # drops them: packing would be wrong
    batch = collate(ROWS)
    (got, _, probed), (want, _, _) = _both_ways(adapter, engine, inputs.heads["e0"], batch)
    assert probed is False
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
