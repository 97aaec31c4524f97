"""CLAFusion (Nguyen et al., ICASSP 2023): fuse MLPs of different depth by cross-layer alignment, then
OT fusion.

1. The deepest model is the anchor (the first of equally deep ones).
2. For every shallower model, its hidden layers are matched to the anchor's by dynamic programming
   over a layer cost (ot/layer_align.py): `activation` = 1 − linear CKA of the post-ReLU activations
   on the calibration inputs (the same rows for both models), `neuron` = squared width difference
   (the reference's default representation; no data needed, but blind between equal widths). The
   first and last hidden layers are matched to each other (the reference's defaults).
3. Balancing (`add`, the reference's default): identity layers are inserted into the shallower model
   at the anchor positions nothing maps to, which is exact because they follow a ReLU.
4. OT fusion (ot_fusion.py, same options) fuses the now equally deep models into the anchor's shapes.

Only alloy_arch MLPs (ot/arch.py) are aligned: the reference's VGG/ResNet chunking and its `merge`
balancing (collapsing layers through a ReLU approximation) are not built. Models of equal depth pass
straight to OT fusion. Metrics add each model's layer map (`layer_maps`) and its alignment cost.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_ops.declare import MethodDef, Param
from merge_ops.errors import SpecError
from merge_ops.lazy import lazy
from merge_ops.methods.ot_fusion import METHOD as OT_FUSION

if TYPE_CHECKING:
    from merge_ops.context import JobContext, MethodResult
    from merge_ops.spec import MergeSpec

torch = lazy("torch")
OT_PARAMS = ("weight", "solver", "reg", "ground_metric", "qk", "resid_policy")


def check(spec: MergeSpec) -> None:
    if spec.global_param("layer_measure") == "activation" and (spec.calibration is None or not spec.calibration.tasks):
        raise ValueError("calibration: layer_measure activation compares layers on calibration inputs: add "
                         "calibration.tasks (expert name -> JSONL file of {\"input\": [...]} rows), or use "
                         "layer_measure neuron")
    if spec.global_param("solver") == "sinkhorn" and not spec.global_param("reg") > 0:
        raise ValueError("parameters.reg: Sinkhorn needs reg > 0; use solver: exact for unregularised OT")
    if spec.global_param("ground_metric") == "activations" and (spec.calibration is None or not spec.calibration.tasks):
        raise ValueError("calibration: ground_metric activations matches neurons on calibration rows: add "
                         "calibration.tasks (expert name -> JSONL file or calibration-set id)")


METHOD = MethodDef(
    "clafusion", "ot",
    "fuse MLPs of different depth: align layers by dynamic programming, insert identity layers into the "
    "shallower, then OT fusion",
    "Nguyen et al. 2023, On Cross-Layer Alignment for Model Fusion of Heterogeneous Neural Networks, "
    "ICASSP, arXiv:2110.15538",
    (
        Param("layer_measure", "activation", "layer cost: activation (1 − linear CKA on calibration inputs) "
              "or neuron (squared width difference)", type=str, choices=("activation", "neuron")),
        *(p for n in OT_PARAMS if (p := OT_FUSION.param(n)) is not None),
    ),
    needs_base=False, min_experts=2, check=check,
)


def run(ctx: JobContext) -> MethodResult:
    from merge_ops.lora.reader import open_checkpoint
    from merge_ops.methods import ot_fusion
    from merge_ops.ot.layer_align import align_layers, hidden_activations, insert_identity, layer_cost

    spec, p = ctx.spec, ctx.params
    names = spec.expert_names()
    sds, cfgs = [], []
    for name, e in zip(names, ctx.experts, strict=True):
        with open_checkpoint(e) as r:
            cfg = r.config()
            if cfg.get("alloy_arch") != "mlp":
                raise SpecError(f"clafusion aligns alloy_arch MLPs; expert {name!r} is "
                                f"{cfg.get('alloy_arch') or cfg.get('model_type') or 'unknown'}", param=name)
            cfgs.append(cfg)
            sds.append({k: r.read(k).clone() for k in r.names()})
    depth = [len(c["hidden"]) for c in cfgs]
    anchor = depth.index(max(depth))
    measure = str(p["layer_measure"])
    x = None
    if measure == "activation":
        x = ot_fusion._calibration_inputs(ctx, cfgs[anchor], Path(ctx.experts[anchor].path))
    ctx.report("align", 0, len(sds))
    reps = [hidden_activations(c, sd, x) if x is not None else list(c["hidden"]) for c, sd in zip(cfgs, sds, strict=True)]
    maps: dict[str, list[int]] = {}
    costs: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="clafusion-") as tmp:
        experts = []
        for i, (name, e) in enumerate(zip(names, ctx.experts, strict=True)):
            c = layer_cost(reps[anchor], reps[i], measure)
            a = align_layers(c)
            maps[name] = a
            costs[name] = round(float(sum(c[a[k], k] for k in range(len(a)))), 6)
            if depth[i] == depth[anchor]:
                experts.append(e)
                continue
            sd, cfg = insert_identity(sds[i], cfgs[i], a, depth[anchor])
            experts.append(dataclasses.replace(e, path=_write(Path(tmp) / f"e{i}", sd, cfg), adapter=None))
        ctx.report("align", len(sds), len(sds))
        fused_spec = spec.model_copy(update={
            "method": "ot_fusion",
            "parameters": {**{k: v for k, v in spec.parameters.items() if k in OT_PARAMS}, "anchor": anchor}})
        res = ot_fusion.run(dataclasses.replace(ctx, spec=fused_spec, experts=experts))
    metrics: dict[str, Any] = {**res.metrics, "layer_measure": measure, "layer_maps": maps,
                               "alignment_cost": costs, "depths": dict(zip(names, depth, strict=True))}
    return dataclasses.replace(res, metrics=metrics)


def _write(folder: Path, sd: dict[str, torch.Tensor], cfg: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder
