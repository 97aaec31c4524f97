"""Calibration data: the one row format, and the typed reference a spec gives for each expert's set.

A calibration set is JSONL, one object per line (blank lines are skipped):

    {"text": "..."}               tokenised with the base's tokenizer (OT fusion: the anchor's)
    {"input_ids": [1, 2, ...]}     token ids as they are
    {"prompt": "...", "completion": "..."}                  prompt-completion (TRL's format)
    {"input_ids": [...], "completion_mask": [0, 0, 1, ...]}  the same, tokenised (TRL's field name)
    {"input": [0.1, 0.2, ...]}     a feature vector, for small non-HF models (OT fusion of MLP/CNN)

Prompt-completion rows are whole rows to a model (prompt then completion); a causal LM's learned
objective scores only the predictions of completion tokens (merge_ops/learned/batches.py): a prompt
is context, not the task. Any other key (a label, an id) is ignored, so a learned merge can never see
labels. A set holds token
rows (text and/or input_ids) or input rows, not both. Errors name the line: `<file>:<n>: ...` for a
file, `line <n>: ...` for an upload. The CLI, the service's upload check, the learned engine and OT
fusion all read sets through `parse_rows`.

`calibration.tasks.<expert>` is a CalibrationRef: a calibration-set id (`cal_...`, uploaded to the
service) or a JSONL file (the CLI). Both resolve to a local file before a merge runs:
`calibration_files(spec, find_set)`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from merge_ops.errors import CalibrationError

if TYPE_CHECKING:
    from merge_ops.spec import MergeSpec

SET_ID = re.compile(r"^cal_[A-Za-z0-9]{1,64}$")
MAX_REF = 4096
MAX_TOKEN_ID = 2**31 - 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# -- rows -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    line: int  # 1-based, for messages
    text: str | None = None  # a prompt-completion row's prompt
    input_ids: tuple[int, ...] | None = None
    input: tuple[float, ...] | None = None
    completion: str | None = None  # {"prompt", "completion"} rows
    completion_mask: tuple[int, ...] | None = None  # {"input_ids", "completion_mask"} rows: 1 = completion

    @property
    def kind(self) -> str:
        return "input" if self.input is not None else "tokens"


def _where(source: str | None, line: int) -> str:
    return f"{source}:{line}" if source else f"line {line}"


def parse_row(obj: Any, line: int, source: str | None = None) -> Row:
    where = _where(source, line)

    def bad(msg: str) -> CalibrationError:
        return CalibrationError(f"{where}: {msg}", param=source)

    if not isinstance(obj, dict):
        raise bad("each line must be a JSON object")
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in ids):
            raise bad("input_ids must be a non-empty list of token ids (integers >= 0)")
        mask = obj.get("completion_mask")
        if mask is not None:
            if not isinstance(mask, list) or len(mask) != len(ids) or any(
                    m not in (0, 1) or isinstance(m, bool) for m in mask) or 1 not in mask[1:]:
                raise bad("completion_mask must be a list of 0/1, one per input id, with 1 on the completion's "
                          "tokens (at least one, after the first token)")
            return Row(line, input_ids=tuple(ids), completion_mask=tuple(mask))
        return Row(line, input_ids=tuple(ids))
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(completion, str) \
                or not completion.strip():
            raise bad("a prompt-completion row needs \"prompt\" and \"completion\", both non-empty strings")
        return Row(line, text=prompt, completion=completion)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise bad("text must be a non-empty string")
        return Row(line, text=text)
    if "input" in obj:
        x = obj["input"]
        if not isinstance(x, list) or not x or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in x):
            raise bad("input must be a non-empty list of finite numbers")
        return Row(line, input=tuple(float(v) for v in x))
    raise bad('a line needs "text" (a string), "input_ids" (a list of token ids), "prompt" and "completion" '
              '(strings) or "input" (a list of numbers)')


def iter_rows(lines: Iterable[str | bytes], source: str | None = None) -> Iterator[Row]:
    """Rows one by one, checked line by line; one kind of row per set."""
    first: Row | None = None
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise CalibrationError(f"{_where(source, i)}: not valid JSON ({e})", param=source) from None
        row = parse_row(obj, i, source)
        if first is None:
            first = row
        elif row.kind != first.kind:
            what = {"input": "an input-vector row", "tokens": "a text/input_ids row"}
            raise CalibrationError(
                f"{_where(source, i)}: {what[row.kind]}, but line {first.line} is {what[first.kind]}: a set "
                "holds token rows or input vectors, not both", param=source)
        yield row


def _empty(source: str | None) -> CalibrationError:
    return CalibrationError(f"{source or 'the calibration set'} has no rows: send one JSON object per line",
                            param=source)


def parse_rows(lines: Iterable[str | bytes], source: str | None = None, *,
               limit: int | None = None) -> list[Row]:
    """Every row (or the first `limit`)."""
    rows: list[Row] = []
    for row in iter_rows(lines, source):
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise _empty(source)
    return rows


def read_rows(path: str | Path, *, limit: int | None = None, label: str | None = None) -> list[Row]:
    """The rows of a JSONL file; messages name the file (or `label`)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} not found", param=label or str(path))
    with path.open("rb") as f:
        return parse_rows(f, label or str(path), limit=limit)


def validate_upload(path: str | Path) -> int:
    """The number of rows of an uploaded set (streamed: none is kept); CalibrationError('line <n>:
    ...') on the first bad line."""
    with Path(path).open("rb") as f:
        n = sum(1 for _ in iter_rows(f))
    if n == 0:
        raise _empty(None)
    return n


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


