"""File-backed streamed learning (store.py + streaming.py's BlockCache): the coefficient gradients
equal the in-memory engine's (float64, 1e-9), the inputs' dtype is kept (nothing model-sized is held
in the compute dtype), the device holds a bounded number of blocks, and the teacher cache lives on
disk with the same targets as the experts' own forward."""

from __future__ import annotations

import pytest
import torch

from merge_ops.learned.adapters import build_adapter
from merge_ops.learned.engine import MergeEngine, Step
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.store import LazyBase, LazyTaskVectors, open_merge_inputs
from merge_ops.learned.streaming import CACHED_BLOCKS, find_blocks, streamer_for
from merge_ops.learned.teacher_cache import build_teacher_cache, read_expert_params
from merge_ops.methods.adamerging import entropy_loss
from merge_ops.methods.expert_merging import alignment_loss, regulariser
from tests.merge_ops.test_learned_stream import _batch, _grad, _groups, _setup, bert, llama  # noqa: F401
from tests.toy_models import make_experts, write_llama


def _setup_files(family, dtype=torch.float64):
    base, experts, specific = family
    adapter = build_adapter(base, dtype, packing=True, skeleton=True)
    st = streamer_for(adapter)
    inputs = open_merge_inputs(base, list(experts.values()), list(experts), task_specific=specific,
                               dtype=dtype, only=adapter.used, resident=st.held)
    st.attach(inputs, "cpu")
    adapter.bind(inputs.held_base())
    return adapter, inputs


