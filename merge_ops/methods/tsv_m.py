"""TSV-M: merge the task vectors' top singular vectors after whitening them.

Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR,
arXiv:2412.00081. Official code AntoAndGar/task_singular_vectors (`compute_and_sum_svd_mem_reduction`),
also in FusionBench (`task_singular_vector`).

For each matrix (a 2-D tensor not matched by `exclude`, see static/spectral.py) with task vectors
τ₁..τ_T (m×n) and r = min(m, n):

    1. τₜ = Uₜ·Sₜ·Vₜᵀ (thin SVD);   k = ⌊r/T⌋ directions per task
    2. concatenate the top k of every task:
           U = [U₁[:, :k] … U_T[:, :k]]  (m×r),  S = [S₁[:k] … S_T[:k]],  Vᵀ = [V₁ᵀ[:k]; …; V_Tᵀ[:k]]  (r×n)
       the r − kT leftover slots stay zero
    3. whiten: U⊥ = polar(U), V⊥ᵀ = polar(Vᵀ)     (the nearest matrices with orthonormal columns / rows)
    4. τ = U⊥·diag(S)·V⊥ᵀ                          (singular values not renormalised: each task keeps its own)
    every other tensor: τ = (1/T)·Σ τₜ
    out = θ₀ + α·τ                                  (α scales every tensor, the mean included)

Defaults: alpha 1, as FusionBench's config and its committed CLIP ViT-B/32 8-task result (83.1); the
authors sweep α ∈ {0.1, …, 3.0} on labelled validation data and report the best.
When the spec has evaluation sets with labelled rows and does not set `alpha`, α is chosen on them
as the authors do (grid 0.2…3.0 then ±0.1, best mean normalised score: static/alpha_select.py).

Deviations from the official code, and why:
- k = r // T. The official int(r·(1/T)) is one less for some (r, T), e.g. T = 49, by float rounding.
- A matrix with r < T (k = 0, e.g. a 2-class head merged from 8 experts) gets the mean task vector; the
  official code returns a zero update there, silently dropping every expert's change.
- Singular triplets at rounding level are dropped before whitening (spectral.py): an expert that left a
  matrix unchanged, a low-rank (LoRA-merged) task vector or two identical experts otherwise feed LAPACK's
  arbitrary null-space vectors into the polar factors. Identical on full-rank task vectors.
SVDs run in float32 (as the official code and FusionBench), in float64 with `dtype: float64`.
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
    "tsv_m", "static", "per matrix: each task's top 1/T singular vectors, whitened (polar factors), "
    "recombined with their singular values",
    "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, arXiv:2412.00081",
    (alpha(1.0, "FusionBench's default"), EXCLUDE))


def tsv(taus: Iterable[torch.Tensor], n_tasks: int) -> torch.Tensor:
    """τ_TSV of one matrix from its n_tasks task vectors (an iterable, so they can come one at a time)."""
    u_cat = s_cat = vh_cat = None
    k = 0
    for t, tau in enumerate(taus):
        if u_cat is None:
            (m, n), dt, dev = tau.shape, tau.dtype, tau.device
            r = min(m, n)
            k = r // n_tasks
            u_cat = torch.zeros(m, r, dtype=dt, device=dev)
            s_cat = torch.zeros(r, dtype=dt, device=dev)
            vh_cat = torch.zeros(r, n, dtype=dt, device=dev)
        u, s, vh = spectral.top_svd(tau, k)
        u_cat[:, t * k:(t + 1) * k], s_cat[t * k:(t + 1) * k], vh_cat[t * k:(t + 1) * k] = u, s, vh
    assert u_cat is not None and s_cat is not None and vh_cat is not None, "no task vectors"
    return spectral.polar(u_cat) @ (s_cat[:, None] * spectral.polar(vh_cat))


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    return spectral.merge_matrices(x, METHOD, lambda x, tau, n: tsv((tau(t) for t in range(n)), n),
                                   min_side=lambda n: n)
