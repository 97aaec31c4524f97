"""`alloy merge-adapters`: LoRA adapters of one base merged into one adapter, as PEFT's
`add_weighted_adapter` does it (same combinations, same result), without loading the model.

Per module, with sₖ the scale of adapter k and wₖ its weight (adapters lacking the module are skipped):

    cat       A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …]          exact: B·A = Σ wₖsₖBₖAₖ, rank Σ rₖ
    svd       Δ = Σ wₖ·sₖBₖAₖ, then its rank-r truncated SVD: B = U_r·S_r, A = V_rᵀ
    ties_svd  Δ = TIES of the sₖBₖAₖ (PEFT's merge_utils.ties: magnitude top-`density` per adapter,
              sign elected from the pruned sum (`total`) or count (`frequency`), weighted mean of the
              agreeing entries), then as svd

r is `rank` or the largest adapter rank (svd), Σ rₖ (cat); the new adapter has lora_alpha = r (scale
1) and exactly the merged modules as targets. PEFT copies the first adapter's `use_rslora` into the new
config, which rescales its merged adapter by √r; here the scale stays 1, so the result is Σ wₖ·Δₖ as
documented. Adapters with full tensors (modules_to_save, trained biases, lora_bias) are refused:
PEFT cannot combine those either.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from merge_ops.errors import InputError
from merge_ops.lora.config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraConfig, check_adapter_folder
from merge_ops.lora.reader import PREFIX, AdapterKeys, _TensorFile, adapter_keys

METHODS = ("svd", "cat", "ties_svd")
SIGN_METHODS = ("total", "frequency")


def ties(deltas: list[torch.Tensor], weights: list[float], density: float, sign_method: str = "total"
         ) -> torch.Tensor:
    """PEFT's merge_utils.ties on [K, ...] task tensors (the same steps, in the same order)."""
    pruned = []
    for d in deltas:
        if density >= 1:
            pruned.append(d)
            continue
        k = int(density * d.numel())
        mask = torch.zeros(d.numel(), dtype=d.dtype)
        mask[torch.topk(d.abs().reshape(-1), k=k, largest=True).indices] = 1
        pruned.append(d * mask.view(d.shape))
    t = torch.stack(pruned)
    sign = t.sign()
    magnitude = t.sum(0) if sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(magnitude >= 0, 1, -1)
    w = torch.tensor(weights, dtype=t.dtype).view(-1, *[1] * (t.dim() - 1))
    return (t * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def _max_rank(cfg: LoraConfig) -> int:
    return max([cfg.r, *cfg.rank_pattern.values()])


def merge_adapters(adapters: list[Path], weights: list[float], out_dir: Path, *, method: str = "svd",
                   rank: int | None = None, density: float | None = None, sign_method: str = "total") -> dict:
    """Write the merged adapter into out_dir; returns its config."""
    if method not in METHODS:
        raise InputError(f"--method {method!r}: use one of {', '.join(METHODS)}", param="method")
    if len(adapters) < 2:
        raise InputError("give at least two adapters to merge", param="adapters")
    if len(weights) != len(adapters):
        raise InputError(f"--weights: {len(weights)} weight(s) for {len(adapters)} adapters", param="weights")
    if method == "ties_svd" and (density is None or not 0 <= density <= 1):
        raise InputError("--density (0..1) is needed by ties_svd: the fraction of each adapter's entries kept",
                         param="density")
    if sign_method not in SIGN_METHODS:
        raise InputError(f"--majority-sign {sign_method!r}: use total or frequency", param="majority_sign")
    if rank is not None and rank < 1:
        raise InputError(f"--rank must be at least 1, got {rank}", param="rank")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"output folder {out_dir} is not empty: choose a new folder", param="out")
    cfgs = [check_adapter_folder(Path(a)) for a in adapters]
    files = [_TensorFile(Path(a) / ADAPTER_WEIGHTS) for a in adapters]
    try:
        keys: list[AdapterKeys] = []
        for a, f in zip(adapters, files, strict=True):
            k = adapter_keys(f._info, str(a))
            # an embedding's saved base layer is the base's own weight (every adapter of the base has it)
            full = sorted(set(k.full) - k.base_copies) + sorted(k.bias)
            if full:
                raise InputError(f"{a} holds full tensors ({full[:3]}): modules_to_save and biases cannot be "
                                 "combined at adapter level; merge the models instead", param="adapters")
            keys.append(k)
        new_rank = sum(map(_max_rank, cfgs)) if method == "cat" else rank or max(map(_max_rank, cfgs))
        modules = sorted({m for k in keys for m in k.pairs})
        tensors: dict[str, torch.Tensor] = {}
        for module, embedding in modules:
            dtype = None
            parts = []  # (weight, scale, A, B) of the adapters that have the module
            for w, cfg, k, f in zip(weights, cfgs, keys, files, strict=True):
                ab = k.pairs.get((module, embedding))
                if ab is not None:
                    a, b = f.read(ab["A"]), f.read(ab["B"])
                    dtype = dtype or a.dtype
                    parts.append((w, cfg.scale(module), a.double(), b.double()))
            if len({(p[3].shape[0], p[2].shape[1]) for p in parts}) != 1:
                raise InputError(f"module {module!r} has different shapes in the adapters: they are not adapters "
                                 "of one base", param="adapters")
            if method == "cat":
                a = torch.cat([w * s * a for w, s, a, _ in parts])
                b = torch.cat([b for *_, b in parts], dim=1)
            else:
                deltas = [s * b @ a for _, s, a, b in parts]
                ws = [w for w, *_ in parts]
                d = sum(w * x for w, x in zip(ws, deltas, strict=True)) if method == "svd" else \
                    ties(deltas, ws, float(density), sign_method)
                u, sv, vh = torch.linalg.svd(d, full_matrices=False)
                a, b = vh[:new_rank], u[:, :new_rank] * sv[:new_rank]
            # PEFT allocates every module at the new rank: unused rows/columns stay zero
            a = torch.cat([a, a.new_zeros(new_rank - a.shape[0], a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], new_rank - b.shape[1])], dim=1)
            kind = "lora_embedding_" if embedding else "lora_"
            suffix = "" if embedding else ".weight"
            tensors[f"{PREFIX}{module}.{kind}A{suffix}"] = a.to(dtype).contiguous()
            tensors[f"{PREFIX}{module}.{kind}B{suffix}"] = b.to(dtype).contiguous()
    finally:
        for f in files:
            f.close()
    from safetensors.torch import save_file

    config = json.loads((Path(adapters[0]) / ADAPTER_CONFIG).read_text())
    config.update(r=new_rank, lora_alpha=new_rank, rank_pattern={}, alpha_pattern={}, use_rslora=False,
                  target_modules="(" + "|".join(re.escape(m) for m, _ in modules) + ")",
                  modules_to_save=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config
