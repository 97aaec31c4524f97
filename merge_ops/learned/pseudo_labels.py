"""Pseudo-labels and labelled rows for the learned methods that train on targets (aTLAS, Model Tinting).

    trusted_rows     aTLAS's trusted set: per predicted class, the k most confident rows
    labelled_rows    token ids + class labels from evaluation-style rows ({"text"|"input_ids", "label"})

Calibration sets are read without labels (merge_ops/calibration.py); a supervised objective reads the
same files with the evaluation-set parser, which requires a `label` on every row.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from merge_ops.errors import CalibrationError


def trusted_rows(cls: torch.Tensor, conf: torch.Tensor, n_classes: int, cap: int = 100) -> torch.Tensor:
    """Boolean mask over rows: for each predicted class, its k most confident rows, k = min(⌊N/C/10⌋,
    cap) and at least 1 (aTLAS `learn_ufm.py`; the reference builds the mask from the last class's full
    argsort, flagging every row: here it is per class as intended)."""
    n = cls.numel()
    k = max(1, min(n // max(n_classes, 1) // 10, cap))
    mask = torch.zeros(n, dtype=torch.bool)
    for c in cls.unique().tolist():
        rows = (cls == c).nonzero().flatten()
        top = conf[rows].argsort(descending=True, stable=True)[:k]
        mask[rows[top]] = True
    return mask


def labelled_rows(paths: Mapping[str, str | Path], tasks: list[str], *, tokenizer: object | None,
                  max_length: int, limit: int | None, seed: int
                  ) -> dict[str, tuple[list[list[int]], list[int]]]:
    """Per task: (token ids, labels) of its calibration file read as an accuracy set (every row needs
    "label"); `limit` rows chosen by `seed` as `batches.read_samples` chooses them."""
    from merge_ops.evaluation.declarations import EvalSetError
    from merge_ops.evaluation.rows import read_eval_set
    from merge_ops.learned.batches import token_ids_by_line

    out = {}
    for t in tasks:
        src = str(paths[t])
        try:
            rows = read_eval_set(src, kind="accuracy").rows
        except EvalSetError as e:
            raise CalibrationError(f"calibration set of {t!r}: the supervised objective needs a class "
                                   f'"label" on every row: {e.message}', param=src) from None
        ids = token_ids_by_line(rows, tokenizer, max_length, src)
        label = {r.line: int(r.label) for r in rows if r.label is not None}
        lines = [ln for ln in sorted(ids) if ids[ln]]
        if limit is not None and limit < len(lines):
            g = torch.Generator().manual_seed(seed)
            lines = [lines[j] for j in sorted(torch.randperm(len(lines), generator=g)[:limit].tolist())]
        out[t] = ([ids[ln] for ln in lines], [label[ln] for ln in lines])
    return out
