"""OT fusion as a job: read the experts, align them to the anchor by optimal transport, average, write.

Singh & Jaggi 2020 (arXiv:1910.05653) with the transformer extensions of Imfeld et al. 2024
(arXiv:2310.05719); the algorithm is in ot/fusion.py, what can be aligned in ot/graph.py, the small
MLP/CNN config format in ot/arch.py. With `ground_metric: activations`, neurons are matched by their
activations on the experts' calibration rows (merge_ops/calibration.py): `{"input": [...]}` for
alloy_arch models, `{"text"}` (the anchor's tokenizer) or `{"input_ids"}` for HF models.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param
from merge_ops.errors import CalibrationError
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.context import JobContext, MethodResult
    from merge_ops.ot.fusion import Inputs
    from merge_ops.spec import MergeSpec

torch = lazy("torch")
DEFAULT_ROWS = 200  # calibration rows per expert when samples_per_task is not set


def check(spec: MergeSpec) -> None:
    n = len(spec.experts)
    anchor = spec.global_param("anchor")
    if anchor >= n:
        raise ValueError(f"parameters.anchor: {anchor} is not an expert index (0..{n - 1})")
    if spec.global_param("solver") == "sinkhorn" and not spec.global_param("reg") > 0:
        raise ValueError("parameters.reg: Sinkhorn needs reg > 0; use solver: exact for unregularised OT")
    if spec.global_param("ground_metric") == "activations" and (
            spec.calibration is None or not spec.calibration.tasks):
        raise ValueError("calibration: ground_metric activations matches neurons on calibration rows: add "
                         "calibration.tasks (expert name -> JSONL file or calibration-set id)")


METHOD = MethodDef(
    "ot_fusion", "ot",
    "align neurons of models without a shared base by optimal transport, then average",
    "Singh & Jaggi 2020, Model fusion via optimal transport, arXiv:1910.05653; "
    "Imfeld et al. 2024, Transformer fusion with OT, arXiv:2310.05719",
    (
        Param("anchor", 0, "index of the model the others are aligned to", type=int, min=0),
        Param("weight", None, "averaging weight of this model (default 1/N)", scope="model",
              nullable=True, min=0.0),
        Param("solver", "exact", "exact (ot.emd) or sinkhorn", type=str, choices=("exact", "sinkhorn")),
        Param("reg", 0.05, "Sinkhorn entropic regularisation", min=0.0),
        Param("ground_metric", "weights", "neuron features: weights or activations on calibration data",
              type=str, choices=("weights", "activations")),
        Param("qk", "separate", "attention Q/K maps: separate, or shared (one map from both); RoPE models "
              "always share one map over whole kv heads", type=str, choices=("separate", "shared")),
        Param("resid_policy", "mean", "residual stream: mean of the writers' maps, or joint (one map from "
              "all writers' features)", type=str, choices=("mean", "joint")),
    ),
    needs_base=False, min_experts=2, check=check,
)


def run(ctx: JobContext) -> MethodResult:
    """Read the experts, fuse them into the anchor's shapes, write the checkpoint into ctx.out_dir."""
    from merge_ops.checkpoint import (
        TORCH_DTYPES,
        CheckpointWriter,
        TensorSpec,
        copy_aux_files,
    )
    from merge_ops.context import MethodResult
    from merge_ops.lora.reader import open_checkpoint
    from merge_ops.ot.fusion import FusionOptions, fuse
    from merge_ops.spec import parse_size

    spec, p = ctx.spec, ctx.params
    names = spec.expert_names()
    anchor = int(p["anchor"])
    opt = FusionOptions(solver=p["solver"], reg=float(p["reg"]), ground_metric=p["ground_metric"], qk=p["qk"],
                        resid_policy=p["resid_policy"], seed=spec.seed)
    sds, cfgs, dtypes = [], [], []
    for e in ctx.experts:
        with open_checkpoint(e) as r:  # an expert given as model+adapter: with its delta
            cfgs.append(r.config())
            sds.append({k: r.read(k).clone() for k in r.names()})
            dtypes.append({k: r.dtype(k) for k in r.names()})
    inputs = None
    if opt.ground_metric == "activations":
        inputs = _calibration_inputs(ctx, cfgs[anchor], Path(ctx.experts[anchor].path))
    ctx.report("merge", 0, None)
    res = fuse([{k: v.float() if v.is_floating_point() else v for k, v in sd.items()} for sd in sds], cfgs,
               weights=p["weight"], anchor=anchor, options=opt, inputs=inputs, channel=ctx.channel)
    out_dtype = TORCH_DTYPES[spec.out_dtype] if spec.out_dtype else None
    ctx.report("write", 0, 1)
    layout = [TensorSpec(k, tuple(v.shape), out_dtype if out_dtype and v.is_floating_point() else dtypes[anchor][k])
              for k, v in res.state_dict.items()]
    with CheckpointWriter(ctx.out_dir, layout, parse_size(spec.shard_size),
                          metadata={"alloy_method": spec.method}) as w:
        for t in layout:
            w.write(t.name, res.state_dict[t.name].to(t.dtype))
    copy_aux_files(ctx.experts[anchor].path, ctx.out_dir, out_dtype)
    ctx.report("write", 1, 1)
    return MethodResult(metrics={
        "anchor": names[anchor],
        "settings": {"solver": opt.solver, "reg": opt.reg, "ground_metric": opt.ground_metric, "qk": opt.qk,
                     "resid_policy": opt.resid_policy, "squared": opt.squared,
                     "calibration_rows": 0 if inputs is None else _n_inputs(inputs)},
        "transport_cost": {names[i]: {s: c[i] for s, c in res.costs.items()}
                           for i in range(len(sds)) if i != anchor},
    })


