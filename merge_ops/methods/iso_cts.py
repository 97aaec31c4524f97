"""Iso-CTS: isotropic merging in a common subspace plus one task-specific subspace per task.

Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML, arXiv:2502.04959. Official code danielm1405/iso-merging (`iso_cts`), the same in
FusionBench (`isotropic_merging`).

For each matrix (a 2-D tensor not matched by `exclude`, see static/spectral.py) with task vectors
τ₁..τ_T (m×n), r = min(m, n) and common fraction f:

    1. sizes: k_c = ⌊r·f⌋;  s = round((r − k_c)/T)·T;  k_c = r − s;  k_t = s/T per task
    2. common subspace: the top k_c triplets (U_c, S_c, V_c) of Δ = Σₜ τₜ
    3. task subspaces: Rₜ = τₜ − U_c·U_cᵀ·τₜ (the common *left* subspace projected out); its top k_t triplets
    4. stack the task blocks t = 1..T, then the common block: U (m×r), S (r), Vᵀ (r×n)
    5. whiten: U⊥ = polar(U), V⊥ᵀ = polar(Vᵀ)
    6. τ = mean(S)·U⊥·V⊥ᵀ        (common and task σ's averaged together: an isotropic spectrum)
    every other tensor: τ = (1/T)·Σ τₜ
    out = θ₀ + α·τ               (α scales every tensor, the mean included)

Defaults: common_space_fraction 0.8 (official and FusionBench configs); alpha 1.5, the value of
FusionBench's documentation and result table (CLIP ViT-B/32 × 8 tasks: 82.7; its config file says 1.0);
the authors sweep α ∈ {0.1, …, 3.0} on validation data.
When the spec has evaluation sets with labelled rows and does not set `alpha`, α is chosen on them
as the authors do (grid 0.2…3.0 then ±0.1, best mean normalised score: static/alpha_select.py).

Deviations from the official code, and why:
- round() is Python's (half to even) as in the official code, but when s would exceed r (tiny matrices,
  many tasks: e.g. r = 7, T = 2, f = 0 gives s = 8) s drops by T; the official code then slices with a
  negative k_c.
- Triplets at rounding level (a task vector inside the common subspace, one no expert changed, a
  rank-deficient Δ) are dropped before whitening, and whitened directions of zero slots carry no σ̄
  (spectral.py): LAPACK's arbitrary null-space vectors would otherwise enter the result with the mean
  singular value. σ̄ is still the mean over all r slots. Identical on full-rank inputs.
SVDs in float32 (as the official code and FusionBench), float64 with `dtype: float64`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.lazy import lazy
from merge_ops.static.spectral import EXCLUDE, alpha

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")
spectral = lazy("merge_ops.static.spectral")

METHOD = MethodDef(
    "iso_cts", "static", "per matrix: a common subspace of the summed task vector plus each task's own "
    "residual directions, whitened, every singular value set to their mean",
    "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, arXiv:2502.04959",
    (alpha(1.5, "FusionBench's documented value"),
     Param("common_space_fraction", 0.8, "fraction f of the min(m, n) directions given to the common "
           "subspace of Σ τₜ (the rest is split evenly among the tasks)", min=0.0, max=1.0),
     EXCLUDE))


def sizes(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(k_c, k_t): common directions and directions per task, k_c + T·k_t = r."""
    common = int(r * fraction)
    specific = round((r - common) / n_tasks) * n_tasks
    while specific > r:  # the official code would slice with a negative k_c here
        specific -= n_tasks
    return r - specific, specific // n_tasks


def iso_cts(task_vector: Callable[[int], torch.Tensor], n_tasks: int, fraction: float) -> torch.Tensor:
    """τ_Iso-CTS of one matrix; `task_vector(t)` gives τₜ (each is asked for twice, so none is kept)."""
    delta = task_vector(0)
    for t in range(1, n_tasks):
        delta.add_(task_vector(t))
    (m, n), dt, dev = delta.shape, delta.dtype, delta.device
    r = min(m, n)
    k_c, k_t = sizes(r, n_tasks, fraction)
    u_c, s_c, vh_c = spectral.top_svd(delta, k_c)
    del delta
    u_all = torch.zeros(m, r, dtype=dt, device=dev)
    s_all = torch.zeros(r, dtype=dt, device=dev)
    vh_all = torch.zeros(r, n, dtype=dt, device=dev)
    if k_t:
        for t in range(n_tasks):
            tau = task_vector(t)
            resid = tau - u_c @ (u_c.T @ tau)
            # rounding level of the residual is set by τₜ's scale (‖τₜ‖_F ≥ σ_max(τₜ)), not by its own, and
            # grows with k_c (9·eps·‖τₜ‖_F measured at 64×48): numpy's wider max(m, n) rule here
            u, s, vh = spectral.top_svd(resid, k_t, largest=torch.linalg.matrix_norm(tau),
                                        rule=spectral.rank_tolerance)
            sl = slice(t * k_t, (t + 1) * k_t)
            u_all[:, sl], s_all[sl], vh_all[sl] = u, s, vh
    common = slice(n_tasks * k_t, r)
    u_all[:, common], s_all[common], vh_all[common] = u_c, s_c, vh_c
    return s_all.mean() * (spectral.polar(u_all) @ spectral.polar(vh_all))


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    return spectral.merge_matrices(
        x, METHOD, lambda x, tau, n: iso_cts(tau, n, float(x.params["common_space_fraction"])))
