"""The learned-merge engine: a merged model as a differentiable function of a coefficient table.

    θ[name] = θ₀[name] + Σ_k c[k, slot(name)] · τ_k[name]          τ_k = expert_k − base

`MergeInputs` holds θ₀ and the task vectors, stored once in the compute dtype (τ stacked per tensor
as [K, *shape]; tensors no expert changed are kept as constants with no τ and no coefficient).
`MergeEngine` owns the only trainable tensor, the raw table [groups, K], and turns it into merged
parameters (`merged_params()`), which an adapter (adapters.py) feeds to the base architecture through
`torch.func.functional_call`: no model copy is built per step, gradients reach only the table.
`expert_params(k)` gives expert k's own weights (θ₀ + τ_k) through the same path, so a distillation
loss needs no teacher model in memory.

A learned method (methods/adamerging.py is the worked example) gets MergeInputs, an adapter and its
calibration samples from the learned driver (driver.py), builds
    groups = ParamGroups(inputs.merged_shapes(), "layer" | "task" | "block" | "chunk", chunks=...)
    engine = MergeEngine(inputs, groups, init=..., parameterisation="clamp" | "sigmoid")
and a loss `loss_fn(step, s: Step) -> None` that draws its calibration batches and, per task, calls
`s.backward(term)` on a scalar computed from `adapter.forward(s.params, inputs.heads[task], batch)`
(a regulariser is one more term built on `engine.coefficients()`); the driver runs `fit` and writes
the checkpoint, heads and the table.

`engine.stream(adapter)` switches to block-streamed learning (streaming.py): each transformer block's
merged tensors are built inside its checkpointed forward and recomputed in backward, so only one
block's θ(c) exists at a time; the gradients are the same. Under torch.distributed, `fit` sums the
table's gradient over the ranks (distributed.py).
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_ops import memory
from merge_ops.checkpoint import align_buffers
from merge_ops.context import Channel, ResolvedModel, check_cancel, report
from merge_ops.errors import MergeFailed, SpecError
from merge_ops.learned import distributed
from merge_ops.learned.coefficients import Coefficients
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.store import LazyBase, LazyTaskVectors, TensorFiles, check_expert_tensor
from merge_ops.learned.streaming import BlockStreamer, streamer_for
from merge_ops.lora.reader import open_checkpoint
from merge_ops.static import kernels

PARAMETERISATIONS = ("clamp", "sigmoid", "none")


@dataclass
class MergeInputs:
    experts: list[str]
    base: MutableMapping[str, torch.Tensor]  # every floating tensor of the base, compute dtype
    task_vectors: MutableMapping[str, torch.Tensor]  # merged name -> [K, *shape], compute dtype
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # expert -> task-specific
    constant: list[str] = field(default_factory=list)  # base tensors no expert changed
    files: TensorFiles | None = None  # file-backed (store.open_merge_inputs): tensors read on use

    def merged_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        tv = self.task_vectors
        if isinstance(tv, LazyTaskVectors):
            return list(tv.shapes.items())
        return [(n, tuple(t.shape[1:])) for n, t in tv.items()]

    def entry(self, name: str) -> tuple[torch.Tensor, Sequence[torch.Tensor] | None, bool]:
        """(θ₀, τ-or-experts, experts?) of one tensor as held: resident tensors as they are, file-
        backed ones as stored (their own dtype). `experts?`: the sequence is the K experts' tensors
        (τₖ = eₖ − θ₀ is formed in the merge), else the [K, ...] τ stack. None: not merged."""
        tv = self.task_vectors
        if isinstance(tv, LazyTaskVectors):
            assert isinstance(self.base, LazyBase)
            return self.base.raw(name), (tv.experts_raw(name) if name in tv else None), True
        return self.base[name], tv.get(name), False

    def held_base(self) -> dict[str, torch.Tensor]:
        """The base tensors held in memory (all of them unless file-backed): what a module binds."""
        return dict(self.base.resident) if isinstance(self.base, LazyBase) else dict(self.base)

    def materialise(self) -> None:
        """Hold every τ stack in memory (compute dtype), for code that rewrites them in place."""
        if isinstance(self.task_vectors, LazyTaskVectors):
            self.task_vectors = {n: self.task_vectors[n] for n in self.task_vectors}

    def resident_mib(self) -> tuple[float, float]:
        """MiB held in memory by (θ₀, τ): file-backed tensors count only while read."""
        def mib(ts) -> float:
            return round(sum(t.numel() * t.element_size() for t in ts) / 2**20, 2)

        b = self.base.resident_bytes() / 2**20 if isinstance(self.base, LazyBase) else mib(self.base.values())
        tv = 0.0 if isinstance(self.task_vectors, LazyTaskVectors) else mib(self.task_vectors.values())
        return round(b, 2), tv


def load_merge_inputs(base_dir: Path | ResolvedModel, expert_dirs: Sequence[Path | ResolvedModel],
                      experts: Sequence[str], *,
                      task_specific: Sequence[str] = (), dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", only: Callable[[str], bool] | None = None
                      ) -> MergeInputs:
    """Read the base and the experts tensor by tensor; task vectors are built as they stream in.

    Tensors matching a `task_specific` regex are not merged: each expert's copy goes to `heads`
    (they may differ in shape and the base may lack them). `only(name)` restricts which base tensors
    get task vectors (e.g. tensors the architecture actually uses)."""
    pats = [re.compile(p) for p in task_specific]

    def is_specific(n: str) -> bool:
        return any(p.search(n) for p in pats)

    readers = [open_checkpoint(d) for d in expert_dirs]  # a LoRA expert: base + its delta, per tensor
    base_r = open_checkpoint(base_dir)
    align_buffers(base_r, readers)  # buffers transformers does not persist: the base's set
    try:
        base: dict[str, torch.Tensor] = {}
        tvs: dict[str, torch.Tensor] = {}
        constant: list[str] = []
        for n in base_r.names():
            if not base_r.dtype(n).is_floating_point or is_specific(n):
                continue
            b = base_r.read(n).to(device=device, dtype=dtype)
            base[n] = b
            if only is not None and not only(n):
                continue
            stack = torch.empty((len(readers), *b.shape), dtype=dtype, device=device)
            for k, r in enumerate(readers):
                check_expert_tensor(r, n, tuple(b.shape), experts[k])
                torch.sub(r.read(n).to(device=device, dtype=dtype), b, out=stack[k])
            if torch.count_nonzero(stack) == 0:
                constant.append(n)  # nothing to learn: θ = θ₀ whatever the coefficients
            else:
                tvs[n] = stack
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for name, r in zip(experts, readers, strict=True):
            heads[name] = {n: r.read(n).to(device=device, dtype=dtype) for n in r.names()
                           if is_specific(n)}
        if pats and not any(heads.values()):
            raise SpecError(f"task_specific patterns {list(task_specific)} match no tensor of any expert",
                            param="task_specific")
        return MergeInputs(list(experts), base, tvs, heads, constant)
    finally:
        base_r.close()
        for r in readers:
            r.close()


def ties_trim(inputs: MergeInputs, density: float) -> None:
    """AdaMerging++: replace each τ_k by its TIES-selected entries, in place.

    As the official code: keep the top-`density` magnitudes of each task's whole flattened task
    vector, elect a sign per entry from the sum of the kept entries (majority sign where it is 0),
    keep only entries agreeing with it."""
    inputs.materialise()  # global top-k: every τ at once, in memory
    tvs = inputs.task_vectors
    if not tvs:
        return
    total = sum(t[0].numel() for t in tvs.values())
    keep = int(density * total)
    thr = []
    for k in range(len(inputs.experts)):
        flat = torch.cat([t[k].abs().flatten() for t in tvs.values()])
        if flat.element_size() < 4:  # kthvalue lacks half kernels; float32 holds bf16/fp16 exactly
            flat = flat.float()
        thr.append(math.inf if keep == 0 else flat.kthvalue(total - keep + 1).values.item())
        del flat
    signs = {}
    for n, tv in tvs.items():
        t = torch.tensor(thr, dtype=tv.dtype, device=tv.device).view(-1, *[1] * (tv.dim() - 1))
        tv.mul_(tv.abs() >= t)
        signs[n] = torch.sign(tv.sum(0))
    majority = 1.0 if float(sum(s.sum() for s in signs.values())) >= 0 else -1.0
    for n, tv in tvs.items():
        s = signs[n]
        s[s == 0] = majority
        tv.mul_(torch.sign(tv) == s)


class MergeEngine(torch.nn.Module):
    """θ(c) over MergeInputs; `raw` [groups, K] is the only trainable tensor.

    A chunked tensor (Expert Merging++) merges slice by slice, so autograd saves views of τ rather
    than a [K, numel] per-entry coefficient map."""

    def __init__(self, inputs: MergeInputs, groups: ParamGroups, *, init: float | Sequence[float] = 0.3,
                 parameterisation: str = "clamp", fixed: float | Sequence[float] | None = None):
        super().__init__()
        if parameterisation not in PARAMETERISATIONS:
            raise SpecError(f"parameterisation {parameterisation!r} is not one of {list(PARAMETERISATIONS)}")
        if set(groups.slots) != set(inputs.task_vectors):
            raise ValueError("ParamGroups must be built over exactly the merged tensors "
                             "(MergeInputs.merged_shapes())")
        self.inputs = inputs
        self.groups = groups
        self.parameterisation = parameterisation
        k = len(inputs.experts)
        init_t = _per_expert(init, k, "init")
        if parameterisation == "sigmoid":
            if not bool(((init_t > 0) & (init_t < 1)).all()):
                raise SpecError("sigmoid coefficients need an init strictly between 0 and 1", param="init")
            raw0 = torch.logit(init_t)
        else:
            raw0 = init_t
        self.raw = torch.nn.Parameter(raw0.repeat(groups.n_groups, 1).clone())
        self.register_buffer("fixed", _per_expert(init if fixed is None else fixed, k, "fixed"))
        self.streamer: BlockStreamer | None = None

    def stream(self, adapter: object) -> MergeEngine:
        """Block-streamed learning (streaming.py) on this adapter's module: each block's merged
        weights are built inside its (checkpointed) forward, never all at once."""
        self.streamer = streamer_for(adapter)
        return self

    def coefficients(self) -> torch.Tensor:
        """Effective table [groups, K]: clamped to [0, 1], squashed by a sigmoid, or raw ("none")."""
        return self.coefficients_of(self.raw)

    def coefficients_of(self, raw: torch.Tensor) -> torch.Tensor:
        if self.parameterisation == "sigmoid":
            return torch.sigmoid(raw)
        if self.parameterisation == "clamp":
            return raw.clamp(0.0, 1.0)
        return raw

    def merged_tensor(self, name: str, coeffs: torch.Tensor | None = None) -> torch.Tensor:
        c = self.coefficients() if coeffs is None else coeffs
        if self.inputs.files is not None:  # file-backed: τ formed per expert, re-read in backward
            return self.merge_entry(name, c, lambda: self.inputs.entry(name))
        base = self.inputs.base[name]
        tv = self.inputs.task_vectors.get(name)
        if tv is None:
            return base
        slot = self.groups.slots[name]
        k = tv.shape[0]
        flat = tv.reshape(k, -1)
        if slot.chunks == 0:
            delta = self.fixed.to(tv.dtype) @ flat
        elif slot.chunks == 1:
            delta = c[slot.row].to(tv.dtype) @ flat  # one fused K-term sum, no K temporaries
        else:
            rows = c[slot.row: slot.row + slot.chunks].to(tv.dtype)  # [m, K]
            segs = flat.split(slot.chunk_sizes(), dim=1)
            delta = torch.cat([rows[s] @ seg for s, seg in enumerate(segs)])
        return base + delta.view(base.shape)

    def merge_entry(self, name: str, c: torch.Tensor, load: Callable[[], tuple],
                    numel: int | None = None) -> torch.Tensor:
        """θ[name] through `merge` (below) from what `load()` gives (MergeInputs.entry's triple):
        the streamed path, whose autograd keeps no τ (backward calls `load` again). `numel`: `load`
        gives a part of the tensor of that many elements (gathered rows), merged under the tensor's
        one coefficient (`part_mergeable`)."""
        slot = self.groups.slots.get(name)
        dtype = self._dtype
        if slot is None:  # not merged: θ₀ (in the compute dtype)
            return load()[0].to(dtype)
        k = len(self.inputs.experts)
        if numel is not None and slot.chunks > 1:
            raise ValueError(f"{name}: a part of a tensor with {slot.chunks} coefficient slices")
        if slot.chunks == 0:
            rows, sizes = self.fixed.view(1, k), [slot.numel if numel is None else numel]
        else:
            rows = c[slot.row: slot.row + slot.chunks]
            sizes = slot.chunk_sizes() if numel is None else [numel]
        return merge(rows, load, sizes, dtype)

    def part_mergeable(self, name: str) -> bool:
        """Whether a part of tensor `name` merges on its own: one coefficient (or none) over it all."""
        slot = self.groups.slots.get(name)
        return slot is None or slot.chunks <= 1

    @property
    def _dtype(self) -> torch.dtype:  # the compute dtype
        b = self.inputs.base
        return b.dtype if isinstance(b, LazyBase) else next(iter(b.values())).dtype

    def merged_params(self) -> dict[str, torch.Tensor]:
        """Every floating base tensor, merged ones as differentiable functions of the table. Streamed:
        a block's tensors are left out (its wrapper merges them inside the block's forward)."""
        c = self.coefficients()
        st = self.streamer
        return {n: self.merged_tensor(n, c) for n in self.inputs.base if st is None or not st.streamed(n)}

    def expert_params(self, k: int) -> dict[str, torch.Tensor]:
        """Expert k's own weights θ₀ + τ_k (no gradient): a teacher without a second model."""
        with torch.no_grad():
            out = dict(self.inputs.base)
            for n, tv in self.inputs.task_vectors.items():
                out[n] = self.inputs.base[n] + tv[k]
        return out

    def table(self, **meta: object) -> Coefficients:
        return Coefficients(list(self.groups.group_names), list(self.inputs.experts),
                            self.coefficients().detach().cpu().double(),
                            {"grouping": self.groups.grouping, "parameterisation": self.parameterisation,
                             **meta})


