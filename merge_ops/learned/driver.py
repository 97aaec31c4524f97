"""The learned driver: everything a learned method shares, around the loss it defines.

    setup      seed, the base architecture (adapter), θ₀ and the task vectors (MergeInputs), task heads,
               the calibration samples
    sampling   seeded per-task batches (`Session.batches`) or sample indices (`Session.indices`)
    teachers   `Session.teacher_cache(layers, batch_size)`: each expert run once over its own samples
    learning   `Session.fit(...)`: cancel checks, `learn` progress (stages as one bar), loss curves
    memory     the job's peak, and the learning stage's own (reset when learning starts)
    outputs    the checkpoint, heads, coefficient table and heatmap, and the common metrics

A learned method module declares its parameters and defines `learn(s: Session) -> Trained`: it
builds its engine, its loss and its optimiser, calls `s.fit` once per stage, and returns the engine
with its own metrics and artifacts. It may define `total_steps(params)` (default: `steps`, for the
progress bar of a method that learns in stages) and `learns(params) -> (name -> bool)` (the tensors
that get task vectors; default: every tensor the architecture reads).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from merge_ops import memory
from merge_ops.checkpoint import TORCH_DTYPES
from merge_ops.context import JobContext, MethodResult
from merge_ops.errors import InputError, SpecError
from merge_ops.learned import distributed, launch
from merge_ops.learned import plan as plan_mod
from merge_ops.learned.adapters import Adapter, EncoderClassifier, build_adapter
from merge_ops.learned.batches import BatchSampler, IndexSampler, load_calibration
from merge_ops.learned.engine import FitResult, MergeEngine, MergeInputs, Step, fit, load_merge_inputs
from merge_ops.learned.outputs import write_outputs
from merge_ops.learned.store import open_merge_inputs
from merge_ops.learned.streaming import streamer_for
from merge_ops.learned.teacher_cache import TeacherCache, build_teacher_cache
from merge_ops.spec import parse_size


@dataclass
class Trained:
    """What a method's `learn` hands back: the final engine, and what only the method knows."""

    engine: MergeEngine
    variant: str  # e.g. "layer-wise AdaMerging", the heatmap's title
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # extra keys of coefficients.json


@dataclass
class Session:
    ctx: JobContext
    params: dict[str, Any]  # the method's parameters, resolved (model-scoped: one value per expert)
    names: list[str]  # expert (task) names
    dtype: torch.dtype
    adapter: Adapter
    inputs: MergeInputs
    samples: dict[str, list[list[int]]]  # per task: token ids
    total_steps: int  # of every stage together, for the progress bar
    fits: list[FitResult] = field(default_factory=list)
    cache: TeacherCache | None = None
    mode: str = "streamed"  # "streamed" (streaming.py) or "in_memory"
    _learning: dict[str, Any] = field(default_factory=dict)

    def configure(self, engine: MergeEngine) -> MergeEngine:
        """Apply the session's learning mode to a freshly built engine (every stage's)."""
        if self.mode == "streamed":
            engine.stream(self.adapter)
        return engine

    @property
    def device(self) -> str:
        return self.ctx.device

    def batches(self, batch_size: int) -> BatchSampler:
        return BatchSampler(self.samples, batch_size, seed=self.ctx.spec.seed, pad_id=self.adapter.pad_id())

    def indices(self, batch_size: int) -> IndexSampler:
        sizes = {t: len(self.cache.tasks[t].samples) if self.cache else len(self.samples[t]) for t in self.names}
        return IndexSampler(sizes, batch_size, seed=self.ctx.spec.seed)

    def teacher_cache(self, layers: list[int], batch_size: int) -> TeacherCache:
        """Run each expert once over its own samples (logits and the hidden states at `layers`); the
        samples now live in the cache only."""
        ctx = self.ctx
        self.cache = build_teacher_cache(
            self.adapter, dict(zip(self.names, ctx.experts, strict=True)), self.inputs.heads,
            self.samples, layers, base=self.inputs.base, batch_size=batch_size, dtype=self.dtype,
            device=ctx.device, channel=ctx.channel)
        self.samples = {}
        return self.cache

    def fit(self, engine: MergeEngine, loss_fn: Callable[[int, Step], None], *, steps: int,
            optimizer: torch.optim.Optimizer, scheduler: object | None = None,
            clip_grad: float | None = None) -> FitResult:
        """One learning stage; stages follow each other on one `learn` progress bar."""
        if not self._learning:  # the learning stage's memory is measured from here
            self._learning["setup_peak"] = memory.peak_rss_mib()
            self._learning["reset_ok"] = memory.reset_peak(self.device)
            self._learning["rss_before"] = memory.peak_rss_mib()
            self.ctx.report("learn", 0, self.total_steps)
        offset = sum(f.steps for f in self.fits)
        res = fit(engine, loss_fn, steps=steps, optimizer=optimizer, scheduler=scheduler, clip_grad=clip_grad,
                  channel=self.ctx.channel, offset=offset, total=self.total_steps)
        self.fits.append(res)
        return res


