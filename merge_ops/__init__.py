"""Alloy's merging library: build a MergeSpec, run it, publish the result.

    from merge_ops import load_spec, run_merge
    spec = load_spec("examples/ties.yaml")        # or spec_from_dict({...}); validated here, once
    outcome = run_merge(spec, Path("merged"))     # resolve → (learn) → merge → write a checkpoint + card

Methods are declared in `merge_ops.methods` (METHODS, get_method); a running merge reports through a
Channel (context.py). Importing this package does not import torch: the math loads when a merge runs.

    spec.py          MergeSpec and its validation         declare.py      how a method declares itself
    methods/         one module per method                calibration.py  calibration rows and references
    static/          the streaming static driver, kernels, top-k selection
    learned/         the learned driver and engine        ot/             OT fusion internals
    runner.py        run_merge / run_method               context.py      JobContext, Channel
    checkpoint.py    safetensors reads and writes         sources.py      local and hub models
    publish.py       local folder hub, Hugging Face Hub   card.py         model card, alloy_merge.json
"""

from merge_ops.calibration import CalibrationRef
from merge_ops.context import Callbacks, Channel, JobContext, MethodResult, ResolvedModel
from merge_ops.declare import MethodDef, Param
from merge_ops.errors import (
    AlloyError,
    CalibrationError,
    Cancelled,
    CheckpointError,
    InputError,
    MergeFailed,
    PublishError,
    SpecError,
)
from merge_ops.methods import METHODS, get_method
from merge_ops.spec import MergeSpec, load_spec, spec_from_dict

# running and publishing load on first use: the API validates specs with this package and never runs one
_LAZY = {"MergeOutcome": "runner", "ResolveOptions": "runner", "publish_result": "runner", "run_merge": "runner",
         "run_method": "runner", "HfHubPublisher": "publish", "LocalHub": "publish", "PublishedRef": "publish",
         "make_publisher": "publish"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"merge_ops.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'merge_ops' has no attribute {name!r}")


__all__ = [
    "METHODS", "AlloyError", "CalibrationError", "CalibrationRef", "Callbacks", "Cancelled", "Channel",
    "CheckpointError", "HfHubPublisher", "InputError", "JobContext", "LocalHub", "MergeFailed", "MergeOutcome",
    "MergeSpec", "MethodDef", "MethodResult", "Param", "PublishError", "PublishedRef", "ResolveOptions",
    "ResolvedModel", "SpecError", "get_method", "load_spec", "make_publisher", "publish_result", "run_merge",
    "run_method", "spec_from_dict",
]
