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

The merge inside a block is `engine.merge`: τₖ is formed one expert at a time and autograd saves
none of it (backward reloads), so a block costs its merged weights, one scratch tensor and its
activations, whatever K. A streamed embedding table (an untied one; a tied one is on the Step path)
merges only the rows its batch looks up (`_lookup`): the other rows would get no gradient.

A tied embedding (SmolLM2, GPT-2) is one tensor used twice, by the lookup and by the head, so it
stays on the Step path: merged once per step, its θ(c) leaf shared by every task. Attached, it is
not held either (θ₀ and the experts are read from the files inside that merge and its backward),
its lookup's gradient is sparse (the batch's rows), and the head's weight gradient is added into
the leaf's gradient in place (`_TiedHead`): autograd would form each task's model-sized gradient
and their sum before accumulating them. At backward's peak it costs its θ(c) and the gradient.

File-backed inputs (store.py; the driver's streamed mode) `attach` to the streamer: the module's
block parameters then stay on the meta device and every block call gets its weights from the files,
through a `BlockCache` — a few blocks (θ₀ and the K experts' tensors, in their stored dtype) held
on the device, the next one in the walking direction read by a background thread while the current
one computes (pinned host memory then a non-blocking copy on CUDA). Outside a step an attached
streamer runs the blocks on θ₀, or on expert k's own tensors inside `teacher(k)` (the teacher cache).

Unattached (in-memory inputs), the wrappers only act while `active` (fit turns it on around each
step): the teacher cache and the packing probe, which run the module on other weights, see the
plain blocks.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.checkpoint import checkpoint

from merge_ops.learned.store import LazyBase, LazyTaskVectors

if TYPE_CHECKING:
    from merge_ops.learned.engine import MergeEngine, MergeInputs

_DIGITS = re.compile(r"^\d+$")
CACHED_BLOCKS = 2  # ready blocks kept on the device (plus one being prefetched)
MMAP_THRESHOLD = 1 << 20  # host allocations from this size are mapped on their own (release_freed_memory)
CACHE_SHARE = 0.4  # their bytes: at most this share of the model's stored bytes (ALLOY_STREAM_CACHE_MB)

Entry = tuple[torch.Tensor, Any, bool]  # MergeInputs.entry: (θ₀, τ stack or experts, experts?)


def find_blocks(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(prefix 'model.layers.3.', block) for the repeated transformer blocks: the children of the
    first ModuleList with more than one entry whose children are numbered (HF convention)."""
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1:
            kids = list(m.named_children())
            if all(_DIGITS.match(k) for k, _ in kids):
                return [(f"{name}.{k}." if name else f"{k}.", b) for k, b in kids]
    return []


def _outside_units(module: torch.nn.Module, blocks: list[tuple[str, torch.nn.Module]]
                   ) -> list[tuple[str, torch.nn.Module, list[str]]]:
    """(prefix, module, its own parameter names) for the modules outside the blocks that own
    parameters directly; a parameter shared by two names (a tied head) stays on the Step path."""
    inside = {id(m) for _, b in blocks for m in b.modules()}
    seen: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    out = []
    for name, m in module.named_modules():
        if id(m) in inside:
            continue
        own = list(m.named_parameters(recurse=False))
        if own and all(seen[id(p)] == 1 for _, p in own):
            out.append((f"{name}." if name else "", m, [n for n, _ in own]))
    return out


class Slot:
    """One reusable host buffer that a unit's tensors are read into (bump-allocated, 64-byte aligned).

    Reading every unit into fresh tensors allocated K + 1 tensors per unit on the prefetch thread, freed
    on the main one, twice per task; reused slots make the reads allocation-free after the first units
    (no page faults or allocator churn per read). Alone they did not lower the peak (1.97 GiB instead of
    1.99 on SmolLM2-135M, K = 4): that was the heap's retention (release_freed_memory)."""

    ALIGN = 64

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)
        self.at = 0

    def reserve(self, nbytes: int) -> None:
        """Start a new unit of at most `nbytes` (padded per tensor): grow the buffer if it is smaller."""
        if self.buf.numel() < nbytes:
            self.buf = torch.empty(0, dtype=torch.uint8)  # drop the old one before allocating
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
        self.at = 0

    def take(self, nbytes: int) -> torch.Tensor:
        view = self.buf[self.at: self.at + nbytes]
        self.at += -(-nbytes // self.ALIGN) * self.ALIGN
        return view

    @classmethod
    def padded(cls, sizes: list[int]) -> int:
        return sum(-(-n // cls.ALIGN) * cls.ALIGN for n in sizes)


class BlockCache:
    """Blocks' entries by block index: at most `capacity` ready on the device plus one being read
    by the prefetch thread (the next block in the direction of the last two requests). Each held or
    pending block owns one of `capacity + 1` `Slot`s, given back when it is evicted (or, for a dropped
    prefetch, when its read ends): a unit's entries are views of its slot, so they are valid until it
    is evicted — callers use an entry only within one merge (load, use, return)."""

    def __init__(self, load: Callable[[int, Slot], dict[str, Entry]], n_blocks: int,
                 capacity: int = CACHED_BLOCKS, budget: float = float("inf"),
                 size: Callable[[int], int] = lambda i: 0, slots: int | None = None):
        self.load, self.n, self.capacity = load, n_blocks, capacity
        self.budget, self.size = budget, size  # bytes the ready and prefetched blocks may hold
        self.ready: OrderedDict[int, tuple[dict[str, Entry], Slot]] = OrderedDict()
        self.pending: dict[int, tuple[Future, Slot]] = {}
        self.free = [Slot() for _ in range(capacity + 1 if slots is None else slots)]
        self.dropped: list[Future] = []  # dropped prefetches still reading into their slots
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="alloy-prefetch")
        self.last: int | None = None
        self.direction = 1
        self.reads = 0  # blocks read (tests, benchmarks)
        self.max_held = 0  # most blocks ever held at once (ready + being read)
        self._lock = threading.Lock()

    def _load(self, i: int, slot: Slot) -> dict[str, Entry]:
        with self._lock:
            self.reads += 1
        return self.load(i, slot)

    def _give(self, slot: Slot) -> None:
        with self._lock:
            self.free.append(slot)

    def _take(self) -> Slot | None:
        with self._lock:
            return self.free.pop() if self.free else None

    def _drop(self, fut: Future, slot: Slot) -> None:
        """A prefetch nobody will use: its slot is free once the read is cancelled or has ended."""
        if not fut.cancel():
            self.dropped.append(fut)
            fut.add_done_callback(lambda _f: self._give(slot))
        else:
            self._give(slot)

    def _evict(self) -> None:
        _, slot = self.ready.popitem(last=False)[1]
        self._give(slot)

    def get(self, i: int) -> dict[str, Entry]:
        if i in self.ready:
            self.ready.move_to_end(i)
            block = self.ready[i][0]
        else:
            got = self.pending.pop(i, None)
            if got is not None:
                block, slot = got[0].result(), got[1]
            else:
                while (slot := self._take()) is None:  # every slot held: the least recent goes
                    if self.ready:
                        self._evict()
                    else:  # dropped prefetches hold the slots: wait for one to end
                        wait([*self.dropped, *(f for f, _ in self.pending.values())], return_when=FIRST_COMPLETED)
                    self.dropped = [f for f in self.dropped if not f.done()]
                block = self._load(i, slot)
            self.ready[i] = (block, slot)
            while len(self.ready) > 1 and (len(self.ready) > self.capacity or self._held() > self.budget):
                self._evict()
        if self.last is not None and i != self.last:
            self.direction = 1 if i > self.last else -1
        self.last = i
        nxt = i + self.direction
        for j in [j for j in self.pending if j != nxt]:  # a guess in the old direction: drop it
            self._drop(*self.pending.pop(j))
        if (0 <= nxt < self.n and nxt not in self.ready and nxt not in self.pending
                and self.size(i) + self.size(nxt) <= self.budget):
            slot = self._take()
            if slot is not None:
                self.pending[nxt] = (self.pool.submit(self._load, nxt, slot), slot)
        self.max_held = max(self.max_held, len(self.ready) + len(self.pending))
        return block

    def _held(self) -> int:
        return sum(self.size(j) for j in self.ready)

    def clear(self) -> None:
        for fut, slot in self.pending.values():
            self._drop(fut, slot)
        self.pending.clear()
        while self.ready:
            self._evict()
        self.last = None


def release_freed_memory() -> bool:
    """Make glibc give freed host tensors of MMAP_THRESHOLD bytes or more back to the OS at once.

    A streamed step allocates and frees every unit's merged weights, scratch and gradients three
    times per task (forward, recomputation, backward). With glibc's adaptive threshold those land in
    the heap, which kept growing from its top while the freed chunks stayed resident: on SmolLM2-135M
    (K = 4) the heap held ~1 GiB free at the peak, RSS 1.97 GiB. A fixed threshold maps each such tensor
    on its own and unmaps it when freed (peak 1.32 GiB; no slowdown seen: the grown heap faulted fresh
    pages too). Process-wide and kept (a worker's later jobs also return what they free); False where the C
    library is not glibc (nothing changed)."""
    global _RELEASING
    if _RELEASING is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _RELEASING = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        except (OSError, AttributeError):
            _RELEASING = False
    return _RELEASING


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
_RELEASING: bool | None = None


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if device.type == "cuda":  # pinned staging: the copy overlaps compute (untested here: no GPU)
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class BlockStreamer:
    """Per-block wrappers over an adapter's module, bound to one engine at a time (`engine` may be
    swapped, e.g. Expert Merging's stage 2) and, for file-backed inputs, attached to them."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.blocks = find_blocks(module)
        self.slot_bytes = 0  # BlockCache slot size: the biggest block's reads (attach)
        # units: the blocks (every tensor under the prefix), then the modules outside them that own
        # parameters directly (embeddings, norms, head: their own tensors only), tied ones excepted
        self.units: list[tuple[str, torch.nn.Module, list[str] | None]] = [(p, b, None) for p, b in self.blocks]
        self.units += _outside_units(module, self.blocks)
        self._outside = {f"{p}{n}" for p, _, names in self.units if names for n in names}
        self.engine: MergeEngine | None = None
        self.active = False
        self.inputs: MergeInputs | None = None  # attached (file-backed) inputs
        self.device = torch.device("cpu")
        self.cache: BlockCache | None = None
        self._teacher: int | None = None
        self._names: dict[int, list[str]] = {}
        self._last_engine: MergeEngine | None = None
        for i, (prefix, block, _) in enumerate(self.units):
            block.forward = self._wrap(i, prefix, block, block.forward)
        self.tied = _tied_pair(module)  # (name, lookup, head) of a tied embedding, else None
        if self.tied is not None:
            for m in self.tied[1:]:
                m.forward = self._wrap_tied(m, m.forward)

    def streamed(self, name: str) -> bool:
        """Whether tensor `name` is merged inside its unit's forward (not on the Step path)."""
        return name in self._outside or any(name.startswith(p) for p, _ in self.blocks)

    def held(self, name: str) -> bool:
        """Whether file-backed inputs hold base tensor `name` in memory: neither a streamed unit's
        nor a tied embedding's (read from the files by the Step's merge)."""
        return not self.streamed(name) and (self.tied is None or name != self.tied[0])

    def attach(self, inputs: MergeInputs, device: str | torch.device) -> BlockStreamer:
        """Serve every block's weights from file-backed `inputs` (the module holds none of them)."""
        self.inputs, self.device = inputs, torch.device(device)
        release_freed_memory()
        files = inputs.files
        assert files is not None
        model = sum(files.base.info(n).nbytes for n in inputs.base if n not in inputs.base.overrides)  # type: ignore[attr-defined]
        budget = float(os.environ.get("ALLOY_STREAM_CACHE_MB", 0) or 0) * 2**20 or CACHE_SHARE * model
        self._names = {}
        self.cache = None
        # slots sized for the blocks: a bigger unit outside them (an untied head) is read into fresh
        # tensors, freed when evicted; as many slots as the budget holds (at least one)
        self.slot_bytes = max((Slot.padded(self._read_sizes(i, budget)) for i in range(len(self.blocks))),
                              default=0)
        slots = int(min(CACHED_BLOCKS + 1, max(1, budget // max(self.slot_bytes, 1))))
        self.cache = BlockCache(self._load_block, len(self.units), budget=budget, size=self._unit_bytes,
                                slots=slots)
        if self.tied is not None and self.tied[0] in inputs.task_vectors:
            # the lookup's gradient: the batch's rows (sparse), added into the leaf's dense one in place
            self.tied[1].sparse = True
        return self

    def _read_sizes(self, i: int, budget: float) -> list[int]:
        """Bytes of each tensor unit i reads from the files: θ₀'s (not held), and the K experts'
        when the unit fits the budget whole."""
        inputs = self.inputs
        assert inputs is not None and inputs.files is not None
        files, base = inputs.files, inputs.base
        names = self.names(i, inputs)
        sizes = [files.base.info(n).nbytes for n in names
                 if n not in base.overrides and n not in base.resident]  # type: ignore[attr-defined]
        if self._whole(i, budget):
            k = len(inputs.experts)
            sizes += [files.expert_nbytes(j, n) for n in names if n in inputs.task_vectors for j in range(k)]
        return sizes

    def _whole(self, i: int, budget: float) -> bool:
        """Whether unit i is read with its experts' tensors (held in the cache) rather than reading them
        one at a time inside the merge: it fits the budget and, outside the blocks, a block's slot too.
        An untied embedding and head each held whole (θ₀ + K experts) put the 302M Llama's peak at 2.7×
        its bytes at K = 2 (1.99× at K = 4, where they no longer fit the budget)."""
        size = self._unit_bytes(i)
        return size <= budget and (i < len(self.blocks) or size <= self.slot_bytes)

    def names(self, i: int, inputs: MergeInputs) -> list[str]:
        """The base tensors of unit i (cached per unit; the set of names does not change)."""
        if i not in self._names:
            p, _, own = self.units[i]
            self._names[i] = ([n for n in inputs.base if n.startswith(p)] if own is None
                              else [p + n for n in own if p + n in inputs.base])
        return self._names[i]

    def _unit_bytes(self, i: int) -> int:
        """Unit i's stored bytes: θ₀ and, for merged tensors, the K experts' tensors."""
        inputs = self.inputs
        assert inputs is not None and inputs.files is not None
        k = len(inputs.experts)
        info = inputs.files.base.info
        return sum(info(n).nbytes * (1 + (k if n in inputs.task_vectors else 0)) for n in self.names(i, inputs))

    def _load_block(self, i: int, slot: Slot) -> dict[str, Entry]:
        """Unit i's entries on the device, read into `slot`; the experts' tensors too when the unit
        fits the cache's budget, else they stay lazy (read one expert at a time inside the merge)."""
        inputs, cache = self.inputs, self.cache
        assert inputs is not None and inputs.files is not None and cache is not None
        files, base, tvs = inputs.files, inputs.base, inputs.task_vectors
        names = self.names(i, inputs)
        out: dict[str, Entry] = {}
        if not isinstance(tvs, LazyTaskVectors):  # held τ stacks (AdaMerging++ materialised them)
            for n in names:
                b, taus, experts = inputs.entry(n)
                out[n] = (_to_device(b, self.device), None if taus is None else _to_device(taus, self.device), experts)
            return out
        assert isinstance(base, LazyBase)
        whole = self._whole(i, cache.budget)
        k = len(inputs.experts)
        held = {n for n in names if n in base.overrides or n in base.resident}
        need = Slot.padded(self._read_sizes(i, cache.budget))
        into = slot.take if need <= self.slot_bytes else None  # else fresh tensors, freed when evicted
        if into is not None:
            slot.reserve(need)
        for n in names:
            # a tensor that is not merged is used as read (engine.merged returns it as θ₀): a fresh
            # tensor, so nothing outlives the slot it would share; merged ones are only read from
            b = base.raw(n) if n in held else files.base_raw(n, into if n in tvs else None)
            taus: Any = None
            if n in tvs:
                taus = ([_to_device(files.expert_raw(j, n, into), self.device) for j in range(k)]
                        if whole else tvs.experts_raw(n))
            out[n] = (_to_device(b, self.device), taus, True)
        return out

    @contextmanager
    def using(self, engine: MergeEngine) -> Iterator[None]:
        if self.cache is not None and engine is not self._last_engine:
            self.cache.clear()  # a new engine (stage 2) may have rewritten θ₀ and the merged set
        self._last_engine = engine
        prev = (self.engine, self.active)
        self.engine, self.active = engine, True
        try:
            yield
        finally:
            self.engine, self.active = prev

    @contextmanager
    def teacher(self, k: int) -> Iterator[None]:
        """Outside a step, run the blocks on expert k's own tensors (attached inputs only)."""
        prev, self._teacher = self._teacher, k
        try:
            yield
        finally:
            self._teacher = prev

    def _plain(self, i: int, prefix: str) -> dict[str, torch.Tensor]:
        """Block i's weights outside a step: θ₀, or the teacher's own tensors."""
        inputs = self.inputs
        assert inputs is not None and inputs.files is not None
        dtype = inputs.base.dtype  # type: ignore[attr-defined]
        out = {}
        for n in self.names(i, inputs):
            t = inputs.files.expert_raw(self._teacher, n) if self._teacher is not None else inputs.base.raw(n)  # type: ignore[attr-defined]
            out[n[len(prefix):]] = t.to(device=self.device, dtype=dtype)
        return out

    def _wrap_tied(self, m: torch.nn.Module, orig: Any) -> Any:
        """The tied embedding's lookup or head. Attached and outside a step, its weight is read from
        the files (θ₀, or the teacher's) when nothing bound it; in a learning step the head adds its
        weight gradient into the Step leaf's in place."""
        def forward(*args: Any, **kwargs: Any) -> Any:
            w = m.weight
            if self.inputs is None:
                return orig(*args, **kwargs)
            if w.is_meta:
                with torch.no_grad(), _reparametrize_module(m, {"weight": self._tied_plain()}):
                    return orig(*args, **kwargs)
            if (m is self.tied[2] and w.requires_grad and torch.is_grad_enabled()  # type: ignore[index]
                    and len(args) == 1 and not kwargs):
                return _TiedHead.apply(args[0], w)
            return orig(*args, **kwargs)

        return forward

    def _tied_plain(self) -> torch.Tensor:
        inputs = self.inputs
        assert inputs is not None and inputs.files is not None and self.tied is not None
        n = self.tied[0]
        t = inputs.files.expert_raw(self._teacher, n) if self._teacher is not None else inputs.base.raw(n)  # type: ignore[attr-defined]
        return t.to(device=self.device, dtype=inputs.base.dtype)  # type: ignore[attr-defined]

    def _wrap(self, i: int, prefix: str, block: torch.nn.Module, orig: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            engine = self.engine if self.active else None
            if engine is None:
                if self.inputs is None:
                    return orig(*args, **kwargs)
                with torch.no_grad(), _reparametrize_module(block, self._plain(i, prefix)):
                    return orig(*args, **kwargs)
            inputs = engine.inputs
            names = self.names(i, inputs)
            tvs = inputs.task_vectors
            if not any(n in tvs for n in names):
                if self.inputs is None:
                    return orig(*args, **kwargs)
                with _reparametrize_module(block, self._plain(i, prefix)):
                    return orig(*args, **kwargs)
            cache = self.cache if inputs is self.inputs else None
            # an embedding table: merge only the rows the batch looks up (the others get no gradient)
            lookup = (type(block) is torch.nn.Embedding and block.max_norm is None and len(names) == 1
                      and not kwargs and len(args) == 1 and engine.part_mergeable(names[0]))

            def loader(n: str) -> Callable[[], Entry]:
                if cache is None:
                    return lambda: inputs.entry(n)
                return lambda: cache.get(i)[n]

            def run(raw: torch.Tensor, *a: Any, **kw: Any) -> Any:
                c = engine.coefficients_of(raw)
                if lookup:
                    return _lookup(block, a[0], lambda n, load, numel: engine.merge_entry(n, c, load, numel),
                                   names[0], loader(names[0]))
                params = {n[len(prefix):]: engine.merge_entry(n, c, loader(n)) for n in names}
                # the block's own forward, not its __call__: its hooks (HF records hidden states with
                # forward hooks) already ran around this wrapper and must not fire twice
                with _reparametrize_module(block, params):
                    return orig(*a, **kw)

            for key in ("cache", "past_key_values", "past_key_value"):  # a KV cache would grow on recompute
                if kwargs.get(key) is not None:
                    kwargs[key] = None
            return checkpoint(run, engine.raw, *args, use_reentrant=False, **kwargs)

        return forward


def _tied_pair(module: torch.nn.Module) -> tuple[str, torch.nn.Embedding, torch.nn.Linear] | None:
    """(weight name, lookup, head) when the module's output layer is a bias-free Linear sharing its
    input embedding's weight (HF's tie_word_embeddings), else None."""
    get_in, get_out = getattr(module, "get_input_embeddings", None), getattr(module, "get_output_embeddings", None)
    emb, head = (get_in() if get_in else None), (get_out() if get_out else None)
    if not (isinstance(emb, torch.nn.Embedding) and type(head) is torch.nn.Linear and head.bias is None
            and head.weight is emb.weight):
        return None
    name = next(f"{n}.weight" if n else "weight" for n, m in module.named_modules() if m is emb)
    return name, emb, head


class _TiedHead(torch.autograd.Function):
    """logits = h·Wᵀ for a tied head whose W is a Step leaf: backward returns dh and adds gᵀ·h into
    W.grad in place (no per-task model-sized gradient, no out-of-place sum). Same values."""

    @staticmethod
    def forward(ctx, h, w):  # type: ignore[override]
        ctx.save_for_backward(h)
        ctx.w = w
        return torch.nn.functional.linear(h, w)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (h,) = ctx.saved_tensors
        w = ctx.w
        g2, h2 = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1]).to(g.dtype)
        if w.grad is None:
            w.grad = (g2.t() @ h2).to(w.dtype)
        elif w.grad.is_sparse:  # the lookup's came first (not HF's order): make it the dense sum
            w.grad = torch.addmm(w.grad.to_dense(), g2.t(), h2)
        else:
            w.grad.addmm_(g2.t(), h2)
        return (g @ w if ctx.needs_input_grad[0] else None), None


def _lookup(emb: torch.nn.Embedding, ids: torch.Tensor,
            merge: Callable[[str, Callable[[], Entry], int], torch.Tensor],
            name: str, load: Callable[[], Entry]) -> torch.Tensor:
    """`emb(ids)` on the merged table, merging only the looked-up rows: per element the same merge,
    and the rows not looked up would get a zero gradient, so the coefficients' gradient is the same
    sum without its zero terms. A streamed table was merged whole three times per task (forward,
    recomputation, backward) for a batch's few rows."""
    rows, inv = torch.unique(ids, return_inverse=True)

    def part() -> Entry:
        b, taus, experts = load()
        if experts:  # each expert's table read (if lazy), its rows kept, dropped before the next
            taus = [e.index_select(0, rows) for e in taus]
        elif taus is not None:
            taus = taus.index_select(1, rows)
        return b.index_select(0, rows), taus, experts

    weight = merge(name, part, rows.numel() * emb.embedding_dim)
    pad = emb.padding_idx
    if pad is not None:  # the padding row's place among the rows (it gets no gradient), if looked up
        hit = (rows == pad).nonzero()
        pad = int(hit[0, 0]) if hit.numel() else None
    # a dense gradient for the rows (the merge's backward takes a dense one; it is the rows' size)
    return torch.nn.functional.embedding(inv, weight.view(-1, emb.embedding_dim), pad, None,
                                         emb.norm_type, emb.scale_grad_by_freq, False)


def streamer_for(adapter: Any) -> BlockStreamer:
    """The adapter's streamer, installed on first use (one per module)."""
    s = getattr(adapter, "_streamer", None)
    if s is None:
        s = BlockStreamer(adapter.module)
        adapter._streamer = s
    return s
