"""Teacher targets for distillation-style merging, computed once and kept without the teachers.

Expert Merging aligns the merged model with expert k on task k's calibration samples only. The
expert's outputs on those fixed samples never change, so each expert is loaded once (its own
checkpoint: every tensor, embeddings and norms included, since the teacher is the real expert and
not base + its merged task vectors), run over its own samples, and dropped before the next one is
loaded. What stays is, per sample, the rows the loss scores — the head logits (encoders) or the
next-token logits at every real token (causal LMs) — and the chosen hidden states at real tokens,
stored in float16 (float32 for a tensor that would overflow float16). Learning then needs only
θ₀, the task vectors and this cache; no expert model is alive.

Rows of a sample are stored in row-major token order, which is exactly the order in which
`h[mask.bool()]` enumerates the real tokens of a right-padded batch: concatenating the cached
samples of a batch lines up with the student's masked outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_ops.checkpoint import CheckpointReader
from merge_ops.context import Channel, report
from merge_ops.learned.adapters import Adapter, CausalLM
from merge_ops.learned.batches import Batch, collate

CACHE_DTYPE = torch.float16


@dataclass
class Targets:
    logits: torch.Tensor  # [rows, C]
    hidden: list[torch.Tensor]  # per chosen layer: [tokens, H]


@dataclass
class TaskCache:
    samples: list[list[int]]
    logits: list[torch.Tensor] = field(default_factory=list)  # per sample
    hidden: list[list[torch.Tensor]] = field(default_factory=list)  # per sample, per layer

    def nbytes(self) -> int:
        ts = [*self.logits, *(h for hs in self.hidden for h in hs)]
        return sum(t.numel() * t.element_size() for t in ts)


class TeacherCache:
    """Per task: calibration samples and their teacher's cached outputs; batches by sample index."""

    def __init__(self, tasks: dict[str, TaskCache], layers: Sequence[int], pad_id: int):
        self.tasks = tasks
        self.layers = list(layers)
        self.pad_id = pad_id

    def batch(self, task: str, idx: Sequence[int], device: str | torch.device = "cpu"
              ) -> tuple[Batch, Targets]:
        """The collated samples and their targets, widened to float32 (float64 stays)."""
        tc = self.tasks[task]
        b = collate([tc.samples[i] for i in idx], self.pad_id).to(device)

        def cat(ts: list[torch.Tensor]) -> torch.Tensor:
            x = torch.cat(ts).to(device)
            return x if x.dtype == torch.float64 else x.float()

        logits = cat([tc.logits[i] for i in idx])
        hidden = [cat([tc.hidden[i][j] for i in idx]) for j in range(len(self.layers))]
        return b, Targets(logits, hidden)

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tasks.values())


def _store(t: torch.Tensor) -> torch.Tensor:
    h = t.detach().to(CACHE_DTYPE, copy=True)  # a copy: a view would pin the whole batch's output
    return h.cpu() if bool(torch.isfinite(h).all()) else t.detach().float().cpu()


def read_expert_params(expert_dir: Path, names: set[str], dtype: torch.dtype,
                       device: str | torch.device) -> dict[str, torch.Tensor]:
    """Every floating tensor the architecture reads, from the expert's own checkpoint."""
    with CheckpointReader(expert_dir) as r:
        return {n: r.read(n).to(device=device, dtype=dtype) for n in r.names()
                if n in names and r.dtype(n).is_floating_point}


def build_teacher_cache(adapter: Adapter, expert_dirs: Mapping[str, Path], heads: Mapping[str, dict],
                        samples: Mapping[str, list[list[int]]], layers: Sequence[int], *,
                        base: Mapping[str, torch.Tensor], batch_size: int, dtype: torch.dtype,
                        device: str | torch.device = "cpu",
                        on_loaded: Callable[[str, dict[str, torch.Tensor]], None] | None = None,
                        channel: Channel | None = None) -> TeacherCache:
    """Run each expert once over its own samples; keep logits and hidden states at `layers`.

    Tensors an expert checkpoint lacks (e.g. a tied head it does not store) fall back to `base`.
    `on_loaded(task, params)` sees each expert's weights while they are alive (tests hold weak
    references to check that they are gone before learning starts). Progress is the `plan` stage."""
    pad = adapter.pad_id()
    tasks: dict[str, TaskCache] = {}
    for i, (task, folder) in enumerate(expert_dirs.items()):
        own = read_expert_params(folder, adapter.names, dtype, device)
        if on_loaded is not None:
            on_loaded(task, own)
        params = {**base, **own}
        tc = TaskCache(list(samples[task]))
        with torch.no_grad():
            for s in range(0, len(tc.samples), batch_size):
                batch = collate(tc.samples[s: s + batch_size], pad).to(device)
                out = adapter.forward(params, heads.get(task, {}), batch, layers=layers)
                lens = batch.attention_mask.sum(1).tolist()
                per_row = lens if isinstance(adapter, CausalLM) else [1] * len(lens)
                tc.logits += [_store(x) for x in out.logits.split(per_row)]
                hs = [h.split(lens) for h in out.hidden] if out.hidden else []
                tc.hidden += [[_store(h[r]) for h in hs] for r in range(len(lens))]
                del out
        tasks[task] = tc
        del own, params  # the expert is gone before the next one loads
        report(channel, "plan", i + 1, len(expert_dirs))
    return TeacherCache(tasks, layers, pad)

