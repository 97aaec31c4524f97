"""Expert Merging and Expert Merging++ (Zhang et al. 2025, arXiv:2509.25712).

Expert Merging learns one coefficient per (expert, merged tensor), α = sigmoid(w), w₀ = logit(α₀),
so that the merged model θ = θ₀ + Σ_k α_k ⊙ τ_k reproduces each expert on that expert's own
unlabelled calibration samples:

    L = (1/K) Σ_k β_k · [ T² · CE(softmax(z_k/T), log_softmax(z/T))          logit alignment
                          + w_h · mean_{ℓ∈S} MSE(h_ℓ, h_ℓ^(k)) ]              hidden-state alignment
        + γ · (1/(K·G)) Σ_{k,g} |α_{k,g} − α₀_k|                             stay near task arithmetic

over G coefficient rows. The soft cross-entropy equals the paper's KL plus the teacher's entropy (a
constant), so the gradients are the paper's. Rows scored are the head logits (encoder + task head)
or every real token's next-token logits (causal LMs, padding excluded); hidden states are compared
at real tokens only. The mean over tasks (not the paper's sum) matches the authors' code, which
averages per-sample losses. The regulariser uses the paper's normalisation (mean over the table);
the authors' code divides by the coefficients per expert instead, i.e. its R is K × ours: our γ
equals K × theirs for the same pull (their CLI default 5 with K experts ↔ our 5K).

Defaults (authors' CLI): α₀ 0.1, T 1, γ 5 (see above), AdamW lr 0.5 in logit space, weight decay
1e-5, CosineAnnealingWarmRestarts(T_0 50, T_mult 2, eta_min 0.1·lr), gradient clip 1.0. Excluded
tensors (regex `exclude`: norms, embeddings, biases, lm_head) keep the base's values; task-specific
heads are never merged. Hidden layer default: "middle", HF hidden_states index L//2 (the output of
block L/2). The authors' CLI turns the hidden loss off; the paper names "a middle Transformer layer",
and with classification heads of 2–8 classes the logits alone say little about the encoder, so the
middle layer's token states give the alignment most of its signal.

The teachers are run once over their samples (teacher_cache.py) and freed before learning.

Expert Merging++ (`chunked`): after the layer-wise run, each tensor's importance
I_ℓ = Norm(Σ_k |α_k^ℓ| · mean|τ_k^ℓ| · n_ℓ) sets its chunk count m_ℓ = ⌊B · I_ℓ^κ / Σ I^κ⌋
(chunking.py), and a second run learns one coefficient per (expert, contiguous chunk). Default
(`warm_start`): stage 2 refines stage 1 — each chunk starts at its tensor's stage-1 coefficient,
m_ℓ = 0 tensors keep their stage-1 value, and it learns at `stage2_lr_scale` (0.1) × lr, so it starts
from the Expert Merging model instead of discarding it. `warm_start: false` is the authors' code:
chunks start at α₀, m_ℓ = 0 tensors are fixed at α₀, and stage 2 learns at the full lr.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from merge_ops.checkpoint import TORCH_DTYPES
from merge_ops.errors import SpecError
from merge_ops.job import JobContext, MethodResult
from merge_ops.learned import chunking
from merge_ops.learned.adapters import Adapter, EncoderClassifier, Output, build_adapter
from merge_ops.learned.calibration import load_calibration
from merge_ops.learned.engine import FitResult, MergeEngine, MergeInputs, Step, fit, load_merge_inputs
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.outputs import write_outputs
from merge_ops.learned.teacher_cache import IndexSampler, Targets, TeacherCache, build_teacher_cache
from merge_ops.spec import parse_size

PLAN_PNG = "chunk_plan.png"


# -- the objective --------------------------------------------------------------------------------
def soft_ce(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over rows of −Σ_v softmax(teacher/T)_v · log_softmax(student/T)_v."""
    t = temperature
    student = _wide(student)
    p = (teacher.to(student.dtype) / t).softmax(-1)
    return (t * t) * -(p * (student / t).log_softmax(-1)).sum(-1).mean()


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Losses in float32 at least (half-precision softmax/MSE sums lose digits), float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


