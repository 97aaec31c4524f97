"""Expert Merging / Expert Merging++: loss vs a float64 hand computation, chunk allocation, teacher
release, and run() end to end on a tiny BERT with heads and a tiny Llama."""

from __future__ import annotations

import gc
import itertools
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_ops.context import JobContext, ResolvedModel
from merge_ops.errors import SpecError
from merge_ops.learned import chunking, driver, teacher_cache
from merge_ops.learned.adapters import Output, build_adapter
from merge_ops.learned.batches import IndexSampler, collate
from merge_ops.learned.coefficients import Coefficients
from merge_ops.learned.engine import MergeEngine, Step, load_merge_inputs
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.teacher_cache import build_teacher_cache
from merge_ops.methods import expert_merging
from merge_ops.runner import run_merge, run_method
from merge_ops.spec import spec_from_dict
from tests.merge_ops.test_learned_engine import BERT, write_bert_family
from tests.toy_models import make_experts, write_llama

EXCLUDE = "(?i)(norm|embed|bias|lm_head)"


def _calib(root: Path, tasks: list[str], vocab: int, n: int = 12) -> dict[str, Path]:
    out = {}
    for i, t in enumerate(tasks):
        p = root / f"{t}.jsonl"
        rows = [{"input_ids": [(5 * j + i * 11 + m) % (vocab - 1) + 1 for m in range(2 + j % 6)]}
                for j in range(n)]
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[t] = p
    return out


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("em_bert")
    base, experts = write_bert_family(root)
    return base, experts, _calib(root, list(experts), BERT["vocab_size"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("em_llama")
    base = write_llama(root / "base", hidden=32, layers=2, intermediate=64, vocab=64, heads=4,
                       dtype=torch.float32)
    experts = dict(zip(["x", "y"], make_experts(base, 2, root, scale=0.02, dtype=torch.float32), strict=True))
    return base, experts, _calib(root, list(experts), 64)


def _spec(base: Path, experts: dict[str, Path], cal: dict[str, Path], heads: bool, **params):
    return spec_from_dict({
        "method": "expert_merging", "base": str(base),
        "experts": [{"model": str(p), "name": n} for n, p in experts.items()],
        "parameters": {"steps": 3, "batch_size": 4, **params},
        "task_specific": [r"^classifier\."] if heads else [],
        "calibration": {"tasks": {n: str(p) for n, p in cal.items()}}, "seed": 3,
    })


def _ctx(out: Path, base: Path, experts: dict[str, Path], cal: dict[str, Path], heads: bool, **params):
    return JobContext(spec=_spec(base, experts, cal, heads, **params), base=ResolvedModel(str(base), base),
                      experts=[ResolvedModel(str(p), p) for p in experts.values()], out_dir=out,
                      calibration=cal)


# -- the loss ----------------------------------------------------------------------------------------
def test_loss_equals_float64_hand_computation(bert, monkeypatch):
    """Soft CE ×T², hidden MSE, β per task, mean over tasks, γ·mean|α − α₀| — written out by hand."""
    from transformers import BertConfig, BertModel

    monkeypatch.setattr(teacher_cache, "CACHE_DTYPE", torch.float64)  # exact targets for the check
    base, experts, cal = bert
    tasks = list(experts)
    adapter = build_adapter(base, torch.float64)
    inputs = load_merge_inputs(base, list(experts.values()), tasks, task_specific=[r"^classifier\."],
                               dtype=torch.float64, only=lambda n: adapter.used(n) and "LayerNorm" not in n
                               and "bias" not in n and "embeddings" not in n)
    adapter.bind(inputs.base)
    samples = {t: [json.loads(x)["input_ids"] for x in cal[t].read_text().splitlines()] for t in tasks}
    layers, T, hw, gamma, beta, a0 = [1], 2.0, 0.7, 3.0, [1.0, 0.5, 2.0], [0.1, 0.2, 0.3]
    cache = build_teacher_cache(adapter, experts, inputs.heads, samples, layers, base=inputs.base,
                                batch_size=5, dtype=torch.float64)
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=a0,
                         parameterisation="sigmoid")
    with torch.no_grad():
        engine.raw.add_(torch.randn(engine.raw.shape, generator=torch.Generator().manual_seed(5)))
    obj = expert_merging.Objective(engine, adapter, cache, IndexSampler(dict.fromkeys(tasks, 12), 4, seed=9),
                                   alpha0=torch.tensor(a0, dtype=torch.float64), beta=beta, temperature=T, hidden_weight=hw,
                                   gamma=gamma)
    s = Step(engine)
    obj(0, s)
    s.finish()
    got, grad = s.total, engine.raw.grad.clone()
    # the per-task backward of the two-phase step gives the gradient of the plain joint loss
    engine.raw.grad = None
    joint_sampler = IndexSampler(dict.fromkeys(tasks, 12), 4, seed=9)
    params = engine.merged_params()
    joint = expert_merging.regulariser(engine.coefficients(), torch.tensor(a0, dtype=torch.float64)) * gamma
    for k, t in enumerate(tasks):
        batch, tgt = cache.batch(t, joint_sampler.next(t))
        out = adapter.forward(params, inputs.heads[t], batch, layers=layers)
        lg, hd = expert_merging.alignment_loss(out, tgt, temperature=T, hidden_weight=hw)
        joint = joint + beta[k] * (lg + hd) / 3
    joint.backward()
    torch.testing.assert_close(grad, engine.raw.grad, rtol=1e-6, atol=1e-9)
    assert float(joint) == pytest.approx(got, rel=1e-12)

    # reference: merged weights from the files, HF BertModel in float64, formulas written out
    replay = IndexSampler(dict.fromkeys(tasks, 12), 4, seed=9)
    alpha = engine.coefficients().detach().double()
    rows = engine.groups.slots
    b = load_file(str(base / "model.safetensors"))
    es = {t: load_file(str(p / "model.safetensors")) for t, p in experts.items()}

    def bert_out(sd, batch):
        m = BertModel(BertConfig(**BERT)).double().eval()
        m.load_state_dict({n: v.double() for n, v in sd.items() if n in m.state_dict()}, strict=False)
        with torch.no_grad():
            o = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        mask = batch.attention_mask.unsqueeze(-1).double()
        pooled = (o.last_hidden_state * mask).sum(1) / mask.sum(1)
        return pooled, o.hidden_states[1][batch.attention_mask.bool()]

    merged = {n: b[n].double() + (sum(alpha[rows[n].row, k] * (es[t][n].double() - b[n].double())
                                      for k, t in enumerate(tasks)) if n in rows else 0.0) for n in b}
    align = 0.0
    for k, t in enumerate(tasks):
        batch = collate([samples[t][i] for i in replay.next(t)])
        w, bias = es[t]["classifier.weight"].double(), es[t]["classifier.bias"].double()
        ps, hs = bert_out(merged, batch)
        pt, ht = bert_out(es[t], batch)
        zs, zt = ps @ w.T + bias, pt @ w.T + bias
        p = torch.exp(zt / T) / torch.exp(zt / T).sum(-1, keepdim=True)
        logq = zs / T - torch.log(torch.exp(zs / T).sum(-1, keepdim=True))
        ce = T * T * (-(p * logq).sum(-1)).mean()
        mse = ((hs - ht) ** 2).sum() / hs.numel()
        align += beta[k] * (float(ce) + hw * float(mse))
    reg = float(sum(abs(alpha[r, k] - a0[k]) for r in range(alpha.shape[0]) for k in range(3))) / alpha.numel()
    want = align / 3 + gamma * reg
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert obj.last["reg"] == pytest.approx(reg, rel=1e-9) and obj.last["hidden"] > 0


def test_causal_lm_alignment_is_token_level_over_real_tokens(llama):
    """With the merged weights equal to expert k's, hidden MSE is 0 and the soft CE is the teacher's
    entropy: teacher rows line up with the student's real tokens despite padding."""
    base, experts, cal = llama
    tasks = list(experts)
    adapter = build_adapter(base, torch.float32)
    inputs = load_merge_inputs(base, list(experts.values()), tasks, only=adapter.used)
    adapter.bind(inputs.base)
    samples = {t: [json.loads(x)["input_ids"] for x in cal[t].read_text().splitlines()] for t in tasks}
    cache = build_teacher_cache(adapter, experts, {}, samples, [1], base=inputs.base, batch_size=3,
                                dtype=torch.float32)
    n_real = sum(len(x) for x in samples["x"])
    assert sum(t.shape[0] for t in cache.tasks["x"].logits) == n_real
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "task"), init=[1.0, 0.0],
                         parameterisation="none")
    idx = [0, 5, 7, 2]  # lengths 2, 3, 3, 4: right padding inside the batch
    batch, tgt = cache.batch("x", idx)
    out = adapter.forward(engine.merged_params(), {}, batch, layers=[1])
    lg, hd = expert_merging.alignment_loss(out, tgt, temperature=1.0, hidden_weight=1.0)
    p = tgt.logits.float().softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert float(hd.detach()) < 1e-6
    assert float(lg) == pytest.approx(float(entropy), abs=2e-3)


