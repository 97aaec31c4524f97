"""What a method runs with (JobContext) and returns (MethodResult), and the one progress channel.

`runner.run_merge` resolves the inputs, builds a JobContext and runs the method (`runner.run_method`):
static methods through the streaming driver (static/driver.py), learned ones through the learned
driver (learned/driver.py), OT fusion through its own `run`. A method writes the merged checkpoint
into `ctx.out_dir` and returns metrics and artifact paths; the model card and `alloy_merge.json` are
written afterwards by `card.py` from the result.

Progress and cancellation travel through one `Channel`: `progress(stage, step, total, loss=None)`
(stages: resolve, plan, learn, merge, evaluate, write; the service adds publish)
and `cancel_requested()`. The CLI implements it with progress bars, the worker with throttled
writes to the job store; the library calls it through `ctx.report(...)` and `ctx.check_cancel()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from merge_ops.errors import Cancelled

if TYPE_CHECKING:
    from merge_ops.spec import MergeSpec

# every stage a job reports, in order (evaluate runs only when the spec has `evaluate:`)
STAGES: tuple[str, ...] = ("resolve", "plan", "learn", "merge", "evaluate", "write", "publish")


class Channel(Protocol):
    """Where a running merge reports progress and learns that it should stop. Called often
    (every tensor, every step): implementations must be cheap."""

    def progress(self, stage: str, step: int, total: int | None, loss: float | None = None) -> None: ...

    def cancel_requested(self) -> bool: ...


@dataclass(frozen=True)
class Callbacks:
    """A Channel from two plain functions (scripts and tests)."""

    on_progress: Callable[..., None] | None = None
    on_cancel: Callable[[], bool] | None = None

    def progress(self, stage: str, step: int, total: int | None, loss: float | None = None) -> None:
        if self.on_progress is not None:
            if loss is None:
                self.on_progress(stage, step, total)
            else:
                self.on_progress(stage, step, total, loss)

    def cancel_requested(self) -> bool:
        return self.on_cancel is not None and bool(self.on_cancel())


SILENT: Channel = Callbacks()


def report(channel: Channel | None, stage: str, step: int, total: int | None, loss: float | None = None
           ) -> None:
    if channel is not None:
        channel.progress(stage, step, total, loss)


def check_cancel(channel: Channel | None) -> None:
    """Call between steps: raises Cancelled when a cancel was requested."""
    if channel is not None and channel.cancel_requested():
        raise Cancelled("cancelled on request")


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint on local disk and where it came from (for provenance in the card)."""

    ref: str  # as written in the spec
    path: Path  # local folder holding config.json and *.safetensors
    repo_id: str | None = None
    revision: str | None = None  # as asked (branch/tag/commit), None for local folders
    commit: str | None = None  # the resolved commit sha (hub) or a content fingerprint (local)
    # a LoRA adapter folder applied to the model at `path` (lora/reader.py); its weights are read
    # through lora.reader.open_checkpoint, never from `path` alone
    adapter: Path | None = None


@dataclass
class JobContext:
    spec: MergeSpec
    base: ResolvedModel | None
    experts: list[ResolvedModel]
    out_dir: Path
    device: str = "cpu"
    calibration: dict[str, Path] = field(default_factory=dict)  # expert name -> local JSONL file
    channel: Channel = SILENT
    job_id: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        """The method's parameters, resolved: global ones as values, model-scoped ones per expert."""
        return self.spec.method_params()

    def report(self, stage: str, step: int, total: int | None, loss: float | None = None) -> None:
        self.channel.progress(stage, step, total, loss)

    def check_cancel(self) -> None:
        check_cancel(self.channel)


@dataclass
class MethodResult:
    metrics: dict[str, Any] = field(default_factory=dict)  # goes into alloy_merge.json / the job record
    # artifact name -> path relative to out_dir, e.g. {"coefficients": "coefficients.json",
    # "coefficients_png": "coefficients.png", "heads": "heads"}
    artifacts: dict[str, str] = field(default_factory=dict)
