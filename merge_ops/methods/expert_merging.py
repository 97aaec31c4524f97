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

Defaults per model kind (`hidden_norm` and `init_search` are "auto", resolved by KIND_DEFAULTS;
every other default is the same for both kinds):
    encoder classifiers  hidden_norm none (plain MSE), init_search off (start at alpha0): the 5-task
                         benchmark's settings, unchanged
    causal LMs           hidden_norm variance: each hidden dimension's squared error is divided by
                         the teacher's variance of it over its calibration tokens. SmolLM2's middle
                         layer has a few outlier dimensions; the plain MSE there is ~400 against a
                         soft CE of ~10, so it drowned the logit term and was itself dominated by
                         those few dimensions. Normalised, it is ~1 at the base, on the CE's scale.
                         init_search on: before learning, task arithmetic at each λ of INIT_GRID
                         (0.3, 0.5, 0.7: the benchmark's task-arithmetic grid) is scored by the
                         merged model's own next-token NLL on fixed calibration probes (the first
                         2 batches per task; per task the mean over real tokens, then the β-weighted
                         mean over tasks; no_grad, no labels: the LM loss of the unlabelled rows),
                         and learning starts — and γ anchors — at the best λ instead of alpha0.
                         Why: started at α₀ 0.1 with γ pulling back to 0.1, the learned merge ended
                         below task arithmetic (the old 2-expert result: German ppl 71 vs 51). Why
                         NLL and not the alignment loss itself: the NLL is the LM loss of the rows,
                         comparable across λ without the teachers' entropy in it. Measured on SmolLM2
                         + 4 experts (benchmarks/README.md, scored on calibration rows no merge learned
                         from): the search picks λ 0.3 and reaches 0.903 mean normalised gain, against
                         0.896 started at α₀ 0.1 — a small gain, kept.
Both are plain parameters ("variance"/"none", "on"/"off"), so a job can override either.
Prompt-completion calibration rows (batches.py): on a causal LM the logit term, like the init
search's NLL, scores only the predictions of completion tokens. That is what made Expert Merging work
on causal LMs: with the same rows scored on every token (the prompts of answer-only experts included)
it reached 0.592 on that calibration score, against 0.903 (task arithmetic: 0.745).

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

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from merge_ops.declare import MethodDef, Param, learn_params, regex_problem
from merge_ops.errors import SpecError
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.learned.adapters import Adapter, Output
    from merge_ops.learned.batches import Batch, IndexSampler
    from merge_ops.learned.driver import Session, Trained
    from merge_ops.learned.engine import MergeEngine, MergeInputs, Step
    from merge_ops.learned.teacher_cache import Targets, TeacherCache

torch = lazy("torch")
F = lazy("torch.nn.functional")
PLAN_PNG = "chunk_plan.png"
INIT_GRID = (0.3, 0.5, 0.7)  # candidate λ of the init search: benchmarks/causal_lm_quality.py's task-arithmetic grid
# per model kind, what the "auto" parameters resolve to (benchmarks/README.md has the ablation)
KIND_DEFAULTS = {"causal_lm": {"hidden_norm": "variance", "init_search": "on"},
                 "encoder": {"hidden_norm": "none", "init_search": "off"}}


def _layers_syntax(value: str) -> str | None:
    v = value.strip().lower()
    if v in ("", "none", "off", "middle") or re.fullmatch(r"\s*\d{1,4}\s*(,\s*\d{1,4}\s*)*", v, re.ASCII):
        return None
    return f"{value!r}: use 'middle', 'none' or comma-separated hidden-state indices (0 = embeddings)"


