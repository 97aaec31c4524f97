"""ModelRef: where a checkpoint comes from, parsed without touching the network or the disk.

    /abs/path, ./rel, ../rel, ~/x, file:///abs    a local folder
    org/name, org/name@revision                     a hub repo (revision: branch, tag or commit)
    model+adapter                                   a PEFT LoRA adapter applied to a model (mergekit's
                                                    syntax; each side is one of the above)

`sources.py` turns a ModelRef into a local folder and a resolved commit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from merge_ops.errors import SpecError

# Hub repo ids: 1-96 chars of [A-Za-z0-9_.-] per part, no leading/trailing '.' or '-', no '--' or '..'.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,254}$")
_REF_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,127}$")  # a branch or tag we publish to
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_repo_id(s: str) -> bool:
    return bool(_REPO_ID.match(s)) and "--" not in s and ".." not in s


def _is_revision(s: str) -> bool:
    return bool(_REVISION.match(s)) and ".." not in s and not s.endswith(("/", "."))


def check_ref_name(name: str) -> str | None:
    """What is wrong with a branch or tag name to publish to (None: nothing)."""
    if not _REF_NAME.match(name) or ".." in name or name.endswith(("/", ".")) or "//" in name:
        return (f"{name!r}: a branch or tag is 1-128 letters, digits, '_', '-', '.', '/', starting with a "
                "letter or digit, without '..' or a trailing '/' or '.'")
    return None


@dataclass(frozen=True)
class ModelRef:
    raw: str
    local_path: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    def __str__(self) -> str:
        return self.raw


def split_adapter_ref(s: str) -> tuple[str, str | None]:
    """mergekit's `model+adapter` (a LoRA applied to a model) as (model, adapter); (s, None) without '+'.

    As mergekit, any '+' splits: a local folder whose name holds '+' cannot be named directly."""
    parts = s.split("+")
    if len(parts) == 1:
        return s, None
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise SpecError(f"{s!r}: write a model with a LoRA adapter as model+adapter (one '+', e.g. "
                        "org/base+org/my-lora or /models/base+/adapters/code)")
    return parts[0].strip(), parts[1].strip()


def ref_parts(s: str) -> list[str]:
    """The refs `s` names: itself, or a model and its adapter."""
    model, adapter = split_adapter_ref(s)
    return [model] if adapter is None else [model, adapter]


def parse_model_ref(s: str) -> ModelRef:
    if CONTROL.search(s):
        raise SpecError(f"{s!r} holds a control character: give a local folder or a hub id like "
                        "org/name@revision")
    s = s.strip()
    if not s:
        raise SpecError("empty model reference: give a local folder or a hub id like org/name@revision")
    if s.startswith("file://"):
        return ModelRef(s, local_path=s[len("file://"):])
    if s.startswith(("/", "./", "../", "~")) or s in (".", ".."):
        return ModelRef(s, local_path=s)
    repo, at, rev = s.partition("@")
    if is_repo_id(repo) and (not at or _is_revision(rev)):
        return ModelRef(s, repo_id=repo, revision=rev or None)
    raise SpecError(
        f"{s!r} is neither a local folder (start it with /, ./ or ../) nor a hub repo id "
        "(org/name or org/name@revision; letters, digits, '_', '-', '.')"
    )
