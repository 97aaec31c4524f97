"""What the data-free per-matrix methods share (tsv_m, iso_c, iso_cts, wudi).

Each of them looks at one tensor's task vectors τₜ = expertₜ − base (t = 1..T) and splits tensors in two:

- a *matrix*: a 2-D tensor (linear weights, and also embeddings, position embeddings and heads: the
  papers' and FusionBench's rule is "every 2-D tensor") whose name the method's `exclude` regex does
  not match. It gets the method's SVD or interference treatment.
- everything else (norms, biases, 1-D scales, excluded tensors): the method's fallback, the mean task
  vector (1/T)·Σ τₜ as in the TSV-M and Iso authors' code and FusionBench (WUDI: see its `fallback`).

Precision: matrix math runs in float32, the precision of the reference codes (FusionBench upcasts half
precision to it); in float64 when the spec's compute dtype is float64. Task vectors are formed from the
stored (e.g. bf16) weights exactly in that dtype. Whole matrices are decomposed, so unlike the blocked
task-vector kernels these hold a few fp32 copies of one matrix at a time.

Numerically zero singular directions. The singular vectors of a zero (or numerically zero) singular
value are an arbitrary orthonormal completion chosen by LAPACK. The reference codes feed them into
orthogonalisations and spectrum flattening, so an expert that left a matrix unchanged, a low-rank
(LoRA-merged) task vector or two identical experts give results that depend on the library build.
Here such directions are dropped: `polar` is the partial isometry of the polar decomposition (only
singular values above the rank tolerance), and truncated SVDs zero components below it. On full-rank
inputs, the usual case, this is exactly the reference computation.

The tolerance is the rounding level of the SVD itself, ½·sqrt(m+n+1)·eps·σ_max (Numerical Recipes'
default), not numpy matrix_rank's max(m, n)·eps·σ_max: the fine-tuned attention query/key weights of
all-MiniLM-L6-v2 (inputs from a LayerNorm, likely why their rows stay nearly ⊥ one direction) have one
small but well-separated singular value, 80-380·eps32·σ_max in the spectra tested here (Δ, the stacked
singular vectors); max(m, n) = 384 dropped it in float32, which moved TSV-M / Iso-C / Iso-CTS results by
18-29 % of a tensor's largest change against FusionBench and against the float64 result.
The computed singular values of exactly rank-deficient float32 matrices measured 1.5-9·eps·σ_max for
64×48 to 2048×2048 (about 0.2·sqrt(max(m, n)), under the tolerance by a factor 3-4).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param, regex_problem
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")


EXCLUDE = Param("exclude", None, "regex (searched in tensor names) of 2-D tensors that get the method's fallback "
                "instead of the matrix treatment; null = none (every 2-D tensor, the papers' rule)",
                type=str, nullable=True, check=regex_problem)


def alpha(default: float, source: str) -> Param:
    """The scaling factor α of θ = θ₀ + α·τ_merged (every tensor, the fallback included)."""
    return Param("alpha", default, f"scale of the merged task vector, every tensor included ({source}); the "
                 "authors pick it on validation data", min=0.0)


# -- tensors ---------------------------------------------------------------------------------------
def work_dtype(x: TensorInputs) -> torch.dtype:
    return torch.float64 if x.compute_dtype == torch.float64 else torch.float32


def is_matrix(x: TensorInputs, exclude: str | None) -> bool:
    """Whether this tensor gets the method's matrix treatment."""
    assert x.base is not None
    if x.base.dim() != 2 or x.base.numel() == 0:
        return False
    return not (exclude and re.search(exclude, x.name))


def task_vector(x: TensorInputs, i: int, base: torch.Tensor) -> torch.Tensor:
    """τᵢ = expertᵢ − base in base's dtype (the work dtype), a fresh tensor (never a view of an input)."""
    return torch.sub(x.experts[i].to(base.dtype), base)