METHOD = MethodDef(
    "expert_merging", "learned",
    "learn layer-wise (or chunk-wise: Expert Merging++) coefficients that align hidden states and "
    "logits of the merged model with each expert",
    "Zhang et al. 2025, Expert Merging, arXiv:2509.25712",
    (
        Param("chunked", False, "Expert Merging++: importance-guided chunk-wise coefficients", type=bool),
        Param("alpha0", 0.1, "initial coefficient (per expert allowed); coefficients are sigmoids, so "
              "strictly between 0 and 1", scope="model", min=0.0, max=1.0, min_inclusive=False,
              max_inclusive=False),
        Param("beta", 1.0, "per-task loss weight", scope="model", min=0.0),
        Param("temperature", 1.0, "logit distillation temperature", min=0.0, min_inclusive=False),
        Param("hidden_layers", "middle", "hidden states aligned by MSE: 'middle' (HF hidden_states index "
              "L//2), comma-separated indices (0 = embeddings), or 'none'", type=str, check=_layers_syntax),
        Param("hidden_weight", 1.0, "weight of the hidden-state loss", min=0.0),
        Param("hidden_norm", "auto", "hidden-state loss scale: 'variance' divides each dimension's squared "
              "error by the teacher's variance of that dimension over its calibration tokens (scale-free, "
              "~1 = no better than the teacher's mean state), 'none' is the plain MSE; 'auto': variance "
              "for causal LMs, none for encoders", type=str, choices=("auto", "variance", "none")),
        Param("init_search", "auto", "start (and anchor the regulariser) at the task-arithmetic λ on "
              f"{list(INIT_GRID)} whose merged model has the lowest next-token NLL on 2 calibration "
              "batches per task, instead of alpha0 (causal LMs only); 'auto': on for causal LMs, off for "
              "encoders", type=str, choices=("auto", "on", "off")),
        Param("gamma", 5.0, "weight of the L1 deviation of coefficients from alpha0 (mean over the "
              "table, the paper's normalisation: the authors' code is K times stronger)", min=0.0),
        *learn_params(steps=100, batch_size=8, lr=0.5, lr_help="AdamW learning rate in logit space",
                      steps_help="optimizer steps (per stage for Expert Merging++)"),
        Param("weight_decay", 1e-5, "AdamW weight decay", min=0.0),
        Param("restart_period", 50, "CosineAnnealingWarmRestarts T_0 (T_mult 2, eta_min 0.1·lr)",
              type=int, min=1),
        Param("clip_grad", 1.0, "gradient norm clip (0 = off)", min=0.0),
        Param("exclude", "(?i)(norm|embed|bias|lm_head)", "regex (searched) of tensors that keep the "
              "base values; task-specific heads are never merged", type=str, check=regex_problem),
        Param("chunk_budget", 2.0, "Expert Merging++ total chunks B as a multiple of the number of "
              "merged tensors", min=0.0),
        Param("kappa", 1.0, "Expert Merging++ concentration: 0 = uniform chunks", min=0.0),
        Param("warm_start", True, "Expert Merging++ stage 2 starts from the stage-1 coefficients and "
              "fixes m = 0 tensors at their stage-1 values (false: from alpha0, as the authors' code)",
              type=bool),
        Param("stage2_lr_scale", 0.1, "Expert Merging++ with warm_start: stage 2 learns at this × lr "
              "(it refines stage 1; a cold stage 2 uses lr)", min=0.0),
    ),
    needs_calibration=True,
)


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


