"""Tokenizer merges as mergekit 0.1.5 does them: the output vocabulary, each model's rows mapped into
it, and the remap of every vocabulary-indexed tensor (embeddings, lm_head, output biases) applied
by the static driver to one tensor at a time as it streams.

`plan_vocab` builds the output tokenizer (mergekit `build_tokenizer`): `base` is the base's
tokenizer stripped to its config's vocab_size, `union` adds every model's other tokens (as added
tokens, model by model in id order), a model source takes that model's tokenizer; `tokenizer.tokens` adds the
tokens it lists. Each model's token -> row map is by token text. `VocabPlan.remap` then gives each
model a (V_out, ...) tensor (mergekit `PermutedVocabulary`): a model's own row when it has the token;
otherwise (or with `force`) a default row: the listed source, else the base's row, else the only
model's, else the mean over the models that have it, else zeros. Rows added by
`pad_to_multiple_of` are each model's mean row. The merge method then merges those tensors.
Without a tokenizer setting rows merge by id, and `check_same_vocabulary` refuses tokenizers that
disagree on ids.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_ops.checkpoint import VOCAB_TENSOR
from merge_ops.errors import CheckpointError, SpecError
from merge_ops.tokenizer_spec import ModelTokenSource, TokenizerSpec, ZeroSource

LOG = logging.getLogger(__name__)


def is_vocab_tensor(name: str) -> bool:
    return bool(VOCAB_TENSOR.search(name))


def config_vocab_size(folder: Path) -> int | None:
    """vocab_size from config.json (top level, or text_config for multimodal configs)."""
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    v = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    if v is None and isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("vocab_size")
    return v if isinstance(v, int) and v > 0 else None


def _load_tokenizer(folder: Path, label: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as e:  # transformers raises many types for a folder without (valid) tokenizer files
        raise CheckpointError(f"{label} ({folder}): its tokenizer does not load ({type(e).__name__}: {e}); "
                              "a tokenizer merge needs every model's tokenizer files", param=label) from None


def _stripped(tok: Any, vocab_size: int, label: str) -> Any:
    """The tokenizer without tokens at ids >= vocab_size (mergekit `get_stripped_tokenizer`)."""
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    doc = json.loads(tok._tokenizer.to_str())
    if doc["model"]["type"] != "BPE":
        raise CheckpointError(f"{label}: its tokenizer has tokens beyond the model's vocab_size {vocab_size} and "
                              f"is {doc['model']['type']}; only BPE tokenizers can be trimmed", param=label)
    import tokenizers

    doc["added_tokens"] = [e for e in doc["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        doc["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:
        toks = m.split(" ") if isinstance(m, str) else m
        return not any(t in unused for t in toks)

    doc["model"]["merges"] = [m for m in doc["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(doc))
    return tok


def _union(base_tok: Any, toks: Sequence[Any], sizes: Sequence[int]) -> Any:
    """mergekit `build_union_tokenizer`: the base's tokenizer plus every other model's tokens."""
    from transformers import AutoTokenizer

    out_vocab: dict[str, int] = {}
    out_added: dict[str, Any] = {}
    for tok, size in zip(toks, sizes, strict=True):
        added = tok.added_tokens_decoder
        added_text = {a.content for a in added.values()}
        # in id order: mergekit walks get_vocab() in hash order, which changes from run to run
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < size and t not in added_text and t not in out_vocab:
                out_vocab[t] = len(out_vocab)
        for i, info in sorted(added.items()):
            if i < size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as d:  # a copy: never mutate the base's tokenizer
        base_tok.save_pretrained(d)
        res = AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


@dataclass
class VocabPlan:
    """The output tokenizer and, per model (driver order: base first), how its rows map into it."""
    tokenizer: Any  # transformers tokenizer written to the output
    n_tokens: int  # len(output vocab)
    rows_out: int  # n_tokens padded up to pad_to_multiple_of
    rows: list[torch.Tensor]  # per model: int64 [n_tokens], its row of each token, -1 if it lacks it
    own: list[torch.Tensor]  # per model: bool [n_tokens], the model's own row is used
    fill: torch.Tensor  # int64 [F]: tokens some model takes a default row for
    donor: torch.Tensor  # int64 [F]: model giving the default row (-1: mean or zero)
    donor_row: torch.Tensor  # int64 [F]: its row
    mean_of: torch.Tensor  # bool [models, F]: models averaged for a mean default row
    labels: list[str]

    def remap(self, name: str, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """Every model's tensor `name` with rows in the output vocabulary (dtype `dtype`)."""
        rest = tensors[0].shape[1:]
        for j, (lab, x, r) in enumerate(zip(self.labels, tensors, self.rows, strict=True)):
            if x.shape[1:] != rest:
                raise CheckpointError(f"tensor {name!r} is {list(x.shape)} in {lab} but {list(tensors[0].shape)} "
                                      f"in {self.labels[0]}: only the vocabulary dimension may differ", param=lab)
            top = int(torch.cat([r, self.donor_row[self.donor == j], torch.tensor([-1])]).max())
            if top >= x.shape[0]:
                raise CheckpointError(f"tensor {name!r} of {lab} has {x.shape[0]} rows but its tokenizer uses id "
                                      f"{top}: the checkpoint and its tokenizer do not match", param=lab)
        xs = [x.to(dtype) for x in tensors]
        defaults = torch.zeros((len(self.fill), *rest), dtype=dtype)
        for j, x in enumerate(xs):
            sel = self.donor == j
            if sel.any():
                defaults[sel] = x.index_select(0, self.donor_row[sel])
        count = self.mean_of.sum(0)
        if count.any():
            for j, x in enumerate(xs):  # summed in model order, then divided, as mergekit does
                m = self.mean_of[j]
                if m.any():
                    defaults[m] += x.index_select(0, self.rows[j][self.fill[m]])
            avg = count > 0
            defaults[avg] /= count[avg].to(dtype).view(-1, *([1] * len(rest)))
        out = []
        for j, x in enumerate(xs):
            y = torch.zeros((self.rows_out, *rest), dtype=dtype)
            own = self.own[j]
            y[: self.n_tokens][own] = x.index_select(0, self.rows[j][own])
            take = ~own[self.fill]
            y[self.fill[take]] = defaults[take]
            if self.rows_out > self.n_tokens:  # padding rows: the mean row (mergekit, after Hewitt)
                y[self.n_tokens:] = y[: self.n_tokens].mean(0)
            out.append(y)
        return out


