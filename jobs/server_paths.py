"""Server paths out of what a tenant reads: job results, errors, events and webhook bodies.

A worker's error may name a file it opened: a model folder after its links were resolved, a file in
the hub download cache (`<data>/cache/models--org--name/snapshots/<sha>/...`), the job's own work
folder, the local hub. None of that is the tenant's business, and it tells an attacker where the
server keeps other tenants' data. `PathHider` rewrites such paths to what the tenant gave: the ref of
the model (`org/name@rev`, or the local path as written in the spec), and names the server's own
folders by role (`<job folder>`, `<hub>`, `<data dir>`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jobs.settings import Settings
from merge_ops.errors import SpecError
from merge_ops.refs import parse_model_ref, ref_parts


def _both(p: Path) -> set[str]:
    """A path as configured and as resolved (a data dir under a symlink is named either way)."""
    return {str(p), str(p.resolve())}


def model_refs(spec_doc: dict[str, Any]) -> list[str]:
    """The base's and experts' refs of a stored spec, read without validating it (it may be what failed)."""
    experts = spec_doc.get("experts")
    refs = [spec_doc.get("base"), *(e.get("model") for e in experts if isinstance(e, dict))] \
        if isinstance(experts, list) else [spec_doc.get("base")]
    return [r for r in refs if isinstance(r, str)]


def _each_part(refs: list[str]) -> list[str]:
    """model+adapter refs as their two parts: each folder is named by its own part."""
    out = []
    for ref in refs:
        try:
            out.extend(ref_parts(ref))
        except SpecError:
            out.append(ref)
    return out


class PathHider:
    def __init__(self, refs: list[str], settings: Settings, job_dir: Path):
        swaps: dict[str, str] = {}
        self.hub_refs: dict[str, str] = {}  # repo id -> the ref the spec gave for it
        for ref in _each_part(refs):
            try:
                r = parse_model_ref(ref)
            except SpecError:
                continue
            if r.local_path is not None:  # the folder after links and `~` are resolved -> the spec's ref
                swaps[str(Path(r.local_path.removeprefix("file://")).expanduser().resolve())] = ref
            elif r.repo_id is not None:
                self.hub_refs.setdefault(r.repo_id, ref)
        for folder, role in ((job_dir, "<job folder>"), (settings.hub_root, "<hub>"),
                             (settings.data_dir, "<data dir>")):
            swaps.update({s: role for s in _both(folder) if s not in swaps})
        swaps = {k: v for k, v in swaps.items() if k != v and k not in ("/", ".")}
        # longest first: a job folder inside the data dir is named as the job folder
        self._swaps = sorted(swaps.items(), key=lambda kv: -len(kv[0]))
        caches = "|".join(re.escape(c) for c in sorted(_both(settings.data_dir / "cache"), key=len, reverse=True))
        self._cache = re.compile(rf"(?:{caches})/models--([^/\s]+?)--([^/\s]+)/(?:snapshots|blobs)/[0-9a-f]+")

    def _hub(self, m: re.Match[str]) -> str:
        repo = f"{m[1]}/{m[2]}"
        return self.hub_refs.get(repo, repo)

    def text(self, s: str) -> str:
        s = self._cache.sub(self._hub, s)
        for path, name in self._swaps:
            s = s.replace(path, name)
        return s

    def value(self, x: Any) -> Any:
        """Every string in a JSON-like value, rewritten."""
        if isinstance(x, dict):
            return {k: self.value(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [self.value(v) for v in x]
        return self.text(x) if isinstance(x, str) else x
