"""Mean prediction entropy over a vocabulary, in row blocks (AdaMerging's objective on a causal LM)."""

from __future__ import annotations

import torch


class MeanEntropy(torch.autograd.Function):
    """mean over rows of −Σ p log p, p = softmax(z) in float32, row block by row block, saving only z:
    autograd's log_softmax, exp and product each kept an [N, C] float32 copy, and over a vocabulary
    of 49k with a step's tasks in one forward those were its largest activations. The gradient,
    −p ⊙ (log p + H) per row, is re-formed from z in backward."""

    ROWS_BYTES = 1 << 22  # float32 bytes of one row block

    @staticmethod
    def _blocks(z: torch.Tensor):
        step = max(1, MeanEntropy.ROWS_BYTES // (4 * max(z.shape[-1], 1)))
        for a in range(0, z.shape[0], step):
            logp = z[a: a + step].float().log_softmax(-1)
            yield a, logp, logp.exp()

    @staticmethod
    def forward(ctx, z):  # type: ignore[override]
        ctx.save_for_backward(z)
        total = torch.zeros((), dtype=torch.float32, device=z.device)
        for _, logp, p in MeanEntropy._blocks(z):
            total -= (p * logp).sum()
        return total / z.shape[0]  # no rows: NaN, which fails the step with a message (as the mean did)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        out = torch.empty_like(z)
        scale = g / max(z.shape[0], 1)
        for a, logp, p in MeanEntropy._blocks(z):
            h = -(p * logp).sum(-1, keepdim=True)
            out[a: a + len(p)] = (-(p * (logp + h)) * scale).to(z.dtype)
        return out


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """mean over the rows of [N, C] logits of the softmax's entropy, in float32 (NaN for no rows)."""
    return MeanEntropy.apply(logits)
