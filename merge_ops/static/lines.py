"""LiNeS layer scaling of the merged task vector (an option of the task-vector methods; its
parameters are declared in declare.LINES).

Wang et al. 2025, "LiNeS: Post-training layer scaling prevents forgetting and enhances model
merging", ICLR, arXiv:2410.17146. Shallow layers hold general features that merging should disturb
least, so the merged task vector of block l (0-based, of L) is scaled by

    λ(l) = α + β · l / (L − 1)        (l / (L − 1) taken as 0 when L = 1)

and tensors outside the blocks (embeddings, final norm, head) by α. Defaults: `lines` off,
β = 0.5, α = null: the paper's α = ‖Σ τᵢ‖₁ / ‖τ_merged‖₁ / N, which is 1/N for a summed task
vector (normalize: false) and taken as 1 for an averaged one (normalize: true). The scale
multiplies `lambda`.
"""

from __future__ import annotations

from merge_ops.static.inputs import TensorInputs


def scale(x: TensorInputs, normalized: bool) -> float:
    """The LiNeS factor for tensor `x` (1.0 when `lines` is off)."""
    if not x.params.get("lines"):
        return 1.0
    alpha = x.params.get("lines_alpha")
    if alpha is None:
        alpha = 1.0 if normalized else 1.0 / max(len(x.experts), 1)
    alpha = float(alpha)
    if x.layer is None:
        return alpha
    depth = x.layer / (x.n_layers - 1) if x.n_layers > 1 else 0.0
    return alpha + float(x.params["lines_beta"]) * depth
