"""The methods Alloy knows, declared as data: name, kind, parameters with defaults, paper.

This module is the contract shared by the CLI (`alloy methods`), spec validation and the service,
and it imports no torch: the API validates jobs without loading the math. Each method's math lives
in the module named by `impl` and is imported only when a merge runs.

Parameter scopes follow mergekit: a `model` parameter may be set per expert (`experts[i].parameters`)
and also globally as the default for every expert; a `global` parameter is set once. Parameters with
`gradient=True` accept per-layer gradients and `{filter, value}` lists (see `params.py`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

Kind = Literal["static", "learned", "ot"]


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    help: str
    type: type = float
    scope: Literal["model", "global"] = "global"
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    gradient: bool = False  # accepts per-layer gradients and filter lists
    required: bool = False
    nullable: bool = False  # None is a meaningful value (e.g. "auto")


@dataclass(frozen=True)
class MethodDef:
    name: str
    kind: Kind
    summary: str
    paper: str
    impl: str  # module holding the math
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    min_experts: int = 1
    max_experts: int | None = None
    needs_calibration: bool = False
    aliases: tuple[str, ...] = field(default=())

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def module(self) -> ModuleType:
        return importlib.import_module(self.impl)

    @property
    def queue(self) -> str:
        """Learned and OT methods want an accelerator; static merges are memory-bound CPU work."""
        return "cpu" if self.kind == "static" else "gpu"


# -- shared parameter declarations -------------------------------------------------------------
WEIGHT = Param("weight", 1.0, "scale of this expert's task vector (or of the model, for linear)",
               scope="model", gradient=True)
DENSITY = Param("density", 1.0, "fraction of task-vector entries kept per tensor", scope="model",
                min=0.0, max=1.0, gradient=True)
LAMBDA = Param("lambda", 1.0, "scale of the merged task vector", min=0.0)
INT8_MASK = Param("int8_mask", False, "store sign masks as int8 (memory); results identical", type=bool)
LINES = (
    Param("lines", False, "LiNeS: scale the merged task vector linearly with depth", type=bool),
    Param("lines_alpha", None, "LiNeS scale of the shallowest block and of tensors outside blocks; "
          "null = 1/N (N experts) for summed task vectors, 1 for averaged ones (normalize: true)",
          nullable=True, min=0.0),
    Param("lines_beta", 0.5, "LiNeS extra scale reached at the deepest block: λ(l) = α + β·l/(L-1)",
          min=0.0),
)


def _ta_family(name: str, summary: str, paper: str, impl: str, *, normalize: bool, rescale: bool | None,
               density: bool, consensus: bool, extra: tuple[Param, ...] = ()) -> MethodDef:
    params: list[Param] = [WEIGHT]
    if density:
        params.append(DENSITY)
    params += list(extra)
    params += [LAMBDA, Param("normalize", normalize, "divide by the sum of weights", type=bool)]
    if rescale is not None:
        params.append(Param("rescale", rescale, "rescale kept entries to preserve the tensor's scale",
                            type=bool))
    if consensus:
        params.append(INT8_MASK)
    params += list(LINES)
    return MethodDef(name, "static", summary, paper, impl, tuple(params))


METHODS: dict[str, MethodDef] = {}


def register(m: MethodDef) -> MethodDef:
    METHODS[m.name] = m
    return m


register(MethodDef(
    "linear", "static", "weighted average of the models' weights",
    "Wortsman et al. 2022, Model soups, arXiv:2203.05482", "merge_ops.methods.linear",
    (WEIGHT, Param("normalize", True, "divide by the sum of weights", type=bool)),
    needs_base=False, min_experts=1,
))
register(_ta_family(
    "task_arithmetic", "base + λ·Σ wᵢ·τᵢ over task vectors τᵢ = expertᵢ − base",
    "Ilharco et al. 2023, Editing models with task arithmetic, arXiv:2212.04089",
    "merge_ops.methods.task_arithmetic", normalize=False, rescale=None, density=False, consensus=False))
register(_ta_family(
    "ties", "trim each task vector to its top-density magnitudes, elect signs, disjoint mean",
    "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708", "merge_ops.methods.ties",
    normalize=True, rescale=False, density=True, consensus=True))
register(_ta_family(
    "dare_linear", "random drop (keep prob. density) and rescale each task vector, then sum",
    "Yu et al. 2024, Language models are Super Mario (DARE), arXiv:2311.03099", "merge_ops.methods.dare",
    normalize=False, rescale=True, density=True, consensus=False))
register(_ta_family(
    "dare_ties", "DARE drop-and-rescale, then TIES sign election and disjoint merge",
    "Yu et al. 2024, arXiv:2311.03099; Yadav et al. 2023, arXiv:2306.01708", "merge_ops.methods.dare_ties",
    normalize=False, rescale=True, density=True, consensus=True))
register(_ta_family(
    "breadcrumbs", "drop the largest (gamma) and smallest magnitudes of each task vector, then sum",
    "Davari & Belilovsky 2024, Model Breadcrumbs, arXiv:2312.06795", "merge_ops.methods.breadcrumbs",
    normalize=False, rescale=False, density=True, consensus=False,
    extra=(Param("gamma", 0.01, "fraction of largest-magnitude entries removed", scope="model",
                 min=0.0, max=1.0, gradient=True),)))
register(MethodDef(
    "model_stock", "static", "interpolate the experts' mean toward the base by their task-vector angle",
    "Jang et al. 2024, Model Stock, arXiv:2403.19522", "merge_ops.methods.model_stock",
    (Param("filter_wise", False, "one ratio per output row instead of per tensor", type=bool),),
    min_experts=2,
))
register(MethodDef(
    "slerp", "static", "spherical interpolation between the base and one expert",
    "Shoemake 1985; as used by mergekit", "merge_ops.methods.slerp",
    (Param("t", None, "interpolation factor: 0 = base, 1 = expert", min=0.0, max=1.0, gradient=True,
           required=True),),
    min_experts=1, max_experts=1,
))

# -- learned methods: owned by merge_ops/learned ------------------------------------------------
LEARN_COMMON = (
    Param("steps", 500, "optimizer steps", type=int, min=1),
    Param("batch_size", 16, "calibration samples per task per step", type=int, min=1),
    Param("lr", 1e-3, "learning rate of the coefficients", min=0.0),
)
register(MethodDef(
    "adamerging", "learned",
    "learn task- or layer-wise coefficients by minimising prediction entropy on unlabelled data",
    "Yang et al. 2024, AdaMerging, ICLR, arXiv:2310.02575", "merge_ops.learned.adamerging",
    (
        Param("granularity", "layer", "task: one coefficient per expert; layer: one per expert per "
              "tensor; block: one per expert per transformer block", type=str,
              choices=("task", "layer", "block")),
        Param("init", 0.3, "initial coefficient", min=0.0, max=1.0),
        Param("clamp", True, "clamp coefficients to [0, 1] in the forward pass", type=bool),
        *LEARN_COMMON,
        Param("plus", False, "AdaMerging++: learn over TIES-trimmed task vectors", type=bool),
        Param("plus_density", 0.2, "TIES keep fraction for AdaMerging++", min=0.0, max=1.0),
        Param("normalize_entropy", True, "divide each task's entropy by log(num_classes)", type=bool),
        Param("diversity", None, "weight of the batch-mean prediction entropy bonus (guards against a "
              "head collapsing onto one class; lower it for tasks with very skewed classes); default "
              "(null): 3 for classification heads, 0 for causal LMs; 0 = the official loss",
              nullable=True, min=0.0),
    ),
    needs_calibration=True, min_experts=1,
))
register(MethodDef(
    "expert_merging", "learned",
    "learn layer-wise (or chunk-wise: Expert Merging++) coefficients that align hidden states and "
    "logits of the merged model with each expert",
    "Zhang et al. 2025, Expert Merging, arXiv:2509.25712", "merge_ops.learned.expert_merging",
    (
        Param("chunked", False, "Expert Merging++: importance-guided chunk-wise coefficients", type=bool),
        Param("alpha0", 0.1, "initial coefficient (per expert allowed)", scope="model", min=0.0, max=1.0),
        Param("beta", 1.0, "per-task loss weight", scope="model", min=0.0),
        Param("temperature", 1.0, "logit distillation temperature", min=0.0),
        Param("hidden_layers", "middle", "hidden states aligned by MSE: 'middle' (HF hidden_states index "
              "L//2), comma-separated indices (0 = embeddings), or 'none'", type=str),
        Param("hidden_weight", 1.0, "weight of the hidden-state loss", min=0.0),
        Param("gamma", 5.0, "weight of the L1 deviation of coefficients from alpha0 (mean over the "
              "table, the paper's normalisation: the authors' code is K times stronger)", min=0.0),
        Param("lr", 0.5, "AdamW learning rate in logit space", min=0.0),
        Param("weight_decay", 1e-5, "AdamW weight decay", min=0.0),
        Param("restart_period", 50, "CosineAnnealingWarmRestarts T_0 (T_mult 2, eta_min 0.1·lr)",
              type=int, min=1),
        Param("clip_grad", 1.0, "gradient norm clip (0 = off)", min=0.0),
        Param("steps", 100, "optimizer steps (per stage for Expert Merging++)", type=int, min=1),
        Param("batch_size", 8, "calibration samples per task per step", type=int, min=1),
        Param("exclude", "(?i)(norm|embed|bias|lm_head)", "regex (searched) of tensors that keep the "
              "base values; task-specific heads are never merged", type=str),
        Param("chunk_budget", 2.0, "Expert Merging++ total chunks B as a multiple of the number of "
              "merged tensors", min=0.0),
        Param("kappa", 1.0, "Expert Merging++ concentration: 0 = uniform chunks", min=0.0),
        Param("warm_start", True, "Expert Merging++ stage 2 starts from the stage-1 coefficients and "
              "fixes m = 0 tensors at their stage-1 values (false: from alpha0, as the authors' code)",
              type=bool),
        Param("stage2_lr_scale", 0.1, "Expert Merging++ with warm_start: stage 2 learns at this × lr "
              "(it refines stage 1; a cold stage 2 uses lr)", min=0.0),
    ),
    needs_calibration=True, min_experts=1,
))
register(MethodDef(
    "ot_fusion", "ot",
    "align neurons of models without a shared base by optimal transport, then average",
    "Singh & Jaggi 2020, Model fusion via optimal transport, arXiv:1910.05653; "
    "Imfeld et al. 2024, Transformer fusion with OT, arXiv:2310.05719", "merge_ops.ot.fusion",
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
    needs_base=False, min_experts=2,
))


def get_method(name: str) -> MethodDef:
    from merge_ops.errors import SpecError

    m = METHODS.get(name)
    if m is None:
        raise SpecError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}",
                        param="method")
    return m