def alignment_loss(out: Output, tgt: Targets, *, temperature: float, hidden_weight: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit loss, weighted hidden loss) of one task's batch against its cached teacher targets
    (`out.hidden`: the student's states at the cached layers, real tokens only, as `tgt.hidden`)."""
    logit = soft_ce(out.logits, tgt.logits, temperature)
    hidden = torch.zeros((), device=logit.device)
    if out.hidden and hidden_weight:
        hs = []
        for sh, h in zip(out.hidden, tgt.hidden, strict=True):
            sh = _wide(sh)
            hs.append(F.mse_loss(sh, h.to(sh.dtype)))
        hidden = hidden_weight * torch.stack(hs).mean()
    return logit, hidden


def regulariser(coeffs: torch.Tensor, alpha0: torch.Tensor) -> torch.Tensor:
    """(1/(K·G)) Σ |α − α₀_k| over a [G, K] table: the paper's R (the authors' code: K × this)."""
    if coeffs.numel() == 0:
        return torch.zeros((), device=coeffs.device)
    return (coeffs.double() - alpha0.double().to(coeffs.device)).abs().mean()  # the table is small


class Objective:
    """The per-step loss in the engine's two-phase form (`fit` passes a `Step`): one batch per task
    against the merged weights `s.params`, each task's term backpropagated at once so only one task's
    activations are alive (peak memory does not grow with the number of experts), then γ·R on the
    table. The step's loss is the sum of the terms (`s.total`)."""

    def __init__(self, engine: MergeEngine, adapter: Adapter, cache: TeacherCache, sampler: IndexSampler, *,
                 alpha0: torch.Tensor, beta: Sequence[float], temperature: float, hidden_weight: float,
                 gamma: float, device: str | torch.device = "cpu"):
        self.engine, self.adapter, self.cache, self.sampler = engine, adapter, cache, sampler
        self.alpha0, self.beta = alpha0, list(beta)
        self.temperature, self.hidden_weight, self.gamma = temperature, hidden_weight, gamma
        self.device = device
        self.last: dict[str, float] = {}

    def __call__(self, step: int, s: Step) -> None:
        e = self.engine
        experts = e.inputs.experts
        parts = {"logit": 0.0, "hidden": 0.0}
        for k, task in enumerate(experts):
            batch, tgt = self.cache.batch(task, self.sampler.next(task), self.device)
            out = self.adapter.forward(s.params, e.inputs.heads.get(task, {}), batch, layers=self.cache.layers)
            lg, hd = alignment_loss(out, tgt, temperature=self.temperature,
                                    hidden_weight=self.hidden_weight)
            s.backward(self.beta[k] * (lg + hd) / len(experts))
            parts["logit"] += float(lg.detach()) / len(experts)
            parts["hidden"] += float(hd.detach()) / len(experts)
            del out, lg, hd
        reg = regulariser(e.coefficients(), self.alpha0)
        self.last = {**parts, "reg": float(reg.detach())}
        s.backward(self.gamma * reg)


class SlicedEngine(MergeEngine):
    """MergeEngine whose chunked tensors merge slice by slice (Expert Merging++): autograd then saves
    views of τ, not the [K, numel] per-entry coefficient map the base engine expands to."""

    def merged_tensor(self, name: str, coeffs: torch.Tensor | None = None) -> torch.Tensor:
        tv = self.inputs.task_vectors.get(name)
        slot = self.groups.slots.get(name)
        if tv is None or slot is None or slot.chunks <= 1:
            return super().merged_tensor(name, coeffs)
        c = self.coefficients() if coeffs is None else coeffs
        rows = c[slot.row: slot.row + slot.chunks].to(tv.dtype)  # [m, K]
        segs = tv.reshape(tv.shape[0], -1).split(slot.chunk_sizes(), dim=1)
        delta = torch.cat([rows[s] @ seg for s, seg in enumerate(segs)])
        base = self.inputs.base[name]
        return base + delta.view(base.shape)


# -- memory of the learning stage ------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next reading covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _mib(ts) -> float:
    return round(sum(t.numel() * t.element_size() for t in ts) / 2**20, 2)


# -- the method -----------------------------------------------------------------------------------
def parse_layers(value: str, n_layers: int) -> list[int]:
    v = str(value).strip().lower()
    if v in ("", "none", "off"):
        return []
    if v == "middle":
        return [n_layers // 2]
    try:
        out = sorted({int(x) for x in v.split(",") if x.strip()})
    except ValueError:
        raise SpecError(f"hidden_layers {value!r}: use 'middle', 'none' or comma-separated indices",
                        param="hidden_layers") from None
    bad = [i for i in out if not 0 <= i <= n_layers]
    if bad:
        raise SpecError(f"hidden_layers {bad} out of range: the model has hidden states 0..{n_layers}",
                        param="hidden_layers")
    return out


def _optimise(engine: MergeEngine, loss_fn: Objective, g, *, steps: int, ctx: JobContext, offset: int,
              total: int, lr_scale: float = 1.0) -> FitResult:
    lr = float(g("lr")) * lr_scale
    opt = torch.optim.AdamW(engine.parameters(), lr=lr, betas=(0.9, 0.999),
                            weight_decay=float(g("weight_decay")))
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=int(g("restart_period")), T_mult=2, eta_min=0.1 * lr)
    clip = float(g("clip_grad")) or None

    def progress(stage: str, step: int, _total: int, loss: float | None = None) -> None:
        ctx.progress("learn", offset + step, total, loss)

    return fit(engine, loss_fn, steps=steps, optimizer=opt, scheduler=sched, clip_grad=clip,
               progress=progress, check_cancel=ctx.check_cancel)


def tensor_importance(engine: MergeEngine) -> dict[str, float]:
    """I_ℓ from a layer-wise engine's learned coefficients and its task vectors."""
    c = engine.coefficients().detach()
    alpha, s, n = {}, {}, {}
    for name, slot in engine.groups.slots.items():
        tv = engine.inputs.task_vectors[name]
        alpha[name] = c[slot.row].tolist()
        s[name] = tv.reshape(tv.shape[0], -1).abs().float().mean(1).tolist()
        n[name] = slot.numel
    return chunking.importance(alpha, s, n)


def stage_two(inputs: MergeInputs, stage1: MergeEngine, plan: dict[str, int], *, alpha0: list[float],
              warm: bool) -> MergeEngine:
    """The chunk-wise engine. Tensors with m = 0 are folded into θ₀ at their fixed coefficient (α₀,
    as the authors' code; with `warm`, their stage-1 value) and leave the learned set, so no gradient
    is computed for them. Warm: each chunk starts at its tensor's stage-1 coefficient."""
    with torch.no_grad():
        c1 = stage1.coefficients()
        a0 = torch.tensor(alpha0)
        for n in [n for n, m in plan.items() if m == 0]:
            tv = inputs.task_vectors.pop(n)
            c = c1[stage1.groups.slots[n].row] if warm else a0
            flat = c.to(tv.dtype) @ tv.reshape(tv.shape[0], -1)
            inputs.base[n] = inputs.base[n] + flat.view(inputs.base[n].shape)
    groups = ParamGroups(inputs.merged_shapes(), "chunk", chunks=plan)
    engine = SlicedEngine(inputs, groups, init=alpha0, parameterisation="sigmoid")
    if warm:
        with torch.no_grad():
            raw1 = stage1.raw.detach()
            for n, slot in groups.slots.items():
                engine.raw[slot.row: slot.row + slot.chunks] = raw1[stage1.groups.slots[n].row]
    return engine


def run(ctx: JobContext) -> MethodResult:
    spec = ctx.spec
    g = spec.global_param
    if ctx.base is None:
        raise SpecError("expert_merging needs a base model: set `base`", param="base")
    names = spec.expert_names()
    k = len(names)
    dtype = TORCH_DTYPES[spec.dtype]
    torch.manual_seed(spec.seed)
    alpha0 = [float(spec.model_param_value(i, "alpha0")) for i in range(k)]
    beta = [float(spec.model_param_value(i, "beta")) for i in range(k)]
    if not all(0.0 < a < 1.0 for a in alpha0):
        raise SpecError("alpha0 must lie strictly between 0 and 1 (coefficients are sigmoids)", param="alpha0")
    temperature = float(g("temperature"))
    if temperature <= 0:
        raise SpecError("temperature must be > 0", param="temperature")
    try:
        exclude = re.compile(str(g("exclude"))) if g("exclude") else None
    except re.error as e:
        raise SpecError(f"exclude {g('exclude')!r} is not a regex: {e}", param="exclude") from None
    chunked = bool(g("chunked"))
    steps = int(g("steps"))
    total = steps * (2 if chunked else 1)

    adapter = build_adapter(ctx.base.path, dtype, ctx.device)
    layers = parse_layers(g("hidden_layers"), int(adapter.module.config.num_hidden_layers))
    inputs = load_merge_inputs(ctx.base.path, [e.path for e in ctx.experts], names,
                               task_specific=spec.task_specific, dtype=dtype, device=ctx.device,
                               only=lambda n: adapter.used(n) and not (exclude and exclude.search(n)))
    if not inputs.task_vectors:
        raise SpecError("no tensor is left to merge: every changed tensor matches `exclude` "
                        f"{g('exclude')!r} or is task-specific", param="exclude")
    adapter.bind(inputs.base)
    if isinstance(adapter, EncoderClassifier):
        headless = [n for n in names if not inputs.heads.get(n)]
        if headless:
            raise SpecError(f"expert(s) {headless} have no classification head: set `task_specific` to "
                            "regexes of the head tensors (e.g. '^classifier\\.')", param="task_specific")

    cal_spec = spec.calibration
    samples = load_calibration(ctx.calibration, names, tokenizer_dir=ctx.base.path,
                               max_length=cal_spec.max_length if cal_spec else 64,
                               samples_per_task=cal_spec.samples_per_task if cal_spec else None,
                               seed=spec.seed)
    batch_size = int(g("batch_size"))
    cache = build_teacher_cache(adapter, {n: e.path for n, e in zip(names, ctx.experts, strict=True)},
                                inputs.heads, samples, layers, base=inputs.base, batch_size=batch_size,
                                dtype=dtype, device=ctx.device,
                                progress=lambda s, i, n: ctx.progress("plan", i, n))
    del samples

    reset_ok = reset_peak_rss()
    rss_before = peak_rss_mib()
    a0 = torch.tensor(alpha0, dtype=torch.float64)
    sampler = IndexSampler({t: len(cache.tasks[t].samples) for t in names}, batch_size, seed=spec.seed)
    hw = float(g("hidden_weight"))
    gamma = float(g("gamma"))

    def objective(engine: MergeEngine) -> Objective:
        return Objective(engine, adapter, cache, sampler, alpha0=a0, beta=beta, temperature=temperature,
                         hidden_weight=hw, gamma=gamma, device=ctx.device)

    ctx.progress("learn", 0, total, None)
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=alpha0,
                         parameterisation="sigmoid").to(ctx.device)
    obj = objective(engine)
    res = _optimise(engine, obj, g, steps=steps, ctx=ctx, offset=0, total=total)
    metrics: dict = {"variant": "Expert Merging++" if chunked else "Expert Merging",
                     "loss_curve": [round(x, 6) for x in res.losses], "loss_parts_final": obj.last,
                     "n_coefficients_layerwise": int(engine.raw.numel())}
    artifacts: dict[str, str] = {}
    if chunked:
        imp = tensor_importance(engine)
        n_el = {n: s.numel for n, s in engine.groups.slots.items()}
        budget = chunking.budget_from_ratio(float(g("chunk_budget")), len(n_el))
        plan = chunking.allocate_chunks(imp, budget, float(g("kappa")), n_el)
        if not any(plan.values()):
            raise SpecError(f"chunk_budget {g('chunk_budget')} gives no tensor a chunk ({len(plan)} merged "
                            "tensors): raise it", param="chunk_budget")
        layerwise = engine.table()
        engine = stage_two(inputs, engine, plan, alpha0=alpha0, warm=bool(g("warm_start"))).to(ctx.device)
        obj = objective(engine)
        # a warm stage 2 refines a finished model: a fresh AdamW at the full lr would first move every
        # coefficient by ~lr in logit space, away from the stage-1 optimum
        scale = float(g("stage2_lr_scale")) if g("warm_start") else 1.0
        res2 = _optimise(engine, obj, g, steps=steps, ctx=ctx, offset=steps, total=total, lr_scale=scale)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        chunking.plot_plan(imp, plan, ctx.out_dir / PLAN_PNG)
        artifacts["chunk_plan_png"] = PLAN_PNG
        metrics.update({
            "importance": {n: round(v, 6) for n, v in imp.items()}, "chunk_plan": plan,
            "chunk_budget": budget, "chunks_used": sum(plan.values()),
            "fixed_tensors": sum(1 for m in plan.values() if m == 0),
            "stage1_coefficients": {n: [round(x, 4) for x in layerwise.values[i].tolist()]
                                    for i, n in enumerate(layerwise.groups)},
            "loss_curve_stage2": [round(x, 6) for x in res2.losses], "loss_parts_final": obj.last,
        })
        res = FitResult(res.losses + res2.losses, res.seconds + res2.seconds,
                        (res.step_seconds + res2.step_seconds) / 2, res.steps + res2.steps)
    learn_peak = peak_rss_mib()

    ctx.progress("write", 0, 1, None)
    artifacts.update(write_outputs(
        ctx.out_dir, ctx.base.path, engine, out_dtype=TORCH_DTYPES[spec.out_dtype] if spec.out_dtype else None,
        shard_size=parse_size(spec.shard_size), title=metrics["variant"],
        meta={"method": "expert_merging", "chunked": chunked, "steps": res.steps}))
    ctx.progress("write", 1, 1, None)
    coeffs = engine.coefficients().detach()
    metrics.update({
        "loss_first": res.losses[0], "loss_final": res.losses[-1], "steps": res.steps,
        "learn_seconds": round(res.seconds, 3), "step_seconds": round(res.step_seconds, 4),
        "hidden_layers": layers, "n_coefficients": int(coeffs.numel()),
        "n_merged_tensors": len(engine.groups.slots), "n_constant_tensors": len(inputs.constant),
        "coefficient_mean": {n: round(float(coeffs[:, i].mean()), 4) if coeffs.numel() else None
                             for i, n in enumerate(names)},
        # memory: what learning holds, and the process peak while it ran (VmHWM reset before it)
        "base_mib": _mib(inputs.base.values()), "task_vectors_mib": _mib(inputs.task_vectors.values()),
        "teacher_cache_mib": round(cache.nbytes() / 2**20, 2),
        "rss_before_learn_mib": None if rss_before is None else round(rss_before, 1),
        "learn_peak_rss_mib": None if learn_peak is None or not reset_ok else round(learn_peak, 1),
    })
    return MethodResult(metrics=metrics, artifacts=artifacts)
