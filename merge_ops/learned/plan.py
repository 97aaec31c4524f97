"""The memory plan of a learned merge: predicted peak device and host memory, before any weight is read.

Torch-free: it reads only config.json and the safetensors headers (shapes and dtypes), and counts

    base θ₀                 every floating tensor, compute dtype
    task vectors            K × the merged tensors, compute dtype (MergeInputs)
    merged parameters       in_memory: θ(c) for every merged tensor, plus its gradient leaf (Step);
                            streamed: only the tensors outside the blocks, plus one block's θ(c) and
                            its recomputed copy in backward
    activations             one task's forward/backward at a time (Step): in_memory keeps every
                            block's internals; streamed keeps the block boundaries (checkpointing)
                            and one block's internals, plus the logits and their softmax in fp32
    teacher cache           Expert Merging: each task's samples' logits (+ hidden states), fp32
    runtime                 the process itself (Python, torch, transformers): RUNTIME_MIB on the host
    mapped inputs           CPU: the K + 1 checkpoints' pages, mapped while θ₀ and τ are read

On CPU the device is the host: device and host peaks are the same number. The prediction is a
bound built from the terms above; benchmarks/learned_scale.py compares it with measured peaks.
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
    teacher_cache_mib: float
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
                device: str = "cpu") -> MemoryPlan:
    """Predict the learning stage's peak memory. `learned(name) -> bool` restricts the merged tensors
    (as the method's `learns`); `teacher_samples` > 0 adds an Expert Merging teacher cache."""
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    tensors = {n: v for n, v in safetensors_tensors(base_dir).items() if v[1].startswith(("F", "BF"))}
    cb = BYTES[compute_dtype]
    model = sum(_numel(s) * BYTES[d] for s, d in tensors.values())
    base = sum(_numel(s) for s, _ in tensors.values()) * cb
    merged = {n: _numel(s) for n, (s, _) in tensors.items() if learned is None or learned(n)}
    tv = k * sum(merged.values()) * cb
    per_block: dict[int, int] = {}
    outside = 0
    for n, e in merged.items():
        b = _block_index(n)
        if b is None:
            outside += e
        else:
            per_block[b] = per_block.get(b, 0) + e
    biggest_block = max(per_block.values(), default=0)
    h = int(cfg.get("hidden_size", 0) or 0)
    inter = int(cfg.get("intermediate_size", 4 * h) or 4 * h)
    layers = int(cfg.get("num_hidden_layers", len(per_block)) or len(per_block))
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    vocab = int(cfg.get("vocab_size", 0) or 0)
    tokens = batch * seq_len
    # one block's saved tensors for backward: ~12 H-wide states, 3 intermediate-wide (gated MLP),
    # attention probabilities heads × T per token
    block_act = tokens * (12 * h + 3 * inter + 2 * heads * seq_len) * cb
    logits = tokens * vocab * 4 * 3  # logits, log-softmax and softmax in fp32
    if mode == "in_memory":
        merged_b = 2 * sum(merged.values()) * cb  # θ(c) and the gradient leaf of each
        act = layers * block_act + logits
    else:
        merged_b = (2 * outside + 2 * biggest_block) * cb
        act = (layers + 1) * tokens * h * cb + block_act + logits
    cache = teacher_samples * seq_len * (vocab + h) * 4
    device_b = base + tv + merged_b + act + cache
    if device == "cpu":  # the K + 1 input checkpoints are memory-mapped while read: in the RSS high-water mark
        device_b += (k + 1) * model
    mib = 2**20
    on_cpu = device == "cpu"
    host = device_b / mib + RUNTIME_MIB if on_cpu else RUNTIME_MIB + model / mib
    return MemoryPlan(mode, k, batch, seq_len, model / mib, base / mib, tv / mib, merged_b / mib,
                      act / mib, cache / mib, device_b / mib + (RUNTIME_MIB if on_cpu else 0.0), host)


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
