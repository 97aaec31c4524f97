"""RegMean++: RegMean whose layer inputs come from the merged model's previous blocks.

Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for
Model Merging", arXiv:2508.03121. Official code nthehai01/RegMean-plusplus (a FusionBench fork;
upstream in FusionBench `regmean_plusplus`).

    1. tensors outside the transformer blocks: merged first (embeddings, norms: the experts'
       average; linears outside the blocks: RegMean on each expert's own inputs)
    2. X_k⁽⁰⁾ = task k's calibration rows through the merged embeddings (the input of block 0)
    3. for each block l: run *expert k's* block l on X_k⁽ˡ⁾, collecting the Grams of its linears
       (inside the block, inputs still come from expert k's own sub-layers); merge the block's linears
       by the RegMean closed form (same α shrinkage) and average its other tensors; then
       X_k⁽ˡ⁺¹⁾ = merged_block_l(X_k⁽ˡ⁾) for every task

The closed form, the safeguard and the block walk are in learned/gram.py (`propagate="merged"`).
Defaults as RegMean's in FusionBench (256 rows per task there, batch 32, α 0.95).

Deviations from the official code, and why: padding positions are not Gram rows; float64 Cholesky
with a ridge instead of torch.inverse; tensors after the last block (a final norm, a pooler) are
merged like those before it. The official CLIP code never merges `post_layernorm`, which stays at θ₀
(a side effect of its layer walk, not a choice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef
from merge_ops.methods.regmean import learn_regmean, regmean_params

if TYPE_CHECKING:
    from merge_ops.learned.driver import Session, Trained

METHOD = MethodDef(
    "regmean_plusplus", "learned",
    "RegMean block by block, each block's inputs coming from the already-merged previous blocks",
    "Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for "
    "Model Merging, arXiv:2508.03121",
    regmean_params(0.95),
    min_experts=2, needs_calibration=True,
)


def total_steps(params: dict) -> int:
    return 0


def learn(s: Session) -> Trained:
    return learn_regmean(s, "merged", "RegMean++")
