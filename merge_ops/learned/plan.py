"""The memory plan of a learned merge: predicted peak device and host memory, before any weight is read.

Torch-free: it reads only config.json and the safetensors headers (shapes and dtypes), and counts

    in_memory (engine.load_merge_inputs: everything held, compute dtype)
      base θ₀               every floating tensor
      task vectors          K × the merged tensors
      merged parameters     θ(c) for every merged tensor, plus its gradient leaf (Step)
      activations           one forward/backward at a time — one task's, or every task's batch at
                            once for a causal LM whose tasks have no tensors of their own
                            (Adapter.task_groups) — every block's internals, plus the logits and
                            their softmax in fp32
      (the checkpoints are read with preadv, not mapped: their pages are not in the RSS)
    streamed (store.open_merge_inputs + streaming.BlockCache: the files are the store)
      base θ₀               none held: every tensor belongs to a streamed unit — a block, or a module
                            outside them (embeddings, norm, head) — or is a tied embedding, merged
                            once per step from the files (its pieces read as they are merged)
      task vectors          none held: τ is formed from the files per unit
      blocks                the BlockCache's read buffers (streaming.Slot, kept for the job): up to
                            CACHED_BLOCKS + 1, as many as CACHE_SHARE of the model's bytes holds, each the
                            biggest block's θ₀ and K experts' tensors in their stored dtype (θ₀ only
                            when a block alone exceeds the share); a unit outside the blocks bigger
                            than a slot (an untied head) has its θ₀ read into fresh tensors on top and
                            its experts read piece by piece (`_cache_bytes`)
      merged parameters     the biggest unit's θ(c), its weight gradients (and, on an accelerator, the
                            merge's full-size scratch: the CPU merge works in pieces); a
                            tied embedding (on the Step path) 2× more: its θ(c) and the leaf's gradient,
                            into which each task's head and lookup gradients are added in place
      activations           the block boundaries (checkpointing), one block's internals, logits
    both
      teacher cache         Expert Merging: on disk (teacher_cache.RowFile) in fp16, reported but
                            not in the peak; one batch's targets are resident (activations)
      runtime               the process itself (Python, torch, transformers): RUNTIME_MIB on the host

On CPU the device is the host: device and host peaks are the same number. The prediction is a
bound built from the terms above; benchmarks/learned_scale.py compares it with measured peaks
(benchmarks/README.md), tests/merge_ops/test_learned_stream_plan.py with a generous band.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
RUNTIME_MIB = 420.0  # resident size of a worker after importing torch + transformers (measured, CPU)
BLOCK_WORDS = ("layers", "layer", "h", "blocks")
CACHED_BLOCKS = 2  # streaming.CACHED_BLOCKS (this module stays torch-free)
CACHE_BYTES = 2  # teacher rows are stored in float16
CACHE_SHARE = 0.4  # streaming.CACHE_SHARE: the block cache's budget, a share of the model's bytes


@dataclass
class MemoryPlan:
    mode: str
    k: int
    batch: int
    seq_len: int
    model_mib: float  # the base's floating tensors in their own dtype
    base_mib: float
    task_vectors_mib: float
    merged_mib: float
    activations_mib: float
    teacher_cache_mib: float  # on disk
    blocks_mib: float
    peak_device_mib: float
    peak_host_mib: float

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def text(self) -> str:
        d = self.to_dict()
        return "\n".join([f"memory plan ({self.mode}, K={self.k}, batch {self.batch} x {self.seq_len} tokens)",
                          *[f"  {k:<20} {v:>10} MiB" for k, v in d.items() if k.endswith("_mib")]])


def safetensors_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the headers of every *.safetensors file (no data read)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                out[name] = (tuple(meta["shape"]), meta["dtype"])
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in BLOCK_WORDS and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def plan_memory(base_dir: Path, *, k: int, batch: int, seq_len: int, mode: str = "streamed",
                compute_dtype: str = "float32", learned: Any = None, teacher_samples: int = 0,
                device: str = "cpu", task_specific: bool = False) -> MemoryPlan:
    """Predict the learning stage's peak memory. `learned(name) -> bool` restricts the merged tensors
    (as the method's `learns`); `teacher_samples` > 0 adds an Expert Merging teacher cache;
    `task_specific`: the tasks have tensors of their own (one forward per task)."""
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    tensors = {n: v for n, v in safetensors_tensors(base_dir).items() if v[1].startswith(("F", "BF"))}
    cb = BYTES[compute_dtype]
    model = sum(_numel(s) * BYTES[d] for s, d in tensors.values())
    base = sum(_numel(s) for s, _ in tensors.values()) * cb
    merged = {n: _numel(s) for n, (s, _) in tensors.items() if learned is None or learned(n)}
    tv = k * sum(merged.values()) * cb
    per_block: dict[int, int] = {}  # merged elements per block
    unit_bytes: dict[str, int] = {}  # stored bytes of each streamed unit: θ₀ and the K experts' tensors
    unit_base: dict[str, int] = {}
    unit_blocks: set[str] = set()  # the units that are transformer blocks
    biggest_unit = 0  # merged elements of the biggest unit (a block, or an outside tensor)
    tied = bool(cfg.get("tie_word_embeddings", False))
    tied_emb = 0  # a tied embedding is learned on the Step path (streaming.py)
    for n, (shape, dt) in tensors.items():
        b = _block_index(n)
        e = _numel(shape)
        unit = str(b) if b is not None else n.rsplit(".", 1)[0]
        if b is None and tied and "embed" in n:
            tied_emb += e
            continue
        if b is not None:
            unit_blocks.add(unit)
        unit_bytes[unit] = unit_bytes.get(unit, 0) + e * BYTES[dt] * (1 + (k if n in merged else 0))
        unit_base[unit] = unit_base.get(unit, 0) + e * BYTES[dt]
        if n in merged:
            if b is not None:
                per_block[b] = per_block.get(b, 0) + e
            else:
                biggest_unit = max(biggest_unit, e)
    biggest_unit = max(biggest_unit, *per_block.values(), 0)
    h = int(cfg.get("hidden_size", 0) or 0)
    inter = int(cfg.get("intermediate_size", 4 * h) or 4 * h)
    layers = int(cfg.get("num_hidden_layers", len(per_block)) or len(per_block))
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    vocab = int(cfg.get("vocab_size", 0) or 0)
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in cfg.get("architectures") or [])
    tokens = batch * seq_len * (k if causal and not task_specific else 1)  # one forward's tokens
    # one block's saved tensors for backward: ~12 H-wide states, 3 intermediate-wide (gated MLP),
    # attention probabilities heads × T per token
    block_act = tokens * (12 * h + 3 * inter + 2 * heads * seq_len) * cb
    logits = tokens * vocab * 4 * 3  # logits, log-softmax and softmax in fp32
    cache = teacher_samples * seq_len * (vocab + h) * CACHE_BYTES  # on disk
    teacher_batch = tokens * (vocab + h) * (CACHE_BYTES + 4) if teacher_samples else 0
    blocks = 0
    on_cpu = device == "cpu"
    if mode == "in_memory":
        merged_b = 2 * sum(merged.values()) * cb  # θ(c) and the gradient leaf of each
        act = layers * block_act + logits + teacher_batch
        device_b = base + tv + merged_b + act
    else:
        base = 0
        tv = 0
        blocks = _cache_bytes(unit_bytes, unit_base, CACHE_SHARE * model, unit_blocks)
        # a unit's θ(c) and its weight gradients, plus on an accelerator the merge's full-size scratch
        # (the CPU merge works in cache-sized pieces: engine._merge_cpu); a tied embedding's θ(c) and
        # the gradient its tasks add into (at a step's ends θ₀ read whole for the merge replaces one
        # of them; its experts are read piece by piece)
        merged_b = ((2 if on_cpu else 3) * biggest_unit + 2 * tied_emb) * cb
        act = (layers + 1) * tokens * h * cb + block_act + logits + teacher_batch
        device_b = base + blocks + merged_b + act
    mib = 2**20
    host = device_b / mib + RUNTIME_MIB if on_cpu else RUNTIME_MIB + (blocks + teacher_batch) / mib
    return MemoryPlan(mode, k, batch, seq_len, model / mib, base / mib, tv / mib, merged_b / mib,
                      act / mib, cache / mib, blocks / mib, device_b / mib + (RUNTIME_MIB if on_cpu else 0.0),
                      host)


def _cache_bytes(unit_bytes: dict[str, int], unit_base: dict[str, int], budget: float, blocks: set[str]) -> int:
    """streaming.BlockCache's high-water mark: its slots (kept for the job), CACHED_BLOCKS + 1 of them
    or as many as the budget holds (at least one), each the biggest block's reads — θ₀ + K experts
    when the unit fits the budget, else θ₀ only (experts read piece by piece) — plus one unit outside
    the blocks that is bigger than a slot (its θ₀ read into fresh tensors, freed when evicted; its
    experts are read piece by piece)."""
    slot = max((u if u <= budget else unit_base[n] for n, u in unit_bytes.items() if n in blocks), default=0)
    slots = min(CACHED_BLOCKS + 1, max(1, int(budget // slot))) if slot else 0
    # a unit outside the blocks keeps its experts only when it fits a slot (streaming.BlockStreamer._whole)
    outside = [u if u <= min(budget, slot) else unit_base[n] for n, u in unit_bytes.items() if n not in blocks]
    extra = max([u for u in outside if u > slot], default=0)
    return int(slots * slot + extra)


def check_fits(plan: MemoryPlan, budget_mib: float | None) -> str | None:
    """None if the plan fits `budget_mib` (None: unknown, not checked), else what to change."""
    if budget_mib is None or plan.peak_device_mib <= budget_mib:
        return None
    hint = "lower batch_size or calibration.max_length, use fewer experts"
    if plan.mode == "in_memory":
        hint = "use the streamed mode (ALLOY_LEARNED_MODE=auto or streamed), " + hint
    return (f"the learned merge needs about {plan.peak_device_mib:.0f} MiB on the device but "
            f"{budget_mib:.0f} MiB are available (model {plan.model_mib:.0f} MiB, task vectors "
            f"{plan.task_vectors_mib:.0f} MiB, activations {plan.activations_mib:.0f} MiB): {hint}, "
            "or use a compute dtype of fewer bytes")
