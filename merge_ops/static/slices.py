"""The merge plan of a sliced spec (`slices:`, see slices_spec.py): which input tensors make each
output tensor, with which method and parameters, streamed by the static driver like any merge.

Output block j (counted over the slices, in order) is slice s's layer `offset`; it reads block
`start + offset` of each source of s, so the tensor `model.layers.<j>.X` reads
`model.layers.<start + offset>.X` from each source. Gradients are evaluated at
t = offset / (length - 1) (1 for a one-layer slice), tensors before the blocks come from the first
slice (t = 0) and those after them from the last (t = 0): mergekit 0.1.5's `MergePlanner.plan_slice`
and `plan_module`. Global parameters are resolved for the output tensor's name, per-model ones for
the input tensor's name (`resolve_parameters`), as there.

With mergekit `modules:` (slices tagged with a module, modules_spec.py) the same plan runs per
module over the tensors under the module's prefix: its blocks count from 0, its first and last
slices give the tensors before and after them, and each module's layer count goes to its config
key (`write_depths`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_ops import layers
from merge_ops.checkpoint import CheckpointReader
from merge_ops.declare import MethodDef
from merge_ops.errors import CheckpointError, SpecError
from merge_ops.modules_spec import (
    ARCHITECTURES,
    ModuleDef,
    architecture_of,
    module_table,
    multi_module,
    read_config,
    set_config_value,
    slice_label,
    used_modules,
)
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
    n_layers: int  # output blocks (of the text decoder, with modules)
    layer_sources: list[tuple[int, int]]  # per output block: (reader position, input block) of its first source
    config_from: int  # reader position whose config.json the output's is made from
    depths: dict[str, int] = field(default_factory=dict)  # with modules: config key -> the module's blocks

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]


def plan(spec: MergeSpec, readers: list[CheckpointReader]) -> SlicePlan:
    """The steps of a sliced merge over `readers` (driver order: the base first, when there is one).
    Raises SpecError for a layer range past a model's depth, CheckpointError for a tensor a source
    lacks or whose shape differs."""
    assert spec.slices
    config_from = 0 if spec.base is not None else _Slice.of(spec, 0, spec.slices[0], {}).order[0]
    if spec.slices[0].module is not None:
        return _plan_modules(spec, readers, config_from)
    arch = multi_module(readers[config_from].config())
    if arch is not None:
        raise SpecError(f"slices: {arch} has several modules; stack layers per module with mergekit's `modules:` "
                        "(e.g. text_decoder, vision_tower, multi_modal_projector)", param="slices")
    blocks = [_blocks(r.names()) for r in readers]
    check_ranges(spec, {k: len(b[0]) for k, b in enumerate(blocks)})
    steps, n, layer_sources = _plan_group(spec, readers, blocks, list(enumerate(spec.slices)), {},
                                          layers.before_blocks)
    return SlicePlan(steps, n, layer_sources, config_from)


def _plan_group(spec: MergeSpec, readers: list[CheckpointReader], blocks: list[tuple[list[list[str]], list[str]]],
                group: list[tuple[int, SliceSpec]], ranges: dict[tuple[int, int], tuple[int, int]],
                before: Callable[[str], bool]) -> tuple[list[Step], int, list[tuple[int, int]]]:
    """The steps of one stack of slices (the whole model, or one module): `blocks` per reader,
    `ranges` the resolved ranges of sources without one, `before` tells the tensors outside the
    blocks that precede them. Returns (steps, output blocks, each block's source)."""
    slices = [_Slice.of(spec, i, s, ranges) for i, s in group]
    steps: list[Step] = []
    first, last = slices[0], slices[-1]
    for name in blocks[first.order[0]][1]:
        if before(name):
            steps.append(_step(readers, first, name, [name] * len(first.positions), 0.0, None))
    j = 0
    layer_sources = []
    for sl in slices:
        k_ref = sl.order[0]
        for offset in range(sl.length):
            t = offset / (sl.length - 1) if sl.length > 1 else 1.0
            ref_layer = sl.starts[k_ref] + offset
            for name in blocks[k_ref][0][ref_layer]:
                ins = [layers.with_index(name, sl.starts[k] + offset) for k in sl.positions]
                steps.append(_step(readers, sl, layers.with_index(name, j), ins, t, j))
            layer_sources.append((k_ref, ref_layer))
            j += 1
    for name in blocks[last.order[0]][1]:
        if not before(name):
            steps.append(_step(readers, last, name, [name] * len(last.positions), 0.0, None))
    return steps, j, layer_sources


def _plan_modules(spec: MergeSpec, readers: list[CheckpointReader], config_from: int) -> SlicePlan:
    """Each module's slices over its own tensors (modules_spec.py), one module after another."""
    used = used_modules(spec)
    cfg = readers[config_from].config()
    table = module_table(cfg, used)
    for r in readers:
        if architecture_of(r.config()) != architecture_of(cfg):
            raise CheckpointError(f"{r.folder} is a {architecture_of(r.config())!r}, not a {architecture_of(cfg)!r} "
                                  "like the model the output's config comes from: modules merge one architecture",
                                  param=str(r.folder))
    owner = _owners(readers, table)
    steps: list[Step] = []
    depths: dict[str, int] = {}
    n_text, text_sources = 0, []
    for module in used:
        mdef = table[module]
        blocks = [_blocks([n for n in r.names() if owner[n] == module]) for r in readers]
        group = [(i, s) for i, s in enumerate(spec.slices or []) if s.module == module]
        ranges = _module_ranges(spec, group, module, {k: len(b[0]) for k, b in enumerate(blocks)})
        post = {mdef.prefix + n for n in mdef.post}
        got, n, sources = _plan_group(spec, readers, blocks, group, ranges, lambda name, post=post: name not in post)
        if n == 0 and blocks[config_from][0]:
            raise SpecError(f"modules.{module}: its slices stack no layers, but the module has "
                            f"{len(blocks[config_from][0])}", param=f"modules.{module}")
        steps += got
        if mdef.depth_key is not None:
            depths[mdef.depth_key] = n
            if "." not in mdef.depth_key or mdef.depth_key.startswith("text_config."):
                n_text, text_sources = n, sources  # the depth (and layer_types) copy_aux_files' set_depth writes
    return SlicePlan(steps, n_text, text_sources, config_from, depths)


def _owners(readers: list[CheckpointReader], table: dict[str, ModuleDef]) -> dict[str, str]:
    """Each tensor's module (the longest matching prefix); a tensor of none is refused (mergekit
    would leave it out of the output)."""
    by_length = sorted(table.items(), key=lambda kv: -len(kv[1].prefix))
    out: dict[str, str] = {}
    for r in readers:
        for n in r.names():
            m = next((name for name, d in by_length if n.startswith(d.prefix)), None)
            if m is None:
                raise CheckpointError(f"tensor {n!r} of {r.folder} is in none of the modules "
                                      f"({', '.join(f'{k}: {d.prefix}*' for k, d in table.items())})",
                                      param="modules")
            out[n] = m
    return out


def _module_ranges(spec: MergeSpec, group: list[tuple[int, SliceSpec]], module: str,
                   depth: dict[int, int]) -> dict[tuple[int, int], tuple[int, int]]:
    """(slice index, source index) -> [start, end) for the sources without a range (the whole
    module); every range checked against its model's module depth."""
    out = {}
    for i, s in group:
        for j, src in enumerate(s.sources):
            pos = model_position(spec, src.model)
            assert pos is not None  # MergeSpec's validation
            if src.layer_range is None:
                out[(i, j)] = (0, depth[pos])
            elif src.layer_range[1] > depth[pos]:
                where = f"slices[{i}].sources[{j}].layer_range"
                raise SpecError(f"{slice_label(spec, i)}.sources[{j}].layer_range: [{src.layer_range[0]}, "
                                f"{src.layer_range[1]}] reaches past the {depth[pos]} layers of module {module} "
                                f"of {src.model!r}", param=where)
        lengths = [(out.get((i, j)) or src.layer_range or (0, 0)) for j, src in enumerate(s.sources)]
        if len({b - a for a, b in lengths}) > 1:
            raise SpecError(f"{slice_label(spec, i)}: every source covers as many layers, got "
                            f"{[b - a for a, b in lengths]} (module depths differ)", param=f"modules.{module}")
    return out


def module_depths(folder: Path, names: list[str]) -> Callable[[str], int] | None:
    """For an unsliced merge of a multi-module model: each tensor's block count is its module's, so
    gradients run over each module's own depth (mergekit expands `models:` into one slice per
    module). None for a model without modules Alloy knows."""
    table = ARCHITECTURES.get(architecture_of(read_config(Path(folder)) or {}) or "")
    if table is None:
        return None
    by_length = sorted((d.prefix for d in table.values()), key=len, reverse=True)
    owner = {n: next((p for p in by_length if n.startswith(p)), "") for n in names}
    depth = {p: layers.num_layers(n for n in names if owner[n] == p) for p in [*by_length, ""]}
    return lambda name: depth[owner[name]] if name in owner else layers.num_layers(names)


def write_depths(plan_: SlicePlan, out_dir: Path) -> None:
    """Each module's layer count at its config key (mergekit's `_model_out_config`)."""
    if not plan_.depths:
        return
    path = Path(out_dir) / "config.json"
    doc = json.loads(path.read_text())
    for key, n in plan_.depths.items():
        if not set_config_value(doc, key, n):
            raise CheckpointError(f"config.json has no {key} to set the module's {n} layers to", param="modules")
    path.write_text(json.dumps(doc, indent=2) + "\n")


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
    length: int
    names: dict[int, str]  # the model as the slice names it
    scopes: dict[int, list[dict[str, Any]]]
    global_scopes: list[dict[str, Any]]

    @classmethod
    def of(cls, spec: MergeSpec, i: int, s: SliceSpec, ranges: dict[tuple[int, int], tuple[int, int]]) -> _Slice:
        pos = [model_position(spec, src.model) for src in s.sources]
        assert all(k is not None for k in pos)  # MergeSpec's validation
        positions = [int(k) for k in pos if k is not None]
        base = slice_base(spec, s)
        order = sorted(positions, key=lambda k: k != base) if base is not None else positions
        spans = [ranges.get((i, j)) or src.layer_range or (0, 0) for j, src in enumerate(s.sources)]
        return cls(i, s, slice_method(spec, s), base, positions, order,
                   {k: a for k, (a, _) in zip(positions, spans, strict=True)}, spans[0][1] - spans[0][0],
                   {k: src.model for k, src in zip(positions, s.sources, strict=True)},
                   {k: model_scopes(spec, s, src.model) for k, src in zip(positions, s.sources, strict=True)},
                   [s.parameters, spec.parameters])


def _blocks(names: list[str]) -> tuple[list[list[str]], list[str]]:
    """(names of each block in storage order, names outside the blocks) of one checkpoint's `names`."""
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