def _tie(folder) -> None:
    """Rewrite a write_llama checkpoint as a tied one (SmolLM2's layout): no lm_head, tied config."""
    import json

    from merge_ops.checkpoint import CheckpointReader, CheckpointWriter, TensorSpec

    with CheckpointReader(folder) as r:
        tensors = {n: r.read(n) for n in r.names() if n != "lm_head.weight"}
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    with CheckpointWriter(folder, [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 1 << 62) as w:
        for n, t in tensors.items():
            w.write(n, t)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tied_llama")
    base = write_llama(root / "base", hidden=32, layers=3, intermediate=64, vocab=64, heads=4, dtype=torch.float32)
    experts = dict(zip("xy", make_experts(base, 2, root, scale=0.02, dtype=torch.float32), strict=True))
    for f in [base, *experts.values()]:
        _tie(f)
    return base, experts, []


@pytest.mark.parametrize("family", ["llama", "bert", "tied_llama"])
@pytest.mark.parametrize("method", ["adamerging", "expert_merging_chunks"])
def test_file_backed_gradient_equals_in_memory(family, method, request):
    fam = request.getfixturevalue(family)
    ref_adapter, ref_inputs = _setup(fam)
    adapter, inputs = _setup_files(fam)
    assert inputs.constant == ref_inputs.constant
    assert inputs.merged_shapes() == ref_inputs.merged_shapes()
    names = ref_inputs.experts
    n_layers = int(adapter.module.config.num_hidden_layers)
    layers = [n_layers // 2, n_layers] if method != "adamerging" else []
    targets = {}
    if layers:  # teachers from the in-memory inputs: each expert's own weights
        probe = MergeEngine(ref_inputs, ParamGroups(ref_inputs.merged_shapes(), "layer"))
        for k, t in enumerate(names):
            with torch.no_grad():
                targets[t] = ref_adapter.forward(probe.expert_params(k), ref_inputs.heads.get(t, {}), _batch(k),
                                                 layers=layers)
    a0 = torch.full((len(names),), 0.3, dtype=torch.float64)

    def make_loss(ad, inp):
        def loss(s: Step) -> None:
            for k, t in enumerate(names):
                out = ad.forward(s.params, inp.heads.get(t, {}), _batch(k), layers=layers)
                if not layers:
                    s.backward(entropy_loss(out.logits, normalize=True, diversity=1.0))
                else:
                    lg, hd = alignment_loss(out, targets[t], temperature=2.0, hidden_weight=1.0)
                    s.backward((lg + hd) / len(names))
            if layers:
                s.backward(5.0 * regulariser(s.engine.coefficients(), a0))
        return loss

    grouping = "layer" if method == "adamerging" else "chunk"
    param = "none" if method == "adamerging" else "sigmoid"

    def engine_for(inp):
        e = MergeEngine(inp, _groups(inp, grouping), init=0.3, parameterisation=param).double()
        with torch.no_grad():
            e.raw.add_(0.4 * torch.randn(e.raw.shape, generator=torch.Generator().manual_seed(2)))
        return e

    ref = _grad(engine_for(ref_inputs), make_loss(ref_adapter, ref_inputs))
    got = _grad(engine_for(inputs).stream(adapter), make_loss(adapter, inputs))
    if family == "tied_llama":  # learned on the Step path, not held (read from the files), sparse lookup
        assert "model.embed_tokens.weight" in inputs.task_vectors and not inputs.base.resident
        assert adapter.module.get_input_embeddings().sparse and adapter.module.get_input_embeddings().weight.is_meta
    assert ref.abs().max() > 1e-6
    assert torch.allclose(got, ref, rtol=0, atol=1e-9), (got - ref).abs().max()


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bf16_llama")
    base = write_llama(root / "base", hidden=32, layers=4, intermediate=64, vocab=64, heads=4)
    experts = dict(zip("xy", make_experts(base, 2, root, scale=0.02), strict=True))
    return base, experts, []


def test_inputs_keep_their_dtype_and_the_device_holds_few_blocks(bf16_llama):
    adapter, inputs = _setup_files(bf16_llama, torch.float32)
    assert isinstance(inputs.base, LazyBase) and isinstance(inputs.task_vectors, LazyTaskVectors)
    blocks = find_blocks(adapter.module)
    prefixes = [p for p, _ in blocks]
    # nothing model-sized held (untied head: every tensor belongs to a streamed unit), no τ anywhere
    assert inputs.base.resident == {} and inputs.resident_mib() == (0.0, 0.0)
    assert all(p.is_meta for p in adapter.module.parameters())
    name = next(n for n in inputs.task_vectors if n.startswith(prefixes[1]))
    b, experts, is_experts = inputs.entry(name)
    assert is_experts and b.dtype == torch.bfloat16 and all(e.dtype == torch.bfloat16 for e in experts)
    # τ formed from the stored bf16 tensors equals the float32 difference of the checkpoints
    from merge_ops.checkpoint import CheckpointReader
    with CheckpointReader(bf16_llama[1]["y"]) as r, CheckpointReader(bf16_llama[0]) as rb:
        want = r.read(name).float() - rb.read(name).float()
    assert torch.equal(inputs.task_vectors[name][1], want)

    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=0.4).stream(adapter)
    assert engine.raw.requires_grad and [p for p in engine.parameters() if p.requires_grad] == [engine.raw]

    def loss(s: Step) -> None:
        for k in range(len(inputs.experts)):
            s.backward(entropy_loss(adapter.forward(s.params, {}, _batch(k)).logits))

    g = _grad(engine, loss)
    cache = adapter._streamer.cache
    assert g.abs().max() > 0 and torch.isfinite(g).all()
    assert cache.max_held <= CACHED_BLOCKS + 1 < len(blocks) + 1  # bounded, fewer than the model's blocks
    assert cache.reads >= 2 * len(blocks)  # each task's forward and backward stream the blocks


def test_teacher_cache_is_on_disk_and_matches_the_experts(bf16_llama):
    base, experts, _ = bf16_llama
    samples = {t: [[(5 * j + i) % 60 + 1 for j in range(3 + i)] for i in range(5)] for t in experts}
    adapter, inputs = _setup_files(bf16_llama, torch.float32)
    cache = build_teacher_cache(adapter, experts, inputs.heads, samples, [2], base=inputs.base, batch_size=2,
                                dtype=torch.float32)
    # nothing resident: the task caches hold row indices into their files
    for tc in cache.tasks.values():
        assert len(tc.logits.ids) == len(tc.samples) and tc.nbytes() > 0
        assert not any(isinstance(v, torch.Tensor) for v in vars(tc.logits).values())
    assert cache.nbytes() == sum(tc.rows.nbytes for tc in cache.tasks.values())
    # the targets: each expert's own full forward (an in-memory model of it), to fp16 rounding
    ref = build_adapter(base, torch.float32)
    for t, folder in experts.items():
        params = read_expert_params(folder, ref.names, torch.float32, "cpu")
        batch, tgt = cache.batch(t, [0, 3])
        with torch.no_grad():
            out = ref.forward(params, {}, batch, layers=[2])
        assert tgt.logits.dtype == torch.float32
        assert torch.allclose(tgt.logits, out.logits, rtol=2e-3, atol=2e-3)
        assert torch.allclose(tgt.hidden[0], out.hidden[0], rtol=2e-3, atol=2e-3)