def run(ctx: JobContext, method: ModuleType) -> MethodResult:
    """Set up, run the method's `learn`, write the outputs; as rank 0 of several when the worker
    asks for ranks (launch.py: one per GPU it owns)."""
    with launch.helper_ranks(ctx):
        return _run(ctx, method)


def _run(ctx: JobContext, method: ModuleType) -> MethodResult:
    spec = ctx.spec
    params = ctx.params
    total_steps = method.total_steps(params) if hasattr(method, "total_steps") else int(params["steps"])
    learns = method.learns(params) if hasattr(method, "learns") else None
    assert ctx.base is not None  # learned methods declare needs_base: the spec has one
    names = spec.expert_names()
    dtype = TORCH_DTYPES[spec.dtype]
    torch.manual_seed(spec.seed)
    mem_plan = choose_plan(ctx, params, learns)
    memory.reset_peak(ctx.device)
    streamed = mem_plan.mode == "streamed"
    adapter = build_adapter(ctx.base.path, dtype, ctx.device, skeleton=streamed)
    only = adapter.used if learns is None else lambda n: adapter.used(n) and learns(n)
    if streamed:  # block tensors and task vectors stay in the files (store.py), read per block
        streamer = streamer_for(adapter)
        inputs = open_merge_inputs(ctx.base, ctx.experts, names,
                                   resident=streamer.held, task_specific=spec.task_specific,
                                   dtype=dtype, device=ctx.device, only=only)
        streamer.attach(inputs, ctx.device)
    else:
        inputs = load_merge_inputs(ctx.base, ctx.experts, names,
                                   task_specific=spec.task_specific, dtype=dtype, device=ctx.device, only=only)
    adapter.bind(inputs.held_base())
    if isinstance(adapter, EncoderClassifier):
        headless = [n for n in names if not inputs.heads.get(n)]
        if headless:
            raise SpecError(f"expert(s) {headless} have no classification head: set `task_specific` to "
                            "regexes of the head tensors (e.g. '^classifier\\.')", param="task_specific")
    cal = spec.calibration
    samples = load_calibration(ctx.calibration, names, tokenizer_dir=ctx.base.path,
                               max_length=cal.max_length if cal else 64,
                               samples_per_task=cal.samples_per_task if cal else None, seed=spec.seed)
    s = Session(ctx, params, names, dtype, adapter, inputs, samples, total_steps, mode=mem_plan.mode)
    trained = method.learn(s)
    learn_peak = memory.peak(ctx.device)

    engine = trained.engine
    if distributed.rank_world()[0] != 0:  # a helper rank: rank 0 writes the model; the table only
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        if engine.groups.n_groups:
            engine.table(**{"method": spec.method, **trained.meta}).save(ctx.out_dir / "coefficients.json")
        return MethodResult(metrics={"rank": distributed.rank_world()[0]})
    ctx.report("write", 0, 1)
    artifacts = write_outputs(ctx.out_dir, ctx.base, engine,
                              out_dtype=TORCH_DTYPES[spec.out_dtype] if spec.out_dtype else None,
                              shard_size=parse_size(spec.shard_size), title=trained.variant,
                              meta={"method": spec.method, **trained.meta, "steps": sum(f.steps for f in s.fits)})
    ctx.report("write", 1, 1)
    metrics = {**_metrics(s, engine, learn_peak), **trained.metrics,
               "variant": trained.variant, "learned_mode": s.mode, "memory_plan": mem_plan.to_dict()}
    return MethodResult(metrics=metrics, artifacts={**trained.artifacts, **artifacts})


