"""The merge plan of a sliced spec (`slices:`, see slices_spec.py): which input tensors make each
output tensor, with which method and parameters, streamed by the static driver like any merge.

Output block j (counted over the slices, in order) is slice s's layer `offset`; it reads block
`start + offset` of each source of s, so the tensor `model.layers.<j>.X` reads
`model.layers.<start + offset>.X` from each source. Gradients are evaluated at
t = offset / (length - 1) (1 for a one-layer slice), tensors before the blocks come from the first
slice (t = 0) and those after them from the last (t = 0): mergekit 0.1.5's `MergePlanner.plan_slice`
and `plan_module`. Global parameters are resolved for the output tensor's name, per-model ones for
the input tensor's name (`resolve_parameters`), as there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from merge_ops import layers
from merge_ops.checkpoint import CheckpointReader
from merge_ops.declare import MethodDef
from merge_ops.errors import CheckpointError
from merge_ops.slices_spec import (
    SliceSpec,
    check_ranges,
    model_position,
    model_scopes,
    resolve_scoped,
    slice_base,
    slice_method,
)
from merge_ops.spec import MergeSpec


@dataclass(frozen=True)
class Step:
    """One output tensor: read `reads` (reader position, input tensor name; the base first when
    `has_base`), merge them with `method` and the resolved parameters, write it as `name`."""

    name: str
    reads: tuple[tuple[int, str], ...]
    has_base: bool
    method: MethodDef
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    layer: int | None  # output block index


@dataclass(frozen=True)
class SlicePlan:
    steps: list[Step]
    n_layers: int  # output blocks
    layer_sources: list[tuple[int, int]]  # per output block: (reader position, input block) of its first source
    config_from: int  # reader position whose config.json the output's is made from

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]


def plan(spec: MergeSpec, readers: list[CheckpointReader]) -> SlicePlan:
    """The steps of a sliced merge over `readers` (driver order: the base first, when there is one).
    Raises SpecError for a layer range past a model's depth, CheckpointError for a tensor a source
    lacks or whose shape differs."""
    assert spec.slices
    blocks = [_blocks(r) for r in readers]
    check_ranges(spec, {k: len(b[0]) for k, b in enumerate(blocks)})
    slices = [_Slice.of(spec, i, s) for i, s in enumerate(spec.slices)]
    steps: list[Step] = []
    first, last = slices[0], slices[-1]
    for name in blocks[first.order[0]][1]:
        if layers.before_blocks(name):
            steps.append(_step(readers, first, name, [name] * len(first.positions), 0.0, None))
    j = 0
    layer_sources = []
    for sl in slices:
        length = sl.spec.length()
        k_ref = sl.order[0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            ref_layer = sl.starts[k_ref] + offset
            for name in blocks[k_ref][0][ref_layer]:
                ins = [layers.with_index(name, sl.starts[k] + offset) for k in sl.positions]
                steps.append(_step(readers, sl, layers.with_index(name, j), ins, t, j))
            layer_sources.append((k_ref, ref_layer))
            j += 1
    for name in blocks[last.order[0]][1]:
        if not layers.before_blocks(name):
            steps.append(_step(readers, last, name, [name] * len(last.positions), 0.0, None))
    config_from = 0 if spec.base is not None else first.order[0]
    return SlicePlan(steps, j, layer_sources, config_from)


@dataclass(frozen=True)
class _Slice:
    """One slice, resolved against the spec once: reader positions in source order and base first,
    range starts and parameter scopes by position."""

    index: int
    spec: SliceSpec
    method: MethodDef
    base: int | None
    positions: list[int]  # source order
    order: list[int]  # the base first
    starts: dict[int, int]
    names: dict[int, str]  # the model as the slice names it
    scopes: dict[int, list[dict[str, Any]]]
    global_scopes: list[dict[str, Any]]

    @classmethod
    def of(cls, spec: MergeSpec, i: int, s: SliceSpec) -> _Slice:
        pos = [model_position(spec, src.model) for src in s.sources]
        assert all(k is not None for k in pos)  # MergeSpec's validation
        positions = [int(k) for k in pos if k is not None]
        base = slice_base(spec, s)
        order = sorted(positions, key=lambda k: k != base) if base is not None else positions
        return cls(i, s, slice_method(spec, s), base, positions, order,
                   {k: src.layer_range[0] for k, src in zip(positions, s.sources, strict=True)},
                   {k: src.model for k, src in zip(positions, s.sources, strict=True)},
                   {k: model_scopes(spec, s, src.model) for k, src in zip(positions, s.sources, strict=True)},
                   [s.parameters, spec.parameters])


def _blocks(r: CheckpointReader) -> tuple[list[list[str]], list[str]]:
    """(names of each block in storage order, names outside the blocks) of one checkpoint."""
    names = r.names()
    per: list[list[str]] = [[] for _ in range(layers.num_layers(names))]
    outside = []
    for n in names:
        i = layers.layer_index(n)
        (outside if i is None else per[i]).append(n)
    return per, outside


def _step(readers: list[CheckpointReader], sl: _Slice, out: str, ins: list[str], t: float,
          layer: int | None) -> Step:
    """`ins`: the input tensor names in the slice's source order."""
    by_pos = dict(zip(sl.positions, ins, strict=True))
    reads = tuple((k, by_pos[k]) for k in sl.order)
    shape = None
    for k, n in reads:
        r = readers[k]
        if n not in r:
            raise CheckpointError(f"tensor {n!r} is not in {sl.names[k]!r} ({r.folder}), which slices[{sl.index}] "
                                  f"reads for {out!r}: the models must share one architecture", param=sl.names[k])
        if shape is None:
            shape = r.shape(n)
        elif r.shape(n) != shape:
            raise CheckpointError(f"tensor {n!r} has shape {list(r.shape(n))} in {sl.names[k]!r} but "
                                  f"{list(shape)} in the first source of slices[{sl.index}]", param=sl.names[k])
    glob: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = []
    for p in sl.method.params:
        if p.scope == "global":
            v = resolve_scoped(sl.global_scopes, p.name, out, t)
            glob[p.name] = p.default if v is None else v
    for k, n in reads:
        if k == sl.base:
            continue
        d = {}
        for p in sl.method.params:
            if p.scope == "model":
                v = resolve_scoped(sl.scopes[k], p.name, n, t)
                d[p.name] = p.default if v is None else v
        per_model.append(d)
    return Step(out, reads, sl.base is not None, sl.method, glob, per_model, layer)


def layer_types(plan_: SlicePlan, folders: list[Any]) -> list[Any] | None:
    """The output config's per-block `layer_types` (attention kind per block, Gemma 2/3, Qwen 3),
    taken from each block's source; None when the output config has none."""
    docs = [_config(f) for f in folders]

    def types(doc: dict) -> list | None:
        for d in (doc, doc.get("text_config")):
            if isinstance(d, dict) and isinstance(d.get("layer_types"), list):
                return d["layer_types"]
        return None

    if types(docs[plan_.config_from]) is None:
        return None
    out = []
    for k, i in plan_.layer_sources:
        lt = types(docs[k])
        if lt is None or i >= len(lt):
            return None
        out.append(lt[i])
    return out


def _config(folder: Any) -> dict:
    try:
        doc = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