def _n_inputs(inputs: Inputs) -> int:
    return len(inputs["input_ids"]) if isinstance(inputs, Mapping) else len(inputs)


def _calibration_inputs(ctx: JobContext, config: Mapping, anchor_dir: Path) -> Inputs:
    """The calibration rows of every expert's set, in expert order: the same inputs for every model
    (alloy_arch models: the input vectors, reshaped to the model's input; HF models: token ids, text
    tokenised with the anchor's tokenizer)."""
    from merge_ops.calibration import read_rows

    cal = ctx.spec.calibration
    limit = (cal.samples_per_task if cal and cal.samples_per_task else DEFAULT_ROWS) * len(ctx.spec.experts)
    max_len = cal.max_length if cal else 64
    rows = []
    for name in ctx.spec.expert_names():
        if name in ctx.calibration and len(rows) < limit:
            rows += read_rows(ctx.calibration[name], limit=limit - len(rows), label=f"calibration.tasks.{name}")
    arch = config.get("alloy_arch")
    if arch in ("mlp", "cnn"):
        bad = next((r for r in rows if r.input is None), None)
        if bad is not None:
            raise CalibrationError(f"alloy_arch {arch} calibration rows need `input` (a list of numbers), "
                                   f"line {bad.line} has none")
        x = torch.tensor([list(r.input) for r in rows], dtype=torch.float32)
        if arch == "cnn":
            x = x.reshape(len(rows), config["in_channels"], config["image_size"], config["image_size"])
        return x
    if any(r.input is not None for r in rows):
        raise CalibrationError("HF models read {\"text\"} or {\"input_ids\"} calibration rows, not `input` vectors")
    from merge_ops.learned.batches import load_tokenizer, token_ids_by_line

    tok = load_tokenizer(anchor_dir) if any(r.text is not None for r in rows) else None
    if tok is None and any(r.text is not None for r in rows):
        raise CalibrationError(f"text calibration rows need a tokenizer in the anchor's folder {anchor_dir}")
    ids = token_ids_by_line(rows, tok, max_len, "calibration")  # prompt-completion rows: the whole row
    seqs = [list(ids[line]) for line in sorted(ids)]
    width = max(len(x) for x in seqs)
    pad = int(config.get("pad_token_id") or 0)
    return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in seqs]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])}