def job_plan(ctx: JobContext, params: dict[str, Any], mode: str, learns: Any = None) -> plan_mod.MemoryPlan:
    """The memory plan of a learned job from its spec and the base's headers (no weights read)."""
    spec = ctx.spec
    assert ctx.base is not None
    cal = spec.calibration
    k = len(spec.experts)
    teacher = (cal.samples_per_task or 0) * k if cal and spec.method == "expert_merging" else 0
    return plan_mod.plan_memory(ctx.base.path, k=k, batch=int(params.get("batch_size", 1)),
                                seq_len=cal.max_length if cal else 64, mode=mode, compute_dtype=spec.dtype,
                                learned=learns, teacher_samples=teacher, task_specific=bool(spec.task_specific),
                                device=str(torch.device(ctx.device).type))


def learned_mode() -> str:
    """ALLOY_LEARNED_MODE: `auto` (default), `streamed` or `in_memory`."""
    mode = os.environ.get("ALLOY_LEARNED_MODE", "auto")
    if mode not in ("auto", "streamed", "in_memory"):
        raise SpecError(f"ALLOY_LEARNED_MODE={mode!r}: use auto, streamed or in_memory")
    return mode


def choose_plan(ctx: JobContext, params: dict[str, Any], learns: Any = None) -> plan_mod.MemoryPlan:
    """The job's mode and memory plan; refuses (with the numbers) a job that cannot fit its device.

    `auto` learns in memory when that fits (it is the faster: streaming recomputes each block's
    forward and merge in backward and reads the files: about 2x a step on a loaded CPU, benchmarks/README.md)
    and streams when only that fits."""
    budget = memory.device_budget_mib(ctx.device)
    mode = learned_mode()
    plan = job_plan(ctx, params, "in_memory" if mode == "auto" else mode, learns)
    if mode == "auto" and plan_mod.check_fits(plan, budget) is not None:
        plan = job_plan(ctx, params, "streamed", learns)
    if (why := plan_mod.check_fits(plan, budget)) is not None:
        raise InputError(why)
    return plan


def _metrics(s: Session, engine: MergeEngine, learn_peak: dict[str, float]) -> dict[str, Any]:
    fits, inputs = s.fits, engine.inputs
    losses = [x for f in fits for x in f.losses]
    coeffs = engine.coefficients().detach()
    learning = s._learning
    out: dict[str, Any] = {
        "loss_curve": [round(x, 6) for x in fits[0].losses] if fits else [],
        **{f"loss_curve_stage{i + 1}": [round(x, 6) for x in f.losses] for i, f in enumerate(fits[1:], 1)},
        "loss_first": losses[0] if losses else None, "loss_final": losses[-1] if losses else None,
        "steps": len(losses),
        "learn_seconds": round(sum(f.seconds for f in fits), 3),
        "step_seconds": round(sum(f.step_seconds for f in fits) / len(fits), 4) if fits else None,
        "n_coefficients": int(coeffs.numel()), "n_merged_tensors": len(engine.groups.slots),
        "n_constant_tensors": len(inputs.constant),
        "coefficient_mean": {n: round(float(coeffs[:, k].mean()), 4) if coeffs.numel() else None
                             for k, n in enumerate(s.names)},
        # held in memory (streamed, file-backed inputs hold no τ and no θ₀)
        "base_mib": inputs.resident_mib()[0], "task_vectors_mib": inputs.resident_mib()[1],
        # memory: the job's peak, and learning's own (the peak mark is reset when learning starts)
        "peak_rss_mib": round(max(learning.get("setup_peak", 0.0), learn_peak["peak_rss_mib"]), 1),
        "rss_before_learn_mib": round(learning["rss_before"], 1) if learning else None,
        "learn_peak_rss_mib": round(learn_peak["peak_rss_mib"], 1) if learning.get("reset_ok") else None,
    }
    if "peak_cuda_mib" in learn_peak:
        out["peak_cuda_mib"] = round(learn_peak["peak_cuda_mib"], 1)
    if s.cache is not None:
        out["teacher_cache_mib"] = round(s.cache.nbytes() / 2**20, 2)
    return out
