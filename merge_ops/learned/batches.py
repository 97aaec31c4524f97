"""Calibration samples as token ids, and the deterministic batches a learned merge draws from them.

Rows come from the one calibration parser (merge_ops/calibration.py): `{"text"}` rows are
tokenised with the base model's tokenizer, `{"input_ids"}` rows are kept (cut at `max_length`);
nothing else of a row is read, so a learned merge cannot see labels. A prompt-completion row becomes
one `Sample` (prompt then completion) that remembers which tokens are the completion; its batch's
`loss_mask` marks the positions whose next-token prediction is a completion token, the only ones a
causal LM's objective scores (an answer-only expert models the prompt worse than the base: aligning
a merge with it there would teach it to lose the prompt, and a short answer after a long prompt
would be a small share of the loss). Batches come from one seeded
generator per task that reshuffles at each pass (DataLoader(shuffle=True) semantics), so a seed
fixes every batch of every step.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_ops.calibration import has_tokenizer, read_rows
from merge_ops.errors import CalibrationError


class Sample(list):
    """A row's token ids; `completion` is the 0/1 completion mask of a prompt-completion row (None:
    every token is the row's own)."""

    completion: tuple[int, ...] | None = None


def sample(ids: list[int], completion: tuple[int, ...] | list[int] | None = None) -> Sample:
    out = Sample(ids)
    if completion is not None:
        out.completion = tuple(completion)
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    # [B, T] bool: positions whose next-token prediction is scored (None: every real position)
    loss_mask: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     None if self.loss_mask is None else self.loss_mask.to(device))

    def scored(self) -> torch.Tensor | None:
        """[n_real] bool over the real tokens in batch order (how causal-LM outputs are packed), or None."""
        return None if self.loss_mask is None else self.loss_mask[self.attention_mask.bool()]


def token_ids_by_line(rows, tokenizer, max_length: int, source: str) -> dict[int, Sample]:
    """Each row's token ids by line number: `input_ids` as given, `text` through the base's tokenizer
    (both cut at `max_length`); a prompt-completion row's prompt and completion are tokenised apart
    (the completion without special tokens) and joined, as TRL does."""
    texts = [r for r in rows if r.text is not None]

    def mask(r) -> tuple[int, ...] | None:  # evaluation rows (aTLAS's labelled sets) carry no completion
        m = getattr(r, "completion_mask", None)
        return None if m is None else m[:max_length]

    ids = {r.line: sample(list(r.input_ids[:max_length]), mask(r)) for r in rows if r.input_ids is not None}
    if texts:
        if tokenizer is None:
            raise CalibrationError(f"{source} holds text but the base model has no tokenizer files: give "
                                   '"input_ids" instead', param=source)
        enc = tokenizer([r.text for r in texts], truncation=True, max_length=max_length)["input_ids"]  # type: ignore[operator]
        pairs = [(r, x) for r, x in zip(texts, enc, strict=True) if getattr(r, "completion", None) is not None]
        comp = tokenizer([r.completion for r, _ in pairs], add_special_tokens=False)["input_ids"] if pairs else []  # type: ignore[operator]
        done = {}
        for (r, x), c in zip(pairs, comp, strict=True):
            done[r.line] = sample((list(x) + list(c))[:max_length], ([0] * len(x) + [1] * len(c))[:max_length])
        ids.update({r.line: done[r.line] if r.line in done else sample(list(x)) for r, x in zip(texts, enc, strict=True)})
    for line, x in ids.items():
        if x.completion is not None and 1 not in x.completion[1:]:
            raise CalibrationError(f"{source}:{line}: the prompt fills max_length ({max_length} tokens): no completion "
                                   "token is left to score; shorten the prompt or raise calibration.max_length",
                                   param=source)
    return ids


