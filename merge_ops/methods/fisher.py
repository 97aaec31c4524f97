"""Fisher merging: a per-entry weighted average of the experts, each entry weighted by its expert's
diagonal Fisher information on that expert's own calibration rows.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", NeurIPS, arXiv:2111.09832.
Reference code mmatena/model_merging (`fisher.py`); also in FusionBench (`fisher_merging`) and as the
RegMean repo's baseline.

    F_k = (1/N_k) Σ_x  E_{y ~ p_k(y|x)} [ (∇_θ log p_k(y|x))² ]       at θ_k, per example x
    θ* = θ₀ + Σ_k w_k·(F_k + ε)·τ_k / Σ_k w_k·(F_k + ε)               per entry (= Σ w F θ_k / Σ w F)

on every tensor the experts change; heads (`task_specific`) are not merged. An entry no example's
gradient reaches (F = 0 for all experts: a BERT pooler under mean pooling) gets the floor ε only,
hence the weighted mean of the task vectors.

The estimator (`estimator`) is the paper's true Fisher, the expectation over the model's own
predictive distribution, not over labels (calibration rows are unlabelled):
- `expected` (classification heads): the exact expectation, Σ_c p_c·(∇ log p_c)² per example,
  C backward passes per example (as the reference code's `_compute_exact_fisher_for_batch`);
- `sampled`: y drawn from p_k(·|x) (`samples` draws per example, seeded), (∇ log p(y|x))² per draw,
  an unbiased estimate of the same quantity (the reference's `y_samples` option). For a causal LM,
  x is a sequence and y one sampled next token at every real position given the true prefix:
  log p(y|x) = Σ_t log p(y_t|x_<t), the independent draws make the cross-position terms vanish in
  expectation, so the square of the sequence gradient estimates Σ_t F_t without bias.
- `auto` (default): expected for classification heads, sampled for causal LMs (an expectation over
  a vocabulary is tens of thousands of backward passes per token).

Deviation from the references, and why: both implementations read here (FusionBench, the RegMean
baseline) square the gradient of a *batch-summed* (or batch-mean) log-likelihood, which adds every
cross-example (and, in FusionBench's √p·log p form, cross-class) product g_i·g_j to the estimate:
not the Fisher, and it depends on the batch size. Here each example's gradient is squared on its own
(batch size 1 for the gradient), so the batch size changes nothing. `normalize` reproduces
FusionBench's option of scaling each F_k by 1/‖F_k‖₂ (global norm); off by default (the paper).
Floor ε = 1e-6 as FusionBench's `minimal_fisher_weight`. Defaults: every calibration row given
(`calibration.samples_per_task` caps it; FusionBench uses 256).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.learned.driver import Session, Trained

torch = lazy("torch")

METHOD = MethodDef(
    "fisher", "learned",
    "per-entry average of the experts weighted by each one's diagonal Fisher information on its own "
    "calibration rows (per-example squared gradients)",
    "Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging, NeurIPS, arXiv:2111.09832",
    (
        Param("weight", 1.0, "this expert's scale w_k in the Fisher-weighted average", scope="model",
              min=0.0),
        Param("estimator", "auto", "expected: exact expectation over the classes; sampled: y drawn from the "
              "model's prediction; auto: expected for classification heads, sampled for causal LMs",
              type=str, choices=("auto", "expected", "sampled")),
        Param("samples", 1, "draws of y per example (estimator sampled)", type=int, min=1, max=1024),
        Param("floor", 1e-6, "ε added to every Fisher entry (entries no gradient reaches get the plain "
              "weighted mean)", min=0.0, min_inclusive=False, max=1.0),
        Param("normalize", False, "scale each expert's Fisher by 1/‖F_k‖₂ (FusionBench's option)", type=bool),
    ),
    min_experts=2, needs_calibration=True,
)


def total_steps(params: dict) -> int:
    return 0


def example_fisher(log_probs: torch.Tensor, leaves: list[torch.Tensor], estimator: str, samples: int,
                   gen: torch.Generator) -> list[torch.Tensor]:
    """Squared-gradient Fisher of ONE example: `log_probs` [R, C] (R = 1 for a classifier, the real
    positions of a sequence for a causal LM), gradients w.r.t. `leaves`."""
    out = [torch.zeros_like(t) for t in leaves]

    def add(term: torch.Tensor, weight: float, retain: bool) -> None:
        grads = torch.autograd.grad(term, leaves, retain_graph=retain, allow_unused=True)
        for acc, g in zip(out, grads, strict=True):
            if g is not None:
                acc.addcmul_(g, g, value=weight)

    if estimator == "expected":
        if log_probs.shape[0] != 1:
            raise ValueError("the expected Fisher is per classified example (one row of logits)")
        p = log_probs.detach().exp()[0]
        c = log_probs.shape[1]
        for j in range(c):
            add(log_probs[0, j], float(p[j]), retain=True)
    else:
        p = log_probs.detach().float().exp()
        for d in range(samples):
            y = torch.multinomial(p.cpu(), 1, generator=gen).squeeze(1).to(log_probs.device)
            add(log_probs.gather(1, y[:, None]).sum(), 1.0 / samples, retain=d < samples - 1)
    return out


def learn(s: Session) -> Trained:
    from merge_ops.errors import InputError
    from merge_ops.learned.adapters import CausalLM
    from merge_ops.learned.batches import collate
    from merge_ops.learned.driver import Trained
    from merge_ops.learned.solved import solved_engine

    if s.mode != "in_memory":
        raise InputError("Fisher merging needs the experts in memory, which this device cannot hold (the "
                         "memory plan chose block streaming): use a larger device")
    p, inputs, names = s.params, s.inputs, s.names
    estimator = str(p["estimator"])
    causal = isinstance(s.adapter, CausalLM)
    if estimator == "auto":
        estimator = "sampled" if causal else "expected"
    if estimator == "expected" and causal:
        raise InputError("parameters.estimator: expected sums over the whole vocabulary at every token; "
                         "use sampled for a causal LM", param="parameters.estimator")
    weights = [float(w) for w in p["weight"]]
    floor = float(p["floor"])
    base = dict(inputs.base)
    tvs = dict(inputs.task_vectors)
    merged = list(tvs)
    num = {n: torch.zeros_like(base[n], dtype=torch.float64) for n in merged}
    den = {n: torch.zeros_like(base[n], dtype=torch.float64) for n in merged}
    gen = torch.Generator().manual_seed(s.ctx.spec.seed)
    total = sum(len(s.samples[t]) for t in names)
    done = 0
    s.ctx.report("learn", 0, total)
    norms = {}
    for k, task in enumerate(names):
        leaves = [(base[n] + tvs[n][k]).requires_grad_(True) for n in merged]
        params = {**base, **dict(zip(merged, leaves, strict=True))}
        fisher = [torch.zeros_like(t, dtype=torch.float64) for t in leaves]
        for sample in s.samples[task]:
            s.ctx.check_cancel()
            batch = collate([sample], s.adapter.pad_id()).to(s.device)
            logits = s.adapter.forward(params, inputs.heads[task], batch).logits
            logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # ≥ float32
            for acc, f in zip(fisher, example_fisher(logp, leaves, estimator, int(p["samples"]), gen), strict=True):
                acc.add_(f)
            done += 1
            s.ctx.report("learn", done, total)
        n_k = len(s.samples[task])
        scale = weights[k] / n_k
        if p["normalize"]:
            norm = float(sum(float((f / n_k).square().sum()) for f in fisher)) ** 0.5
            norms[task] = norm
            scale /= norm + 1e-6
        for n, f in zip(merged, fisher, strict=True):
            w = f.mul_(scale).add_(weights[k] * floor)
            den[n].add_(w)
            num[n].add_(w * tvs[n][k].to(torch.float64))
        del leaves, params, fisher
    tensors = {}
    for n in merged:
        d = den[n]
        delta = torch.where(d > 0, num[n] / d.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        tensors[n] = base[n] + delta.to(base[n].dtype)
    return Trained(solved_engine(inputs, tensors), f"Fisher merging ({estimator})", metrics={
        "estimator": estimator, "examples": {t: len(s.samples[t]) for t in names},
        **({"fisher_norms": norms} if norms else {})})
