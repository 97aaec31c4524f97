"""RegMean: each linear layer's merged weight is the least-squares fit of every expert's outputs on
that expert's own layer inputs, in closed form from the inputs' Gram matrices.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR,
arXiv:2212.09849. Official code bloomberg/dataless-model-merging (`compute_grams`,
`regmean_mean_params`); also in FusionBench (`regmean`).

For every linear weight W (m×n) the experts change, with G_k = X_kᵀX_k/N_k the mean Gram of the
layer's inputs when expert k runs on its own calibration rows (real tokens only):

    G̃_k = α·G_k + (1 − α)·diag(G_k)
    W* = (Σ_k W_k·G̃_k)(Σ_k G̃_k)⁻¹   = argmin_W Σ_k ‖X_k·Wᵀ − X_k·W_kᵀ‖² (α = 1)
    every other tensor (biases, norms, embeddings, a linear no row reaches): the experts' average
    (`fallback: mean`, the paper) or θ₀ (`fallback: base`)

Gram collection, the float64 Cholesky solve and its safeguard (a relative ridge raised until the
system is well conditioned) are in learned/gram.py. Calibration rows are unlabelled; each expert's
Grams come from its own `calibration.tasks` set (`samples_per_task` caps it: FusionBench uses 256).

Defaults: alpha 0.95 (FusionBench's CLIP config; the official GLUE configs use 1.0 and the
emotion/NER ones 0.1), ridge 1e-6 of the mean diagonal, batch 16.

Deviations from the references, and why:
- padding positions are not Gram rows (the references include them: a padded batch then pulls every
  layer towards the padding token's activations, differently for each batch composition);
- the system is solved in float64 by Cholesky with a ridge (they call torch.inverse in float32);
- linears inside transformer blocks are collected block by block (learned/gram.py): one block's
  Grams in memory at a time rather than every layer's, the same Grams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.learned.driver import Session, Trained

torch = lazy("torch")

FALLBACK = Param("fallback", "mean", "tensors that are not linear weights: mean (the experts' average, the "
                 "paper) or base (θ₀)", type=str, choices=("mean", "base"))


def regmean_params(alpha: float) -> tuple[Param, ...]:
    """The parameters RegMean and RegMean++ share."""
    return (
        Param("alpha", alpha, "off-diagonal scale of each Gram, α·G + (1 − α)·diag(G): 1 = plain RegMean, "
              "0 = diagonal only (a per-input-feature weighted average)", min=0.0, max=1.0),
        Param("ridge", 1e-6, "ridge λ added to Σ G̃ as a fraction of its mean diagonal (raised tenfold "
              "while the system is ill-conditioned)", min=0.0, max=1.0),
        Param("batch_size", 16, "calibration samples per forward pass (Grams sum over all of them)",
              type=int, min=1, max=65536),
        FALLBACK,
    )


METHOD = MethodDef(
    "regmean", "learned",
    "per linear layer: the closed-form least-squares merge of the experts' outputs on their own "
    "inputs (input Gram matrices from calibration data)",
    "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR, "
    "arXiv:2212.09849",
    regmean_params(0.95),
    min_experts=2, needs_calibration=True,
)


def total_steps(params: dict) -> int:
    return 0  # no optimisation steps; progress is reported per expert and block


def learn(s: Session) -> Trained:
    return learn_regmean(s, "own", "RegMean")


def learn_regmean(s: Session, propagate: str, variant: str) -> Trained:
    """RegMean (`own`) or RegMean++ (`merged`) through the learned driver's setup and outputs."""
    from merge_ops.errors import InputError
    from merge_ops.learned import gram
    from merge_ops.learned.driver import Trained
    from merge_ops.learned.solved import fallback_tensors, solved_engine

    if s.mode != "in_memory":
        raise InputError(f"{variant} needs the experts in memory, which this device cannot hold "
                         "(the memory plan chose block streaming): use a larger device")
    p, inputs = s.params, s.inputs
    fallback = fallback_tensors(inputs, str(p["fallback"]))
    pad = s.adapter.pad_id()
    batches = {t: gram.fixed_batches(s.samples[t], int(p["batch_size"]), pad) for t in s.names}
    s.ctx.report("learn", 0, None)
    res = gram.regmean(s.adapter.module, dict(inputs.base), dict(inputs.task_vectors), fallback, batches,
                       propagate=propagate, alpha=float(p["alpha"]), ridge=float(p["ridge"]), device=s.device,
                       progress=lambda i, n: (s.ctx.check_cancel(), s.ctx.report("learn", i, n)))
    engine = solved_engine(inputs, {**fallback, **res.tensors})
    return Trained(engine, variant, metrics={
        "n_merged_tensors": len(inputs.task_vectors), "n_regression_linears": len(res.tensors),
        "max_ridge": res.max_ridge, "gram_rows": res.rows})
