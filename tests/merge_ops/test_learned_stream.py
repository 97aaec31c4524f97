"""Block-streamed learning: the coefficient gradients equal the in-memory engine's (float64, 1e-9),
for AdaMerging's entropy and Expert Merging's alignment loss (layer and chunk tables, fixed m = 0
tensors), on a tiny Llama and a tiny BERT; 2 gloo processes learn the same coefficients as one."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from merge_ops.learned.adapters import build_adapter
from merge_ops.learned.batches import collate
from merge_ops.learned.engine import MergeEngine, Step, load_merge_inputs
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.streaming import find_blocks
from merge_ops.learned.teacher_cache import Targets
from merge_ops.methods.adamerging import entropy_loss
from merge_ops.methods.expert_merging import alignment_loss, regulariser
from tests.merge_ops.test_learned_engine import write_bert_family
from tests.toy_models import make_experts, write_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stream_llama")
    base = write_llama(root / "base", hidden=32, layers=3, intermediate=64, vocab=64, heads=4,
                       dtype=torch.float32)
    experts = dict(zip("xyz", make_experts(base, 3, root, scale=0.02, dtype=torch.float32), strict=True))
    return base, experts, []


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):
    base, experts = write_bert_family(tmp_path_factory.mktemp("stream_bert"))
    return base, experts, [r"^classifier\."]


def _setup(family):
    base, experts, specific = family
    adapter = build_adapter(base, torch.float64, packing=True)
    inputs = load_merge_inputs(base, list(experts.values()), list(experts), task_specific=specific,
                               dtype=torch.float64, only=adapter.used)
    adapter.bind(inputs.base)
    return adapter, inputs


def _batch(task: int):
    rows = [[(3 * j + 7 * task + m) % 60 + 1 for m in range(3 + (j + task) % 5)] for j in range(4)]
    return collate(rows, 0)


def _grad(engine: MergeEngine, loss_fn) -> torch.Tensor:
    engine.raw.grad = None
    s = Step(engine)
    with engine.streamer.using(engine) if engine.streamer is not None else _null():
        loss_fn(s)
        s.finish()
    return engine.raw.grad.detach().clone()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _groups(inputs, kind: str) -> ParamGroups:
    shapes = inputs.merged_shapes()
    if kind == "chunk":  # m = 0 (fixed), 1 and 3 chunks mixed
        return ParamGroups(shapes, "chunk", chunks={n: i % 3 if i % 3 != 2 else 3
                                                    for i, (n, _) in enumerate(shapes)})
    return ParamGroups(shapes, kind)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("grouping", ["layer", "block"])
def test_adamerging_streamed_gradient_equals_in_memory(family, grouping, request):
    adapter, inputs = _setup(request.getfixturevalue(family))
    names = inputs.experts
    assert len(find_blocks(adapter.module)) >= 2

    def loss(s: Step) -> None:
        for k, t in enumerate(names):
            logits = adapter.forward(s.params, inputs.heads.get(t, {}), _batch(k)).logits
            s.backward(entropy_loss(logits, normalize=True, diversity=1.0))

    engine = MergeEngine(inputs, _groups(inputs, grouping), init=0.3, parameterisation="none").double()
    torch.manual_seed(0)
    with torch.no_grad():
        engine.raw.add_(0.2 * torch.rand_like(engine.raw))
    ref = _grad(engine, loss)
    got = _grad(engine.stream(adapter), loss)
    assert ref.abs().max() > 1e-6  # a gradient that can differ
    assert torch.allclose(got.double(), ref.double(), rtol=0, atol=1e-9), (got - ref).abs().max()


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("grouping", ["layer", "chunk"])
def test_expert_merging_streamed_gradient_equals_in_memory(family, grouping, request):
    adapter, inputs = _setup(request.getfixturevalue(family))
    names = inputs.experts
    n_layers = int(adapter.module.config.num_hidden_layers)
    layers = [n_layers // 2, n_layers]
    probe = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=0.5,
                        parameterisation="sigmoid")
    targets = {}
    for k, t in enumerate(names):  # teachers: each expert's own weights, no gradient
        with torch.no_grad():
            out = adapter.forward(probe.expert_params(k), inputs.heads.get(t, {}), _batch(k), layers=layers)
        targets[t] = Targets(out.logits, out.hidden)
    a0 = torch.full((len(names),), 0.3, dtype=torch.float64)

    def loss(s: Step) -> None:
        for k, t in enumerate(names):
            out = adapter.forward(s.params, inputs.heads.get(t, {}), _batch(k), layers=layers)
            lg, hd = alignment_loss(out, targets[t], temperature=2.0, hidden_weight=1.0)
            s.backward((lg + hd) / len(names))
        s.backward(5.0 * regulariser(s.engine.coefficients(), a0))

    engine = MergeEngine(inputs, _groups(inputs, grouping), init=[0.3 + 0.1 * k for k in range(len(names))],
                         parameterisation="sigmoid").double()
    with torch.no_grad():
        engine.raw.add_(0.5 * torch.randn(engine.raw.shape, generator=torch.Generator().manual_seed(2)))
    ref = _grad(engine, loss)
    got = _grad(engine.stream(adapter), loss)
    assert ref.abs().max() > 1e-6
    assert torch.allclose(got, ref, rtol=0, atol=1e-9), (got - ref).abs().max()


def test_streamer_is_inert_outside_a_step(llama):
    """The teacher cache and the packing probe run the same module on other weights: outside a step the
    wrapped blocks are the plain blocks."""
    adapter, inputs = _setup(llama)
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=0.9,
                         parameterisation="clamp")
    with torch.no_grad():
        plain = adapter.forward({}, {}, _batch(0)).logits
        engine.stream(adapter)
        again = adapter.forward({}, {}, _batch(0)).logits
        with engine.streamer.using(engine):
            merged = adapter.forward({}, {}, _batch(0)).logits
    assert torch.equal(plain, again)
    assert not torch.allclose(plain, merged)


# -- data parallel: 2 gloo processes vs 1 ------------------------------------------------------------
def _calib(root: Path, tasks: list[str]) -> dict[str, Path]:
    out = {}
    for i, t in enumerate(tasks):
        p = root / f"{t}.jsonl"
        rows = [{"input_ids": [(5 * j + i * 11 + m) % 63 + 1 for m in range(2 + j % 6)]} for j in range(12)]
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[t] = p
    return out


def _run_job(method: str, base: Path, experts: dict[str, Path], cal: dict[str, Path], out: Path) -> dict:
    from merge_ops.context import JobContext, ResolvedModel
    from merge_ops.runner import run_method
    from merge_ops.spec import spec_from_dict

    params = {"steps": 3, "batch_size": 4}
    if method == "expert_merging":
        params.update(chunked=True, lr=0.3)
    spec = spec_from_dict({
        "method": method, "base": str(base), "experts": [{"model": str(p), "name": n} for n, p in experts.items()],
        "parameters": params, "calibration": {"tasks": {n: str(p) for n, p in cal.items()}}, "seed": 3})
    ctx = JobContext(spec=spec, base=ResolvedModel(str(base), base),
                     experts=[ResolvedModel(str(p), p) for p in experts.values()], out_dir=out, calibration=cal)
    run_method(ctx)
    return json.loads((out / "coefficients.json").read_text())


def _rank_main(rank: int, world: int, port: int, method: str, base: str, experts: dict, cal: dict,
               out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run_job(method, Path(base), {n: Path(p) for n, p in experts.items()},
                 {n: Path(p) for n, p in cal.items()}, Path(out) / f"rank{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["adamerging", "expert_merging"])
def test_two_gloo_ranks_learn_the_coefficients_of_one_process(llama, tmp_path, method, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("ALLOY_LEARNED_MODE", "streamed")  # the children inherit it: streamed + data parallel

    base, experts, _ = llama
    # 3 tasks over 2 ranks: rank 0 computes tasks 0 and 2 (and the regulariser), rank 1 task 1
    cal = _calib(tmp_path, list(experts))
    one = _run_job(method, base, experts, cal, tmp_path / "single")
    mp.spawn(_rank_main, args=(2, _free_port(), method, str(base), {n: str(p) for n, p in experts.items()},
                               {n: str(p) for n, p in cal.items()}, str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}" / "coefficients.json").read_text())
        a = torch.tensor(got["values"], dtype=torch.float64)
        b = torch.tensor(one["values"], dtype=torch.float64)
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    ref = torch.tensor(one["values"], dtype=torch.float64)
    assert not torch.allclose(ref, ref.flatten()[0].expand_as(ref))  # learning moved the table