class _Merge(torch.autograd.Function):
    """θ = θ₀ + Σₖ rows[r, k]·τₖ over contiguous slices r, with only `rows` differentiable.

    τₖ is formed one expert at a time in a single scratch buffer (from the experts' stored tensors
    when the entry is file-backed: τₖ = eₖ.to(dtype) − θ₀, `load_merge_inputs`' arithmetic) and
    nothing of it is saved for backward: backward calls `load` again and takes ⟨g, τₖ⟩ per slice.
    Autograd therefore holds no [K, ...] stack, in any dtype, between forward and backward.

    On CPU, file-backed entries go through `_merge_cpu` / `_grad_cpu`: the same arithmetic in
    cache-sized pieces, with no full-size temporary but the result (the streamed step merges each
    unit three times per forward, so its passes over memory and page faults were most of its time)."""

    @staticmethod
    def forward(ctx, rows, load, sizes, dtype):  # type: ignore[override]
        base, taus, experts = load()
        ctx.load, ctx.sizes, ctx.dtype = load, sizes, dtype
        r = rows.to(dtype)
        if not experts and len(sizes) == 1:  # a held [K, ...] stack: one fused K-term sum
            return base + (r @ taus.reshape(len(taus), -1)).view(base.shape)
        if experts and base.device.type == "cpu":
            return _merge_cpu(base, taus, sizes, r.tolist(), dtype)
        bflat = base.reshape(-1).to(dtype)  # τₖ = eₖ − θ₀ in the compute dtype, never the stored one
        out = bflat.clone().view(base.shape)
        flat = out.view(-1)
        buf = torch.empty_like(flat) if experts else None
        scale = _scalars(r)
        for k, t in enumerate(_taus(taus, experts, bflat, buf)):
            for s, sl in enumerate(_slices(sizes)):
                if isinstance(scale, list):
                    flat[sl].add_(t[sl], alpha=scale[s][k])
                else:
                    flat[sl].addcmul_(t[sl], scale[s, k])
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        base, taus, experts = ctx.load()
        gflat = g.reshape(-1).to(ctx.dtype)
        if not experts and len(ctx.sizes) == 1:
            return (taus.reshape(len(taus), -1) @ gflat).view(1, -1), None, None, None
        if experts and base.device.type == "cpu":
            return _grad_cpu(base, taus, ctx.sizes, gflat, ctx.dtype), None, None, None
        b = base.reshape(-1).to(ctx.dtype)
        buf = torch.empty_like(gflat) if experts else None
        cols = []
        for t in _taus(taus, experts, b, buf):
            cols.append(torch.stack([torch.dot(gflat[sl], t[sl]) for sl in _slices(ctx.sizes)]))
        return torch.stack(cols, 1), None, None, None


