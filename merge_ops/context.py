"""What every method runner receives and returns.

The runner (`runner.py`) resolves the inputs, builds a JobContext and calls the method's
`run(ctx) -> MethodResult`. Static methods share one streaming runner (`merge.py`); learned and OT
methods have their own. A runner writes the merged checkpoint into `ctx.out_dir` (sharded
safetensors + index + config/tokenizer files) and returns metrics and artifact paths; the model card
and `alloy_merge.json` are written afterwards by `card.py` from the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_ops.errors import Cancelled
from merge_ops.spec import MergeSpec

STAGES = ("resolve", "plan", "learn", "merge", "write", "publish")


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint on local disk and where it came from (for provenance in the card)."""

    ref: str  # as written in the spec
    path: Path  # local folder holding config.json and *.safetensors
    repo_id: str | None = None
    revision: str | None = None  # as asked (branch/tag/commit), None for local folders
    commit: str | None = None  # the resolved commit sha (hub) or a content fingerprint (local)


# progress(stage, step, total, loss=None): called often; implementations must be cheap.
ProgressFn = Callable[..., None]


def _no_progress(stage: str, step: int, total: int | None, loss: float | None = None) -> None:
    return None


@dataclass
class JobContext:
    spec: MergeSpec
    base: ResolvedModel | None
    experts: list[ResolvedModel]
    out_dir: Path
    device: str = "cpu"
    calibration: dict[str, Path] = field(default_factory=dict)  # expert name -> JSONL file
    progress: ProgressFn = _no_progress
    cancel_requested: Callable[[], bool] = lambda: False
    job_id: str | None = None

    def check_cancel(self) -> None:
        """Call between steps: raises Cancelled when a cancel was requested."""
        if self.cancel_requested():
            raise Cancelled("cancelled on request")


@dataclass
class MethodResult:
    metrics: dict[str, Any] = field(default_factory=dict)  # goes into alloy_merge.json / the job record
    # artifact name -> path relative to out_dir, e.g. {"coefficients": "coefficients.json",
    # "coefficients_png": "coefficients.png", "heads": "heads"}
    artifacts: dict[str, str] = field(default_factory=dict)
