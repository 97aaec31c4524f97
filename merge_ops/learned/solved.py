"""A merge computed in closed form (RegMean, RegMean++, Fisher) handed to the learned driver.

These methods read calibration data like the learned ones (same setup, sampling and outputs:
checkpoint, per-task heads, metrics) but learn no coefficient table: `solved_engine` wraps their
merged tensors in a MergeEngine with no groups, whose `merged_tensor` is the solved value, so the
driver writes them through the one output path (outputs.py; no coefficient table for zero groups).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from merge_ops.learned.engine import MergeEngine, MergeInputs
from merge_ops.learned.groups import ParamGroups


def fallback_tensors(inputs: MergeInputs, how: str) -> dict[str, torch.Tensor]:
    """Every floating base tensor merged the simple way: `mean` θ₀ + (1/K)·Σ τ_k (the average of the
    experts, which share θ₀'s untouched tensors) or `base` θ₀."""
    out = dict(inputs.base)
    if how == "mean":
        for n, tv in inputs.task_vectors.items():
            out[n] = inputs.base[n] + tv.mean(0)
    elif how != "base":
        raise ValueError(f"fallback {how!r} is not mean or base")
    return out


def solved_engine(inputs: MergeInputs, tensors: Mapping[str, torch.Tensor]) -> MergeEngine:
    """An engine whose every tensor is fixed: `tensors` where given, θ₀ elsewhere; heads kept."""
    fixed = MergeInputs(list(inputs.experts), {**inputs.base, **tensors}, {}, inputs.heads, [])
    return MergeEngine(fixed, ParamGroups([], "layer"))