CPU_CHUNK_BYTES = 1 << 19  # per scratch piece of the CPU merge (below): in cache, and on glibc's heap


def _chunks(n: int, step: int, sizes: Sequence[int]) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """(lo, hi, [(slice s, a, z), ...]) over [0, n) in `step` pieces, with the parts of the
    coefficient slices each piece holds (a, z relative to lo)."""
    bounds = list(itertools.accumulate(sizes, initial=0))
    s = 0
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        spans = []
        while s < len(sizes) and bounds[s] < hi:
            a, z = max(bounds[s], lo), min(bounds[s + 1], hi)
            if z > a:
                spans.append((s, a - lo, z - lo))
            if bounds[s + 1] > hi:
                break
            s += 1
        yield lo, hi, spans


def _held_or_one_by_one(experts: Sequence[torch.Tensor]) -> Iterator[list[tuple[int, Any]]]:
    """[(k, eₖ flattened)] groups: all K at once when they are held (a list: each piece of θ₀ is
    widened once, and the output piece stays in cache across the K), one at a time when each is read
    from its file on access (ExpertTensors: read piece by piece as it is sliced, `RangedTensor`; whole
    reads held two experts at once, two embeddings at a tied embedding's merge)."""
    if isinstance(experts, list | tuple):
        yield [(k, e.reshape(-1)) for k, e in enumerate(experts)]
    else:
        for k in range(len(experts)):
            yield [(k, experts.flat(k))]  # type: ignore[attr-defined]