def _llama_cache(llama, layers: list[int], dtype=torch.float64):
    base, experts, cal = llama
    tasks = list(experts)
    adapter = build_adapter(base, dtype)
    inputs = load_merge_inputs(base, list(experts.values()), tasks, dtype=dtype, only=adapter.used)
    adapter.bind(inputs.base)
    samples = {t: [json.loads(x)["input_ids"] for x in cal[t].read_text().splitlines()] for t in tasks}
    cache = build_teacher_cache(adapter, experts, {}, samples, layers, base=inputs.base, batch_size=3, dtype=dtype)
    return adapter, inputs, cache


def test_variance_normalised_hidden_loss_equals_float64_formula(llama, monkeypatch):
    """hidden_norm variance: Σ (h − h_t)² / (var_t + 1e-6·mean var_t) / #entries per layer, var_t the
    teacher's per-dimension population variance over all of the task's cached tokens."""
    monkeypatch.setattr(teacher_cache, "CACHE_DTYPE", torch.float64)
    adapter, inputs, cache = _llama_cache(llama, [1, 2])
    scale = expert_merging.teacher_variance(cache, "x")
    tc = cache.tasks["x"]
    variances = []
    for j in range(2):
        h = torch.cat([tc.hidden[i][j] for i in range(len(tc.samples))]).double()
        var = ((h - h.mean(0)) ** 2).mean(0)
        variances.append(var + 1e-6 * var.mean())
        torch.testing.assert_close(scale[j].double(), 1 / variances[-1], rtol=1e-6, atol=0)
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "task"), init=[0.4, 0.3],
                         parameterisation="none")
    batch, tgt = cache.batch("x", [0, 5, 7, 2])
    out = adapter.forward(engine.merged_params(), {}, batch, layers=[1, 2])
    _, hd = expert_merging.alignment_loss(out, tgt, temperature=1.0, hidden_weight=0.5, hidden_scale=scale)
    want = 0.5 * sum(float((((out.hidden[j].double() - tgt.hidden[j].double()) ** 2) / variances[j]).sum())
                     / out.hidden[j].numel() for j in range(2)) / 2
    assert float(hd.detach()) == pytest.approx(want, rel=1e-9)
    _, plain = expert_merging.alignment_loss(out, tgt, temperature=1.0, hidden_weight=0.5)
    assert float(plain.detach()) != pytest.approx(want, rel=1e-3)  # the scale does change the loss
    # scale-free: the same states ×1000 (teacher and student) give the same normalised loss
    big = Output(out.logits, tuple(h * 1000 for h in out.hidden))
    tbig = teacher_cache.Targets(tgt.logits, [h * 1000 for h in tgt.hidden])
    _, hd_big = expert_merging.alignment_loss(big, tbig, temperature=1.0, hidden_weight=0.5,
                                              hidden_scale=[s / 1e6 for s in scale])
    assert float(hd_big.detach()) == pytest.approx(want, rel=1e-6)  # the weights are stored in float32


