"""STF: superpose each task's own features, so the merged matrix maps every task's top input directions
to that task's outputs (a linear system per matrix, training- and data-free).

Qiu et al. 2025, "Superpose Task-specific Features for Model Merging", EMNLP (v1: "Superpose Singular
Features for Model Merging", SFTM), arXiv:2502.10698. Code LARS-research/STF, which could not be read:
this is implemented from the paper's description (SVD of each task matrix gives its feature bases; a
linear system keeps each task's input→output feature mapping), see ../shared/reference/more-methods.md §8.

For each matrix (a 2-D tensor not matched by `exclude`, see static/spectral.py) with task vectors
τ₁..τ_T (m×n), r = min(m, n) and k = ⌊r·f⌋ directions per task (f = `rank_fraction`, default 1/T):

    1. τₜ = Uₜ·Sₜ·Vₜᵀ; keep the top k triplets of each task
    2. the merged update must reproduce every kept feature on its own input direction:
           τ·v_{t,i} = σ_{t,i}·u_{t,i}   for all t, i         i.e.  τ·A = B
       with A = [V₁ … V_T] (n × Tk) and B = [U₁S₁ … U_TS_T] (m × Tk)
    3. τ = B·(AᵀA + λ·I)⁻¹·Aᵀ                                (λ = `ridge`; λ → 0: the minimum-norm
                                                              least-squares solution B·A⁺)
    every other tensor: τ = (1/T)·Σ τₜ
    out = θ₀ + α·τ

Equivalently τ = (Σₜ τₜ·Pₜ)(Σₜ Pₜ)⁺ with Pₜ = VₜVₜᵀ (projector on task t's kept input directions): a
data-free RegMean whose Gram is each task's row-space projector. When the tasks' kept input
directions are linearly independent (Tk ≤ n and no overlap) every task's features are reproduced
exactly; when they are orthogonal the result is Σₜ (rank-k τₜ): each task's update acts only on its
own inputs. Where directions overlap, the system is a least-squares compromise.

Choices made without the code (say so when comparing with the paper): k = ⌊r/T⌋ as TSV-M (Tk ≤ r,
so the system is square at most); the singular values are kept (the features' magnitudes, not unit
directions); λ = 1e-2 (AᵀA has eigenvalues in [0, T]; nearly parallel input directions of two tasks
with different outputs would otherwise get amplified updates ~1/angle, which a ridge caps); α = 1.
Solved in float64 (a Tk×Tk system), SVDs in float32 (float64 with `dtype: float64`).
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
    "stf", "static", "per matrix: the linear system that maps each task's top input directions to its own "
    "output features (superposed task-specific features)",
    "Qiu et al. 2025, Superpose Task-specific Features for Model Merging, EMNLP, arXiv:2502.10698",
    (alpha(1.0, "no scaling: the system already fixes the features' magnitudes"),
     Param("rank_fraction", None, "fraction f of min(m, n) kept per task (k = ⌊min(m, n)·f⌋, at least 1); "
           "null = 1/T", nullable=True, min=0.0, max=1.0, min_inclusive=False),
     Param("ridge", 1e-2, "λ of (AᵀA + λI)⁻¹: caps the update along nearly shared input directions "
           "(0 = exact minimum-norm least squares)", min=0.0, max=100.0),
     EXCLUDE))


def stf(task_vector: Callable[[int], torch.Tensor], n_tasks: int, k: int, ridge: float) -> torch.Tensor:
    """τ_STF of one matrix (float64) from `task_vector(t)`, k directions per task."""
    a_cols, b_cols = [], []
    for t in range(n_tasks):
        u, s, vh = spectral.top_svd(task_vector(t), k)
        keep = s > 0  # triplets at rounding level carry no feature
        a_cols.append(vh[keep].T.to(torch.float64))
        b_cols.append((u[:, keep] * s[keep]).to(torch.float64))
    a, b = torch.cat(a_cols, 1), torch.cat(b_cols, 1)
    if a.shape[1] == 0:
        return torch.zeros(b.shape[0], a.shape[0], dtype=torch.float64)
    gram = a.T @ a
    if ridge > 0:
        gram.diagonal().add_(ridge)
        coef = torch.linalg.solve(gram, b.T)  # (AᵀA + λI)⁻¹·Bᵀ
    else:
        coef = torch.linalg.pinv(gram, hermitian=True) @ b.T
    return coef.T @ a.T


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    def solve(x: TensorInputs, tau: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
        m, cols = x.base.shape  # type: ignore[union-attr]
        f = x.params["rank_fraction"]
        k = max(1, int(min(m, cols) * (1.0 / n if f is None else float(f))))
        return stf(tau, n, k, float(x.params["ridge"])).to(spectral.work_dtype(x))

    return spectral.merge_matrices(x, METHOD, solve)
