"""A directory of per-set results for models that do not change: the base and the experts.

Key = sha256 of (model commit or fingerprint, the set's sha256, the task head used, the settings
that change scores, the metric code's version). Each entry is one JSON file written to a temporary
name and renamed, so concurrent workers never read half an entry; a corrupt or foreign entry is a
miss. Device and batch size are not part of the key: they change scores only by rounding.
No torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from merge_ops.evaluation.declarations import EvalSettings
from merge_ops.evaluation.results import SetResult


def cache_key(model: str, set_sha256: str, settings: EvalSettings, head: str | None = None) -> str:
    doc = {"model": model, "set": set_sha256, "head": head, "settings": settings.key()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class ResultCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> SetResult | None:
        p = self._path(key)
        try:
            doc = json.loads(p.read_text())
            if doc.get("key") != key:
                return None
            return SetResult.from_dict(doc["result"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, result: SetResult) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "result": result.to_dict()}, f)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def lookup(cache: ResultCache | None, model: str | None, sets: Mapping[str, str], settings: EvalSettings,
           heads: Mapping[str, str | None]) -> tuple[dict[str, SetResult], dict[str, str]]:
    """(cached results, cache keys) for sets given as name -> set sha256; nothing without a cache or a
    model commit. `heads[name]` names the head that scores it (None for sets scored without one)."""
    if cache is None or model is None:
        return {}, {}
    keys = {n: cache_key(model, sha, settings, heads.get(n)) for n, sha in sets.items()}
    hits = {n: r for n, k in keys.items() if (r := cache.get(k)) is not None}
    return hits, keys