def test_init_search_starts_at_the_lambda_with_the_lowest_calibration_nll(llama):
    """The criterion is the task-arithmetic model's own next-token NLL on each task's probe rows (mean
    over real tokens, then β-weighted mean over tasks), recomputed here in float64 with a plain HF
    model run row by row (no padding, no packing) on hand-merged weights θ₀ + λ Σ_k τ_k."""
    from transformers import AutoModelForCausalLM

    base_dir = llama[0]
    adapter, inputs, cache = _llama_cache(llama, [1])
    tasks = list(inputs.experts)
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=0.1,
                         parameterisation="sigmoid")
    beta = [1.0, 2.0]
    obj = expert_merging.Objective(engine, adapter, cache, IndexSampler(dict.fromkeys(tasks, 12), 4),
                                   alpha0=torch.tensor([0.1, 0.1], dtype=torch.float64), beta=beta,
                                   temperature=1.0, hidden_weight=1.0, gamma=5.0)
    probes = {"x": [0, 1, 2, 3, 4], "y": [5, 7, 9]}  # rows of 2..7 tokens; batches of 2 pad and split
    best, curve = expert_merging.search_init(engine, obj, probes, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float64).eval()
    by_hand = {}
    for lam in expert_merging.INIT_GRID:
        merged = {n: inputs.base[n] + lam * tv.sum(0) for n, tv in inputs.task_vectors.items()}
        assert not model.load_state_dict(merged, strict=False).unexpected_keys
        total = 0.0
        for b, t in zip(beta, tasks, strict=True):
            nll, count = 0.0, 0
            for i in probes[t]:
                ids = torch.tensor([cache.tasks[t].samples[i]])
                with torch.no_grad():
                    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
                count += ids.shape[1] - 1
            total += b * nll / count / len(tasks)
        by_hand[lam] = total
    # rel 1e-6: the packed forward and the row-by-row one differ by float32 rotary/mask rounding
    # (~3e-8); the grid points differ by ~1e-3, so the choice below is decided by the criterion
    assert curve == pytest.approx(by_hand, rel=1e-6)
    v = sorted(by_hand.values())
    assert min(b - a for a, b in itertools.pairwise(v)) > 1e-4 * v[0]
    assert best == min(by_hand, key=by_hand.get)
    torch.testing.assert_close(engine.coefficients().detach(), torch.full_like(engine.raw, best))


