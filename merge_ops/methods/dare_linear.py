"""DARE: drop task-vector entries at random and rescale, then merge (`dare_linear`).

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML, arXiv:2311.03099. With mergekit's semantics, per tensor:

    τᵢ = mᵢ ⊙ (expertᵢ − base),  mᵢ ~ Bernoulli(density) per entry (density ≥ 1: no drop)
    rescale (default on): τᵢ ← τᵢ · ‖expertᵢ − base‖₁ / ‖τᵢ‖₁ — mergekit's L1 rescale, which is
      ≈ 1/density (the paper's factor) but preserves the L1 norm exactly
    then task arithmetic (this module) or TIES sign election (`dare_ties`, see dare_ties.py).

Defaults (mergekit): weight 1, density 1, lambda 1, normalize false, rescale true.

Randomness: the driver seeds `x.generator` from (spec seed, tensor name), so a merge is
reproducible and each tensor's masks do not depend on the others. Masks are drawn block by block
and expert by expert from that generator as 16-bit uniform integers (four per 64-bit draw): an
entry is kept when its integer is below round(density·2¹⁶), so the keep probability is density
rounded to a multiple of 2⁻¹⁶. mergekit uses `torch.bernoulli` with its global RNG, so DARE
results match mergekit in distribution, not entry by entry.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, task_vector_params
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")
kernels = lazy("merge_ops.static.kernels")

METHOD = MethodDef(
    "dare_linear", "static", "random drop (keep prob. density) and rescale each task vector, then sum",
    "Yu et al. 2024, Language models are Super Mario (DARE), arXiv:2311.03099",
    task_vector_params(normalize=False, rescale=True, density=True, consensus=False))
LANES = 4  # 16-bit uniforms per int64 draw


class Bernoulli:
    """Keep each entry with probability `density`, from a generator that each pass rewinds."""

    def __init__(self, density: float, generator: torch.Generator):
        self.density = density
        self.cut = round(min(max(density, 0.0), 1.0) * 65536) - 32768  # keep lanes < cut
        self.gen = generator
        self._state = generator.get_state()

    needs_magnitudes = False

    def observe(self, start: int, mags: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, magnitudes_at: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.gen.set_state(self._state)

    def apply(self, d: torch.Tensor, start: int) -> None:
        if self.density >= 1:
            return
        n = d.numel()
        words = kernels.buffer("dare_words", -(-n // LANES), torch.int64, self.gen.device)
        words.random_(-(1 << 63), None, generator=self.gen)
        lanes = words.view(torch.int16)[:n]
        keep = kernels.buffer("dare_keep", n, d.dtype, d.device)  # a float 0/1 mask: bool paths are slow
        torch.lt(lanes.to(d.device), self.cut, out=keep)
        d.mul_(keep)


def generator(x: TensorInputs) -> torch.Generator:
    if x.generator is not None:
        return x.generator
    device = x.base.device if x.base is not None else torch.device("cpu")
    return torch.Generator(device=device).manual_seed(zlib.crc32(x.name.encode()))


def trims(x: TensorInputs) -> list[Bernoulli]:
    gen = generator(x)
    return [Bernoulli(float(mp["density"]), gen) for mp in x.model_params]


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.task_vectors import merge

    x = x.with_defaults(METHOD)
    return merge(x, trims(x), consensus=False)
