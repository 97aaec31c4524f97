"""File-backed learning inputs: θ₀'s block tensors and the task vectors stay in the checkpoint files.

Streamed learning (streaming.py) needs a block's tensors only while that block computes, so
nothing model-sized has to live in memory. `open_merge_inputs` returns the same `MergeInputs` as
`engine.load_merge_inputs`, but

    base            resident (compute dtype, on the device) only for the tensors outside the
                    transformer blocks (embeddings, final norm, head): `LazyBase`
    block tensors   read per block with `os.preadv` (checkpoint.CheckpointReader: no mmap, so a
                    read tensor leaves the resident set when it is dropped), in the inputs' own
                    dtype (bf16 stays bf16), and widened to the compute dtype inside the merge
    task vectors    never stored: τₖ = eₖ − θ₀ is formed in the compute dtype from the two
                    stored tensors when a merge (or its backward) needs it — the same arithmetic
                    as `load_merge_inputs`, so the gradients are the in-memory engine's
    experts         `LazyTaskVectors` keeps only names and shapes; `tv[name]` still gives the
                    [K, *shape] stack (compute dtype) for code that wants a whole tensor once
                    (Expert Merging's importance, its stage-2 folding)

Writes into `LazyBase` (Expert Merging++ folds its fixed tensors into θ₀) are kept resident as
overrides. AdaMerging++'s TIES trim needs every τ at once: `MergeInputs.materialise()` loads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path

import torch

from merge_ops.checkpoint import CheckpointReader, align_buffers
from merge_ops.context import ResolvedModel
from merge_ops.errors import CheckpointError, SpecError
from merge_ops.lora.reader import open_checkpoint


class TensorFiles:
    """The base's and the experts' checkpoint readers (plain file descriptors, reads by offset)."""

    def __init__(self, base_dir: Path | ResolvedModel, expert_dirs: Sequence[Path | ResolvedModel],
                 experts: Sequence[str]):
        # open_checkpoint: a LoRA expert reads as base + its adapter's delta, tensor by tensor
        self.base: CheckpointReader = open_checkpoint(base_dir)
        self.experts = [open_checkpoint(d) for d in expert_dirs]
        align_buffers(self.base, self.experts)  # buffers transformers does not persist: the base's set
        self.names = list(experts)

    def base_raw(self, name: str, into: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """θ₀'s tensor as stored; `into(nbytes)`, if given, supplies the uint8 buffer it is read into
        (streaming.Slot: reused, so reading allocates nothing)."""
        return self.base.read(name, None if into is None else into(self.base.info(name).nbytes))

    def expert_raw(self, k: int, name: str, into: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Expert k's own tensor in its stored dtype (the base's where the expert lacks it)."""
        r = self._holder(k, name)
        return r.read(name, None if into is None else into(r.info(name).nbytes))

    def expert_nbytes(self, k: int, name: str) -> int:
        return self._holder(k, name).info(name).nbytes

    def _holder(self, k: int, name: str) -> CheckpointReader:
        """The reader expert k's tensor `name` comes from: its own, or the base where it lacks it."""
        return self.experts[k] if name in self.experts[k] else self.base

    def close(self) -> None:
        self.base.close()
        for r in self.experts:
            r.close()