def test_init_search_on_an_encoder_is_a_spec_error(bert, tmp_path):
    base, experts, cal = bert
    ctx = _ctx(tmp_path / "out", base, experts, cal, True, steps=1, init_search="on")
    with pytest.raises(SpecError, match="init_search"):
        run_method(ctx)


def test_kind_defaults_resolve_auto_and_keep_encoder_behaviour():
    p = {"hidden_norm": "auto", "init_search": "auto"}
    assert expert_merging.resolve_auto(p, True) == {"hidden_norm": "variance", "init_search": "on"}
    assert expert_merging.resolve_auto(p, False) == {"hidden_norm": "none", "init_search": "off"}
    assert expert_merging.resolve_auto({"hidden_norm": "none", "init_search": "on"}, True) == {
        "hidden_norm": "none", "init_search": "on"}


# -- importance and chunks ---------------------------------------------------------------------------
def test_importance_matches_formula():
    alpha = {"a": [0.5, -0.2], "b": [0.1, 0.1]}
    s = {"a": [0.01, 0.03], "b": [0.2, 0.0]}
    n = {"a": 100, "b": 10}
    raw = {"a": (0.5 * 0.01 + 0.2 * 0.03) * 100, "b": (0.1 * 0.2) * 10}
    imp = chunking.importance(alpha, s, n)
    assert imp == pytest.approx({k: v / sum(raw.values()) for k, v in raw.items()})


def test_allocator_respects_budget_and_orders_by_importance():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        L = 3 + trial % 17
        imp_t = torch.rand(L, generator=g) ** 3
        imp = {f"t{i}": float(v) for i, v in enumerate(imp_t / imp_t.sum())}
        numel = dict.fromkeys(imp, 10000)
        budget = int(1 + trial * 3)
        for kappa in (0.0, 0.5, 1.0, 2.0):
            plan = chunking.allocate_chunks(imp, budget, kappa, numel)
            assert sum(plan.values()) <= budget
            order = sorted(imp, key=imp.get)
            assert [plan[x] for x in order] == sorted(plan[x] for x in order)  # monotone in I
            want = {x: math.floor(budget * imp[x] ** kappa / sum(v ** kappa for v in imp.values()) + 1e-9)
                    for x in imp}
            assert plan == want
    uniform = chunking.allocate_chunks({"a": 0.9, "b": 0.1, "c": 0.0}, 6, 0.0, {"a": 9, "b": 9, "c": 9})
    assert uniform == {"a": 2, "b": 2, "c": 2}
    sharp = chunking.allocate_chunks({"a": 0.6, "b": 0.4}, 10, 4.0, {"a": 99, "b": 99})
    assert sharp["a"] > 6 and sharp["b"] < 4


def test_plan_yields_exactly_the_planned_chunks_where_torch_chunk_does_not():
    assert len(torch.chunk(torch.arange(5), 4)) == 3  # the authors' torch.chunk drops a coefficient
    numel = {"w": 5, "v": 7, "u": 3}
    plan = chunking.allocate_chunks({"w": 0.5, "v": 0.45, "u": 0.05}, 40, 1.0, numel)
    assert plan == {"w": 5, "v": 7, "u": 2}  # capped at numel: one entry per chunk at most
    groups = ParamGroups([("w", (5,)), ("v", (7, 1)), ("u", (3,))], "chunk", chunks=plan)
    for n, m in plan.items():
        sizes = groups.slots[n].chunk_sizes()
        assert len(sizes) == m and min(sizes) >= 1 and sum(sizes) == numel[n]
    assert groups.n_groups == sum(plan.values())


