"""Calibration sets: unlabelled samples grouped by task, and deterministic batches drawn from them.

A JSONL line is `{"text": "..."}` (tokenised with the base model's tokenizer) or
`{"input_ids": [...]}`. Only those two keys are ever read: a line may carry a label (or anything
else) and it is ignored, so a learned merge cannot see labels. Batches come from one seeded
generator per task that reshuffles at each pass (DataLoader(shuffle=True) semantics), so a seed
fixes every batch of every step.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_ops.errors import CalibrationError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens

    def to(self, device: str | torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))


def read_samples(path: str | Path, *, tokenizer: object | None = None, max_length: int = 64,
                 limit: int | None = None, seed: int = 0) -> list[list[int]]:
    """Token ids of every sample in a JSONL file (or `limit` of them, chosen by `seed`)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} not found", param=str(path))
    texts: list[tuple[int, str]] = []
    ids: list[tuple[int, list[int]]] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise CalibrationError(f"{path}:{i}: not JSON: {e}", param=str(path)) from None
        if not isinstance(row, dict):
            raise CalibrationError(f"{path}:{i}: each line must be an object", param=str(path))
        if isinstance(row.get("input_ids"), list):
            x = row["input_ids"]
            if not x or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x):
                raise CalibrationError(f"{path}:{i}: input_ids must be a non-empty list of token ids",
                                       param=str(path))
            ids.append((i, x[:max_length]))
        elif isinstance(row.get("text"), str):
            texts.append((i, row["text"]))
        else:
            raise CalibrationError(f'{path}:{i}: a line needs "text" (a string) or "input_ids" (a list)',
                                   param=str(path))
    if texts:
        if tokenizer is None:
            raise CalibrationError(f"{path} holds text but the base model has no tokenizer files: give "
                                   '"input_ids" instead', param=str(path))
        enc = tokenizer([t for _, t in texts], truncation=True, max_length=max_length)["input_ids"]  # type: ignore[operator]
        ids += [(i, x) for (i, _), x in zip(texts, enc, strict=True)]
    ids.sort()
    out = [x for _, x in ids if x]
    if not out:
        raise CalibrationError(f"{path} has no samples", param=str(path))
    if limit is not None and limit < len(out):
        g = torch.Generator().manual_seed(seed)
        pick = sorted(torch.randperm(len(out), generator=g)[:limit].tolist())
        out = [out[j] for j in pick]
    return out


def load_calibration(paths: Mapping[str, str | Path], tasks: list[str], *, tokenizer_dir: Path | None,
                     max_length: int = 64, samples_per_task: int | None = None, seed: int = 0
                     ) -> dict[str, list[list[int]]]:
    missing = [t for t in tasks if t not in paths]
    if missing:
        raise CalibrationError(f"no calibration data for expert(s) {missing}", param="calibration")
    tok = _tokenizer(tokenizer_dir)
    return {t: read_samples(paths[t], tokenizer=tok, max_length=max_length, limit=samples_per_task,
                            seed=seed) for t in tasks}


def _tokenizer(folder: Path | None) -> object | None:
    if folder is None or not any((folder / f).is_file() for f in
                                 ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def collate(samples: list[list[int]], pad_id: int = 0) -> Batch:
    n = max(len(x) for x in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for i, x in enumerate(samples):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return Batch(ids, mask)


class BatchSampler:
    """Per task, a seeded stream of batches: shuffle, walk through, reshuffle when exhausted."""

    def __init__(self, samples: Mapping[str, list[list[int]]], batch_size: int, seed: int = 0,
                 pad_id: int = 0):
        self.samples = dict(samples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        # one generator per task, seeded from (seed, task name): adding a task changes no other stream
        self._gen = {t: torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(t.encode()))
                     for t in self.samples}
        self._order: dict[str, list[int]] = {t: [] for t in self.samples}

    def next(self, task: str) -> Batch:
        pool, order = self.samples[task], self._order[task]
        picked: list[int] = []
        while len(picked) < min(self.batch_size, len(pool)):
            if not order:
                order.extend(torch.randperm(len(pool), generator=self._gen[task]).tolist())
            picked.append(order.pop(0))
        return collate([pool[i] for i in picked], self.pad_id)
