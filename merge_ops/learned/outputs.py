"""What a learned merge leaves in out_dir: the merged checkpoint, per-task heads, the coefficient table.

    out_dir/  model*.safetensors (+ index)   the base's tensors, merged ones at the learned coefficients
              config.json, tokenizer files    copied from the base
              heads/<task>.safetensors       each task's own task-specific tensors (not merged)
              coefficients.json / .png       the learned table (groups × experts) and its heatmap
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from merge_ops.checkpoint import CheckpointReader, CheckpointWriter, copy_aux_files, layout_like
from merge_ops.errors import MergeFailed
from merge_ops.learned.engine import MergeEngine

ARTIFACTS = {"coefficients": "coefficients.json", "coefficients_png": "coefficients.png", "heads": "heads"}


def write_outputs(out_dir: Path, base_dir: Path, engine: MergeEngine, *, out_dtype: torch.dtype | None,
                  shard_size: int, title: str, meta: dict | None = None) -> dict[str, str]:
    """Write everything; returns the artifacts map for MethodResult (paths relative to out_dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = engine.inputs
    with CheckpointReader(base_dir) as r, torch.no_grad():
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
    copy_aux_files(base_dir, out_dir, dt)
    heads_dir = out_dir / ARTIFACTS["heads"]
    for task, head in inputs.heads.items():
        if head:
            heads_dir.mkdir(exist_ok=True)
            save_file({n: t.detach().to(dt).cpu().contiguous() for n, t in head.items()},
                      str(heads_dir / f"{task}.safetensors"), metadata={"format": "pt", "task": task})
    table = engine.table(**(meta or {}))
    table.save(out_dir / ARTIFACTS["coefficients"])
    table.heatmap(out_dir / ARTIFACTS["coefficients_png"], title=title)
    arts = dict(ARTIFACTS)
    if not heads_dir.is_dir():
        arts.pop("heads")
    return arts
