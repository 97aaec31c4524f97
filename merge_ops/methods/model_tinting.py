"""Model Tinting (Jung et al., arXiv:2412.19098): merge coefficients learned jointly with one
task-specific layer per task, on the experts' pseudo-labels.

θ = θ₀ + Σ_k c_k ⊙ τ_k with layer-wise AdaMerging coefficients (init 0.3, clamped to [0, 1]), and for
each task t its own copy of the "tinted" layer, initialised from expert t's. The tinted layer is what
the spec's `task_specific` names: the classification head (the reference code's only option; its
`--trainlayer` is parsed but never used), or, for causal LMs, any module tensors (e.g. a per-task
`lm_head` or one projection). Each step draws one batch per task from its unlabelled calibration
rows and scores the merged model with that task's tinted layer against expert t's argmax (the expert
with its own, untrained layer, run once before learning: teacher_cache.py):

    crosspseudoconf (Model Tinting++, default `confidence_filter: true`): keep rows where the merged
        model agrees with the expert, or disagrees but is less confident (p_expert ≥ p_merged); the
        loss is the mean CE against the expert's class over the kept rows.
    crosspseudo (`confidence_filter: false`): CE against the expert's class on every row.

Adam (0.9, 0.999), no weight decay, one lr (1e-2) for the coefficients and the tinted layers together
(the reference's setting when heads train). Outputs: the merged checkpoint, and the tinted layers in
heads/<task>.safetensors beside it, as every learned merge writes its per-task heads.

Deviations from the reference, and why:
  * The reference takes one optimizer step per task per "epoch" (T steps, shuffled task order);
    here a step sums the tasks' losses (as AdaMerging in Alloy), so one step sees every task and the
    result does not depend on a task order. `steps` counts these joint steps.
  * The reference moves each expert to the GPU and back at every step; the experts are run once
    here and only their logits are kept.
Tinted heads change the classifier, so compare with methods that keep the experts' heads on equal
terms (report the tinting separately, as the reference's pitfalls note says).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merge_ops.declare import MethodDef, Param, learn_params
from merge_ops.errors import SpecError
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.learned.driver import Session, Trained
    from merge_ops.learned.engine import Step

torch = lazy("torch")
F = lazy("torch.nn.functional")

METHOD = MethodDef(
    "model_tinting", "learned",
    "learn layer-wise merge coefficients jointly with one task-specific layer per task (the head or "
    "another `task_specific` layer) on confidence-filtered expert pseudo-labels",
    "Jung et al. 2024, Tint Your Models Task-wise for Improved Multi-task Model Merging, arXiv:2412.19098",
    (
        Param("granularity", "layer", "task: one coefficient per expert; layer: one per expert per tensor",
              type=str, choices=("task", "layer")),
        Param("init", 0.3, "initial coefficient (the reference's prior)", min=0.0, max=1.0),
        Param("clamp", True, "clamp coefficients to [0, 1] in the forward pass", type=bool),
        Param("train_coefficients", True, "learn the coefficients too (false: only the tinted layers, "
              "the reference's --onlyclassifiertrain)", type=bool),
        Param("confidence_filter", True, "Model Tinting++: drop rows where the merged model disagrees with "
              "the expert and is more confident than it", type=bool),
        *learn_params(steps=500, batch_size=32, lr=1e-2,
                      lr_help="Adam learning rate of the coefficients and the tinted layers"),
    ),
    needs_calibration=True,
)


def tinting_loss(student: torch.Tensor, teacher: torch.Tensor, *, confidence_filter: bool = True
                 ) -> torch.Tensor | None:
    """Mean CE of `student` rows against the teacher's argmax, over the rows kept by the filter
    (None: no row kept). Kept: the two agree, or the teacher is at least as confident."""
    lg = student.float() if student.dtype != torch.float64 else student
    with torch.no_grad():
        p_e, c_e = teacher.to(lg.dtype).softmax(-1).max(-1)
        p_m, c_m = lg.softmax(-1).max(-1)
        keep = (c_e == c_m) | (p_e >= p_m) if confidence_filter else torch.ones_like(c_e, dtype=torch.bool)
    if not bool(keep.any()):
        return None
    return F.cross_entropy(lg[keep], c_e[keep])


def learn(s: Session) -> Trained:
    from merge_ops.learned import distributed
    from merge_ops.learned.driver import Trained
    from merge_ops.learned.engine import MergeEngine
    from merge_ops.learned.groups import ParamGroups

    p, names, inputs = s.params, s.names, s.inputs
    if distributed.rank_world()[1] > 1:  # tinted layers are not reduced across ranks
        raise SpecError("model_tinting runs on one device: its tinted layers are per-task and not shared "
                        "across ranks", param="method")
    missing = [t for t in names if not inputs.heads.get(t)]
    if missing:
        raise SpecError(f"expert(s) {missing} have no task-specific layer to tint: set `task_specific` to "
                        "regexes of it (e.g. '^classifier\\.' or a per-task layer)", param="task_specific")
    if not inputs.task_vectors:
        raise SpecError("no tensor is left to merge: the experts do not differ from the base", param="experts")
    engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), str(p["granularity"])),
                         init=float(p["init"]), parameterisation="clamp" if p["clamp"] else "none").to(s.device)
    s.configure(engine)
    batch_size = int(p["batch_size"])
    cache = s.teacher_cache([], batch_size)  # the experts with their own (untinted) layers: the labellers
    sampler = s.indices(batch_size)
    tint = {t: {n: torch.nn.Parameter(x.detach().clone().to(s.device)) for n, x in inputs.heads[t].items()}
            for t in names}
    filt = bool(p["confidence_filter"])
    kept: dict[str, list[float]] = {t: [] for t in names}

    def loss_fn(step: int, st: Step) -> None:
        for t in names:
            idx = sampler.next(t)
            batch, tgt = cache.batch(t, idx, s.device)
            out = s.adapter.forward(st.params, tint[t], batch).logits
            loss = tinting_loss(out, tgt.logits, confidence_filter=filt)
            with torch.no_grad():
                p_e, c_e = tgt.logits.softmax(-1).max(-1)
                p_m, c_m = out.detach().float().softmax(-1).max(-1)
                kept[t].append(float(((c_e == c_m) | (p_e >= p_m) | (not filt)).float().mean()))
            if loss is not None:
                st.backward(loss)

    learned = [x for h in tint.values() for x in h.values()]
    if p["train_coefficients"]:
        learned = [engine.raw, *learned]
    else:
        engine.raw.requires_grad_(False)
    opt = torch.optim.Adam(learned, lr=float(p["lr"]), betas=(0.9, 0.999), weight_decay=0.0)
    s.fit(engine, loss_fn, steps=int(p["steps"]), optimizer=opt)
    for t in names:  # the tinted layers are the task's heads now: written to heads/<task>.safetensors
        inputs.heads[t] = {n: x.detach() for n, x in tint[t].items()}
    metrics: dict[str, Any] = {
        "tinted_tensors": {t: sorted(tint[t]) for t in names},
        "kept_fraction_final": {t: round(v[-1], 4) for t, v in kept.items() if v},
    }
    return Trained(engine, "Model Tinting" + ("++" if filt else ""), metrics=metrics,
                   meta={"confidence_filter": filt, "tinted": sorted({n for h in tint.values() for n in h})})
