"""AdaMerging (Yang et al., ICLR 2024): learn merge coefficients by minimising prediction entropy.

Each step draws one batch per task from its unlabelled calibration set, runs the merged model with
that task's own head, and sums the tasks' mean prediction entropies; Adam updates only the
coefficient table (defaults of the official code: init 0.3, clamp [0, 1], lr 1e-3, 500 steps, 16
samples per task). `granularity` task/layer/block; `plus` = AdaMerging++ (TIES-trimmed task vectors).

Entropy collapse guard. Pure entropy minimisation can be won by a head that predicts one class for
every input (entropy 0), which is what sank a binary sentiment head in an earlier prototype. Two
defaults guard against it:
  * each task's entropy is divided by log(num_classes), so a 2-class head (max entropy 0.69) does
    not pull differently from an 8-class one (2.08), and no task dominates the sum;
  * `diversity` (default 3.0 for classifier heads) subtracts that many times the entropy of the
    batch-mean prediction (also normalised): predicting one class for the whole batch is then
    penalised, confident *and* varied predictions are rewarded (information maximisation, weighted
    towards the marginal).
    Why 3 and not the usual 1: with five experts the task-arithmetic start already leaves the binary
    sentiment head predicting one class for 91% of inputs; at weight 1 entropy minimisation finishes
    the collapse (share 1.0, its coefficient driven to 0), at 3 it pulls the head back (see
    benchmarks/README.md). It assumes no class is very rare in a task's calibration set. Causal LMs
    default to 0 (plain next-token entropy). `diversity: 0, normalize_entropy: false` is the official
    loss exactly.
The largest share of any one predicted class per task (over the last steps) is reported in the
metrics (`class_share_max`), so a collapse is visible in every job.
"""

from __future__ import annotations

import math

import torch

from merge_ops.checkpoint import TORCH_DTYPES
from merge_ops.errors import SpecError
from merge_ops.job import JobContext, MethodResult
from merge_ops.learned.adapters import CausalLM, EncoderClassifier, build_adapter
from merge_ops.learned.calibration import BatchSampler, load_calibration
from merge_ops.learned.engine import (
    MergeEngine,
    Step,
    fit,
    load_merge_inputs,
    reset_peak_memory,
    ties_trim,
)
from merge_ops.learned.groups import ParamGroups
from merge_ops.learned.outputs import write_outputs
from merge_ops.spec import parse_size

# Over a vocabulary the batch-mean next-token distribution is near-uniform anyway, and at this weight
# that term would drown the entropy signal: causal LMs default to 0.
CLASSIFIER_DIVERSITY = 3.0


def entropy_loss(logits: torch.Tensor, *, normalize: bool = True, diversity: float = 0.0) -> torch.Tensor:
    """Mean prediction entropy of [N, C] logits, optionally /log C and minus `diversity`·H(mean p)."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    loss = -(p * logp).sum(-1).mean()
    if diversity:
        pm = p.mean(0)
        loss = loss + diversity * (pm * pm.clamp_min(1e-12).log()).sum()
    if normalize:
        loss = loss / math.log(max(logits.shape[-1], 2))
    return loss


def run(ctx: JobContext) -> MethodResult:
    spec = ctx.spec
    g = spec.global_param
    if ctx.base is None:
        raise SpecError("adamerging needs a base model: set `base`", param="base")
    names = spec.expert_names()
    dtype = TORCH_DTYPES[spec.dtype]
    torch.manual_seed(spec.seed)
    reset_peak_memory(ctx.device)
    ctx.progress("learn", 0, int(g("steps")), None)

    adapter = build_adapter(ctx.base.path, dtype, ctx.device)
    inputs = load_merge_inputs(ctx.base.path, [e.path for e in ctx.experts], names,
                               task_specific=spec.task_specific, dtype=dtype, device=ctx.device,
                               only=adapter.used)
    adapter.bind(inputs.base)
    if isinstance(adapter, EncoderClassifier):
        headless = [n for n in names if not inputs.heads.get(n)]
        if headless:
            raise SpecError(f"expert(s) {headless} have no classification head: set `task_specific` to "
                            "regexes of the head tensors (e.g. '^classifier\\.')", param="task_specific")
    if g("plus"):
        ties_trim(inputs, float(g("plus_density")))
    groups = ParamGroups(inputs.merged_shapes(), str(g("granularity")))
    engine = MergeEngine(inputs, groups, init=float(g("init")),
                         parameterisation="clamp" if g("clamp") else "none").to(ctx.device)

    cal_spec = spec.calibration
    samples = load_calibration(ctx.calibration, names, tokenizer_dir=ctx.base.path,
                               max_length=cal_spec.max_length if cal_spec else 64,
                               samples_per_task=cal_spec.samples_per_task if cal_spec else None,
                               seed=spec.seed)
    sampler = BatchSampler(samples, int(g("batch_size")), seed=spec.seed, pad_id=adapter.pad_id())
    normalize, diversity = bool(g("normalize_entropy")), g("diversity")
    if diversity is None:  # auto: the guard is for classifier heads
        diversity = 0.0 if isinstance(adapter, CausalLM) else CLASSIFIER_DIVERSITY
    diversity = float(diversity)
    steps = int(g("steps"))
    window = max(1, steps // 10)
    counts = {n: torch.zeros(0) for n in names}

    def loss_fn(step: int, s: Step) -> None:
        for task in names:
            logits = adapter.forward(s.params, inputs.heads[task], sampler.next(task).to(ctx.device)).logits
            s.backward(entropy_loss(logits, normalize=normalize, diversity=diversity))
            if step >= steps - window:  # collapse monitor over the last tenth of the steps
                c = torch.bincount(logits.detach().argmax(-1).cpu(), minlength=logits.shape[-1]).float()
                counts[task] = c if counts[task].numel() == 0 else counts[task] + c

    opt = torch.optim.Adam(engine.parameters(), lr=float(g("lr")), betas=(0.9, 0.999), weight_decay=0.0)
    res = fit(engine, loss_fn, steps=steps, optimizer=opt, progress=ctx.progress,
              check_cancel=ctx.check_cancel)

    ctx.progress("write", 0, 1, None)
    variant = f"{g('granularity')}-wise AdaMerging{'++' if g('plus') else ''}"
    artifacts = write_outputs(ctx.out_dir, ctx.base.path, engine,
                              out_dtype=TORCH_DTYPES[spec.out_dtype] if spec.out_dtype else None,
                              shard_size=parse_size(spec.shard_size), title=variant,
                              meta={"method": "adamerging", "steps": res.steps})
    ctx.progress("write", 1, 1, None)
    coeffs = engine.coefficients().detach()
    metrics = {
        "variant": variant, "diversity": diversity,
        "loss_curve": [round(x, 6) for x in res.losses],
        "loss_first": res.losses[0], "loss_final": res.losses[-1],
        "steps": res.steps, "seconds": round(res.seconds, 3), "step_seconds": round(res.step_seconds, 4),
        **{k: round(v, 1) for k, v in res.peak_memory.items()},
        "task_vectors_mib": round(sum(t.numel() * t.element_size() for t in inputs.task_vectors.values())
                                  / 2**20, 1),
        "n_coefficients": int(coeffs.numel()), "n_merged_tensors": len(inputs.task_vectors),
        "n_constant_tensors": len(inputs.constant),
        "coefficient_mean": {n: round(float(coeffs[:, k].mean()), 4) for k, n in enumerate(names)},
        "class_share_max": {n: round(float(c.max() / c.sum()), 3) for n, c in counts.items() if c.numel()},
    }
    return MethodResult(metrics=metrics, artifacts=artifacts)
