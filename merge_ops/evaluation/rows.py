"""Evaluation sets: JSONL rows with targets, parsed and checked line by line (no torch).

    {"text": "..."}                      perplexity   mean token NLL over the text's tokens
    {"input_ids": [...]}                 perplexity   the same on given token ids
    {"prompt": "...", "answer": "..."}   exact_match  greedy continuation of the prompt == answer
    {"text": "...", "label": 2}          accuracy     a task head's argmax == label (encoder classifiers)
    {"input_ids": [...], "label": 2}     accuracy

A set holds one kind; it is inferred from the first row unless declared, and a row of another
kind is an error naming its line (a set declared `perplexity` may carry labels: they are ignored). Other keys (ids, sources) are ignored. Errors read
`<source>:<line>: <what is wrong>`, as calibration sets' do (merge_ops/learned/calibration.py),
so the upload endpoint can return them as they are. This parser is self-contained so it can be
folded into a shared row parser for calibration and evaluation sets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from merge_ops.calibration import parse_row
from merge_ops.errors import CalibrationError
from merge_ops.evaluation.declarations import SET_KINDS, EvalSetError


@dataclass(frozen=True)
class EvalRow:
    line: int  # 1-based line in the source, for messages
    text: str | None = None
    input_ids: tuple[int, ...] | None = None
    prompt: str | None = None
    answer: str | None = None
    label: int | None = None


@dataclass(frozen=True)
class EvalSet:
    kind: str
    rows: tuple[EvalRow, ...]
    sha256: str  # of the kind and the rows as read (not of the file's formatting or ignored keys)
    source: str = "the evaluation set"

    def __len__(self) -> int:
        return len(self.rows)


def _kind(row: dict) -> str | None:
    if "prompt" in row or "answer" in row:
        return "exact_match"
    if "label" in row:
        return "accuracy"
    if "text" in row or "input_ids" in row:
        return "perplexity"
    return None


def _where(source: str | None, line: int) -> str:
    return f"{source}:{line}" if source else f"line {line}"  # as merge_ops.calibration's messages


def _row(i: int, row: dict, kind: str, source: str | None) -> EvalRow:
    where = _where(source, i)
    if kind == "exact_match":
        p, a = row.get("prompt"), row.get("answer")
        if not isinstance(p, str) or not p:
            raise EvalSetError(f'{where}: "prompt" must be a non-empty string', param=source)
        if not isinstance(a, str) or not a.strip():
            raise EvalSetError(f'{where}: "answer" must be a non-empty string', param=source)
        return EvalRow(i, prompt=p, answer=a)
    label = None
    if kind == "accuracy":
        label = row.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise EvalSetError(f'{where}: "label" must be a class index (an integer >= 0)', param=source)
    # the text / input_ids part is a calibration row: checked by the shared row parser
    try:
        r = parse_row({k: row[k] for k in ("text", "input_ids") if k in row}, i, source)
    except CalibrationError as e:
        raise EvalSetError(e.message, param=e.param) from None
    return EvalRow(i, text=r.text, input_ids=r.input_ids, label=label)


def parse_lines(lines: Iterable[str], *, source: str | None = None, kind: str | None = None,
                max_rows: int | None = None) -> EvalSet:
    """Rows of an evaluation set; `kind` (declared) must match every row, else the first decides."""
    name = source or "the evaluation set"
    if kind is not None and kind not in SET_KINDS:
        raise EvalSetError(f"unknown set kind {kind!r}; kinds: {', '.join(SET_KINDS)}", param=source)
    rows: list[EvalRow] = []
    first: int | None = None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = _where(source, i)
        try:
            row = json.loads(line)
        except ValueError as e:
            raise EvalSetError(f"{where}: not valid JSON ({e})", param=source) from None
        if not isinstance(row, dict):
            raise EvalSetError(f"{where}: each line must be a JSON object", param=source)
        k = _kind(row)
        if k is None:
            raise EvalSetError(f'{where}: a line needs "text" or "input_ids" (perplexity), "prompt" and '
                               '"answer" (exact match), or one of those with "label" (accuracy)', param=source)
        if kind is None:
            kind, first = k, i
        elif k != kind and not (kind == "perplexity" and k == "accuracy"):  # a label is ignored there
            why = "the set is declared" if first is None else f"line {first} made the set"
            raise EvalSetError(f"{where}: a {k} row, but {why} {kind}: one kind per set", param=source)
        rows.append(_row(i, row, kind, source))
        if max_rows is not None and len(rows) > max_rows:
            raise EvalSetError(f"{name}: more than {max_rows} rows", param=source)
    if not rows or kind is None:
        raise EvalSetError(f"{name} has no rows: send one JSON object per line", param=source)
    h = hashlib.sha256(kind.encode())
    for r in rows:
        d = {k: v for k, v in asdict(r).items() if k != "line" and v is not None}
        h.update(b"\n" + json.dumps(d, sort_keys=True, ensure_ascii=False).encode())
    return EvalSet(kind, tuple(rows), h.hexdigest(), name)


def parse_eval_set(data: str | bytes, *, source: str | None = None, kind: str | None = None,
                   max_rows: int | None = None) -> EvalSet:
    """An uploaded body (JSONL text or UTF-8 bytes); without `source` messages read `line <n>: ...`."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EvalSetError(f"{source or 'the evaluation set'}: not UTF-8 text: {e}", param=source) from None
    return parse_lines(data.splitlines(), source=source, kind=kind, max_rows=max_rows)


def read_eval_set(path: str | Path, *, kind: str | None = None, max_rows: int | None = None) -> EvalSet:
    path = Path(path)
    if not path.is_file():
        raise EvalSetError(f"evaluation set {path} not found", param=str(path))
    return parse_eval_set(path.read_bytes(), source=str(path), kind=kind, max_rows=max_rows)
