"""Teacher targets for distillation-style merging, computed once and kept without the teachers.

Expert Merging aligns the merged model with expert k on task k's calibration samples only. The
expert's outputs on those fixed samples never change, so each expert is loaded once (its own
checkpoint: every tensor, embeddings and norms included, since the teacher is the real expert and
not base + its merged task vectors), run over its own samples, and dropped before the next one is
loaded. What stays is, per sample, the rows the loss scores — the head logits (encoders) or the
next-token logits at every real token (causal LMs) — and the chosen hidden states at real tokens,
stored in float16 (float32 for a tensor that would overflow float16). Learning then needs only
θ₀, the task vectors and this cache; no expert model is alive.

The rows live in an anonymous temporary file (`RowFile`: appended as they are computed, read back
per batch with `os.pread`), so the cache costs disk, not memory: what is resident is one batch's
targets, widened to float32 when the batch is drawn. Its size is in the memory plan
(plan.py, `teacher_cache_mib`, counted on disk). With file-backed inputs (store.py) each expert runs
through the block streamer's `teacher(k)` mode: its block tensors are read per block from its own
checkpoint, so not even one whole expert is in memory.

Rows of a sample are stored in row-major token order, which is exactly the order in which
`h[mask.bool()]` enumerates the real tokens of a right-padded batch: concatenating the cached
samples of a batch lines up with the student's masked outputs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_ops.context import Channel, ResolvedModel, report
from merge_ops.learned.adapters import Adapter, CausalLM
from merge_ops.learned.batches import Batch, collate
from merge_ops.lora.reader import open_checkpoint

CACHE_DTYPE = torch.float16


@dataclass
class Targets:
    logits: torch.Tensor  # [rows, C]
    hidden: list[torch.Tensor]  # per chosen layer: [tokens, H]


class RowFile:
    """Tensors appended to an unlinked temporary file and read back by index (nothing resident)."""

    def __init__(self) -> None:
        self._f = tempfile.TemporaryFile(prefix="alloy-teacher-")
        self._at = 0
        self.index: list[tuple[int, tuple[int, ...], torch.dtype]] = []

    def append(self, t: torch.Tensor) -> int:
        data = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        os.pwrite(self._f.fileno(), data, self._at)
        self.index.append((self._at, tuple(t.shape), t.dtype))
        self._at += len(data)
        return len(self.index) - 1

    def read(self, i: int) -> torch.Tensor:
        at, shape, dtype = self.index[i]
        out = torch.empty(shape, dtype=dtype)
        n = out.numel() * out.element_size()
        if n:
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            done = 0
            while done < n:
                done += os.preadv(self._f.fileno(), [buf[done:]], at + done)
        return out

    @property
    def nbytes(self) -> int:
        return self._at

    def close(self) -> None:
        self._f.close()


class StoredRows(Sequence):
    """Tensors kept in a RowFile: `append` writes one, `[i]` reads it back (a fresh tensor)."""

    def __init__(self, rows: RowFile):
        self.rows = rows
        self.ids: list[int] = []

    def append(self, t: torch.Tensor) -> None:
        self.ids.append(self.rows.append(t))

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.rows.read(self.ids[i])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TaskCache:
    samples: list[list[int]]
    rows: RowFile = field(default_factory=RowFile)
    logits: StoredRows = field(init=False)  # per sample
    hidden: list[StoredRows] = field(default_factory=list)  # per sample: per layer

    def __post_init__(self) -> None:
        self.logits = StoredRows(self.rows)

    def nbytes(self) -> int:
        return self.rows.nbytes


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
    h = t.detach().to(CACHE_DTYPE)
    return h if bool(torch.isfinite(h).all()) else t.detach().float()


def read_expert_params(expert_dir: Path | ResolvedModel, names: set[str], dtype: torch.dtype,
                       device: str | torch.device) -> dict[str, torch.Tensor]:
    """Every floating tensor the architecture reads, from the expert's own checkpoint (a LoRA
    expert's: base + delta)."""
    with open_checkpoint(expert_dir) as r:
        return {n: r.read(n).to(device=device, dtype=dtype) for n in r.names()
                if n in names and r.dtype(n).is_floating_point}


def build_teacher_cache(adapter: Adapter, expert_dirs: Mapping[str, Path | ResolvedModel],
                        heads: Mapping[str, dict],
                        samples: Mapping[str, list[list[int]]], layers: Sequence[int], *,
                        base: Mapping[str, torch.Tensor], batch_size: int, dtype: torch.dtype,
                        device: str | torch.device = "cpu",
                        on_loaded: Callable[[str, dict[str, torch.Tensor]], None] | None = None,
                        channel: Channel | None = None) -> TeacherCache:
    """Run each expert once over its own samples; keep logits and hidden states at `layers`.

    Tensors an expert checkpoint lacks (e.g. a tied head it does not store) fall back to `base`.
    `on_loaded(task, params)` sees each expert's weights while they are alive (tests hold weak
    references to check that they are gone before learning starts). Progress is the `plan` stage.

    With a block streamer attached to file-backed inputs, only the tensors outside the blocks are
    read here; the blocks run on the expert's own tensors read per block (`streamer.teacher(k)`)."""
    pad = adapter.pad_id()
    tasks: dict[str, TaskCache] = {}
    st = getattr(adapter, "_streamer", None)
    attached = st is not None and st.inputs is not None
    for i, (task, folder) in enumerate(expert_dirs.items()):
        names = {n for n in adapter.names if not st.streamed(n)} if attached else adapter.names
        own = read_expert_params(folder, names, dtype, device)
        if on_loaded is not None:
            on_loaded(task, own)
        params = {**(st.inputs.held_base() if attached else base), **own}
        tc = TaskCache(list(samples[task]))
        with torch.no_grad(), st.teacher(st.inputs.experts.index(task)) if attached else nullcontext():
            for s in range(0, len(tc.samples), batch_size):
                batch = collate(tc.samples[s: s + batch_size], pad).to(device)
                out = adapter.forward(params, heads.get(task, {}), batch, layers=layers)
                lens = batch.attention_mask.sum(1).tolist()
                causal = isinstance(adapter, CausalLM)
                scored = batch.scored() if causal else None
                keep = scored.split(lens) if scored is not None else [None] * len(lens)
                for x, m in zip(out.logits.split(lens if causal else [1] * len(lens)), keep, strict=True):
                    tc.logits.append(_store(x if m is None else x[m]))  # prompt-completion: completion only
                hs = [h.split(lens) for h in out.hidden] if out.hidden else []
                for r in range(len(lens)):
                    tc.hidden.append(StoredRows(tc.rows))
                    for h in hs:
                        tc.hidden[-1].append(_store(h[r]))
                del out
        tasks[task] = tc
        del own, params  # the expert is gone before the next one loads
        report(channel, "plan", i + 1, len(expert_dirs))
    return TeacherCache(tasks, layers, pad)