def read_samples(path: str | Path, *, tokenizer: object | None = None, max_length: int = 64,
                 limit: int | None = None, seed: int = 0, label: str | None = None) -> list[Sample]:
    """Token ids of every sample in a JSONL file (or `limit` of them, chosen by `seed`)."""
    rows = read_rows(path, label=label)
    source = label or str(path)
    if rows[0].kind != "tokens":
        raise CalibrationError(f"{source}:{rows[0].line}: a learned merge reads text or input_ids, not input "
                               "vectors", param=source)
    ids = token_ids_by_line(rows, tokenizer, max_length, source)
    out = [ids[line] for line in sorted(ids) if ids[line]]
    if not out:
        raise CalibrationError(f"{source} has no samples", param=source)
    if limit is not None and limit < len(out):
        g = torch.Generator().manual_seed(seed)
        pick = sorted(torch.randperm(len(out), generator=g)[:limit].tolist())
        out = [out[j] for j in pick]
    return out


def load_calibration(paths: Mapping[str, str | Path], tasks: list[str], *, tokenizer_dir: Path | None,
                     max_length: int = 64, samples_per_task: int | None = None, seed: int = 0
                     ) -> dict[str, list[list[int]]]:
    tok = load_tokenizer(tokenizer_dir)
    return {t: read_samples(paths[t], tokenizer=tok, max_length=max_length, limit=samples_per_task,
                            seed=seed) for t in tasks}


def load_tokenizer(folder: Path | None) -> object | None:
    if folder is None or not has_tokenizer(folder):
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
    loss = None
    if any(getattr(x, "completion", None) is not None for x in samples):
        loss = mask.bool().clone()  # rows without a completion mask: every real position
        for i, x in enumerate(samples):
            c = getattr(x, "completion", None)
            if c is not None:  # position t predicts token t + 1: scored when that token is the completion's
                loss[i, : len(x)] = torch.tensor(list(c[1:]) + [0], dtype=torch.bool)
    return Batch(ids, mask, loss)


def concat(batches: list[Batch], pad_id: int = 0) -> Batch:
    """The rows of several batches as one (right-padded to the longest), in order: a causal LM scores
    them in one forward (`Adapter.forward_many`). A batch without a loss mask scores every real position."""
    if len(batches) == 1:
        return batches[0]
    n = max(b.input_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int | bool) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, n - t.shape[1]), value=value)

    ids = torch.cat([pad(b.input_ids, pad_id) for b in batches])
    mask = torch.cat([pad(b.attention_mask, 0) for b in batches])
    loss = None
    if any(b.loss_mask is not None for b in batches):
        loss = torch.cat([pad(b.attention_mask.bool() if b.loss_mask is None else b.loss_mask, False)
                          for b in batches])
    return Batch(ids, mask, loss)


class IndexSampler:
    """Per task, a seeded stream of sample indices: shuffle, walk through, reshuffle when exhausted."""

    def __init__(self, sizes: Mapping[str, int], batch_size: int, seed: int = 0):
        self.sizes = dict(sizes)
        self.batch_size = batch_size
        # one generator per task, seeded from (seed, task name): adding a task changes no other stream
        self._gen = {t: torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(t.encode()))
                     for t in sizes}
        self._order: dict[str, list[int]] = {t: [] for t in sizes}

    def next(self, task: str) -> list[int]:
        n, order = self.sizes[task], self._order[task]
        out: list[int] = []
        while len(out) < min(self.batch_size, n):
            if not order:
                order.extend(torch.randperm(n, generator=self._gen[task]).tolist())
            out.append(order.pop(0))
        return out


class BatchSampler:
    """Per task, a seeded stream of collated batches (IndexSampler over the samples)."""

    def __init__(self, samples: Mapping[str, list[list[int]]], batch_size: int, seed: int = 0,
                 pad_id: int = 0):
        self.samples = dict(samples)
        self.pad_id = pad_id
        self.index = IndexSampler({t: len(s) for t, s in self.samples.items()}, batch_size, seed)

    def next(self, task: str) -> Batch:
        pool = self.samples[task]
        return collate([pool[i] for i in self.index.next(task)], self.pad_id)