# -- run() end to end ---------------------------------------------------------------------------------
def test_run_chunked_bert_releases_teachers_writes_checkpoint_plan_and_facts(bert, tmp_path, monkeypatch):
    base, experts, cal = bert
    refs: list[weakref.ref] = []
    real_build, real_fit = driver.build_teacher_cache, driver.fit
    alive_at_fit: list[int] = []

    def build(*a, **kw):
        kw["on_loaded"] = lambda task, params: refs.extend(weakref.ref(t) for t in params.values())
        return real_build(*a, **kw)

    def fit(*a, **kw):
        gc.collect()
        alive_at_fit.append(sum(r() is not None for r in refs))
        return real_fit(*a, **kw)

    monkeypatch.setattr(driver, "build_teacher_cache", build)
    monkeypatch.setattr(driver, "fit", fit)
    # cold stage 2 (the authors' code): m = 0 tensors are fixed at α₀, checked below; the warm default's
    # values are checked in test_stage_two_cold_fixes_alpha0_and_warm_starts_at_the_stage_one_model
    spec = _spec(base, experts, cal, True, chunked=True, chunk_budget=1.0, kappa=2.0, steps=3, lr=0.3,
                 warm_start=False)
    out = run_merge(spec, tmp_path / "merged").out_dir
    assert len(refs) > 3 * 10  # every expert's own tensors were loaded (and watched) ...
    assert alive_at_fit == [0, 0]  # ... and none is alive when either learning stage starts
    facts = json.loads((out / "alloy_merge.json").read_text())
    m = facts["metrics"]
    assert m["teacher_cache_mib"] > 0 and m["task_vectors_mib"] > 0
    assert m["variant"] == "Expert Merging++" and m["steps"] == 6
    assert m["hidden_norm"] == "none" and m["init_search"] == "off" and "alpha0_chosen" not in m  # encoder
    plan, imp = m["chunk_plan"], m["importance"]
    assert set(plan) == set(imp) and sum(plan.values()) <= m["chunk_budget"] == len(plan)
    assert sum(imp.values()) == pytest.approx(1.0, abs=1e-4)
    assert (out / expert_merging.PLAN_PNG).stat().st_size > 1000
    from transformers import AutoModel

    assert AutoModel.from_pretrained(str(out)).config.hidden_size == 32
    # written = θ₀ + Σ_k α_{k,s} τ_k over the planned contiguous chunks, from the saved table
    table = Coefficients.load(out / "coefficients.json")
    written = load_file(str(out / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    es = [load_file(str(p / "model.safetensors")) for p in experts.values()]
    name = max(plan, key=plan.get)
    mcount = plan[name]
    assert mcount >= 2
    flat_b = b[name].double().flatten()
    want = flat_b.clone()
    bounds = torch.tensor_split(torch.arange(flat_b.numel()), mcount)
    for s, idx in enumerate(bounds):
        row = table.groups.index(f"{name}#{s}")
        for k, e in enumerate(es):
            want[idx] += table.values[row, k] * (e[name].double().flatten()[idx] - flat_b[idx])
    torch.testing.assert_close(written[name].double().flatten(), want, atol=1e-6, rtol=0)
    # m = 0: a fixed coefficient α₀ (the authors' code), no row in the table
    zeros = [n for n, c in plan.items() if c == 0]
    assert zeros and m["fixed_tensors"] == len(zeros)
    for n in zeros[:2]:
        assert n not in table.groups and f"{n}#0" not in table.groups
        fixed = b[n].double() + sum(0.1 * (e[n].double() - b[n].double()) for e in es)
        torch.testing.assert_close(written[n].double(), fixed, atol=1e-6, rtol=0)
    # excluded tensors (norms, biases, embeddings) keep the base values
    for n in ("encoder.layer.0.attention.output.LayerNorm.weight", "encoder.layer.1.output.dense.bias"):
        torch.testing.assert_close(written[n], b[n])


def test_run_causal_lm_end_to_end(llama, tmp_path):
    base, experts, cal = llama
    ctx = _ctx(tmp_path / "out", base, experts, cal, False, steps=4, lr=0.5, gamma=0.0)
    res = run_method(ctx)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ctx.out_dir))
    assert model.config.num_hidden_layers == 2
    m = res.metrics
    # experts are base + independent noise: each task pulls its own expert's coefficient up from α₀
    assert m["hidden_layers"] == [1] and all(v > 0.1 for v in m["coefficient_mean"].values())
    assert m["hidden_norm"] == "variance" and m["init_search"] == "on"  # causal LM defaults
    assert m["alpha0_chosen"] in expert_merging.INIT_GRID and len(m["init_search_loss"]) == 3
    written = load_file(str(ctx.out_dir / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(written[n], b[n])  # excluded: base values
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(written[q], b[q])


def test_stage_two_cold_fixes_alpha0_and_warm_starts_at_the_stage_one_model():
    """Cold: m = 0 tensors fold in at α₀ and chunks start at α₀ (the authors' code). Warm: the
    stage-2 model at its start is exactly the stage-1 model."""
    from merge_ops.learned.engine import MergeInputs

    g = torch.Generator().manual_seed(0)

    def inputs() -> MergeInputs:
        shapes = {"a": (4, 6), "b": (5,), "c": (3, 3)}
        return MergeInputs(["x", "y"], {n: torch.randn(s, generator=torch.Generator().manual_seed(1),
                                                       dtype=torch.float64) for n, s in shapes.items()},
                           {n: torch.randn((2, *s), generator=torch.Generator().manual_seed(2),
                                           dtype=torch.float64) for n, s in shapes.items()})

    plan = {"a": 3, "b": 0, "c": 1}
    a0 = [0.1, 0.2]
    for warm in (False, True):
        inp = inputs()
        s1 = MergeEngine(inp, ParamGroups(inp.merged_shapes(), "layer"), init=a0, parameterisation="sigmoid")
        with torch.no_grad():
            s1.raw.add_(torch.randn(s1.raw.shape, generator=g))
        stage1 = {n: t.detach().clone() for n, t in s1.merged_params().items()}
        c1 = s1.coefficients().detach().double()
        e2 = expert_merging.stage_two(inp, s1, plan, alpha0=a0, warm=warm)
        assert e2.groups.n_groups == 4 and "b" not in e2.inputs.task_vectors
        got = e2.merged_params()
        ref = inputs()
        for n, t in got.items():
            if warm:
                want = stage1[n]
            else:
                want = ref.base[n] + sum(a0[k] * ref.task_vectors[n][k] for k in range(2))
            torch.testing.assert_close(t.detach(), want, atol=1e-6, rtol=0)
        if warm:
            rows = e2.coefficients().detach().double()
            assert torch.allclose(rows[:3], c1[s1.groups.slots["a"].row].expand(3, 2), atol=1e-7)


@pytest.mark.parametrize(("warm", "want"), [(True, [0.3, 0.075]), (False, [0.3, 0.3])])
def test_warm_stage_two_learns_at_the_scaled_lr(bert, tmp_path, monkeypatch, warm, want):
    base, experts, cal = bert
    lrs: list[float] = []
    real = driver.fit

    def fit(engine, loss_fn, **kw):
        lrs.append(kw["optimizer"].param_groups[0]["initial_lr"])
        return real(engine, loss_fn, **kw)

    monkeypatch.setattr(driver, "fit", fit)
    run_method(_ctx(tmp_path / "out", base, experts, cal, True, chunked=True, steps=2, lr=0.3,
                            warm_start=warm, stage2_lr_scale=0.25))
    assert lrs == pytest.approx(want)


def test_bound_causal_lm_with_a_tied_head_uses_the_embedding_as_head(llama, tmp_path):
    """A tied checkpoint stores no lm_head: after `bind` the head must be the bound embedding, not
    from_config's random init (which made every causal-LM objective score a random head)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src = llama[0]
    tied = tmp_path / "tied"
    shutil.copytree(src, tied)
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    w = {n: t for n, t in load_file(str(src / "model.safetensors")).items() if n != "lm_head.weight"}
    save_file(w, str(tied / "model.safetensors"))
    adapter = build_adapter(tied, torch.float64)
    adapter.bind({n: t.double() for n, t in w.items()})
    ids = [3, 9, 4, 17, 5]
    with torch.no_grad():
        got = adapter.forward({}, {}, collate([ids], adapter.pad_id())).logits
        ref = AutoModelForCausalLM.from_pretrained(str(tied), dtype=torch.float64)(
            input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, ref)