def alignment_loss(out: Output, tgt: Targets, *, temperature: float, hidden_weight: float,
                   hidden_scale: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit loss, weighted hidden loss) of one task's batch against its cached teacher targets
    (`out.hidden`: the student's states at the cached layers, real tokens only, as `tgt.hidden`).
    `hidden_scale` (per layer, [H]) weights each dimension's squared error: with 1/variance
    (`teacher_variance`) the hidden loss is scale-free."""
    logit = soft_ce(out.logits, tgt.logits, temperature)
    hidden = torch.zeros((), device=logit.device)
    if out.hidden and hidden_weight:
        hs = []
        for j, (sh, h) in enumerate(zip(out.hidden, tgt.hidden, strict=True)):
            sh = _wide(sh)
            if hidden_scale is None:
                hs.append(F.mse_loss(sh, h.to(sh.dtype)))
            else:
                hs.append(((sh - h.to(sh.dtype)).square() * hidden_scale[j].to(sh)).mean())
        hidden = hidden_weight * torch.stack(hs).mean()
    return logit, hidden


def teacher_variance(cache: TeacherCache, task: str, eps: float = 1e-6) -> list[torch.Tensor]:
    """Per cached layer, 1 / (the teacher's per-dimension variance over all of the task's cached
    tokens, + eps × its mean variance so a constant dimension cannot divide by zero): the weights
    that make the hidden MSE scale-free (1 = no closer than the teacher's mean state). A causal LM's
    middle-layer states have a few huge-magnitude dimensions (SmolLM2: plain MSE ~400 against a soft
    CE ~10), which would otherwise outweigh the logits and every other dimension. Sums in float64."""
    tc = cache.tasks[task]
    out = []
    for j in range(len(cache.layers)):
        n, s1, s2 = 0, 0.0, 0.0
        for i in range(len(tc.samples)):
            h = tc.hidden[i][j].double()
            n, s1, s2 = n + h.shape[0], s1 + h.sum(0), s2 + h.square().sum(0)
        mean = s1 / max(n, 1)
        var = (s2 / max(n, 1) - mean.square()).clamp_min(0.0)  # type: ignore[union-attr]
        out.append((1.0 / (var + eps * float(var.mean()) + 1e-12)).float())
    return out


def regulariser(coeffs: torch.Tensor, alpha0: torch.Tensor) -> torch.Tensor:
    """(1/(K·G)) Σ |α − α₀_k| over a [G, K] table: the paper's R (the authors' code: K × this)."""
    if coeffs.numel() == 0:
        return torch.zeros((), device=coeffs.device)
    return (coeffs.double() - alpha0.double().to(coeffs.device)).abs().mean()  # the table is small


class Objective:
    """The per-step loss in the engine's two-phase form (`fit` passes a `Step`): one batch per task
    against the merged weights `s.params`, each forward's terms backpropagated at once — one task's,
    or a causal LM's tasks together where they share one forward (`Adapter.task_groups`) — then γ·R
    on the table. The step's loss is the sum of the terms (`s.total`)."""

    def __init__(self, engine: MergeEngine, adapter: Adapter, cache: TeacherCache, sampler: IndexSampler, *,
                 alpha0: torch.Tensor, beta: Sequence[float], temperature: float, hidden_weight: float,
                 gamma: float, device: str | torch.device = "cpu",
                 hidden_scale: dict[str, list[torch.Tensor]] | None = None):
        self.engine, self.adapter, self.cache, self.sampler = engine, adapter, cache, sampler
        self.alpha0, self.beta = alpha0, list(beta)
        self.temperature, self.hidden_weight, self.gamma = temperature, hidden_weight, gamma
        self.device = device
        self.hidden_scale = hidden_scale or {}
        self.last: dict[str, float] = {}

    def align(self, params: dict[str, torch.Tensor], tasks: Sequence[str], idx: Sequence[Sequence[int]]
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each task's (logit, hidden) alignment loss on its samples `idx` under merged `params`,
        from one forward over them all (the tasks of one `Adapter.task_groups` group)."""
        got = [self.cache.batch(t, ix, self.device) for t, ix in zip(tasks, idx, strict=True)]
        head = self.engine.inputs.heads.get(tasks[0], {})
        outs = self.adapter.forward_many(params, head, [b for b, _ in got], layers=self.cache.layers)
        losses = []
        for t, (batch, tgt), out in zip(tasks, got, outs, strict=True):
            scored = batch.scored() if self.adapter.causal else None
            if scored is not None:  # the cache holds the teacher's logits at these positions only
                out = dataclasses.replace(out, logits=out.logits[scored])
            losses.append(alignment_loss(out, tgt, temperature=self.temperature, hidden_weight=self.hidden_weight,
                                         hidden_scale=self.hidden_scale.get(t)))
        return losses

    def __call__(self, step: int, s: Step) -> None:
        e = self.engine
        experts = e.inputs.experts
        parts = {"logit": 0.0, "hidden": 0.0}
        # drawn on every rank, in task order: the streams stay those of one process
        idx = [self.sampler.next(task) for task in experts]
        for group in self.adapter.task_groups([e.inputs.heads.get(t, {}) for t in experts]):
            mine = [k for k in group if s.owns(k)]
            if not mine:
                continue
            losses = self.align(s.params, [experts[k] for k in mine], [idx[k] for k in mine])
            s.backward(sum(self.beta[k] * (lg + hd) for k, (lg, hd) in zip(mine, losses, strict=True))
                       / len(experts))
            for lg, hd in losses:
                parts["logit"] += float(lg.detach()) / len(experts)
                parts["hidden"] += float(hd.detach()) / len(experts)
            del losses
        reg = regulariser(e.coefficients(), self.alpha0)
        self.last = {**parts, "reg": float(reg.detach())}
        if s.lead:
            s.backward(self.gamma * reg)


# -- the method -----------------------------------------------------------------------------------
def parse_layers(value: str, n_layers: int) -> list[int]:
    """The hidden-state indices `hidden_layers` names (its syntax was checked with the spec; the
    range depends on the model)."""
    v = str(value).strip().lower()
    if v in ("", "none", "off"):
        return []
    if v == "middle":
        return [n_layers // 2]
    out = sorted({int(x) for x in v.split(",") if x.strip()})
    bad = [i for i in out if not 0 <= i <= n_layers]
    if bad:
        raise SpecError(f"hidden_layers {bad} out of range: the model has hidden states 0..{n_layers}",
                        param="parameters.hidden_layers")
    return out


def tensor_importance(engine: MergeEngine) -> dict[str, float]:
    """I_ℓ from a layer-wise engine's learned coefficients and its task vectors."""
    from merge_ops.learned import chunking

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
    from merge_ops.learned.engine import MergeEngine
    from merge_ops.learned.groups import ParamGroups

    with torch.no_grad():
        c1 = stage1.coefficients()
        a0 = torch.tensor(alpha0)
        for n in [n for n, m in plan.items() if m == 0]:
            tv = inputs.task_vectors.pop(n)
            c = c1[stage1.groups.slots[n].row] if warm else a0
            flat = c.to(tv.dtype) @ tv.reshape(tv.shape[0], -1)
            inputs.base[n] = inputs.base[n] + flat.view(inputs.base[n].shape)
    groups = ParamGroups(inputs.merged_shapes(), "chunk", chunks=plan)
    engine = MergeEngine(inputs, groups, init=alpha0, parameterisation="sigmoid")
    if warm:
        with torch.no_grad():
            raw1 = stage1.raw.detach()
            for n, slot in groups.slots.items():
                engine.raw[slot.row: slot.row + slot.chunks] = raw1[stage1.groups.slots[n].row]
    return engine


def resolve_auto(p: dict[str, Any], causal: bool) -> dict[str, str]:
    """`hidden_norm` and `init_search` with "auto" resolved by model kind (KIND_DEFAULTS)."""
    kind = KIND_DEFAULTS["causal_lm" if causal else "encoder"]
    return {k: kind[k] if p[k] == "auto" else str(p[k]) for k in kind}


def next_token_nll(out: Output, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed −log p(next token) of a causal LM's Output (logits at real tokens, batch order) over
    every real token that has a predecessor in its row (prompt-completion rows: every completion
    token), and how many such tokens there are: the LM loss of the rows themselves, padding excluded
    (no labels needed)."""
    lens = batch.attention_mask.sum(1)
    ids = batch.input_ids[batch.attention_mask.bool()]
    ends = torch.cumsum(lens, 0)
    last = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    first = last.clone()
    last[(ends - 1)[lens > 0]] = True  # a row's last position predicts nothing
    first[(ends - lens)[lens > 0]] = True  # a row's first token is predicted by nothing
    pos, tgt = ~last, ~first
    scored = batch.scored()
    if scored is not None:  # positions predicting a completion token, and those tokens
        pos = pos & scored
        tgt = torch.roll(pos, 1)
    logits = _wide(out.logits[pos])
    nll = F.cross_entropy(logits, ids[tgt], reduction="sum")
    return nll, int(logits.shape[0])


def search_init(engine: MergeEngine, obj: Objective, probes: dict[str, list[int]],
                grid: Sequence[float] = INIT_GRID, batch_size: int = 8) -> tuple[float, dict[float, float]]:
    """The λ of `grid` whose task-arithmetic model (every coefficient λ) has the lowest next-token
    NLL on its own calibration probes: per task the mean over real tokens, then the β-weighted mean
    over tasks. Leaves `engine.raw` at that λ. Causal LMs only (an encoder's calibration rows have no
    LM loss). Learning then starts from the best static point on the calibration data, so it can only
    refine it; from α₀ 0.1 with γ pulling back to α₀, a causal LM with several experts never reaches
    the λ ~0.3 that task arithmetic already gets (benchmarks/README.md)."""
    from contextlib import nullcontext

    from merge_ops.learned.batches import collate
    from merge_ops.learned.engine import Step

    experts = engine.inputs.experts
    losses = {}
    with torch.no_grad():
        for lam in grid:
            engine.raw.fill_(math.log(lam / (1 - lam)))
            s = Step(engine)
            total = 0.0
            with engine.streamer.using(engine) if engine.streamer is not None else nullcontext():
                for k, task in enumerate(experts):
                    samples = obj.cache.tasks[task].samples
                    nll, n = 0.0, 0
                    for i in range(0, len(probes[task]), batch_size):
                        rows = [samples[j] for j in probes[task][i: i + batch_size]]
                        batch = collate(rows, obj.cache.pad_id).to(obj.device)
                        out = obj.adapter.forward(s.params, engine.inputs.heads.get(task, {}), batch)
                        part, cnt = next_token_nll(out, batch)
                        nll, n = nll + float(part), n + cnt
                        del out
                    total += obj.beta[k] * nll / max(n, 1) / len(experts)
            losses[lam] = total
        best = min(losses, key=losses.get)  # type: ignore[arg-type]
        engine.raw.fill_(math.log(best / (1 - best)))
    return best, losses


def total_steps(p: dict[str, Any]) -> int:
    return int(p["steps"]) * (2 if p["chunked"] else 1)


def learns(p: dict[str, Any]):
    """Tensors matching `exclude` keep the base values: they get no task vector."""
    exclude = re.compile(p["exclude"]) if p["exclude"] else None
    return lambda name: not (exclude and exclude.search(name))


def learn(s: Session) -> Trained:
    from merge_ops.learned import chunking
    from merge_ops.learned.driver import Trained
    from merge_ops.learned.engine import MergeEngine
    from merge_ops.learned.groups import ParamGroups

    p, inputs = s.params, s.inputs
    if not inputs.task_vectors:
        raise SpecError("no tensor is left to merge: every changed tensor matches `exclude` "
                        f"{p['exclude']!r} or is task-specific", param="parameters.exclude")
    alpha0 = [float(a) for a in p["alpha0"]]
    auto = resolve_auto(p, bool(getattr(s.adapter, "causal", False)))
    layers = parse_layers(p["hidden_layers"], int(s.adapter.module.config.num_hidden_layers))
    batch_size = int(p["batch_size"])
    cache = s.teacher_cache(layers, batch_size)
    scale = ({t: teacher_variance(cache, t) for t in s.names}
             if auto["hidden_norm"] == "variance" and layers and float(p["hidden_weight"]) else None)
    sampler = s.indices(batch_size)
    steps = int(p["steps"])
    a0 = torch.tensor(alpha0, dtype=torch.float64)

    def objective(engine: MergeEngine) -> Objective:
        return Objective(engine, s.adapter, cache, sampler, alpha0=a0, beta=[float(b) for b in p["beta"]],
                         temperature=float(p["temperature"]), hidden_weight=float(p["hidden_weight"]),
                         gamma=float(p["gamma"]), device=s.device, hidden_scale=scale)

    def optimise(engine: MergeEngine, loss_fn: Objective, lr_scale: float = 1.0) -> None:
        lr = float(p["lr"]) * lr_scale
        opt = torch.optim.AdamW(engine.parameters(), lr=lr, betas=(0.9, 0.999),
                                weight_decay=float(p["weight_decay"]))
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=int(p["restart_period"]), T_mult=2, eta_min=0.1 * lr)
        s.fit(engine, loss_fn, steps=steps, optimizer=opt, scheduler=sched, clip_grad=float(p["clip_grad"]) or None)

    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=alpha0,
                         parameterisation="sigmoid").to(s.device)
    s.configure(engine)
    obj = objective(engine)
    metrics: dict[str, Any] = {"n_coefficients_layerwise": int(engine.raw.numel()), "hidden_layers": layers,
                               "hidden_norm": auto["hidden_norm"], "init_search": auto["init_search"]}
    if auto["init_search"] == "on":  # the first 2 batches' worth of each task's samples, fixed
        if not getattr(s.adapter, "causal", False):
            raise SpecError("init_search 'on' scores the merged model's next-token loss: causal LMs only",
                            param="parameters.init_search")
        probes = {t: list(range(min(2 * batch_size, len(cache.tasks[t].samples)))) for t in s.names}
        best, curve = search_init(engine, obj, probes, batch_size=batch_size)
        alpha0 = [best] * len(s.names)
        a0.fill_(best)  # the regulariser's anchor moves with the start
        metrics.update({"alpha0_chosen": best, "init_search_loss": {str(k): round(v, 5) for k, v in curve.items()}})
    optimise(engine, obj)
    chunked = bool(p["chunked"])
    artifacts: dict[str, str] = {}
    if chunked:
        imp = tensor_importance(engine)
        n_el = {n: sl.numel for n, sl in engine.groups.slots.items()}
        budget = chunking.budget_from_ratio(float(p["chunk_budget"]), len(n_el))
        plan = chunking.allocate_chunks(imp, budget, float(p["kappa"]), n_el)
        if not any(plan.values()):
            raise SpecError(f"chunk_budget {p['chunk_budget']} gives no tensor a chunk ({len(plan)} merged "
                            "tensors): raise it", param="parameters.chunk_budget")
        layerwise = engine.table()
        engine = stage_two(inputs, engine, plan, alpha0=alpha0, warm=bool(p["warm_start"])).to(s.device)
        s.configure(engine)
        obj = objective(engine)
        # a warm stage 2 refines a finished model: a fresh AdamW at the full lr would first move every
        # coefficient by ~lr in logit space, away from the stage-1 optimum
        optimise(engine, obj, float(p["stage2_lr_scale"]) if p["warm_start"] else 1.0)
        s.ctx.out_dir.mkdir(parents=True, exist_ok=True)
        chunking.plot_plan(imp, plan, s.ctx.out_dir / PLAN_PNG)
        artifacts["chunk_plan_png"] = PLAN_PNG
        metrics.update({
            "importance": {n: round(v, 6) for n, v in imp.items()}, "chunk_plan": plan,
            "chunk_budget": budget, "chunks_used": sum(plan.values()),
            "fixed_tensors": sum(1 for m in plan.values() if m == 0),
            "stage1_coefficients": {n: [round(x, 4) for x in layerwise.values[i].tolist()]
                                    for i, n in enumerate(layerwise.groups)},
        })
    metrics["loss_parts_final"] = obj.last
    return Trained(engine, "Expert Merging++" if chunked else "Expert Merging", metrics=metrics,
                   artifacts=artifacts, meta={"chunked": chunked})
