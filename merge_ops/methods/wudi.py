"""WUDI-Merging: each task vector's own rows stand in for its task's inputs; minimise the interference.

Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via
Task Vectors", ICML, arXiv:2503.08099. Official code nathanielyvo/WUDI-Merging
(`vit/wudi_main.py::get_redundant_task_vector`), also in FusionBench (`wudi`).

For each matrix (a 2-D tensor not matched by `exclude`, see static/spectral.py) with task vectors
τ₁..τ_T (m×n):

    L(τ) = Σₜ ‖(τ − τₜ)·τₜᵀ‖²_F / ‖τₜ‖²_F      the merged update's interference on the rows of each τₜ
    τ ← Σₜ τₜ                                   (task arithmetic, λ = 1)
    repeat `steps` times: one full-batch Adam step on L (lr, betas (0.9, 0.999), eps 1e-8, no decay)
    out = θ₀ + τ                                (no scaling factor: the official code applies it with 1)
    every other tensor: θ₀ + (1/T)·Σ τₜ (`fallback: mean`, FusionBench) or θ₀ (`fallback: base`, official)

Closed form (`solver: closed_form`). With Gₜ = τₜᵀτₜ/‖τₜ‖²_F, S = Σₜ Gₜ (n×n) and C = Σₜ τₜ·Gₜ (m×n),
∇L = 2·(τ·S − C), so the minimisers are τ·S = C and

    τ* = C·S⁺

the minimum-norm one, which is where gradient descent from Σ τₜ converges (it starts in S's row space
and never leaves it). This is RegMean with a data-free Gram (the reference's derivation; the official code
never computes it). It is computed in float64 from S = Q·Λ·Qᵀ, eigenvalues ≤ n·eps·λ_max counted as zero.
It is *not* the official result: 300 Adam steps at lr 1e-5 move each entry by at most ~3e-3, a truncated
optimisation, so the default stays the paper's Adam. Measured: on 4 MiniLM experts of the encoder
benchmark the closed form keeps 0.369 of the experts' accuracy (TSV-M 0.968): directions that the task
vectors barely span (eigenvalues just above the cut-off) get updates of size |C·q|/λ, which the truncated
Adam never takes. It stays an option for analysis, not a solver to merge with.

Implementation: S and C are accumulated once (one task vector in memory at a time), so an Adam step is
one m×n×n product whatever T; the gradient handed to torch.optim.Adam is the one autograd computes on the
official loss, 2·Σₜ (τ − τₜ)·Gₜ, without the official T stacked copies and T m×m products. Memory: S is
n² floats (n = the layer's input width), C and Adam's two moments m·n each.

Defaults: solver adam, steps 300 and lr 1e-5 (official; FusionBench's config runs 400 steps); every 2-D
tensor with the mean fallback (FusionBench). The official ViT code merges only attention in/out and MLP
matrices and leaves every other tensor at θ₀: `fallback: base` with an `exclude` regex naming the 2-D
tensors outside the blocks (embeddings, projections, heads) reproduces that scope.

Deviation from the official code, and why: an expert whose task vector is zero on a matrix (it left the
layer unchanged) contributes no term; the official division by ‖τₜ‖² = 0 makes the whole matrix NaN.
Adam runs in float32 (as the official code), float64 with `dtype: float64`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.lazy import lazy
from merge_ops.static.spectral import EXCLUDE

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")
spectral = lazy("merge_ops.static.spectral")

METHOD = MethodDef(
    "wudi", "static", "per matrix: minimise the merged update's interference on each task vector's rows "
    "(Adam, or the closed form)",
    "Cheng et al. 2025, Whoever Started the Interference Should End It: Guiding Data-Free Model Merging "
    "via Task Vectors, arXiv:2503.08099",
    (Param("solver", "adam", "adam: the paper's truncated Adam from Σ τₜ; closed_form: the exact minimum-norm "
           "minimiser C·S⁺ (float64)", type=str, choices=("adam", "closed_form")),
     Param("steps", 300, "Adam steps per matrix (solver adam)", type=int, min=1, max=100_000),
     Param("lr", 1e-5, "Adam learning rate (solver adam)", min=0.0, min_inclusive=False),
     Param("fallback", "mean", "tensors that are not matrices: mean (θ₀ + mean task vector, FusionBench) or "
           "base (θ₀, the official code)", type=str, choices=("mean", "base")),
     EXCLUDE))


def grams(taus: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, C, Σ τₜ) of one matrix from its task vectors; a zero τₜ adds nothing to S and C."""
    s = c = total = None
    for tau in taus:
        if total is None:
            n = tau.shape[1]
            s = torch.zeros(n, n, dtype=tau.dtype, device=tau.device)
            c, total = torch.zeros_like(tau), torch.zeros_like(tau)
        assert s is not None and c is not None
        total.add_(tau)
        norm2 = float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2
        if norm2 == 0.0:
            continue
        g = (tau.T @ tau).div_(norm2)
        s.add_(g)
        c.addmm_(tau, g)
    assert s is not None and c is not None and total is not None, "no task vectors"
    return s, c, total


def adam(s: torch.Tensor, c: torch.Tensor, start: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """`steps` Adam steps on L from `start`, with the exact gradient ∇L = 2·(τ·S − C)."""
    tau = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([tau], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    grad = torch.empty_like(start)
    tau.grad = grad
    for _ in range(steps):
        with torch.no_grad():
            torch.mm(tau, s, out=grad).sub_(c).mul_(2.0)
        opt.step()
    return tau.detach()


def closed_form(s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """C·S⁺ (the minimum-norm minimiser of L), in the inputs' dtype: pass float64."""
    lam, q = torch.linalg.eigh(s)
    top = float(lam[-1]) if lam.numel() else 0.0
    if top <= 0.0:
        return torch.zeros_like(c)
    keep = lam > top * s.shape[0] * torch.finfo(s.dtype).eps
    qk = q[:, keep]
    return ((c @ qk) / lam[keep]) @ qk.T


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.kernels import require_base

    base = require_base(x)
    x = x.with_defaults(METHOD)
    p = x.params
    b = base.to(spectral.work_dtype(x))
    if not spectral.is_matrix(x, p["exclude"]):
        if p["fallback"] == "base":
            return base.to(x.out_dtype, copy=True)
        return spectral.finish(x, b, spectral.mean_task_vector(x, b), 1.0)
    with spectral.matrix_threads():
        if p["solver"] == "closed_form":
            b64 = b.to(torch.float64)
            s, c, _ = grams(spectral.task_vector(x, t, b64) for t in range(len(x.experts)))
            delta = closed_form(s, c).to(b.dtype)
        else:
            s, c, total = grams(spectral.task_vector(x, t, b) for t in range(len(x.experts)))
            delta = adam(s, c, total, int(p["steps"]), float(p["lr"]))
    return spectral.finish(x, b, delta, 1.0)