class _Pieces:
    """The CPU merge's two scratch pieces (θ₀'s and τₖ's) in the compute dtype: CPU_CHUNK_BYTES
    each, so they stay in cache and below glibc's mmap threshold (MMAP_THRESHOLD: an allocation from
    it on is a fresh mapping, page-faulted on first touch), where the heap reuses them."""

    def __init__(self, base: torch.Tensor, dtype: torch.dtype):
        self.flat = base.reshape(-1)
        self.n = self.flat.numel()
        self.step = max(1, CPU_CHUNK_BYTES // dtype.itemsize)
        c = min(self.step, self.n)
        self.dtype = dtype
        self.b, self.t = (torch.empty(c, dtype=dtype, device=base.device) for _ in range(2))

    def base(self, lo: int, hi: int) -> torch.Tensor:
        """θ₀'s piece in the compute dtype (a view of θ₀ when it is stored in it)."""
        b = self.flat[lo:hi]
        return b if b.dtype == self.dtype else self.b[: hi - lo].copy_(b)

    def tau(self, e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """e − b as `torch.sub(e, b)` computes it (kernels.sub_into: a narrower stored e widened first)."""
        return kernels.sub_into(e, b, self.t[: e.numel()])


def _merge_cpu(base: torch.Tensor, experts: Sequence[torch.Tensor], sizes: Sequence[int],
               scale: list[list[float]], dtype: torch.dtype) -> torch.Tensor:
    """θ₀ + Σₖ scale[s][k]·(eₖ − θ₀) from stored tensors, piece by piece (`_Pieces`): per element
    the same operations in the same order as the whole-tensor form, so the same values. The result
    is the only full-size allocation."""
    p = _Pieces(base, dtype)
    out = torch.empty(p.n, dtype=dtype, device=base.device)
    for group in _held_or_one_by_one(experts):
        for lo, hi, spans in _chunks(p.n, p.step, sizes):
            b, o = p.base(lo, hi), out[lo:hi]
            for k, e in group:
                t = p.tau(e[lo:hi], b)
                if len(spans) == 1:  # one coefficient over the piece (always, for one slice)
                    s = spans[0][0]
                    if k == 0:  # θ₀ + c·τ₀ straight into the output: no copy of θ₀ first
                        torch.add(b, t, alpha=scale[s][0], out=o)
                    else:
                        o.add_(t, alpha=scale[s][k])
                    continue
                for s, a, z in spans:
                    if k == 0:
                        torch.add(b[a:z], t[a:z], alpha=scale[s][0], out=o[a:z])
                    else:
                        o[a:z].add_(t[a:z], alpha=scale[s][k])
    return out.view(base.shape)


def _grad_cpu(base: torch.Tensor, experts: Sequence[torch.Tensor], sizes: Sequence[int],
              g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[slices, K] ⟨g, τₖ⟩ per coefficient slice, τₖ re-formed piece by piece as in `_merge_cpu`;
    the pieces' partial dot products are summed in double precision (Python floats)."""
    p = _Pieces(base, dtype)
    acc = [[0.0] * len(experts) for _ in sizes]
    for group in _held_or_one_by_one(experts):
        for lo, hi, spans in _chunks(p.n, p.step, sizes):
            b, gc = p.base(lo, hi), g[lo:hi]
            for k, e in group:
                t = p.tau(e[lo:hi], b)
                if len(spans) == 1:
                    acc[spans[0][0]][k] += torch.dot(gc, t).item()
                    continue
                for s, a, z in spans:
                    acc[s][k] += torch.dot(gc[a:z], t[a:z]).item()
    return torch.tensor(acc, dtype=dtype)


def _scalars(r: torch.Tensor) -> list[list[float]] | torch.Tensor:
    """The rows as Python floats on CPU (no per-term 0-dim tensor), as a tensor on an accelerator
    (no device sync per merge)."""
    return r.tolist() if r.device.type == "cpu" else r


def _slices(sizes: Sequence[int]) -> list[slice]:
    out, at = [], 0
    for n in sizes:
        out.append(slice(at, at + n))
        at += n
    return out


def _taus(taus: Sequence[torch.Tensor], experts: bool, bflat: torch.Tensor, buf: torch.Tensor | None):
    """τₖ flattened, one at a time. Experts: eₖ − θ₀ formed in `buf` in one pass (the stored dtype
    widened exactly to the compute dtype, as `load_merge_inputs` does), overwritten by the next."""
    for t in taus:
        if experts:
            assert buf is not None
            yield torch.sub(t.reshape(-1), bflat, out=buf)
        else:
            yield t.reshape(-1)


def merge(rows: torch.Tensor, load: Callable[[], tuple], sizes: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """θ from `load()` = (θ₀, τ stack or experts' tensors, experts?) and the table rows [m, K]."""
    return _Merge.apply(rows, load, list(sizes), dtype)


def _per_expert(v: float | Sequence[float], k: int, what: str) -> torch.Tensor:
    t = torch.tensor([float(v)] * k if isinstance(v, int | float) else [float(x) for x in v],
                     dtype=torch.float32)
    if t.numel() != k:
        raise SpecError(f"{what} has {t.numel()} values for {k} experts", param=what)
    return t


# -- the optimisation loop shared by every learned method ----------------------------------------
@dataclass
class FitResult:
    losses: list[float]
    seconds: float
    step_seconds: float  # mean over steps after the first (the first pays one-off costs)
    steps: int
    peak_memory: dict[str, float] = field(default_factory=dict)


class Step:
    """One optimisation step's parameters, for losses made of several terms (one per task).

    `params` are the merged tensors as detached leaves: each term's `backward(term)` runs the model's
    backward and frees that term's activations at once (peak memory = one forward's graph — one task's,
    or the tasks sharing a forward (Adapter.task_groups) — not all of them), accumulating dL/dθ in the leaves; `finish()` then pushes dL/dθ through the merge into the
    coefficients in one pass, instead of re-walking the merge graph once per term. A term may also
    depend on `engine.coefficients()` directly (a regulariser): its gradient goes straight there."""

    def __init__(self, engine: MergeEngine):
        self.engine = engine
        self._merged = engine.merged_params()
        self.params = {n: (t.detach().requires_grad_(True) if t.requires_grad else t)
                       for n, t in self._merged.items()}
        self.total = 0.0
        self.rank, self.world = distributed.rank_world()

    def owns(self, k: int) -> bool:
        """Whether this rank computes task k's term (data parallel: tasks are dealt round-robin over
        the ranks and the table's gradient is summed; one process owns every task)."""
        return k % self.world == self.rank

    @property
    def lead(self) -> bool:
        """Rank 0: computes the terms counted once (a regulariser on the table)."""
        return self.rank == 0

    def backward(self, term: torch.Tensor) -> None:
        if not torch.isfinite(term):
            raise MergeFailed(f"a loss term became {float(term)}: lower the learning rate")
        term.backward()
        self.total += float(term.detach())

    def finish(self) -> None:
        # tensors with a fixed coefficient (0 chunks) have a merged value that needs no gradient
        pairs = [(self._merged[n], p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in self.params.items()
                 if p.requires_grad and p.grad is not None and self._merged[n].requires_grad]
        if self.engine.streamer is not None:
            # θ(c)'s values are not needed any more (the merge's backward re-reads its inputs, and the
            # leaves sharing them are spent): free them before that backward runs, one model-sized
            # tensor less at its peak for a tied embedding (shape and autograd metadata stay)
            for m, _ in pairs:
                m.untyped_storage().resize_(0)
        if pairs:
            torch.autograd.backward([m for m, _ in pairs], [g for _, g in pairs])
        self._merged = {}


def fit(engine: MergeEngine, loss_fn: Callable[[int, Step], None], *, steps: int,
        optimizer: torch.optim.Optimizer, scheduler: object | None = None, clip_grad: float | None = None,
        channel: Channel | None = None, offset: int = 0, total: int | None = None) -> FitResult:
    """Run `steps` optimizer steps; `loss_fn(step, s)` calls `s.backward(term)` per term, forwarding
    `s.params` (one term's activations alive at a time; the step's loss is the sum of its terms).

    Each step checks for a cancel and reports `learn` progress as step `offset + i` of `total` (a
    method that learns in stages reports them as one bar). A NaN/Inf loss fails the job rather than
    producing a silently wrong model."""
    losses: list[float] = []
    t0 = time.perf_counter()
    t_first = None
    for step in range(steps):
        check_cancel(channel)
        optimizer.zero_grad(set_to_none=True)
        s = Step(engine)
        with engine.streamer.using(engine) if engine.streamer is not None else nullcontext():
            loss_fn(step, s)
            s.finish()
        s.total = distributed.reduce_grad(engine.raw, s.total)
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(engine.parameters(), clip_grad)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()  # type: ignore[attr-defined]
        losses.append(s.total)
        if step == 0:
            t_first = time.perf_counter()
        report(channel, "learn", offset + step + 1, total or steps, s.total)
    elapsed = time.perf_counter() - t0
    n = len(losses)
    step_s = (time.perf_counter() - t_first) / (n - 1) if n > 1 and t_first else elapsed / max(n, 1)
    return FitResult(losses, elapsed, step_s, n, memory.peak(engine.raw.device))
