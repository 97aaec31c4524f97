"""Checkpoint names vs module names, for architectures transformers re-lays out when it loads them.

transformers 5 fuses Mixtral's per-expert MoE weights on load: the checkpoint stores
`<p>.block_sparse_moe.experts.<e>.w1|w2|w3.weight` and `<p>.block_sparse_moe.gate.weight`, the
module holds `<p>.mlp.experts.gate_up_proj` [E, 2I, H] (w1 then w3 of each expert, stacked),
`<p>.mlp.experts.down_proj` [E, H, I] (w2) and `<p>.mlp.gate.weight`. Learned merges merge
checkpoint tensors (that is what they write), so the adapter reads and learns checkpoint names and
builds the module's tensors from them for each forward (`torch.stack` / `cat`: differentiable, so
coefficient gradients reach every expert's slice). Without this, those tensors were not "used" by
the module and silently kept the base's values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_FUSED = re.compile(r"^(?P<p>.+)\.mlp\.experts\.(?P<w>gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(?P<p>.+)\.mlp\.gate\.weight$")


@dataclass
class _Built:
    sources: list[str]  # checkpoint names, in the order `build` takes them
    build: Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class CheckpointLayout:
    """Module tensors built from checkpoint tensors (empty: the names are the same)."""
    built: dict[str, _Built] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # the bound base's sources (no copies)

    @classmethod
    def of(cls, module: torch.nn.Module) -> CheckpointLayout:
        if getattr(module.config, "model_type", None) != "mixtral":
            return cls()
        built: dict[str, _Built] = {}
        for name, t in module.state_dict().items():
            if m := _FUSED.match(name):
                src, n_exp = f"{m['p']}.block_sparse_moe.experts", t.shape[0]
                if m["w"] == "gate_up_proj":
                    names = [f"{src}.{e}.{w}.weight" for e in range(n_exp) for w in ("w1", "w3")]
                    built[name] = _Built(names, lambda ts, n=n_exp: torch.stack(
                        [torch.cat(ts[2 * e: 2 * e + 2], 0) for e in range(n)]))
                else:
                    built[name] = _Built([f"{src}.{e}.w2.weight" for e in range(n_exp)], torch.stack)
            elif m := _ROUTER.match(name):
                built[name] = _Built([f"{m['p']}.block_sparse_moe.gate.weight"], lambda ts: ts[0])
        return cls(built)

    def checkpoint_names(self, module_names: set[str]) -> set[str]:
        """The checkpoint tensors the module reads."""
        return (module_names - set(self.built)) | {s for b in self.built.values() for s in b.sources}

    def remember(self, base: dict[str, torch.Tensor]) -> None:
        self.base = {s: base[s] for b in self.built.values() for s in b.sources if s in base}

    def to_module(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint-named tensors as module-named ones; a built tensor whose sources are only partly
        given takes the others from the bound base."""
        if not self.built:
            return tensors
        sources = {s for b in self.built.values() for s in b.sources}
        out = {n: t for n, t in tensors.items() if n not in sources}
        for name, b in self.built.items():
            if any(s in tensors for s in b.sources):
                out[name] = b.build([tensors[s] if s in tensors else self.base[s] for s in b.sources])
        return out
