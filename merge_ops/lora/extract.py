"""`alloy extract-lora`: the difference between two checkpoints as a PEFT LoRA adapter.

For every weight of a Linear, Conv1D or Embedding module that differs, the difference D is factored
by its SVD, truncated to rank k = min(r, its smallest dimension): B·A = U_k·S_k·V_kᵀ with A = √S_k·V_kᵀ
and B = U_k·√S_k (mergekit's extract_lora splits the singular values the same way). That is the best
rank-k approximation (Eckart–Young): ‖D − B·A‖_F = √(Σ_{i>k} σ_i²), reported per module. The adapter's
scale is 1 everywhere (lora_alpha = r, and rank_pattern = alpha_pattern for the modules of lower rank),
and `target_modules` is a regex of exactly the extracted modules, so PEFT adds nothing else.

Tensors a LoRA cannot hold (norms, biases, other 1-D or non-module tensors that changed) are left
out and listed in `alloy_extract.json` with their largest change; a vocabulary of another size is
refused. Tensors stream one at a time; only the factors are kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_ops.checkpoint import CheckpointReader
from merge_ops.context import ResolvedModel
from merge_ops.errors import CheckpointError, InputError
from merge_ops.lora.config import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from merge_ops.lora.reader import PREFIX, model_folder, open_checkpoint

SUMMARY = "alloy_extract.json"
# module types by name, when the architecture cannot be built on the meta device
_EMBEDDING_NAME = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings|"
                             r"token_type_embeddings|embed_positions|tok_embeddings)$")


@dataclass
class Extracted:
    out_dir: Path
    rank: int
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> rank, errors
    left_out: dict[str, float] = field(default_factory=dict)  # changed tensor LoRA cannot hold -> max |Δ|
    missing: list[str] = field(default_factory=list)  # in one checkpoint only

    def max_relative_error(self) -> float:
        return max((m["relative_error"] for m in self.modules.values()), default=0.0)


def module_kinds(folder: Path) -> dict[str, str]:
    """'<module>.weight' -> 'linear' | 'conv1d' | 'embedding', from the architecture built on the meta
    device (no weights, no remote code); {} when transformers cannot build it."""
    try:
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            return {}
        with torch.device("meta"):
            model = cls._from_config(config)
    except Exception:  # an unknown or custom architecture: fall back to names and shapes
        return {}
    from transformers.pytorch_utils import Conv1D

    kinds = {}
    for name, m in model.named_modules():
        kind = ("conv1d" if isinstance(m, Conv1D) else "embedding" if isinstance(m, torch.nn.Embedding)
                else "linear" if isinstance(m, torch.nn.Linear) else None)
        if kind is not None:
            kinds[f"{name}.weight" if name else "weight"] = kind
    return kinds


def _kind(name: str, shape: tuple[int, ...], kinds: dict[str, str]) -> str | None:
    if len(shape) != 2 or not name.endswith(".weight"):
        return None
    if kinds:
        return kinds.get(name)
    return "embedding" if _EMBEDDING_NAME.search(name.removesuffix(".weight")) else "linear"


def factor(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A [k, n], B [m, k], ‖D − B·A‖_F, ‖D‖_F) of D [m, n] by truncated SVD, k = min(rank, m, n)."""
    u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = root[:, None] * vh[:k]
    b = u[:, :k] * root[None, :]
    err = float(s[k:].square().sum().sqrt())
    return a, b, err, float(s.square().sum().sqrt())


def extract_lora(merged: ResolvedModel | Path, base: ResolvedModel | Path, rank: int, out_dir: Path, *,
                 base_name: str | None = None, channel: Any = None) -> Extracted:
    """Write out_dir/{adapter_config.json, adapter_model.safetensors, alloy_extract.json}."""
    from safetensors.torch import save_file

    from merge_ops.context import report

    if rank < 1:
        raise InputError(f"--rank must be at least 1, got {rank}", param="rank")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"output folder {out_dir} is not empty: choose a new folder", param="out")
    kinds = module_kinds(model_folder(base))
    res = Extracted(out_dir, rank)
    tensors: dict[str, torch.Tensor] = {}
    conv1d = False
    with open_checkpoint(merged) as m, open_checkpoint(base) as b:
        names = [n for n in b.names() if n in m]
        res.missing = sorted(set(b.names()) ^ set(m.names()))
        for i, n in enumerate(names):
            _check_shapes(m, b, n)
            if not b.dtype(n).is_floating_point:
                continue
            cd = torch.float64 if torch.float64 in (m.dtype(n), b.dtype(n)) else torch.float32
            diff = m.read(n).to(cd) - b.read(n).to(cd)
            report(channel, "merge", i + 1, len(names))
            if not bool(diff.any()):
                continue
            kind = _kind(n, b.shape(n), kinds)
            if kind is None:
                res.left_out[n] = float(diff.abs().max())
                continue
            module = n.removesuffix(".weight")
            # PEFT: Linear adds B·A; Conv1D (weight [in, out]) and Embedding add (B·A)ᵀ
            a, bb, err, norm = factor(diff if kind == "linear" else diff.T, rank)
            conv1d |= kind == "conv1d"
            stored = b.dtype(n)
            if kind == "embedding":
                tensors[f"{PREFIX}{module}.lora_embedding_A"] = a.to(stored).contiguous()
                tensors[f"{PREFIX}{module}.lora_embedding_B"] = bb.to(stored).contiguous()
            else:
                tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(stored).contiguous()
                tensors[f"{PREFIX}{module}.lora_B.weight"] = bb.to(stored).contiguous()
            res.modules[module] = {"kind": kind, "rank": a.shape[0], "error_fro": err, "norm_fro": norm,
                                   "relative_error": err / norm if norm else 0.0}
            del diff
    if not res.modules:
        raise InputError("the models do not differ in any Linear, Conv1D or Embedding weight: there is no "
                         "LoRA to extract" + (f" (changed elsewhere: {sorted(res.left_out)[:5]})"
                                              if res.left_out else ""), param="model")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    lower = {re.escape(mod): info["rank"] for mod, info in res.modules.items() if info["rank"] != rank}
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name,
        "r": rank, "lora_alpha": rank, "rank_pattern": lower, "alpha_pattern": dict(lower),
        "target_modules": "(" + "|".join(re.escape(mod) for mod in res.modules) + ")",
        "fan_in_fan_out": conv1d, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    summary = {"rank": rank, "modules": res.modules, "left_out": res.left_out, "missing": res.missing,
               "max_relative_error": res.max_relative_error()}
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return res


def _check_shapes(m: CheckpointReader, b: CheckpointReader, n: str) -> None:
    if m.shape(n) != b.shape(n):
        raise CheckpointError(f"tensor {n!r} has shape {list(m.shape(n))} in the merged model but "
                              f"{list(b.shape(n))} in the base (a resized vocabulary?): a LoRA cannot change "
                              "shapes", param="model")

