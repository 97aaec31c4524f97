"""OT fusion: align every model's neurons to an anchor by optimal transport, then average.

Singh & Jaggi 2020, "Model fusion via optimal transport" (arXiv:1910.05653), with the transformer
extensions of Imfeld et al. 2024 (arXiv:2310.05719). Per model m ≠ anchor, for every space of the
alignment graph (graph.py) in order:
    1. features of m's and the anchor's neurons: producing rows with their other axes aligned by
       the maps found so far (weights), or pre-activations on calibration inputs (activations);
    2. cost = Euclidean distance normalised by its max; T = ot.emd or ot.sinkhorn, uniform marginals;
    3. T ← T·diag(1/β) (the n·T correction), so each anchor neuron is a barycentre of m's neurons
       (input sides use the row-normalised diag(1/α)·T; the two agree when widths do);
    4. where several writers meet (a residual stream), one map per writer, combined by their mean
       (resid_policy "mean", the paper's default) or one map from all writers' features ("joint").
Every tensor of m is then carried to the anchor's units on each of its aligned axes (Tᵀ W T_in),
and the fused model is Σ_m w_m · aligned_m with weights w (default 1/N).

Weight mode has one cycle: the residual stream is read by every block and written by their
outputs. The stream is first solved from the writers whose inputs are already aligned (the
embeddings), the blocks after it; then the stream is solved again from all writers and the blocks
once more ("refine"). Activation mode has no cycle: a neuron's activations do not depend on the maps.

Defaults: solver exact, reg 0.05 (Sinkhorn), ground metric weights, Euclidean (not squared),
max-normalised, qk separate (BERT-style; RoPE models always share the Q/K map, see graph.py),
resid_policy mean, up to 2000 activation rows (tokens or samples) per space.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from merge_ops.context import Channel, check_cancel, report
from merge_ops.errors import CheckpointError, SpecError
from merge_ops.ot.align import apply_map, units
from merge_ops.ot.graph import Attachment, Graph, Space, build_graph
from merge_ops.ot.ground_metric import correct, cost_matrix, transport_map

Inputs = torch.Tensor | Mapping[str, torch.Tensor]  # a batch of images/vectors, or HF input_ids (+mask)


@dataclass
class FusionOptions:
    solver: str = "exact"
    reg: float = 0.05
    ground_metric: str = "weights"  # weights | activations
    qk: str = "separate"  # separate | shared (BERT-style Q/K maps)
    resid_policy: str = "mean"  # mean | joint
    squared: bool = False
    max_rows: int = 2000  # activation rows (samples × tokens) kept per space
    recompute_bn: bool = False  # recompute BatchNorm statistics of the fused model on the inputs
    seed: int = 0


@dataclass
class FusionResult:
    state_dict: dict[str, torch.Tensor]
    costs: dict[str, list[float]]  # space -> per model transport cost ⟨T, M⟩ (0 for the anchor)
    maps: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per model: space -> coupling T


def fuse(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    configs: Mapping | Sequence[Mapping],
    *,
    weights: Sequence[float] | None = None,
    anchor: int = 0,
    options: FusionOptions | None = None,
    inputs: Inputs | None = None,
    channel: Channel | None = None,
) -> FusionResult:
    """Fuse N ≥ 2 models (state dicts, one config each or one shared) into the anchor's shapes.
    Progress is the `merge` stage, one step per space solved."""
    opt = options or FusionOptions()
    for name, value, allowed in (("solver", opt.solver, ("exact", "sinkhorn")),
                                 ("ground_metric", opt.ground_metric, ("weights", "activations")),
                                 ("qk", opt.qk, ("separate", "shared")),
                                 ("resid_policy", opt.resid_policy, ("mean", "joint"))):
        if value not in allowed:
            raise SpecError(f"ot_fusion {name} {value!r} is not one of {list(allowed)}", param=name)
    n = len(state_dicts)
    if n < 2:
        raise SpecError("ot_fusion needs at least 2 models")
    cfgs = [configs] * n if isinstance(configs, Mapping) else list(configs)
    if not 0 <= anchor < n:
        raise SpecError(f"anchor {anchor} is not a model index (0..{n - 1})", param="anchor")
    w = _weights(weights, n)
    graphs = [build_graph(c, {k: tuple(v.shape) for k, v in sd.items()}, qk=opt.qk)
              for c, sd in zip(cfgs, state_dicts, strict=True)]
    _check_same_structure(graphs, state_dicts, anchor)
    g = graphs[anchor]
    acts = None
    if opt.ground_metric == "activations":
        if inputs is None:
            raise SpecError("ground_metric activations needs calibration inputs", param="ground_metric")
        probes = _probes(g)
        acts = [_activations(build_module(cfgs[i], state_dicts[i]), inputs, probes, opt) for i in range(n)]

    sd64 = [{k: v.double() for k, v in sd.items() if v.is_floating_point()} for sd in state_dicts]
    sda = sd64[anchor]
    maps: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    costs: dict[str, list[float]] = {s.name: [0.0] * n for s in g.spaces}
    others = [i for i in range(n) if i != anchor]
    refine = opt.ground_metric == "weights" and any(s.residual for s in g.spaces)
    steps = len(g.spaces) * (2 if refine else 1)
    step = 0
    for _ in range(2 if refine else 1):
        for space in g.spaces:
            check_cancel(channel)
            for i in others:
                t, c = _solve(space, graphs[i], sd64[i], sda, maps[i], opt,
                              acts[i] if acts else None, acts[anchor] if acts else None)
                maps[i][space.name], costs[space.name][i] = t, c
            step += 1
            report(channel, "merge", step, steps)

    fused: dict[str, torch.Tensor] = {}
    anchor_sd = state_dicts[anchor]
    for name, ref in anchor_sd.items():
        if name in g.fixed or not ref.is_floating_point():
            fused[name] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for i in range(n):
            x = sd64[i][name]
            if i != anchor:
                x = _align(x, graphs[i].attachments_of(name), maps[i], tuple(ref.shape))
            acc += w[i] * x
        fused[name] = acc.to(ref.dtype)
    if opt.recompute_bn and g.family == "cnn" and inputs is not None:
        fused = _recompute_bn(cfgs[anchor], fused, inputs)
    return FusionResult(fused, costs, maps)


# -- one space ---------------------------------------------------------------------------------
def _solve(space: Space, gm: Graph, sdm: Mapping[str, torch.Tensor], sda: Mapping[str, torch.Tensor],
           maps: dict[str, torch.Tensor], opt: FusionOptions, am: dict | None, aa: dict | None
           ) -> tuple[torch.Tensor, float]:
    """The coupling [n_model, n_anchor] of one space (uncorrected), and its transport cost."""
    writers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module, atts in _writers(space).items():
        if am is not None and aa is not None:
            lay = atts[0].layout
            writers.append((units(am[module], 0, lay).flatten(1), units(aa[module], 0, lay).flatten(1)))
            continue
        fm, fa = [], []
        for a in atts:
            x = _align(sdm[a.param], [(s, b) for s, b in gm.attachments_of(a.param) if b.axis != a.axis],
                       maps, tuple(sda[a.param].shape), skip_axis=a.axis)
            if x is None:  # an input axis whose map is not known yet (first round of the residual cycle)
                break
            fm.append(units(x, a.axis, a.layout).flatten(1))
            fa.append(units(sda[a.param], a.axis, a.layout).flatten(1))
        else:
            writers.append((torch.cat(fm, 1), torch.cat(fa, 1)))
    if not writers:
        raise CheckpointError(f"space {space.name!r} has no writer whose inputs can be aligned")
    if space.residual and opt.resid_policy == "mean":
        pairs = [_one_map(fm, fa, opt) for fm, fa in writers]
        return torch.stack([p[0] for p in pairs]).mean(0), sum(p[1] for p in pairs) / len(pairs)
    return _one_map(torch.cat([x for x, _ in writers], 1), torch.cat([y for _, y in writers], 1), opt)


def _one_map(fm: torch.Tensor, fa: torch.Tensor, opt: FusionOptions) -> tuple[torch.Tensor, float]:
    raw = cost_matrix(fm, fa, squared=opt.squared, normalize="none")
    top = raw.max()
    t = transport_map(raw / top if top > 0 else raw, solver=opt.solver, reg=opt.reg)
    return t, float((t * raw).sum())


def _writers(space: Space) -> dict[str, list[Attachment]]:
    """Producers grouped by module (a layer's weight and bias describe the same neurons)."""
    out: dict[str, list[Attachment]] = {}
    for a in space.producers():
        out.setdefault(a.param.rsplit(".", 1)[0], []).append(a)
    return out


def _align(x: torch.Tensor, atts: list[tuple[Space, Attachment]], maps: Mapping[str, torch.Tensor],
           shape: tuple[int, ...], skip_axis: int | None = None) -> torch.Tensor | None:
    for s, a in atts:
        if a.axis == skip_axis:
            continue
        t = maps.get(s.name)
        if t is None:
            if skip_axis is not None:
                return None
            raise CheckpointError(f"no transport map for space {s.name!r}")  # a graph bug, not user input
        x = apply_map(x, a.axis, a.layout, correct(t, "in" if a.reads else "out"), shape[a.axis])
    return x


def _weights(weights: Sequence[float | None] | None, n: int) -> list[float]:
    if weights is None or all(v is None for v in weights):
        return [1.0 / n] * n
    if len(weights) != n:
        raise SpecError(f"{len(weights)} weights for {n} models", param="weight")
    ws = [1.0 if v is None else float(v) for v in weights]
    if any(v < 0 for v in ws) or sum(ws) <= 0:
        raise SpecError("ot_fusion weights must be ≥ 0 with a positive sum", param="weight")
    return [v / sum(ws) for v in ws]


def _check_same_structure(graphs: list[Graph], sds: Sequence[Mapping[str, torch.Tensor]], anchor: int) -> None:
    ga, sda = graphs[anchor], sds[anchor]
    for i, (g, sd) in enumerate(zip(graphs, sds, strict=True)):
        if g.family != ga.family or set(sd) != set(sda):
            diff = sorted(set(sd) ^ set(sda))
            raise CheckpointError(f"model {i} and the anchor (model {anchor}) have different layers"
                                  + (f", e.g. {diff[0]!r}" if diff else f" ({g.family} vs {ga.family})"))
        for name, t in sd.items():
            aligned = {a.axis for _, a in g.attachments_of(name)}
            for ax, (d, da) in enumerate(zip(t.shape, sda[name].shape, strict=False)):
                if ax not in aligned and d != da or t.dim() != sda[name].dim():
                    raise CheckpointError(
                        f"tensor {name!r} is {tuple(t.shape)} in model {i} but {tuple(sda[name].shape)} in "
                        f"the anchor: only hidden widths may differ (inputs, vocabulary and classes must match)")


# -- activations -------------------------------------------------------------------------------
def build_module(config: Mapping, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    from merge_ops.ot.arch import build_module as build

    return build(config, state_dict)


def _probes(g: Graph) -> set[str]:
    return {m for s in g.spaces for m in _writers(s)}


@torch.no_grad()
def _activations(model: nn.Module, inputs: Inputs, probes: set[str], opt: FusionOptions,
                 batch: int = 64) -> dict[str, torch.Tensor]:
    """module name -> [units, rows] pre-activations over the inputs (real tokens only for text)."""
    mods = dict(model.named_modules())
    missing = sorted(probes - set(mods))
    if missing:
        raise CheckpointError(f"cannot record activations of {missing[0]!r}: no such module")
    got: dict[str, list[torch.Tensor]] = {p: [] for p in probes}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            y = out.movedim(1, -1) if isinstance(mod, nn.Conv2d) else out
            m = mask[0]
            if m is not None and y.dim() == m.dim() + 1:  # per token (a pooler's output is per sample)
                y = y.expand(*m.shape, y.shape[-1])[m]
            got[name].append(y.reshape(-1, y.shape[-1]).float())
        return fn

    handles = [mods[p].register_forward_hook(hook(p)) for p in probes]
    try:
        total = len(inputs["input_ids"]) if isinstance(inputs, Mapping) else len(inputs)
        for s in range(0, total, batch):
            if isinstance(inputs, Mapping):
                b = {k: v[s:s + batch] for k, v in inputs.items()}
                mask[0] = b["attention_mask"].bool() if "attention_mask" in b else None
                model(**b)
            else:
                model(inputs[s:s + batch])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for p, chunks in got.items():
        y = torch.cat(chunks)
        if y.shape[0] > opt.max_rows:  # the same rows for every model: same inputs, same seed
            gen = torch.Generator().manual_seed(opt.seed)
            y = y[torch.randperm(y.shape[0], generator=gen)[:opt.max_rows].sort().values]
        out[p] = y.T.contiguous()
    return out


@torch.no_grad()
def _recompute_bn(config: Mapping, sd: dict[str, torch.Tensor], inputs: Inputs, batch: int = 256
                  ) -> dict[str, torch.Tensor]:
    """Soft maps only approximate BN statistics: re-estimate them on the inputs (cumulative mean)."""
    model = build_module(config, sd)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    x = inputs if isinstance(inputs, torch.Tensor) else inputs["input"]
    for s in range(0, len(x), batch):
        model(x[s:s + batch])
    new = model.state_dict()
    return {k: (new[k].to(v.dtype) if "bns." in k else v) for k, v in sd.items()}
