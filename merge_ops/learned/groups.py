"""ParamGroups: which row of the coefficient table scales which (slice of which) tensor.

    task   one row for every tensor                      (task-wise AdaMerging)
    layer  one row per parameter tensor                  (layer-wise AdaMerging: a "layer" is a tensor)
    block  one row per transformer block, from the block index in the tensor name; tensors outside
           blocks share a row named "other"
    chunk  m rows per tensor, each scaling one contiguous slice of the flattened tensor (Expert
           Merging++). m = 0 gives the tensor no row: it keeps a fixed coefficient (the engine's
           `fixed`). Slices follow torch.tensor_split sizes, so m ≤ numel always yields exactly m
           non-empty slices (torch.chunk may silently return fewer); m > numel is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from merge_ops.errors import SpecError
from merge_ops.layers import layer_index

GROUPINGS = ("task", "layer", "block", "chunk")


@dataclass(frozen=True)
class Slot:
    """Rows [row, row + chunks) of the table scale tensor `name`; chunks == 0: fixed coefficient."""

    name: str
    shape: tuple[int, ...]
    row: int
    chunks: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def chunk_sizes(self) -> list[int]:
        """Sizes of the contiguous slices (first numel % chunks slices are one longer)."""
        q, r = divmod(self.numel, self.chunks)
        return [q + 1] * r + [q] * (self.chunks - r)


ChunkSpec = int | Mapping[str, int] | Callable[[str, tuple[int, ...]], int]


class ParamGroups:
    """The row layout of a coefficient table over `tensors` (name, shape) in a fixed order."""

    def __init__(self, tensors: Sequence[tuple[str, tuple[int, ...]]], grouping: str,
                 chunks: ChunkSpec = 1):
        if grouping not in GROUPINGS:
            raise SpecError(f"grouping {grouping!r} is not one of {list(GROUPINGS)}", param="granularity")
        self.grouping = grouping
        self.group_names: list[str] = []
        self.slots: dict[str, Slot] = {}
        rows: dict[str, int] = {}

        def row_of(group: str) -> int:
            if group not in rows:
                rows[group] = len(self.group_names)
                self.group_names.append(group)
            return rows[group]

        for name, shape in tensors:
            shape = tuple(shape)
            if grouping == "task":
                self.slots[name] = Slot(name, shape, row_of("all"), 1)
            elif grouping == "layer":
                self.slots[name] = Slot(name, shape, row_of(name), 1)
            elif grouping == "block":
                i = layer_index(name)
                self.slots[name] = Slot(name, shape, row_of("other" if i is None else f"block.{i}"), 1)
            else:
                m = _chunks_for(chunks, name, shape)
                n = math.prod(shape)
                if m < 0 or m > n:
                    raise SpecError(f"tensor {name!r} has {n} entries and cannot be cut into {m} chunks: "
                                    f"use 0..{n}", param="chunks")
                first = len(self.group_names)
                for s in range(m):
                    row_of(f"{name}#{s}" if m > 1 else name)
                self.slots[name] = Slot(name, shape, first, m)

    @property
    def n_groups(self) -> int:
        return len(self.group_names)


def _chunks_for(chunks: ChunkSpec, name: str, shape: tuple[int, ...]) -> int:
    if isinstance(chunks, int):
        return chunks
    if callable(chunks):
        return int(chunks(name, shape))
    return int(chunks.get(name, 1))