# -- references -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationRef:
    """Where one expert's calibration set is: a set id of the service, or a JSONL file."""

    raw: str
    set_id: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        return self.raw


def parse_calibration_ref(value: object) -> CalibrationRef:
    if isinstance(value, CalibrationRef):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a calibration reference is a calibration-set id (cal_...) or a JSONL file path")
    if _CONTROL.search(value):
        raise ValueError(f"{value!r} holds a control character: give a calibration-set id or a file path")
    if len(value) > MAX_REF:
        raise ValueError(f"a calibration reference is at most {MAX_REF} characters")
    if SET_ID.match(value):
        return CalibrationRef(value, set_id=value)
    return CalibrationRef(value, path=value)


CalibrationRefField = Annotated[
    CalibrationRef,
    PlainValidator(parse_calibration_ref),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "maxLength": MAX_REF,
                    "description": "calibration-set id (cal_...) or JSONL file path"}),
]


def calibration_files(spec: MergeSpec, find_set: Callable[[str], Path | None] | None = None, *,
                      skip_sets: bool = False) -> dict[str, Path]:
    """Expert name -> local JSONL file. File references must exist; set ids are looked up with
    `find_set` (the service's store; the CLI has none), or left out with `skip_sets`."""
    if spec.calibration is None:
        return {}
    out: dict[str, Path] = {}
    for task, ref in spec.calibration.tasks.items():
        where = f"calibration.tasks.{task}"
        if ref.set_id is not None:
            if skip_sets:
                continue
            if find_set is None:
                raise CalibrationError(f"{where}: {ref.set_id!r} is a calibration-set id, which only the "
                                       "service can read: give a JSONL file instead", param=where)
            found = find_set(ref.set_id)
            if found is None or not Path(found).is_file():
                raise CalibrationError(f"{where}: calibration set {ref.set_id!r} (for {task!r}) no longer "
                                       "exists", param=where)
            out[task] = Path(found)
            continue
        p = Path(ref.path or "").expanduser()
        if not p.is_file():
            raise CalibrationError(f"{where}: {ref.raw!r} is not a file (JSONL expected)", param=where)
        out[task] = p
    return out


# -- checks that read the sets and model folders (no weights) ---------------------------------------
def _local_folder(ref: str | None) -> Path | None:
    from merge_ops.refs import parse_model_ref, ref_parts

    if ref is None:
        return None
    r = parse_model_ref(ref_parts(ref)[0])  # model+adapter: the model holds the config and tokenizer
    if r.local_path is None:
        return None  # a hub model: its files are known only after download
    p = Path(r.local_path.removeprefix("file://")).expanduser()
    return p if p.is_dir() else None


def _config(folder: Path | None) -> Mapping[str, Any]:
    if folder is None or not (folder / "config.json").is_file():
        return {}
    try:
        doc = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # a broken config is the checkpoint reader's to report, with its file name
    return doc if isinstance(doc, dict) else {}


def reading_model(spec: MergeSpec) -> str | None:
    """The ref of the model whose vocabulary and tokenizer the calibration rows are read with: the
    base; OT fusion: the anchor expert."""
    if spec.method_def().kind == "ot":
        anchor = int(spec.global_param("anchor") or 0)
        return spec.experts[anchor].model if anchor < len(spec.experts) else None
    return spec.base


def check_calibration(spec: MergeSpec, files: Mapping[str, Path], *, model_folder: Path | None = None) -> None:
    """What the sets must hold for this spec, checked before any model is downloaded.

    Learned methods read token rows; OT fusion reads input rows for alloy_arch (MLP/CNN) models and
    token rows for HF models. Text rows need tokenizer files in the model that tokenises them (the
    base; OT: the anchor), checked where that model is a local folder. A hub model's files are known
    only after download: the runner checks again with `model_folder` (that model's resolved folder)
    before any learning. Messages name the model by its ref, never by the folder it was read from."""
    m = spec.method_def()
    if not m.reads_calibration or not files:
        return
    ref = reading_model(spec)
    folder = model_folder if model_folder is not None else _local_folder(ref)
    if m.kind == "ot":
        anchor = int(spec.global_param("anchor") or 0)
        who = f"the anchor expert ({spec.expert_names()[anchor]}, {ref})" if folder else ""
    else:
        who = f"the base ({ref})"
    config = _config(folder)
    arch = config.get("alloy_arch")
    vocab = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None
    want = "input" if arch is not None else "tokens" if folder is not None or m.kind == "learned" else None
    tokenizer = folder is None or has_tokenizer(folder)
    for task, path in files.items():
        where = f"calibration.tasks.{task}"
        rows = read_rows(path, label=f"{where} ({Path(path).name})")
        kind = rows[0].kind
        if want is not None and kind != want:
            need = ('{"input": [...]} rows (the model is an alloy_arch ' + str(arch) + " model)"
                    if want == "input" else '{"text"} or {"input_ids"} rows')
            raise CalibrationError(f"{where}: this method reads {need}, but line {rows[0].line} is not one",
                                   param=where)
        if vocab is not None:  # an id past the embedding table would crash the job with an IndexError
            bad = next((r for r in rows if r.input_ids and max(r.input_ids) >= vocab), None)
            if bad is not None:
                raise CalibrationError(f"{where}: line {bad.line} holds token id {max(bad.input_ids)}, but "
                                       f"{who} has a vocabulary of {vocab} ids (0..{vocab - 1})", param=where)
        if not tokenizer and any(r.text is not None for r in rows):
            line = next(r.line for r in rows if r.text is not None)
            raise CalibrationError(f"{where}: line {line} holds text, but {who} has no tokenizer "
                                   'files: give "input_ids" rows instead', param=where)