class LazyBase(MutableMapping):
    """θ₀ by name: resident tensors (outside the blocks, compute dtype, on the device), overrides
    written by a method, and the rest read from the base checkpoint on each access."""

    def __init__(self, files: TensorFiles, names: Sequence[str], resident: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: str | torch.device):
        self.files, self.dtype, self.device = files, dtype, device
        self._names = list(names)
        self._set = set(names)
        self.resident = resident
        self.overrides: dict[str, torch.Tensor] = {}

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (an override or a resident tensor as held): no copy, no cast."""
        if name in self.overrides:
            return self.overrides[name]
        if name in self.resident:
            return self.resident[name]
        if name not in self._set:
            raise KeyError(name)
        return self.files.base_raw(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.raw(name).to(device=self.device, dtype=self.dtype)

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if name not in self._set:
            self._names.append(name)
            self._set.add(name)
        if name in self.resident:
            self.resident[name] = value
        else:
            self.overrides[name] = value

    def __delitem__(self, name: str) -> None:
        self._names.remove(name)
        self._set.discard(name)
        self.resident.pop(name, None)
        self.overrides.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.resident.values(), *self.overrides.values()])


class ExpertTensors(Sequence):
    """Expert k's stored tensor `name`, read from its file on each access."""

    def __init__(self, files: TensorFiles, name: str):
        self.files, self.name = files, name

    def __getitem__(self, k: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.files.expert_raw(k, self.name)

    def __len__(self) -> int:
        return len(self.files.experts)

    def flat(self, k: int) -> torch.Tensor | RangedTensor:
        """Expert k's tensor flattened: read piece by piece on slicing where the file allows it,
        else read whole (an adapter-applied LoRA tensor)."""
        r = self.files._holder(k, self.name)
        return RangedTensor(r, self.name) if r.ranged(self.name) else self[k].reshape(-1)


class RangedTensor:
    """A stored tensor as a flat sequence whose slices `t[lo:hi]` are read from its file into one
    reused buffer: a slice is valid until the next one is taken."""

    def __init__(self, reader: CheckpointReader, name: str):
        self.reader, self.name = reader, name
        self.dtype = reader.dtype(name)
        self.buf = torch.empty(0, dtype=self.dtype)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        n = sl.stop - sl.start
        if self.buf.numel() < n:
            self.buf = torch.empty(n, dtype=self.dtype)
        return self.reader.read_range(self.name, sl.start, sl.stop, self.buf[:n])


class LazyTaskVectors(MutableMapping):
    """τ stacks by name, formed on access from the files (nothing stored but shapes)."""

    def __init__(self, files: TensorFiles, base: LazyBase, shapes: dict[str, tuple[int, ...]],
                 dtype: torch.dtype, device: str | torch.device):
        self.files, self.base, self.shapes = files, base, dict(shapes)
        self.dtype, self.device = dtype, device

    def experts_raw(self, name: str) -> ExpertTensors:
        """The K experts' stored tensors (their own dtype) for a merge that forms τ itself, each
        read when iterated: one expert's tensor at a time is in memory."""
        if name not in self.shapes:
            raise KeyError(name)
        return ExpertTensors(self.files, name)

    def __getitem__(self, name: str) -> torch.Tensor:
        b = self.base[name]
        stack = torch.empty((len(self.files.experts), *b.shape), dtype=self.dtype, device=self.device)
        for k, e in enumerate(self.experts_raw(name)):
            torch.sub(e.to(device=self.device, dtype=self.dtype), b, out=stack[k])
        return stack

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        raise TypeError("file-backed task vectors are read-only: call MergeInputs.materialise() first")

    def __delitem__(self, name: str) -> None:
        del self.shapes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.shapes))

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes


def check_expert_tensor(r, name: str, shape: tuple[int, ...], expert: str) -> None:
    """An expert must hold the base's tensor `name` in the base's shape (it was fine-tuned from it)."""
    if name not in r:
        raise CheckpointError(f"expert {expert!r} ({r.folder}) has no tensor {name!r}: the "
                              "experts must be fine-tuned from the base", param=expert)
    if r.shape(name) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {list(r.shape(name))} in expert "
                              f"{expert!r} but {list(shape)} in the base", param=expert)


def open_merge_inputs(base_dir: Path | ResolvedModel, expert_dirs: Sequence[Path | ResolvedModel],
                      experts: Sequence[str], *,
                      resident: Callable[[str], bool], task_specific: Sequence[str] = (),
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      only: Callable[[str], bool] | None = None):
    """`load_merge_inputs` with the block tensors and the task vectors left in the files.

    `resident(name)` says which base tensors are held (those outside the streamed blocks). The
    checks and the constant-tensor test are `load_merge_inputs`'s; each tensor is read once here,
    one at a time, to find the tensors no expert changed (they get no coefficient)."""
    from merge_ops.learned.engine import MergeInputs

    pats = [re.compile(p) for p in task_specific]

    def is_specific(n: str) -> bool:
        return any(p.search(n) for p in pats)

    files = TensorFiles(base_dir, expert_dirs, experts)
    try:
        base_r = files.base
        names: list[str] = []
        held: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        constant: list[str] = []
        for n in base_r.names():
            if not base_r.dtype(n).is_floating_point or is_specific(n):
                continue
            names.append(n)
            b = base_r.read(n)
            if resident(n):
                held[n] = b.to(device=device, dtype=dtype)
            if only is not None and not only(n):
                continue
            changed = False
            for k, r in enumerate(files.experts):
                check_expert_tensor(r, n, tuple(b.shape), experts[k])
                if not changed:  # τ = 0 in the compute dtype, as load_merge_inputs tests it
                    changed = not torch.equal(r.read(n).to(dtype), b.to(dtype))
            if changed:
                shapes[n] = tuple(b.shape)
            else:
                constant.append(n)  # nothing to learn: θ = θ₀ whatever the coefficients
            del b
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for name, r in zip(experts, files.experts, strict=True):
            heads[name] = {n: r.read(n).to(device=device, dtype=dtype) for n in r.names() if is_specific(n)}
        if pats and not any(heads.values()):
            raise SpecError(f"task_specific patterns {list(task_specific)} match no tensor of any expert",
                            param="task_specific")
    except BaseException:
        files.close()
        raise
    lazy_base = LazyBase(files, names, held, dtype, device)
    tvs = LazyTaskVectors(files, lazy_base, shapes, dtype, device)
    return MergeInputs(list(experts), lazy_base, tvs, heads, constant, files=files)
