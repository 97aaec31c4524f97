"""Task heads beside a merged checkpoint: `out_dir/heads/<expert>.safetensors`.

Task-specific tensors (a spec's `task_specific` regexes: classification heads) are never merged. Each
expert's own copy is written here, by learned and static merges alike, so that an evaluation set
scored by a task head (merge_ops/evaluation, `accuracy` sets) finds the head of its task.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

HEADS_DIR = "heads"


def write_heads(out_dir: Path, heads: Mapping[str, Mapping[str, torch.Tensor]],
                dtype: torch.dtype | None = None) -> bool:
    """One file per expert that has task-specific tensors (floats cast to `dtype` when given);
    returns whether any was written."""
    from safetensors.torch import save_file

    wrote = False
    for task, head in heads.items():
        if not head:
            continue
        (out_dir / HEADS_DIR).mkdir(parents=True, exist_ok=True)
        save_file({n: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().cpu().contiguous()
                   for n, t in head.items()},
                  str(out_dir / HEADS_DIR / f"{task}.safetensors"), metadata={"format": "pt", "task": task})
        wrote = True
    return wrote
