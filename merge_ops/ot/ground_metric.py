"""Ground metric and transport map: the cost of sending model neuron i to anchor neuron j, and T.

Features (OTFusion §3.1 step 2): in *weights* mode a neuron is its producing rows (weight row with
its incoming axis already aligned, plus its bias), in *activations* mode its pre-activation values
on the calibration inputs. Cost = Euclidean distance between features (squared optional, as
OTFusion's default), divided by its max so that Sinkhorn's `reg` means the same for every layer
(Imfeld et al.'s shipped `norm: max`; exact OT is unchanged by the scaling).

Transport (step 4-5): uniform marginals, `ot.emd` or `ot.sinkhorn`, a check that T is a coupling
(ΣT = 1), then the correction T ← T·diag(1/β) with β = Tᵀ1 — the n·T of the paper when β is
exactly uniform — so every anchor neuron is a convex combination of model neurons; axes that read
the space use the row-normalised diag(1/α)·T instead, which matters only when widths differ.
"""

from __future__ import annotations

import numpy as np
import ot
import torch

from merge_ops.errors import MergeFailed


def cost_matrix(x: torch.Tensor, y: torch.Tensor, *, squared: bool = False, normalize: str = "max") -> torch.Tensor:
    """[n, m] distances between rows of x [n, f] and rows of y [m, f], in float64."""
    x, y = x.double(), y.double()
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    m = d2.clamp_min(0.0) if squared else d2.clamp_min(0.0).sqrt()
    if normalize == "max":
        top = m.max()
        return m / top if top > 0 else m
    if normalize == "none":
        return m
    raise ValueError(f"unknown ground-metric normalisation {normalize!r}: use max or none")


def transport_map(cost: torch.Tensor, *, solver: str = "exact", reg: float = 0.05) -> torch.Tensor:
    """Coupling T [n, m] with uniform marginals for the cost [n, m] (float64)."""
    n, m = cost.shape
    mu, nu = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    c = cost.detach().cpu().numpy().astype(np.float64)
    if solver == "exact":
        t = ot.emd(mu, nu, c)
    elif solver == "sinkhorn":
        if reg <= 0:
            raise MergeFailed("Sinkhorn needs reg > 0; use solver: exact for unregularised OT")
        t = ot.sinkhorn(mu, nu, c, reg, method="sinkhorn_log", numItermax=2000, stopThr=1e-9)
    else:
        raise ValueError(f"unknown solver {solver!r}: use exact or sinkhorn")
    t = torch.from_numpy(np.asarray(t, dtype=np.float64))
    total = float(t.sum())
    if not np.isfinite(total) or abs(total - 1.0) > 1e-3:
        raise MergeFailed(f"transport map sums to {total:.6f}, not 1: the solver did not converge "
                          f"(solver={solver}, reg={reg}); raise reg or use solver: exact")
    return t


def correct(t: torch.Tensor, side: str = "out") -> torch.Tensor:
    """The coupling T turned into the map that carries one axis to the anchor's units.

    out: axes indexed by the space's neurons (rows of W, biases, norms): T·diag(1/β), β = Tᵀ1, so
         each anchor neuron is the barycentre of the model neurons sent to it (n_anchor·T).
    in:  axes that *read* the space (columns of the next W): diag(1/α)·T, α = T1, so a model neuron
         split over several anchor neurons is read from all of them, and neurons merged into one
         anchor neuron add their contributions (n_model·T). Both are n·T when the widths agree.
    """
    tiny = torch.finfo(t.dtype).tiny
    if side == "out":
        return t / t.sum(0, keepdim=True).clamp_min(tiny)
    if side == "in":
        return t / t.sum(1, keepdim=True).clamp_min(tiny)
    raise ValueError(f"side must be out or in, got {side!r}")
