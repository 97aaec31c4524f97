"""Errors that carry a message a user can act on.

    AlloyError                 base; `code` is the stable machine-readable reason
    ├── InputError             the request or its inputs are wrong: CLI exit 2, API 4xx, job failed
    │   ├── SpecError          the MergeSpec (unknown method, bad parameter, bad repo id, ...)
    │   ├── CheckpointError    a checkpoint (pickle, bad header, mismatched names/shapes, ...)
    │   └── CalibrationError   a calibration set (bad JSONL line, missing task, ...)
    ├── MergeFailed            the merge ran but its result is unusable (NaN/Inf in a tensor, ...)
    ├── PublishError           the hub refused or failed the upload
    └── Cancelled              a cooperative cancel was seen between steps

Nothing here imports torch: the service uses these on request paths.
"""

from __future__ import annotations


class AlloyError(Exception):
    code = "alloy_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param  # the spec field or file the message is about, when there is one


class InputError(AlloyError):
    code = "invalid_input"


class SpecError(InputError):
    code = "invalid_spec"


class CheckpointError(InputError):
    code = "invalid_checkpoint"


class CalibrationError(InputError):
    code = "invalid_calibration"


class MergeFailed(AlloyError):
    code = "merge_failed"


class PublishError(AlloyError):
    code = "publish_failed"


class Cancelled(AlloyError):
    code = "cancelled"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_refusal(what: str, pickles: list[str]) -> CheckpointError:
    """The one refusal of pickled weights (a local folder, a hub repo): loading one runs code."""
    return CheckpointError(
        f"{what} holds only pickled weights ({', '.join(pickles[:3])}): Alloy never unpickles a model file, "
        "because loading a pickle runs arbitrary code. Convert the checkpoint to safetensors, e.g. "
        "`model.save_pretrained(dir, safe_serialization=True)` in a trusted environment", param=what)
