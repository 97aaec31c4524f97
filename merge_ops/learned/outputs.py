"""What a learned merge leaves in out_dir: the merged checkpoint, per-task heads, the coefficient table.

    out_dir/  model*.safetensors (+ index)   the base's tensors, merged ones at the learned coefficients
              config.json, tokenizer files    copied from the base
              heads/<task>.safetensors       each task's own task-specific tensors (not merged)
              coefficients.json / .png       the learned table (groups × experts) and its heatmap
                                             (none for a closed-form merge: no groups)
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge_ops.checkpoint import CheckpointWriter, copy_aux_files, layout_like
from merge_ops.context import ResolvedModel
from merge_ops.errors import MergeFailed
from merge_ops.heads import HEADS_DIR, write_heads
from merge_ops.learned.engine import MergeEngine
from merge_ops.lora.reader import model_folder, open_checkpoint

ARTIFACTS = {"coefficients": "coefficients.json", "coefficients_png": "coefficients.png", "heads": HEADS_DIR}


def write_outputs(out_dir: Path, base_dir: Path | ResolvedModel, engine: MergeEngine, *, out_dtype: torch.dtype | None,
                  shard_size: int, title: str, meta: dict | None = None) -> dict[str, str]:
    """Write everything; returns the artifacts map for MethodResult (paths relative to out_dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = engine.inputs
    with open_checkpoint(base_dir) as r, torch.no_grad():
        names = r.names()
        floats = [n for n in names if r.dtype(n).is_floating_point]
        dt = out_dtype or (r.dtype(floats[0]) if floats else torch.float32)
        layout = layout_like(r, names, dict.fromkeys(floats, dt))
        coeffs = engine.coefficients()
        with CheckpointWriter(out_dir, layout, shard_size) as w:
            for n in names:
                if n in inputs.base:
                    t = engine.merged_tensor(n, coeffs)
                    if not torch.isfinite(t).all():
                        raise MergeFailed(f"merged tensor {n!r} has NaN/Inf values")
                    w.write(n, t.to(dt).cpu())
                else:  # integer buffers, and task-specific tensors the base itself carries
                    t = r.read(n)
                    w.write(n, t.to(dt) if t.is_floating_point() else t)
    copy_aux_files(model_folder(base_dir), out_dir, dt)
    has_heads = write_heads(out_dir, inputs.heads, dt)
    arts = dict(ARTIFACTS)
    if engine.groups.n_groups:  # a closed-form merge (learned/solved.py) has no table to show
        table = engine.table(**(meta or {}))
        table.save(out_dir / ARTIFACTS["coefficients"])
        table.heatmap(out_dir / ARTIFACTS["coefficients_png"], title=title)
    else:
        arts.pop("coefficients")
        arts.pop("coefficients_png")
    if not has_heads:
        arts.pop("heads")
    return arts
