"""Input Gram matrices of linear layers on calibration data, and the regression-mean solve over them.

RegMean and RegMean++ (methods/regmean.py, methods/regmean_plusplus.py) share everything here; they
differ only in where a block's inputs come from (`propagate`):

    own     each expert's block l sees the output of the expert's own blocks 0..l-1 (RegMean: the
            expert's own activations, as the official code and FusionBench collect them)
    merged  it sees the output of the *merged* blocks 0..l-1 (RegMean++): block l is merged, then
            every task's cached hidden states go through the merged block before block l+1

The walk is block-sequential for both, so only one transformer block's Grams exist at a time
(d_in×d_in per linear; q/k/v, which read the same tensor, share one) and per task only the hidden
states at the current block boundary are cached. Block inputs are captured once with a forward
pre-hook on block 0 (its positional arguments and keyword arguments: attention masks, rotary
embeddings, whatever the architecture passes), then each block is called on its own with them:
no per-architecture code. Linear layers outside the blocks (a BERT pooler, an untied lm_head) get
Grams from each expert's own full forward in both variants, and are solved before the block walk.

Rows are real tokens only: padding positions are dropped (the references include them, which weights
a layer towards whatever the padding token's activations are). Each expert's Gram is the mean over
its rows, G_k = XₖᵀXₖ/Nₖ, so a task with longer texts does not outweigh the others.

The solve, per linear weight W (m×n), with task vectors τ_k = W_k − W₀:

    G̃_k = α·G_k + (1 − α)·diag(G_k)                    off-diagonal shrinkage (the paper's α)
    W* = W₀ + (Σ_k τ_k·G̃_k)·(Σ_k G̃_k + λ·I)⁻¹          λ = ridge · mean(diag(Σ_k G̃_k))

= (Σ_k W_k·G̃_k)(Σ_k G̃_k)⁻¹ (the paper's closed form) when λ = 0; written on task vectors so that the
ridge shrinks towards W₀ rather than towards zero. Numerical safeguard the references lack (they call
`torch.inverse` on Σ G̃ in float32): the sums are float64 and the system is solved by Cholesky; when
the factorisation fails or the Cholesky diagonal shows a condition number above 1e8 (few rows, α = 1,
an input direction no sample excites: a dead ReLU feature, a constant input), λ is raised tenfold
until it passes, and the largest λ used is reported in the job's metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from merge_ops.learned.batches import Batch, collate
from merge_ops.learned.streaming import find_blocks

MAX_CONDITION = 1e8  # of Σ G̃ + λI, estimated from the Cholesky diagonal: float64 noise × 1e8 ≪ 1e-6
MAX_JITTER_TRIES = 8


class _Stop(Exception):  # noqa: N818  (control flow: ends a forward at the first block)
    pass


@dataclass
class LinearSite:
    module: str  # module path, e.g. "encoder.layer.0.attention.self.query"
    weight: str  # checkpoint name of its weight
    transposed: bool  # HF Conv1D (GPT-2): weight is [in, out] and y = x·W


def linear_sites(module: torch.nn.Module, merged: set[str]) -> dict[str, LinearSite]:
    """The linear layers whose weight is a merged tensor (nn.Linear, and HF's Conv1D), except an
    output layer tied to the input embedding (its weight is the embedding's: merged by the fallback)."""
    tied = None
    get_in = getattr(module, "get_input_embeddings", None)
    if callable(get_in):
        emb = get_in()
        tied = getattr(emb, "weight", None)
    out: dict[str, LinearSite] = {}
    for name, m in module.named_modules():
        conv1d = type(m).__name__ == "Conv1D"
        if not (isinstance(m, torch.nn.Linear) or conv1d):
            continue
        w = f"{name}.weight"
        if w not in merged or (tied is not None and m.weight is tied):
            continue
        out[name] = LinearSite(name, w, conv1d)
    return out


@dataclass
class GramSet:
    """Per linear: Σ x·xᵀ over real-token rows and the row count, for one expert."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def mean(self, name: str) -> torch.Tensor | None:
        n = self.rows.get(name, 0)
        return self.sums[name] / n if n else None


class GramHooks:
    """Forward pre-hooks on linear modules accumulating Σ x·xᵀ of their inputs at real tokens.

    `mask` is set per batch ([B, T] bool). A tensor read by several linears in one forward (q/k/v)
    is multiplied once: its product is cached by identity for the batch (`new_batch()`)."""

    def __init__(self, root: torch.nn.Module, sites: dict[str, LinearSite], dtype: torch.dtype):
        self.dtype = dtype
        self.grams = GramSet()
        self.mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        mods = dict(root.named_modules())
        self._handles = [mods[name].register_forward_pre_hook(self._hook(name)) for name in sites]

    def new_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self._seen = {}

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask
        if m is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m]
        if m is not None and x.dim() == 2 and x.shape[0] == m.numel():
            return x[m.flatten()]
        return x.reshape(-1, x.shape[-1])  # an unknown layout: every row

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            hit = self._seen.get(id(x))
            if hit is None or hit[0] is not x:
                rows = self._rows(x.detach()).to(self.dtype)
                hit = (x, rows.T @ rows, rows.shape[0])  # x kept: its id stays unique this batch
                self._seen[id(x)] = hit
            g = self.grams
            if name in g.sums:
                g.sums[name].add_(hit[1])
            else:
                g.sums[name] = hit[1].clone()
            g.rows[name] = g.rows.get(name, 0) + hit[2]
        return hook

    def close(self) -> GramSet:
        for h in self._handles:
            h.remove()
        self._seen = {}
        return self.grams


def shrink(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1 − α)·diag(G): the paper's off-diagonal scaling (α = 1: plain RegMean)."""
    if alpha == 1.0:
        return g
    return g * alpha + torch.diag_embed(torch.diagonal(g)) * (1.0 - alpha)


@dataclass
class Regression:
    """Σ_k G̃_k and Σ_k τ_k·G̃_k of one linear, built one expert at a time (float64)."""

    s: torch.Tensor | None = None
    c: torch.Tensor | None = None

    def add(self, tau: torch.Tensor, gram: torch.Tensor, transposed: bool) -> None:
        t = tau.to(torch.float64)
        if transposed:  # Conv1D: y = x·W, W [in, out]; the regression is on Wᵀ
            t = t.T
        tg = t @ gram
        self.s = gram.clone() if self.s is None else self.s.add_(gram)
        self.c = tg if self.c is None else self.c.add_(tg)


def solve(reg: Regression, ridge: float) -> tuple[torch.Tensor | None, float]:
    """(Σ τG̃)(ΣG̃ + λI)⁻¹ and the λ used; None when no expert's rows reached the layer."""
    if reg.s is None or reg.c is None:
        return None, 0.0
    s = reg.s
    scale = float(torch.diagonal(s).mean())
    if not scale > 0.0:
        return None, 0.0
    lam = ridge * scale
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    for _ in range(MAX_JITTER_TRIES):
        chol, info = torch.linalg.cholesky_ex(s + lam * eye)
        if int(info) == 0:
            d = torch.diagonal(chol)
            if float(d.max() / d.min()) ** 2 <= MAX_CONDITION:
                # X·A = C with A symmetric: solve A·Xᵀ = Cᵀ
                return torch.cholesky_solve(reg.c.T, chol).T, lam
        lam = max(lam * 10.0, scale * 1e-12)
    raise ArithmeticError(f"Σ G̃ stays singular with a ridge of {lam:g}")


@contextmanager
def _stop_at(block: torch.nn.Module, store: list) -> Iterator[None]:
    """End a forward at `block`'s input, keeping (args, kwargs)."""
    def pre(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        store.append((args, kwargs))
        raise _Stop

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def _block_output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out  # type: ignore[return-value]


@dataclass
class BlockInputs:
    """One cached batch at a block boundary: the hidden states and everything else the block reads."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor

    def call(self, block: torch.nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.args:
            args, kwargs = (self.hidden, *self.args[1:]), self.kwargs
        else:
            args, kwargs = (), {**self.kwargs, "hidden_states": self.hidden}
        return _block_output(functional_call(block, params, args=args, kwargs=kwargs, strict=False))


def forward(module: torch.nn.Module, params: dict[str, torch.Tensor], batch: Batch) -> object:
    """The whole model on a padded batch, without a KV cache (blocks are re-run from captured inputs)."""
    kwargs: dict[str, object] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if getattr(getattr(module, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return functional_call(module, params, args=(), kwargs=kwargs, strict=False)


def fixed_batches(samples: Sequence[list[int]], batch_size: int, pad_id: int) -> list[Batch]:
    """Every sample once, in length order (less padding), `batch_size` per batch: a Gram is a sum
    over all of them, so the order changes nothing but the padding."""
    order = sorted(range(len(samples)), key=lambda i: (len(samples[i]), i))
    return [collate([samples[i] for i in order[s: s + batch_size]], pad_id)
            for s in range(0, len(order), batch_size)]


@dataclass
class RegMeanResult:
    tensors: dict[str, torch.Tensor]  # solved linear weights (θ₀ + merged τ), compute dtype
    max_ridge: float = 0.0
    n_linears: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # per task: real-token rows seen at block 0


def regmean(module: torch.nn.Module, base: dict[str, torch.Tensor], task_vectors: dict[str, torch.Tensor],
            fallback: dict[str, torch.Tensor], batches: dict[str, list[Batch]], *, propagate: str,
            alpha: float, ridge: float, device: str | torch.device = "cpu",
            progress: Callable[[int, int], None] | None = None) -> RegMeanResult:
    """Solve every merged linear weight of `module` by regression mean (see the module docstring).

    `fallback` holds the merged value of every other tensor (the merged model's non-linear
    parameters: what RegMean++ propagates through); `batches[task]` are expert `task`'s calibration
    batches, experts in task_vectors' order."""
    tasks = list(batches)
    sites = linear_sites(module, set(task_vectors))
    blocks = find_blocks(module)
    if propagate == "merged" and not blocks:
        raise ValueError("RegMean++ walks transformer blocks; this architecture has none that it can find")
    in_block = {name for name in sites for p, _ in blocks if name.startswith(p)}
    outer = {n: s for n, s in sites.items() if n not in in_block}
    res = RegMeanResult({}, n_linears=len(sites))
    total = len(tasks) * (len(blocks) + (1 if outer else 0) + (1 if blocks else 0))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    def expert(k: int) -> dict[str, torch.Tensor]:
        out = dict(base)
        for n, tv in task_vectors.items():
            out[n] = base[n] + tv[k]
        return out

    def finish(regs: dict[str, Regression], group: dict[str, LinearSite]) -> None:
        for name, site in group.items():
            w, lam = solve(regs[name], ridge)
            res.max_ridge = max(res.max_ridge, lam)
            b = base[site.weight]
            if w is None:  # no rows reached it (an unused layer): the fallback
                res.tensors[site.weight] = fallback[site.weight]
                continue
            delta = (w.T if site.transposed else w).to(b.dtype)
            res.tensors[site.weight] = b + delta

    def accumulate(regs: dict[str, Regression], grams: GramSet, k: int, group: dict[str, LinearSite]) -> None:
        for name, site in group.items():
            g = grams.mean(name)
            if g is not None:
                regs.setdefault(name, Regression()).add(task_vectors[site.weight][k], shrink(g, alpha),
                                                        site.transposed)

    # 1. linears outside the blocks: each expert's own full forward
    if outer:
        regs: dict[str, Regression] = {}
        for k, t in enumerate(tasks):
            params = expert(k)
            hooks = GramHooks(module, outer, torch.float64)
            with torch.no_grad():
                for b in batches[t]:
                    b = b.to(device)
                    hooks.new_batch(b.attention_mask)
                    forward(module, params, b)
            accumulate(regs, hooks.close(), k, outer)
            tick()
        finish(regs, outer)
    if not blocks:
        return res

    # 2. block-0 inputs per task: the expert's own embeddings (own), the merged ones (merged)
    merged_outer = {**fallback, **res.tensors}
    cache: dict[str, list[BlockInputs]] = {}
    for k, t in enumerate(tasks):
        params = expert(k) if propagate == "own" else merged_outer
        store: list = []
        with torch.no_grad(), _stop_at(blocks[0][1], store):
            for b in batches[t]:
                b = b.to(device)
                try:
                    forward(module, params, b)
                except _Stop:
                    pass
        cache[t] = []
        for b, (args, kwargs) in zip(batches[t], store, strict=True):
            hidden = args[0] if args else kwargs["hidden_states"]
            cache[t].append(BlockInputs(hidden, args, kwargs, b.attention_mask.to(device).bool()))
        res.rows[t] = sum(int(c.mask.sum()) for c in cache[t])
        tick()

    # 3. block by block
    for prefix, block in blocks:
        names = [n for n in base if n.startswith(prefix)]
        local = {n: s for n, s in sites.items() if s.weight.startswith(prefix)}
        block_sites = {n[len(prefix):]: s for n, s in local.items()}
        regs = {}
        for k, t in enumerate(tasks):
            own = {n[len(prefix):]: base[n] + task_vectors[n][k] if n in task_vectors else base[n] for n in names}
            hooks = GramHooks(block, block_sites, torch.float64)
            with torch.no_grad():
                for i, c in enumerate(cache[t]):
                    hooks.new_batch(c.mask)
                    out = c.call(block, own)
                    if propagate == "own":
                        cache[t][i] = BlockInputs(out, c.args, c.kwargs, c.mask)
            grams = hooks.close()
            accumulate(regs, GramSet({prefix + n: g for n, g in grams.sums.items()},
                                     {prefix + n: r for n, r in grams.rows.items()}), k, local)
            tick()
        finish(regs, local)
        if propagate == "merged":
            merged_block = {n[len(prefix):]: res.tensors.get(n, fallback[n]) for n in names}
            with torch.no_grad():
                for t in tasks:
                    cache[t] = [BlockInputs(c.call(block, merged_block), c.args, c.kwargs, c.mask)
                                for c in cache[t]]
    return res
