"""Iso-C: flatten the spectrum of the summed task vectors (isotropic merging in the common subspace).

Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML, arXiv:2502.04959. Official code danielm1405/iso-merging (`iso_c`), also in FusionBench
(`isotropic_merging`).

For each matrix (a 2-D tensor not matched by `exclude`, see static/spectral.py) with task vectors
τ₁..τ_T (m×n) and r = min(m, n):

    1. Δ = Σₜ τₜ = U·S·Vᵀ (thin SVD)
    2. τ = mean(S)·U·Vᵀ          every one of the r singular values replaced by their mean σ̄:
                                 full rank, σ̄ times the polar factor of the task-arithmetic sum
    every other tensor: τ = (1/T)·Σ τₜ
    out = θ₀ + α·τ               (α scales every tensor, the mean included)

Defaults: alpha 1.5, the value of FusionBench's documentation and result table (CLIP ViT-B/32 × 8 tasks:
82.8); its config file says 1.0, and the authors sweep α ∈ {0.1, …, 3.0} on validation data (tuned values
reported elsewhere: 1.3–1.5 for CLIP B/32–L/14). α matters more than for most methods: every weak
direction of Δ is raised to σ̄.
When the spec has evaluation sets with labelled rows and does not set `alpha`, α is chosen on them
as the authors do (grid 0.2…3.0 then ±0.1, best mean normalised score: static/alpha_select.py).

Deviation from the official code, and why: directions whose singular value is at rounding level
(≤ ½·sqrt(m+n+1)·eps·σ_max, spectral.py) are left out of U·Vᵀ, while σ̄ is still the mean of all r
values. Their singular vectors are an arbitrary completion chosen by LAPACK (a rank-deficient Δ: low-rank
task vectors, or a matrix no expert changed), so the official result there depends on the library build.
Identical on full-rank Δ. The one case seen on real experts: Δ of all-MiniLM-L6-v2's layer-4 attention
query (4 experts) has σ_min = 0.5·eps32·σ_max (1.9 as float32 computes it, inside the 1.5-9 band where
exact zeros land); FusionBench adds σ̄·u·vᵀ for it (17 % of that tensor's largest change), Alloy does not
in float32 and does with `dtype: float64`.
SVD in float32 (as the official code and FusionBench), float64 with `dtype: float64`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef
from merge_ops.lazy import lazy
from merge_ops.static.spectral import EXCLUDE, alpha

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")
spectral = lazy("merge_ops.static.spectral")

METHOD = MethodDef(
    "iso_c", "static", "per matrix: the summed task vector with every singular value set to their mean",
    "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, arXiv:2502.04959",
    (alpha(1.5, "FusionBench's documented value"), EXCLUDE))


def iso(taus: Iterable[torch.Tensor]) -> torch.Tensor:
    """τ_Iso-C of one matrix from its task vectors (an iterable, so they can come one at a time)."""
    delta: torch.Tensor | None = None
    for tau in taus:
        delta = tau.clone() if delta is None else delta.add_(tau)
    assert delta is not None, "no task vectors"
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = s > spectral.tolerance(s[0], tuple(delta.shape), delta.dtype)
    return s.mean() * (u[:, keep] @ vh[keep])


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    return spectral.merge_matrices(x, METHOD, lambda x, tau, n: iso(tau(t) for t in range(n)))
