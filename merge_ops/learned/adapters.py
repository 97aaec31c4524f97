"""Model adapters: run the base architecture on given parameters and return what losses score.

An adapter owns one instance of the base architecture, built from the base's config.json, whose
own tensors are the base's (assigned, not copied) and frozen. `forward(params, head, batch)` runs it
through `torch.func.functional_call` with the merged (or an expert's) parameters and a task's own
task-specific tensors, and returns `Output(logits [N, C], hidden)`: one row per prediction the loss
scores; `hidden` holds the asked layers' states at the real tokens.

    EncoderClassifier  HF encoder (BertModel, ...) + a per-task linear head on mean-pooled tokens
                       (the sentence-transformers convention). The head is the task's
                       task-specific tensors: one 2-D `*weight` [C, hidden] and optionally a `*bias`.
    CausalLM           HF *ForCausalLM: next-token distributions at every real (unmasked) position.
                       Task-specific tensors, if any, must be module tensors (e.g. a per-task lm_head).

Batches of mixed lengths run packed (packing.py: short rows share a row, so padding costs no
compute) where the architecture passes a one-off probe showing that packed and padded give the same
outputs; otherwise padded, as given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from merge_ops.errors import CheckpointError, SpecError
from merge_ops.learned.batches import Batch, concat
from merge_ops.learned.layouts import CheckpointLayout
from merge_ops.learned.packing import Packing, pack


@dataclass
class Output:
    logits: torch.Tensor  # [N, C]
    # per asked layer (HF hidden_states index, 0 = embeddings): [n_real, H], real tokens in batch order
    hidden: tuple[torch.Tensor, ...] | None = None


class Adapter:
    kind = "base"
    causal = False

    def __init__(self, module: torch.nn.Module, packing: bool = True):
        self.module = module.eval()  # eval: no dropout, so a step is a deterministic function of c
        self._packs = None if packing else False  # None: probe on first use
        self.dtype = next(module.parameters()).dtype
        for p in module.parameters():
            p.requires_grad_(False)
        # checkpoint names the module reads (transformers may lay some out differently: layouts.py)
        self.layout = CheckpointLayout.of(module)
        self.names = self.layout.checkpoint_names(set(module.state_dict()))

    def bind(self, base: dict[str, torch.Tensor]) -> None:
        """Make the module's own tensors the base's (shared storage: no second copy of the model)."""
        own = {n: t for n, t in base.items() if n in self.names}
        self.layout.remember(own)
        self.module.load_state_dict(self.layout.to_module(own), strict=False, assign=True)
        tied = bool(getattr(self.module.config, "tie_word_embeddings", False))
        if (tied or any(p.is_meta for p in self.module.parameters())) and hasattr(self.module, "tie_weights"):
            # a tied head the checkpoint does not store: the bound embedding (assign=True replaced the
            # embedding, so without re-tying the head keeps from_config's random init)
            self.module.tie_weights()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def used(self, name: str) -> bool:
        """Whether the architecture reads this checkpoint tensor (others cannot be learned)."""
        return name in self.names

    def _call(self, params: dict[str, torch.Tensor], batch: Batch, hidden: bool, packing: Packing | None
              ) -> object:
        p = self.layout.to_module({n: t for n, t in params.items() if n in self.names})
        kwargs: dict[str, object] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                     "output_hidden_states": hidden}
        if packing is not None:
            kwargs.update(input_ids=packing.input_ids, position_ids=packing.position_ids,
                          attention_mask=packing.attention_mask(self.dtype, self.causal))
        return functional_call(self.module, p, args=(), kwargs=kwargs, strict=False)

    def _packing(self, batch: Batch) -> Packing | None:
        if self._packs is None:
            self._packs = self._probe_packing()
        return pack(batch.input_ids, batch.attention_mask, self.pad_id()) if self._packs else None

    @torch.no_grad()
    def _probe_packing(self) -> bool:
        """Run a 3-row probe batch packed and padded on the module's own (base) tensors: packing is
        used only if the two agree, so an architecture that ignores position ids or 4-D masks is
        still run correctly (padded)."""
        from merge_ops.learned.batches import collate

        vocab = int(getattr(self.module.config, "vocab_size", 8) or 8)
        rows = [[(7 * i + j) % (vocab - 1) + 1 for j in range(n)] for i, n in enumerate([6, 2, 3])]
        batch = collate(rows, self.pad_id())
        pk = pack(batch.input_ids, batch.attention_mask, self.pad_id())
        try:
            padded = self._call({}, batch, True, None)
            packed = self._call({}, batch, True, pk)
        except (TypeError, ValueError, RuntimeError, IndexError):
            return False
        m = batch.attention_mask.bool()
        a = padded.hidden_states[-1][m]  # type: ignore[attr-defined]
        b = pk.tokens(packed.hidden_states[-1])  # type: ignore[attr-defined, union-attr]
        tol = 1e-4 * (1 + float(a.abs().max()))
        return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=tol))

    def _run(self, params: dict[str, torch.Tensor], batch: Batch, layers: Sequence[int]
             ) -> tuple[object, Callable[[torch.Tensor], torch.Tensor]]:
        """The model's output on the batch (packed where it can be) and `tokens`, which maps a
        [rows, width, ...] output to its real tokens in batch order: [n_real, ...]."""
        pk = self._packing(batch)
        out = self._call(params, batch, bool(layers), pk)
        if pk is not None:
            return out, pk.tokens
        mask = batch.attention_mask.bool()
        return out, lambda x: x[mask]

    @staticmethod
    def _hidden(out: object, tokens: Callable[[torch.Tensor], torch.Tensor], layers: Sequence[int]
                ) -> tuple[torch.Tensor, ...] | None:
        return tuple(tokens(out.hidden_states[j]) for j in layers) if layers else None  # type: ignore[attr-defined]

    def forward(self, params: dict[str, torch.Tensor], head: dict[str, torch.Tensor], batch: Batch,
                layers: Sequence[int] = ()) -> Output:
        raise NotImplementedError

    def task_groups(self, heads: Sequence[Mapping[str, torch.Tensor]]) -> list[list[int]]:
        """Which tasks (indices into `heads`) a step runs as one forward. A causal LM whose tasks have
        no tensors of their own scores every task's rows on one merged model: one forward over all of
        them, so a streamed step merges each block three times per step instead of per task (the
        merge costs per parameter: it was most of a short batch's step). Otherwise one task at a
        time, each task's activations freed by its backward before the next forward."""
        if self.causal and not any(heads):
            return [list(range(len(heads)))] if heads else []
        return [[i] for i in range(len(heads))]

    def forward_many(self, params: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                     batches: list[Batch], layers: Sequence[int] = ()) -> list[Output]:
        """`forward` over the rows of several batches at once (a causal LM: one output row per real
        token, in batch order), split back into one Output per batch."""
        if len(batches) == 1:
            return [self.forward(params, head, batches[0], layers)]
        if not self.causal:
            raise ValueError("forward_many splits per-token outputs: causal LMs only")
        out = self.forward(params, head, concat(batches, self.pad_id()), layers)
        sizes = [int(b.attention_mask.sum()) for b in batches]
        hidden = [h.split(sizes) for h in out.hidden] if out.hidden else None
        return [Output(x, tuple(h[i] for h in hidden) if hidden else None)
                for i, x in enumerate(out.logits.split(sizes))]

    def pad_id(self) -> int:
        pid = getattr(self.module.config, "pad_token_id", None)
        return int(pid) if pid is not None else 0


class EncoderClassifier(Adapter):
    kind = "encoder"

    def forward(self, params: dict[str, torch.Tensor], head: dict[str, torch.Tensor], batch: Batch,
                layers: Sequence[int] = ()) -> Output:
        out, tokens = self._run(params, batch, layers)
        h = tokens(out.last_hidden_state)  # type: ignore[attr-defined]
        lengths = batch.attention_mask.sum(1)
        row = torch.repeat_interleave(torch.arange(len(lengths), device=h.device), lengths)
        pooled = h.new_zeros(len(lengths), h.shape[-1]).index_add(0, row, h)  # mean over each row's tokens
        pooled = pooled / lengths.clamp_min(1).unsqueeze(1).to(h.dtype)
        w, b = _linear_head(head)
        return Output(torch.nn.functional.linear(pooled, w, b), self._hidden(out, tokens, layers))


class CausalLM(Adapter):
    kind = "causal_lm"
    causal = True

    def forward(self, params: dict[str, torch.Tensor], head: dict[str, torch.Tensor], batch: Batch,
                layers: Sequence[int] = ()) -> Output:
        unknown = [n for n in head if n not in self.names]
        if unknown:
            raise SpecError(f"task-specific tensor {unknown[0]!r} is not part of the causal LM",
                            param="task_specific")
        out, tokens = self._run({**params, **head}, batch, layers)
        return Output(tokens(out.logits), self._hidden(out, tokens, layers))  # type: ignore[attr-defined]


def _linear_head(head: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    ws = [n for n, t in head.items() if t.dim() == 2 and n.endswith("weight")]
    bs = [n for n, t in head.items() if t.dim() == 1 and n.endswith("bias")]
    if len(ws) != 1 or len(bs) > 1 or len(head) != len(ws) + len(bs):
        raise SpecError("an encoder task head must be one linear layer (a 2-D *weight and an optional "
                        f"*bias); the task-specific tensors are {sorted(head)}", param="task_specific")
    return head[ws[0]], head[bs[0]] if bs else None


def build_adapter(base_dir: Path, dtype: torch.dtype, device: str | torch.device = "cpu", *,
                  packing: bool = True, skeleton: bool = False) -> Adapter:
    """CausalLM for configs whose architectures name a *ForCausalLM, else EncoderClassifier.

    `skeleton`: the module's parameters are created on the meta device (no memory; buffers such as
    rotary frequencies are real): `bind` then gives it the tensors it holds and a block streamer
    (streaming.py) serves the rest."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg_path = base_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{base_dir} has no config.json: a learned merge needs the architecture",
                              param=str(base_dir))
    archs = json.loads(cfg_path.read_text()).get("architectures") or []
    config = AutoConfig.from_pretrained(str(base_dir))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # *ForCausalLM, or another causal-LM class transformers maps (GPT2LMHeadModel, ...)
    causal = any(a.endswith("ForCausalLM") or a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for a in archs)
    try:
        with torch.device(device), _params_on_meta() if skeleton else nullcontext():
            module = (AutoModelForCausalLM if causal else AutoModel).from_config(config, dtype=dtype)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"transformers cannot build the architecture of {base_dir}: {e}",
                              param=str(base_dir)) from None
    adapter = (CausalLM if causal else EncoderClassifier)(module, packing)
    if skeleton and adapter.layout.built:  # the block streamer runs blocks on module names
        raise CheckpointError(f"{base_dir}: block-streamed learning cannot run {config.model_type}'s fused MoE "
                              "experts yet; run it in memory (ALLOY_LEARNED_MODE=in_memory) on a larger device",
                              param=str(base_dir))
    return adapter


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile moves to the meta device (each is allocated for a moment
    by its module's constructor, one at a time); buffers stay where they are built."""
    register = torch.nn.Module.register_parameter

    def on_meta(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
