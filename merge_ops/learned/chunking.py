"""Expert Merging++: how important each merged tensor is, and how many coefficient chunks it gets.

After a layer-wise Expert Merging run (one coefficient α_k^ℓ per expert k and tensor ℓ):

    I_ℓ = Norm( Σ_k |α_k^ℓ| · s_k^ℓ · n_ℓ )      s_k^ℓ = mean |τ_k^ℓ|,  n_ℓ = numel,  Norm = ℓ₁ over ℓ
    m_ℓ = ⌊ B · I_ℓ^κ / Σ_j I_j^κ ⌋               B = chunk budget, κ = concentration

Σ|α|·s·n is the total magnitude the tensor's learned update carries, so I_ℓ ranks tensors by how much
of the merge happens there. κ = 0 gives every tensor ⌊B/L⌋ chunks (uniform chunking); κ > 1
concentrates the budget on the important ones. m_ℓ = 0 keeps one fixed coefficient for the tensor.
The flooring means Σ m_ℓ ≤ B always. m_ℓ is capped at n_ℓ (a chunk needs at least one entry), and
ParamGroups cuts exactly m_ℓ non-empty slices (torch.tensor_split sizes), so a tensor never gets
fewer chunks than planned — unlike the authors' `torch.chunk`, which may return fewer.

The paper gives the formulas; the authors' code hand-writes the chunk counts, so this module is ours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def importance(alpha: Mapping[str, Sequence[float]], tv_abs_mean: Mapping[str, Sequence[float]],
               numel: Mapping[str, int]) -> dict[str, float]:
    """I_ℓ per tensor (sums to 1; all equal when every raw score is 0)."""
    raw = {n: sum(abs(a) * s for a, s in zip(alpha[n], tv_abs_mean[n], strict=True)) * numel[n]
           for n in alpha}
    total = sum(raw.values())
    if total <= 0 or not math.isfinite(total):
        return {n: 1.0 / len(raw) for n in raw} if raw else {}
    return {n: v / total for n, v in raw.items()}


def allocate_chunks(imp: Mapping[str, float], budget: int, kappa: float,
                    numel: Mapping[str, int]) -> dict[str, int]:
    """m_ℓ = ⌊budget · I_ℓ^κ / Σ_j I_j^κ⌋, capped at numel; Σ m_ℓ ≤ budget."""
    if budget < 0:
        raise ValueError(f"chunk budget must be ≥ 0, got {budget}")
    if kappa < 0:
        raise ValueError(f"kappa must be ≥ 0, got {kappa}")
    # 0**0 == 1: with κ = 0 even a zero-importance tensor gets its uniform share
    w = {n: (float(v) ** kappa if v > 0 or kappa == 0 else 0.0) for n, v in imp.items()}
    total = sum(w.values())
    if total <= 0:
        return dict.fromkeys(imp, 0)
    return {n: min(int(math.floor(budget * x / total + 1e-9)), int(numel[n])) for n, x in w.items()}


def budget_from_ratio(ratio: float, n_tensors: int) -> int:
    """B as a multiple of the layer-wise coefficient count (one per tensor and expert)."""
    return int(round(ratio * n_tensors))


def plot_plan(imp: Mapping[str, float], plan: Mapping[str, int], path: str | Path,
              title: str = "Expert Merging++ importance and chunk plan") -> None:
    """Two aligned bar charts over the merged tensors: importance I_ℓ and chunks m_ℓ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(imp)
    n = len(names)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(min(4 + 0.18 * n, 40), 6), sharex=True)
    a1.bar(range(n), [imp[x] for x in names], color="tab:blue")
    a1.set_ylabel("importance I")
    a1.set_title(title)
    a2.bar(range(n), [plan.get(x, 0) for x in names], color="tab:orange")
    a2.set_ylabel("chunks m (0 = fixed)")
    if n <= 150:  # beyond that the labels overlap into noise
        a2.set_xticks(range(n), names, rotation=90, fontsize=max(3, min(7, 700 // max(n, 1))))
    else:
        a2.set_xlabel(f"{n} merged tensors, in checkpoint order")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