def plan_vocab(tok_spec: TokenizerSpec, folders: Sequence[Path], labels: Sequence[str],
               model_of: dict[str, int], has_base: bool) -> VocabPlan:
    """Build the output tokenizer and every model's row map. `model_of` maps each model reference
    named in `tok_spec` to its position in `folders` (base first when there is one)."""
    sizes = []
    toks = []
    for i, (f, lab) in enumerate(zip(folders, labels, strict=True)):
        tok = _load_tokenizer(f, lab)
        size = config_vocab_size(f) or len(tok.get_vocab())
        toks.append(_stripped(tok, size, lab) if i == 0 else tok)  # mergekit strips the base's only
        sizes.append(size)
    src = tok_spec.source
    if src == "base":
        out_tok = toks[0]
    elif src == "union":
        # mergekit's union reads vocab_size or, without one, tokenizer.vocab_size (not len(vocab))
        out_tok = _union(toks[0], toks, [config_vocab_size(f) or t.vocab_size for f, t in zip(folders, toks,
                                                                                            strict=True)])
    else:
        out_tok = _load_tokenizer(folders[model_of[src]], labels[model_of[src]])
    vocab = out_tok.get_vocab()
    for t in tok_spec.tokens:
        if t not in vocab:
            out_tok.add_tokens(t)
            vocab = out_tok.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise CheckpointError(f"the output tokenizer's ids are not 0..{n - 1}: cannot lay out embedding rows",
                              param="tokenizer")
    pad = tok_spec.pad_to_multiple_of
    rows_out = -(-n // pad) * pad if pad else n
    tokens = sorted(vocab, key=vocab.__getitem__)  # token text by output id
    rows = []
    for tok, size, lab in zip(toks, sizes, labels, strict=True):
        mv = tok.get_vocab()
        r = [mv.get(t, -1) for t in tokens]
        beyond = sum(1 for i in r if i >= size)
        if beyond:
            LOG.warning("%s: %d token(s) of its tokenizer sit at ids >= vocab_size %d; treated as missing",
                        lab, beyond, size)
        rows.append(torch.tensor([i if i < size else -1 for i in r], dtype=torch.int64))
    present = torch.stack([r >= 0 for r in rows]) if rows else torch.zeros(0, n, dtype=torch.bool)
    forced = torch.zeros(n, dtype=torch.bool)
    for t, cfg in tok_spec.tokens.items():
        if cfg.force:
            forced[vocab[t]] = True
    fill_mask = forced | ~present.all(0)
    fill = fill_mask.nonzero().flatten()
    donor = torch.full((len(fill),), -1, dtype=torch.int64)
    donor_row = torch.zeros(len(fill), dtype=torch.int64)
    mean_of = torch.zeros((len(folders), len(fill)), dtype=torch.bool)
    for k, tid in enumerate(fill.tolist()):
        t = tokens[tid]
        cfg = tok_spec.tokens.get(t)
        have = present[:, tid]
        if cfg is not None and cfg.source is not None:  # the source the config names
            s = cfg.source
            if isinstance(s, ZeroSource):
                continue
            if isinstance(s, ModelTokenSource):
                j = model_of[s.model]
                if s.token is not None:
                    src_id = toks[j].get_vocab().get(s.token)
                    if src_id is None:
                        raise SpecError(f"tokenizer.tokens[{t!r}].source: {labels[j]} has no token {s.token!r}",
                                        param="tokenizer")
                else:
                    src_id = s.token_id
                if not 0 <= src_id < sizes[j]:
                    raise SpecError(f"tokenizer.tokens[{t!r}].source: token id {src_id} is outside {labels[j]}'s "
                                    f"vocabulary (0..{sizes[j] - 1})", param="tokenizer")
                donor[k], donor_row[k] = j, src_id
            else:
                j = model_of[s]
                if not have[j]:
                    raise SpecError(f"tokenizer.tokens[{t!r}].source: {labels[j]} has no token {t!r}",
                                    param="tokenizer")
                donor[k], donor_row[k] = j, rows[j][tid]
            continue
        # mergekit's rules (assign_embedding_sources): one model has it, else the base's, else the mean
        n_have = int(have.sum())
        if n_have == 0:
            LOG.warning("token %r is in no model: its embedding is zero", t)
            continue
        if n_have == 1:
            j = int(have.nonzero()[0])
            donor[k], donor_row[k] = j, rows[j][tid]
        elif has_base and have[0]:
            donor[k], donor_row[k] = 0, rows[0][tid]
        else:
            mean_of[:, k] = have
    own = [(r >= 0) & ~forced for r in rows]
    return VocabPlan(out_tok, n, rows_out, rows, own, fill, donor, donor_row, mean_of, list(labels))


def check_same_vocabulary(folders: Sequence[Path], labels: Sequence[str]) -> None:
    """Without a `tokenizer` setting rows are merged by id: refuse models whose tokenizers give the same
    token other ids (e.g. two unrelated 32000-token vocabularies), which would merge unrelated rows.
    Compares tokenizer.json's core vocabulary (added tokens aside: fine-tunes rename reserved ones);
    models without one, or with byte-identical files, are not compared."""
    import hashlib

    ref: tuple[str, bytes, bytes] | None = None  # (label, digest, file) of the first model with one
    ref_vocab: dict[str, int] | None = None
    for f, lab in zip(folders, labels, strict=True):
        p = Path(f) / "tokenizer.json"
        if not p.is_file():
            continue
        raw = p.read_bytes()
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if ref is None:
            ref = (lab, digest, raw)
            continue
        if digest == ref[1]:
            continue
        ref_vocab = ref_vocab if ref_vocab is not None else _core_vocab(ref[2])
        vocab = _core_vocab(raw)
        if ref_vocab is None or vocab is None:
            continue
        moved = [t for t, i in vocab.items() if t in ref_vocab and ref_vocab[t] != i]
        if moved:
            t = moved[0]
            raise CheckpointError(f"{lab}'s tokenizer gives {len(moved)} token(s) other ids than {ref[0]}'s (e.g. "
                                  f"{t!r}: {vocab[t]} vs {ref_vocab[t]}): merging embedding rows by id would mix "
                                  "different tokens; set `tokenizer: {source: base}` (or union) to merge them by "
                                  "token", param=lab)


def _core_vocab(raw: bytes) -> dict[str, int] | None:
    try:
        v = json.loads(raw).get("model", {}).get("vocab")
    except (ValueError, AttributeError):
        return None
    return v if isinstance(v, dict) else None  # Unigram lists and odd files: not compared


def resolve_chat_template(value: str, folders: Sequence[Path]) -> str | None:
    """mergekit `_set_chat_template`: a named template, `auto` (the template most models carry; None
    when none does) or a literal Jinja template."""
    from merge_ops.chat_templates import CHAT_TEMPLATES

    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value != "auto":
        return value
    from collections import Counter

    found = []
    for f in folders:
        try:
            t = _load_tokenizer(f, str(f)).chat_template
        except CheckpointError:
            continue
        if isinstance(t, dict):
            t = t.get("default")
        if t:
            found.append(t.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def write_tokenizer(out_dir: Path, plan: VocabPlan | None, chat_template: str | None, donor: Path) -> None:
    """Save the merged tokenizer (with a plan) or the donor's re-saved with `chat_template` set."""
    tok = plan.tokenizer if plan is not None else _load_tokenizer(donor, str(donor))
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out_dir))
