"""Block-streamed learning: merged weights exist only for the transformer block being computed.

The in-memory engine materialises every merged tensor θ(c) per step and keeps them (and their
gradients) alive through the whole forward/backward: (K + 3)× the model before activations. Here each
transformer block's forward is wrapped so that, inside `torch.utils.checkpoint` (non-reentrant), it

    1. merges its own tensors θ₀ + Σₖ c[k, g]·τₖ from the coefficient table,
    2. runs the block on them (`torch.func.functional_call` on the block alone),

and autograd keeps only the block's inputs: in backward the merge and the block are recomputed and
the gradient flows straight into the table. At any time one block's merged weights and activations
exist (plus the block boundaries' hidden states). Tensors outside the blocks (embeddings, final norm,
head) stay on the engine's two-phase path (`Step`): they are few and are read once per step.

The coefficient gradients are the same function as the in-memory engine's (same merge, same
forward), so they agree to rounding (tests: float64 to 1e-9, AdaMerging and Expert Merging with chunks,
on a tiny Llama and a tiny BERT). The price is one extra forward per block in backward.

`BlockStreamer.install(engine, module)` patches the blocks once; it only acts while `active`
(fit turns it on around each step), so the teacher cache and the adapter's packing probe, which run
the same module on other weights, see the plain blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from merge_ops.learned.engine import MergeEngine

_DIGITS = re.compile(r"^\d+$")


def find_blocks(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(prefix 'model.layers.3.', block) for the repeated transformer blocks: the children of the
    first ModuleList with more than one entry whose children are numbered (HF convention)."""
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1:
            kids = list(m.named_children())
            if all(_DIGITS.match(k) for k, _ in kids):
                return [(f"{name}.{k}." if name else f"{k}.", b) for k, b in kids]
    return []


class BlockStreamer:
    """Per-block merge-inside-checkpoint wrappers over an adapter's module, bound to one engine at a
    time (`engine` may be swapped, e.g. Expert Merging's stage 2)."""

    def __init__(self, module: torch.nn.Module):
        self.blocks = find_blocks(module)
        self.engine: MergeEngine | None = None
        self.active = False
        for i, (prefix, block) in enumerate(self.blocks):
            block.forward = self._wrap(i, prefix, block, block.forward)

    def streamed(self, name: str) -> bool:
        """Whether tensor `name` is merged inside its block (not on the Step path)."""
        return any(name.startswith(p) for p, _ in self.blocks)

    @contextmanager
    def using(self, engine: MergeEngine) -> Iterator[None]:
        prev = (self.engine, self.active)
        self.engine, self.active = engine, True
        try:
            yield
        finally:
            self.engine, self.active = prev

    def _wrap(self, i: int, prefix: str, block: torch.nn.Module, orig: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            engine = self.engine
            if not self.active or engine is None:
                return orig(*args, **kwargs)
            local = {n[len(prefix):]: n for n in engine.inputs.task_vectors if n.startswith(prefix)}
            if not local:
                return orig(*args, **kwargs)

            def run(raw: torch.Tensor, *a: Any, **kw: Any) -> Any:
                c = engine.coefficients_of(raw)
                params = {ln: engine.merged_tensor(full, c) for ln, full in local.items()}
                # the block's own forward, not its __call__: its hooks (HF records hidden states with
                # forward hooks) already ran around this wrapper and must not fire twice
                with _reparametrize_module(block, params):
                    return orig(*a, **kw)

            for key in ("cache", "past_key_values", "past_key_value"):  # a KV cache would grow on recompute
                if kwargs.get(key) is not None:
                    kwargs[key] = None
            return checkpoint(run, engine.raw, *args, use_reentrant=False, **kwargs)

        return forward


def streamer_for(adapter: Any) -> BlockStreamer:
    """The adapter's streamer, installed on first use (one per module)."""
    s = getattr(adapter, "_streamer", None)
    if s is None:
        s = BlockStreamer(adapter.module)
        adapter._streamer = s
    return s
