"""AdaMerging (Yang et al., ICLR 2024): learn merge coefficients by minimising prediction entropy.

Each step draws one batch per task from its unlabelled calibration set, runs the merged model with
that task's own head, and sums the tasks' mean prediction entropies; Adam updates only the
coefficient table (defaults of the official code: init 0.3, clamp [0, 1], lr 1e-3, 500 steps, 16
samples per task). `granularity` task/layer/block; `plus` = AdaMerging++ (TIES-trimmed task vectors).

Entropy collapse guard. Pure entropy minimisation can be won by a head that predicts one class for
every input (entropy 0), which is how the binary sentiment head collapses in the 5-task benchmark
(benchmarks/README.md). Two defaults guard against it:
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
Causal LMs: the objective is the mean next-token entropy over real tokens. Measured on SmolLM2-135M with
four experts (benchmarks/README.md, "Causal-LM quality"), the base has the lowest entropy and the highest
calibration NLL (German: entropy 3.84 / NLL 4.80; task arithmetic λ 0.3: 4.80 / 4.00; λ 0.7: 5.91 / 4.74),
so minimising entropy pulls a decoder merge back towards the base: it is not a quality proxy there.
Prompt-completion rows (batches.py) restrict it to the completion's predictions; on that benchmark it
made no difference (0.781 vs 0.783 mean normalised gain on calibration rows, every token scored).
The largest share of any one predicted class per task (over the last steps) is reported in the
metrics (`class_share_max`), so a collapse is visible in every job.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from merge_ops.declare import MethodDef, Param, learn_params
from merge_ops.lazy import lazy

if TYPE_CHECKING:
    from merge_ops.learned.driver import Session, Trained
    from merge_ops.learned.engine import Step

torch = lazy("torch")

METHOD = MethodDef(
    "adamerging", "learned",
    "learn task- or layer-wise coefficients by minimising prediction entropy on unlabelled data",
    "Yang et al. 2024, AdaMerging, ICLR, arXiv:2310.02575",
    (
        Param("granularity", "layer", "task: one coefficient per expert; layer: one per expert per "
              "tensor; block: one per expert per transformer block", type=str,
              choices=("task", "layer", "block")),
        Param("init", 0.3, "initial coefficient", min=0.0, max=1.0),
        Param("clamp", True, "clamp coefficients to [0, 1] in the forward pass", type=bool),
        *learn_params(steps=500, batch_size=16, lr=1e-3),
        Param("plus", False, "AdaMerging++: learn over TIES-trimmed task vectors", type=bool),
        Param("plus_density", 0.2, "TIES keep fraction for AdaMerging++", min=0.0, max=1.0),
        Param("normalize_entropy", True, "divide each task's entropy by log(num_classes)", type=bool),
        Param("diversity", None, "weight of the batch-mean prediction entropy bonus (guards against a "
              "head collapsing onto one class; lower it for tasks with very skewed classes); default "
              "(null): 3 for classification heads, 0 for causal LMs; 0 = the official loss",
              nullable=True, min=0.0),
    ),
    needs_calibration=True,
)

# Over a vocabulary the batch-mean next-token distribution is near-uniform anyway, and at this weight
# that term would drown the entropy signal: causal LMs default to 0.
CLASSIFIER_DIVERSITY = 3.0


def entropy_loss(logits: torch.Tensor, *, normalize: bool = True, diversity: float = 0.0) -> torch.Tensor:
    """Mean prediction entropy of [N, C] logits, optionally /log C and minus `diversity`·H(mean p)."""
    from merge_ops.learned.entropy import mean_entropy

    loss = mean_entropy(logits)
    if diversity:
        pm = logits.float().softmax(-1).mean(0)
        loss = loss + diversity * (pm * pm.clamp_min(1e-12).log()).sum()
    if normalize:
        loss = loss / math.log(max(logits.shape[-1], 2))
    return loss


def learn(s: Session) -> Trained:
    from merge_ops.learned.adapters import CausalLM
    from merge_ops.learned.driver import Trained
    from merge_ops.learned.engine import MergeEngine, ties_trim
    from merge_ops.learned.groups import ParamGroups

    p, names, inputs = s.params, s.names, s.inputs
    if p["plus"]:
        ties_trim(inputs, float(p["plus_density"]))
    groups = ParamGroups(inputs.merged_shapes(), str(p["granularity"]))
    engine = MergeEngine(inputs, groups, init=float(p["init"]),
                         parameterisation="clamp" if p["clamp"] else "none").to(s.device)
    s.configure(engine)
    sampler = s.batches(int(p["batch_size"]))
    normalize, diversity = bool(p["normalize_entropy"]), p["diversity"]
    if diversity is None:  # auto: the guard is for classifier heads
        diversity = 0.0 if isinstance(s.adapter, CausalLM) else CLASSIFIER_DIVERSITY
    diversity = float(diversity)
    steps = int(p["steps"])
    window = max(1, steps // 10)
    counts = {n: torch.zeros(0) for n in names}

    heads = [inputs.heads[t] for t in names]

    def loss_fn(step: int, st: Step) -> None:
        # drawn on every rank, in task order: the batch streams stay those of one process
        drawn = [sampler.next(task).to(s.device) for task in names]
        for group in s.adapter.task_groups(heads):  # tasks sharing one forward (adapters.py)
            mine = [k for k in group if st.owns(k)]
            if not mine:
                continue
            outs = s.adapter.forward_many(st.params, heads[mine[0]], [drawn[k] for k in mine])
            terms = []
            for k, out in zip(mine, outs, strict=True):
                logits = out.logits
                scored = drawn[k].scored() if s.adapter.causal else None
                if scored is not None:  # prompt-completion rows: the completion's predictions only
                    logits = logits[scored]
                terms.append(entropy_loss(logits, normalize=normalize, diversity=diversity))
                if step >= steps - window:  # collapse monitor over the last tenth of the steps
                    c = torch.bincount(logits.detach().argmax(-1).cpu(), minlength=logits.shape[-1]).float()
                    counts[names[k]] = c if counts[names[k]].numel() == 0 else counts[names[k]] + c
            st.backward(sum(terms))  # type: ignore[arg-type]

    opt = torch.optim.Adam(engine.parameters(), lr=float(p["lr"]), betas=(0.9, 0.999), weight_decay=0.0)
    s.fit(engine, loss_fn, steps=steps, optimizer=opt)
    return Trained(engine, f"{p['granularity']}-wise AdaMerging{'++' if p['plus'] else ''}", metrics={
        "diversity": diversity,
        "class_share_max": {n: round(float(c.max() / c.sum()), 3) for n, c in counts.items() if c.numel()},
    })