def mean_task_vector(x: TensorInputs, base: torch.Tensor) -> torch.Tensor:
    """(1/T)·Σ τₜ: the fallback of every method here."""
    acc = torch.zeros_like(base)
    for e in x.experts:
        acc.add_(e.to(base.dtype))
    return acc.div_(len(x.experts)).sub_(base)


def finish(x: TensorInputs, base: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """θ₀ + scale·δ in the output dtype."""
    return base.add(delta, alpha=scale).to(x.out_dtype)


def merge_matrices(x: TensorInputs, method: MethodDef,
                   solve: Callable[[TensorInputs, Callable[[int], torch.Tensor], int], torch.Tensor], *,
                   min_side: Callable[[int], int] = lambda n_tasks: 1) -> torch.Tensor:
    """The skeleton the SVD methods share: θ₀ + α·δ, where 2-D tensors (not excluded, smaller side at
    least `min_side(T)`) get δ = `solve(x, τ, T)` with τ(t) the t-th task vector, and every other
    tensor the mean task vector."""
    from merge_ops.static.kernels import require_base

    base = require_base(x)
    x = x.with_defaults(method)
    b = base.to(work_dtype(x))
    scale, n_tasks = float(x.params["alpha"]), len(x.experts)
    if not is_matrix(x, x.params["exclude"]) or min(base.shape) < min_side(n_tasks):
        return finish(x, b, mean_task_vector(x, b), scale)
    with matrix_threads():
        delta = solve(x, lambda t: task_vector(x, t, b), n_tasks)
    return finish(x, b, delta, scale)


@contextmanager
def matrix_threads() -> Iterator[None]:
    """All cores for the decompositions and products of one matrix (ALLOY_MATRIX_THREADS to cap them).

    The streaming driver runs merges with one intra-op thread, right for its many small memory-bound
    block ops; an SVD or an m×n×n product is compute-bound and scales with cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = int(os.environ.get("ALLOY_MATRIX_THREADS", "0")) or cores
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, want))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- spectra ---------------------------------------------------------------------------------------
def tolerance(largest: float | torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Singular values at or below this are rounding noise of the SVD: ½·sqrt(m+n+1)·eps·σ_max (see above)."""
    return float(largest) * 0.5 * (sum(shape) + 1) ** 0.5 * torch.finfo(dtype).eps


def rank_tolerance(largest: float | torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """numpy matrix_rank's max(m, n)·eps·σ_max: for matrices formed by a cancelling float computation
    (Iso-CTS's residual τ − U_c·U_cᵀ·τ), whose rounding grows with the projection's rank, beyond `tolerance`."""
    return float(largest) * max(shape) * torch.finfo(dtype).eps


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of a = P·Σ·Qᵀ: P·Qᵀ over the singular values above the rank tolerance.

    For a matrix of full column (row) rank this is the nearest matrix with orthonormal columns (rows),
    the "whitening" of TSV-M and Iso-CTS; columns in a's null space (zero columns, repeated directions)
    contribute nothing instead of an arbitrary direction.
    """
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    keep = s > tolerance(s[0] if s.numel() else 0.0, tuple(a.shape), a.dtype)
    return p[:, keep] @ qh[keep]


def top_svd(a: torch.Tensor, k: int, largest: float | torch.Tensor | None = None,
            rule: Callable[[float | torch.Tensor, tuple[int, ...], torch.dtype], float] = tolerance
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k triplets (U: m×k, S: k, Vᵀ: k×n) of a thin SVD; triplets whose singular value is at or
    below `rule` (relative to `largest`, default a's own σ_max) are zeroed, so they add nothing to a
    later orthogonalisation."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    u, s, vh = u[:, :k], s[:k].clone(), vh[:k]
    ref = (s[0] if s.numel() else 0.0) if largest is None else largest
    dead = s <= rule(ref, tuple(a.shape), a.dtype)
    if bool(dead.any()):
        u, vh = u.clone(), vh.clone()
        u[:, dead], s[dead], vh[dead] = 0, 0, 0
    return u, s, vh
