"""DELLA: magnitude-ranked random drop (MagPrune), rescale, then TIES sign election.

Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", arXiv:2406.11617. With mergekit's semantics (`della_magprune`), per tensor, 0 < density < 1:

    rows: the tensor's rows (its last dimension; a 1-D tensor is one row; a tensor with more than
          two dimensions ranks along dimension 1, as mergekit's argsort(dim=1))
    r    = ascending magnitude rank of |τᵢ| within its row, 0 … C−1 (C entries per row)
    pᵢ   = (density − ε) + 2ε·r/(C − 1)       keep probability: small entries density−ε,
                                              the largest density+ε (C = 1: density)
    τᵢ ← mᵢ ⊙ τᵢ,  mᵢ ~ Bernoulli(pᵢ);  `rescale` (default on) restores τᵢ's L1 norm (as DARE)
    then TIES election and disjoint merge (`della`) or a plain sum (`della_linear`), as in
    task_vectors.py.

density ≥ 1 keeps everything, density ≤ 0 nothing; otherwise density ± epsilon must lie in (0, 1)
(mergekit raises the same error). Defaults (mergekit): weight 1, density 1, epsilon 0.15, lambda 1,
normalize true (della) / false (della_linear), rescale true.

Streaming: ranks are computed a block of whole rows at a time (one sort per row of the magnitudes'
bit patterns with the column below them, so ties keep index order; on CPU numpy's SIMD sort; a row
cut by a block edge is re-read from the inputs), and the uniforms
are drawn block by block from the tensor's generator. With `rescale` the first pass records the
mask (one byte per entry) and the merge pass replays it.
Ties in magnitude are ranked by index (mergekit's argsort leaves them unspecified); the masks match
mergekit in distribution (keep rate per rank), not entry by entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from merge_ops import params as pv
from merge_ops.declare import MethodDef, Param, task_vector_params
from merge_ops.errors import SpecError
from merge_ops.lazy import lazy
from merge_ops.methods import dare_linear

if TYPE_CHECKING:
    from merge_ops.spec import MergeSpec
    from merge_ops.static.inputs import TensorInputs

torch = lazy("torch")
kernels = lazy("merge_ops.static.kernels")

EPSILON = Param("epsilon", 0.15, "half-width of the keep probability: density ± epsilon across magnitude "
                "ranks", scope="model", min=0.0, max=1.0, gradient=True)


def epsilon_error(density: float, epsilon: float) -> str | None:
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        return (f"epsilon {epsilon:g} with density {density:g}: density ± epsilon must lie in (0, 1) "
                "(lower epsilon)")
    return None


def check(spec: MergeSpec) -> None:
    """density ± epsilon within (0, 1), where both are plain numbers (per-layer values: per tensor)."""
    for i in range(len(spec.experts)):
        d, e = spec.model_param_value(i, "density"), spec.model_param_value(i, "epsilon")
        d = 1.0 if d is None else d
        e = 0.15 if e is None else e
        if any(pv.is_gradient(v) or pv.is_conditional(v) for v in (d, e)):
            continue
        if (why := epsilon_error(float(d), float(e))) is not None:
            raise ValueError(f"experts[{i}].parameters.epsilon: {why}")


def declare(name: str, summary: str, *, consensus: bool) -> MethodDef:
    return MethodDef(name, "static", summary,
                     "Deep et al. 2024, DELLA-Merging, arXiv:2406.11617",
                     task_vector_params(normalize=consensus, rescale=True, density=True,
                                        consensus=consensus, extra=(EPSILON,)),
                     check=check)


METHOD = declare("della", "drop task-vector entries at random, keeping larger magnitudes more often "
                 "(MagPrune), rescale, then TIES sign election", consensus=True)


class MagPrune:
    """Keep each entry with a probability linear in its magnitude rank within its row."""

    needs_magnitudes = False

    def __init__(self, density: float, epsilon: float, expert: torch.Tensor, base: torch.Tensor,
                 generator: torch.Generator, wd: torch.dtype, passes: int = 1):
        self.density, self.epsilon = density, epsilon
        self.expert, self.base = expert, base
        self.gen, self._state = generator, generator.get_state()
        self.wd = wd
        # with rescale the driver applies the trim twice (L1 norms, then merge): the first pass
        # records the mask (1 byte per entry) so the second neither sorts nor draws again
        self.record = passes > 1 and 0 < density < 1
        self.mask: torch.Tensor | None = None
        self.replay = False
        shape = base.shape
        self.cols = shape[-1] if base.dim() == 2 else base.numel()  # 1-D: one row
        self.full: torch.Tensor | None = None  # > 2 dims: probabilities precomputed along dim 1
        if base.dim() > 2 and 0 < density < 1:
            mags = (expert.to(wd) - base.to(wd)).abs_().movedim(1, -1)
            self.full = self._probs(mags.reshape(-1, mags.shape[-1])).view(mags.shape).movedim(-1, 1) \
                .reshape(-1).contiguous()

    def observe(self, start: int, mags: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, magnitudes_at: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.gen.set_state(self._state)
        if self.mask is not None:  # a recorded pass exists: replay it
            self.replay = True
        elif self.record:
            self.mask = torch.empty(self.base.numel(), dtype=torch.bool, device=self.base.device)

    def _probs(self, mags: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Keep probabilities for rows of magnitudes (R, C), into `out` if given: the probability
        ramp scattered to each entry's rank, ties in index order. Non-negative floats order like
        their integer bit patterns, and integer sorts are faster."""
        r, c = mags.shape
        out = torch.empty_like(mags) if out is None else out
        if c == 1:
            return out.fill_(self.density)
        if mags.device.type == "cpu" and mags.dtype == torch.float32:
            # each entry's column in the low bits below its magnitude's 31: the keys are unique, so
            # any sort orders them as a stable one would, and numpy's (SIMD) sort of int64 values is
            # ~10x torch's stable sort on CPU; the sorted keys' low bits are then the indices
            cb = (c - 1).bit_length()
            keys = (kernels.buffer("della_keys", r * c, torch.int64, mags.device) if r * c <= kernels.BLOCK_CPU
                    else torch.empty(r * c, dtype=torch.int64)).view(r, c)  # a long row: not kept cached
            keys.copy_(mags.contiguous().view(torch.int32)).bitwise_left_shift_(cb).bitwise_or_(_columns(c))
            keys.numpy().sort(axis=1)
            idx = keys.bitwise_and_((1 << cb) - 1)
        else:
            keys = mags.contiguous().view(torch.int64 if mags.dtype == torch.float64 else torch.int32)
            idx = torch.sort(keys, dim=1, stable=True).indices
        ramp = torch.arange(c, dtype=mags.dtype, device=mags.device).mul_(2 * self.epsilon / (c - 1))
        ramp.add_(self.density - self.epsilon)
        return out.scatter_(1, idx, ramp.expand(r, c))

    def _row(self, r: int) -> torch.Tensor:
        c = self.cols
        fe, fb = self.expert.reshape(-1), self.base.reshape(-1)
        return (fe[r * c:(r + 1) * c].to(self.wd) - fb[r * c:(r + 1) * c].to(self.wd)).abs_().view(1, c)

    def apply(self, d: torch.Tensor, start: int) -> None:
        if self.density >= 1:
            return
        if self.density <= 0:
            d.zero_()
            return
        n, c = d.numel(), self.cols
        if self.replay:  # a bool mask multiplies faster viewed as uint8 (same 0/1 products)
            assert self.mask is not None
            d.mul_(self.mask[start:start + n].view(torch.uint8))
            return
        p = kernels.buffer("della_p", n, d.dtype, d.device)
        if self.full is not None:
            p.copy_(self.full[start:start + n])
        else:
            pos, end = start, start + n
            while pos < end:
                row0 = pos // c
                if pos == row0 * c and end - pos >= c:  # whole rows inside the block
                    k = (end - pos) // c
                    seg = d[pos - start:pos - start + k * c].view(k, c)
                    mags = torch.abs(seg, out=kernels.buffer("della_mag", k * c, d.dtype, d.device).view(k, c))
                    self._probs(mags, out=p[pos - start:pos - start + k * c].view(k, c))
                    pos += k * c
                else:  # a row cut by the block's edge: rank the whole row, keep our part
                    stop = min(end, (row0 + 1) * c)
                    probs = self._probs(self._row(row0)).view(-1)
                    p[pos - start:stop - start].copy_(probs[pos - row0 * c:stop - row0 * c])
                    pos = stop
        u = kernels.buffer("della_u", n, d.dtype, self.gen.device)
        u.uniform_(generator=self.gen)
        if self.mask is not None:
            keep = torch.lt(u.to(d.device), p, out=self.mask[start:start + n]).view(torch.uint8)
        else:
            keep = torch.lt(u.to(d.device), p, out=kernels.buffer("della_keep", n, d.dtype, d.device))
        d.mul_(keep)


_COLS: list[torch.Tensor] = []


def _columns(c: int) -> torch.Tensor:
    """0 … c−1 as int64 on CPU, cached (read-only by convention)."""
    if not _COLS or _COLS[0].numel() < c:
        _COLS[:] = [torch.arange(c, dtype=torch.int64)]
    return _COLS[0][:c]


def trims(x: TensorInputs) -> list[MagPrune]:
    base = kernels.require_base(x)
    gen, wd = dare_linear.generator(x), kernels.work_dtype(x.compute_dtype)
    passes = 2 if x.params.get("rescale") else 1
    out = []
    for e, mp in zip(x.experts, x.model_params, strict=True):
        density, epsilon = float(mp["density"]), float(mp["epsilon"])
        if (why := epsilon_error(density, epsilon)) is not None:
            raise SpecError(f"{x.name}: {why}", param="epsilon")
        out.append(MagPrune(density, epsilon, e, base, gen, wd, passes))
    return out


def merge_tensor(x: TensorInputs) -> torch.Tensor:
    from merge_ops.static.task_vectors import merge

    x = x.with_defaults(METHOD)
    return merge(x, trims(x), consensus=True)
