"""ModelRef: where a checkpoint comes from, parsed without touching the network or the disk.

    /abs/path, ./rel, ../rel, ~/x, file:///abs    a local folder
    org/name, org/name@revision                     a hub repo (revision: branch, tag or commit)

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


def is_repo_id(s: str) -> bool:
    return bool(_REPO_ID.match(s)) and "--" not in s and ".." not in s


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


def parse_model_ref(s: str) -> ModelRef:
    s = s.strip()
    if not s:
        raise SpecError("empty model reference: give a local folder or a hub id like org/name@revision")
    if s.startswith("file://"):
        return ModelRef(s, local_path=s[len("file://"):])
    if s.startswith(("/", "./", "../", "~")) or s in (".", ".."):
        return ModelRef(s, local_path=s)
    repo, at, rev = s.partition("@")
    if is_repo_id(repo) and (not at or _REVISION.match(rev)):
        return ModelRef(s, repo_id=repo, revision=rev or None)
    raise SpecError(
        f"{s!r} is neither a local folder (start it with /, ./ or ../) nor a hub repo id "
        "(org/name or org/name@revision; letters, digits, '_', '-', '.')"
    )
