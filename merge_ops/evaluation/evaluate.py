"""Score a model folder on evaluation sets (torch + transformers).

    perplexity    mean token NLL, token-weighted over the set: Σ −log p(x_t | x_<t) / #predicted
                  tokens (every token but each row's first); ppl = exp(nll)
    exact_match   greedy decoding from the prompt, up to (answer tokens + answer_margin) new tokens,
                  cut at EOS and at the first newline (after leading whitespace; kept when the
                  answer itself spans lines), compared with the answer after stripping whitespace;
                  answer_nll = the answer's mean token NLL given the prompt (token-weighted)
    accuracy      encoder classifiers: argmax of the task head on mean-pooled tokens (the
                  convention learned merges train with: learned/adapters.EncoderClassifier)

The model is loaded with transformers from the local folder (safetensors only, never pickles, no
remote code), in eval mode, without gradients; the tokenizer from the same folder. Greedy decoding
uses an explicit generation config and the folder's generation_config.json is dropped (transformers
would fill unset fields from it), so its sampling or repetition penalty cannot change a score. Rows
are batched longest-first (less padding); sums are accumulated per row in float64 and added in file
order, so a score does not depend on the batch size beyond rounding. `max_length` is capped at the
model's max_position_embeddings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from merge_ops.calibration import has_tokenizer
from merge_ops.errors import Cancelled, CheckpointError
from merge_ops.evaluation.cache import ResultCache, lookup
from merge_ops.evaluation.declarations import EvalSetError, EvalSettings, EvaluateSpec
from merge_ops.evaluation.results import EvalResult, SetResult, normalise
from merge_ops.evaluation.rows import EvalRow, EvalSet, read_eval_set

if TYPE_CHECKING:  # merge_ops.context imports the spec: not needed to score a folder
    from merge_ops.context import Channel, ResolvedModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


@dataclass
class _Loaded:
    folder: Path
    causal: bool
    model: torch.nn.Module
    tokenizer: object | None
    vocab: int
    pad_id: int
    eos_id: int | None
    device: torch.device
    max_positions: int | None = None
    encoder: object | None = None  # learned.adapters.EncoderClassifier around the model (encoders)
    source: ResolvedModel | None = None  # a model with a LoRA adapter: its weights are read through it


def load_model(model_dir: str | Path | ResolvedModel, *, device: str | torch.device = "cpu",
               dtype: str = "float32") -> _Loaded:
    """The folder's model (a *ForCausalLM, else the bare encoder) and its tokenizer, for scoring; a
    resolved model with a LoRA adapter is its base with the adapter's tensors applied in memory."""
    from transformers import AutoModel, AutoModelForCausalLM

    from merge_ops.sources import check_weights

    source = model_dir if getattr(model_dir, "adapter", None) is not None else None
    folder = Path(getattr(model_dir, "path", model_dir))
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: evaluation needs the architecture", param=str(folder))
    check_weights(folder, str(folder))
    cfg = json.loads(cfg_path.read_text())
    causal = any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or [])
    cls = AutoModelForCausalLM if causal else AutoModel
    try:
        model = cls.from_pretrained(str(folder), dtype=_DTYPES[dtype], use_safetensors=True, local_files_only=True,
                                    trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"transformers cannot load {folder}: {e}", param=str(folder)) from None
    if source is not None:
        from merge_ops.lora.reader import apply_adapter

        apply_adapter(model, source)
    dev = torch.device(device)
    model = model.to(dev).eval()
    if causal:  # generate() fills unset fields from the folder's generation config (sampling,
        from transformers import GenerationConfig  # repetition penalties): scores must not depend on it

        model.generation_config = GenerationConfig()
    tok = None
    if has_tokenizer(folder):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    mcfg = model.config
    vocab = int(getattr(mcfg, "vocab_size", 0) or 0)
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    pad = pad if pad is not None else getattr(mcfg, "pad_token_id", None)
    eos = getattr(tok, "eos_token_id", None) if tok is not None else None
    eos = eos if eos is not None else getattr(mcfg, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    pad = pad if pad is not None else (eos if eos is not None else 0)
    positions = getattr(mcfg, "max_position_embeddings", None)
    loaded = _Loaded(folder, causal, model, tok, vocab, int(pad), eos, dev,
                     int(positions) if isinstance(positions, int) and positions > 0 else None, source=source)
    if not causal:
        from merge_ops.learned.adapters import EncoderClassifier

        loaded.encoder = EncoderClassifier(model)
    return loaded


def evaluate_model(model_dir: str | Path, sets: Mapping[str, EvalSet], *, device: str | torch.device = "cpu",
                   batch_size: int = 8, max_length: int = 512, answer_margin: int = 4, dtype: str = "float32",
                   heads: Mapping[str, str | Path | Mapping[str, torch.Tensor]] | None = None,
                   task_specific: Sequence[str] = (), model: str | None = None,
                   cache: ResultCache | None = None, channel: Channel | None = None) -> EvalResult:
    """Every set scored on the model in `model_dir`.

    `heads[set]` is the task head an accuracy set is scored with: a head name (read from
    `model_dir/heads/<name>.safetensors`, a learned merge's per-task heads), a .safetensors path, or
    tensors. Without one, `heads/<set>.safetensors` is used if present, else the model's own head:
    its checkpoint's tensors matching a `task_specific` regex (or, with none given, those the encoder
    does not use). `model` (a commit or fingerprint) names the model in the result and, with
    `cache`, keys cached per-set results: sets found there are not recomputed, and the model is
    not even loaded when all are. `channel` gets progress ("evaluate", rows done, rows) after every
    batch, and a cancel request stops the run there (Cancelled)."""
    settings = EvalSettings(max_length=max_length, answer_margin=answer_margin, dtype=dtype)
    heads = heads or {}
    # a head given as tensors or a file is not cached; one named, or the model's own, is
    named = {n: s for n, s in sets.items() if heads.get(n) is None or isinstance(heads.get(n), str)}
    own = "own:" + "|".join(task_specific)
    out, keys = lookup(cache, model, {n: s.sha256 for n, s in named.items()}, settings,
                       {n: heads.get(n) or (own if s.kind == "accuracy" else None)  # type: ignore[misc]
                        for n, s in named.items()})
    todo = {n: s for n, s in sets.items() if n not in out}
    if todo:
        m = load_model(model_dir, device=device, dtype=dtype)
        total = sum(len(s) * (2 if s.kind == "exact_match" else 1) for s in todo.values())
        ticker = _Ticker(channel, total)
        limit = min(max_length, m.max_positions or max_length)
        for name, s in todo.items():
            r = _score_set(m, name, s, batch_size=batch_size, max_length=limit, answer_margin=answer_margin,
                           head=heads.get(name), task_specific=task_specific, tick=ticker)
            out[name] = r
            if name in keys and cache is not None:
                cache.put(keys[name], r)
    return EvalResult({n: out[n] for n in sets}, model, {**settings.key(), "batch_size": batch_size})


class _Ticker:
    def __init__(self, channel: Channel | None, total: int):
        self.channel, self.total, self.done = channel, total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        report_progress(self.channel, self.done, self.total)


def report_progress(channel: Channel | None, done: int, total: int) -> None:
    """Report evaluate progress on a merge_ops.context.Channel and stop if a cancel was asked."""
    if channel is not None:
        channel.progress("evaluate", done, total)
        if channel.cancel_requested():
            raise Cancelled("cancelled on request")


def _score_set(m: _Loaded, name: str, s: EvalSet, *, batch_size: int, max_length: int, answer_margin: int,
               head: str | Path | Mapping[str, torch.Tensor] | None, task_specific: Sequence[str],
               tick: _Ticker) -> SetResult:
    if s.kind == "accuracy":
        if m.causal:
            raise EvalSetError(f"set {name!r} is scored by a task head, and {m.folder} is a causal LM: "
                               "accuracy sets are for encoder classifiers", param=name)
        return _accuracy(m, name, s, batch_size, max_length, _head(m, name, head, task_specific), tick)
    if not m.causal:
        raise EvalSetError(f"set {name!r} is a {s.kind} set, and {m.folder} is not a causal LM", param=name)
    if s.kind == "perplexity":
        ids = [_ids(m, name, r, max_length) for r in s.rows]
        sums, counts = _nll(m, [(x, 1) for x in ids], batch_size, tick)
        tokens = sum(counts)
        if tokens == 0:
            raise EvalSetError(f"set {name!r}: no row has two tokens, so there is nothing to predict", param=name)
        nll = math.fsum(sums) / tokens
        return SetResult("perplexity", {"nll": nll, "ppl": math.exp(nll)}, len(s), tokens, s.sha256)
    return _exact_match(m, name, s, batch_size, max_length, answer_margin, tick)


def _need_tokenizer(m: _Loaded, name: str) -> object:
    if m.tokenizer is None:
        raise EvalSetError(f"set {name!r} holds text, and {m.folder} has no tokenizer files: give "
                           '"input_ids" instead', param=name)
    return m.tokenizer


def _check_ids(m: _Loaded, name: str, row: EvalRow, ids: Sequence[int]) -> None:
    if m.vocab and ids and max(ids) >= m.vocab:
        raise EvalSetError(f"set {name!r} line {row.line}: token id {max(ids)} is outside the model's "
                           f"vocabulary ({m.vocab})", param=name)


def _ids(m: _Loaded, name: str, row: EvalRow, max_length: int) -> list[int]:
    if row.input_ids is not None:
        ids = list(row.input_ids[:max_length])
    else:
        tok = _need_tokenizer(m, name)
        ids = list(tok(row.text, truncation=True, max_length=max_length)["input_ids"])  # type: ignore[operator]
    _check_ids(m, name, row, ids)
    return ids


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def _pad(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(x) for x in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, x in enumerate(rows):
        sl = slice(n - len(x), n) if left else slice(0, len(x))
        ids[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


@torch.no_grad()
def _nll(m: _Loaded, rows: list[tuple[list[int], int]], batch_size: int, tick: _Ticker
         ) -> tuple[list[float], list[int]]:
    """Per row (ids, start): Σ −log p(ids[t] | ids[:t]) over t >= start (float64), and the count."""
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for chunk in _batches(order, batch_size):
        ids, mask = _pad([rows[i][0] for i in chunk], m.pad_id)
        logits = m.model(input_ids=ids.to(m.device), attention_mask=mask.to(m.device)).logits  # type: ignore[operator]
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(m.device),
                                               reduction="none").double().cpu()  # [B, T-1]: −log p(x_t+1)
        for j, i in enumerate(chunk):
            x, start = rows[i]
            lo = max(start, 1) - 1  # prediction of token t sits at position t-1
            sums[i] = float(lp[j, lo:len(x) - 1].sum())
            counts[i] = max(len(x) - max(start, 1), 0)
        tick(len(chunk))
    return sums, counts


def _answer_cut(text: str, answer: str) -> str:
    if "\n" not in answer.strip():
        text = text.lstrip().split("\n", 1)[0]
    return text.strip()


@torch.no_grad()
def _exact_match(m: _Loaded, name: str, s: EvalSet, batch_size: int, max_length: int, answer_margin: int,
                 tick: _Ticker) -> SetResult:
    from transformers import GenerationConfig

    tok = _need_tokenizer(m, name)
    prompts, answers = [], []
    for r in s.rows:
        a = list(tok(r.answer, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        if not a:
            raise EvalSetError(f"set {name!r} line {r.line}: the answer has no tokens", param=name)
        room = max_length - len(a) - answer_margin
        if room < 1:
            raise EvalSetError(f"set {name!r} line {r.line}: the answer ({len(a)} tokens) does not fit "
                               f"max_length {max_length}", param=name)
        p = list(tok(r.prompt)["input_ids"])[-room:]  # type: ignore[operator]  # keep the prompt's end
        _check_ids(m, name, r, p + a)
        prompts.append(p)
        answers.append(a)
    # the answer's NLL given the prompt (teacher forcing)
    sums, counts = _nll(m, [(p + a, len(p)) for p, a in zip(prompts, answers, strict=True)], batch_size, tick)
    # greedy continuation, left-padded batches; each row keeps its own first len(answer)+margin tokens
    correct = [False] * len(s)
    order = sorted(range(len(s)), key=lambda i: -len(prompts[i]))
    for chunk in _batches(order, batch_size):
        ids, mask = _pad([prompts[i] for i in chunk], m.pad_id, left=True)
        budget = [len(answers[i]) + answer_margin for i in chunk]
        gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max(budget), min_new_tokens=0,
                               eos_token_id=m.eos_id, pad_token_id=m.pad_id, bos_token_id=None)
        out = m.model.generate(input_ids=ids.to(m.device), attention_mask=mask.to(m.device),  # type: ignore[operator]
                               generation_config=gen)
        new = out[:, ids.shape[1]:].cpu()
        for j, i in enumerate(chunk):
            cont = new[j, :budget[j]].tolist()
            if m.eos_id is not None and m.eos_id in cont:
                cont = cont[:cont.index(m.eos_id)]
            text = tok.decode(cont, skip_special_tokens=True)  # type: ignore[attr-defined]
            correct[i] = _answer_cut(text, s.rows[i].answer or "") == (s.rows[i].answer or "").strip()
        tick(len(chunk))
    tokens = sum(counts)
    return SetResult("exact_match", {"exact_match": sum(correct) / len(s), "answer_nll": math.fsum(sums) / tokens},
                     len(s), tokens, s.sha256)


def _head(m: _Loaded, name: str, head: str | Path | Mapping[str, torch.Tensor] | None,
          task_specific: Sequence[str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if isinstance(head, Mapping):
        return dict(head)
    if isinstance(head, Path):  # programmatic callers only; a spec names a head (declarations._head_name)
        return load_file(str(head))
    folder = m.folder / "heads"
    f = folder / f"{head or name}.safetensors"
    if f.is_file():
        return load_file(str(f))
    if folder.is_dir():  # per-task heads exist (a learned merge), and not this one: never guess
        have = sorted(p.stem for p in folder.glob("*.safetensors"))
        raise EvalSetError(f"set {name!r}: {m.folder} has no task head heads/{f.name} (it has {have})",
                           param=name)
    from merge_ops.lora.reader import open_checkpoint

    pats = [re.compile(p) for p in task_specific]
    used = set(m.model.state_dict())
    with open_checkpoint(m.source or m.folder) as r:
        own = {n: r.read(n) for n in r.names()
               if (any(p.search(n) for p in pats) if pats else n not in used)}
    if not own:
        raise EvalSetError(f"set {name!r} needs a task head, and {m.folder} has neither "
                           f"heads/{name}.safetensors nor head tensors of its own", param=name)
    return own


@torch.no_grad()
def _accuracy(m: _Loaded, name: str, s: EvalSet, batch_size: int, max_length: int,
              head: dict[str, torch.Tensor], tick: _Ticker) -> SetResult:
    from merge_ops.learned.batches import collate

    dt = next(m.model.parameters()).dtype
    head = {n: t.to(device=m.device, dtype=dt) for n, t in head.items()}
    rows = [_ids(m, name, r, max_length) for r in s.rows]
    pred = [0] * len(rows)
    classes = 0
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for chunk in _batches(order, batch_size):
        batch = collate([rows[i] for i in chunk], m.pad_id).to(m.device)
        logits = m.encoder.forward({}, head, batch).logits  # type: ignore[union-attr]
        classes = logits.shape[-1]
        for j, i in enumerate(chunk):
            pred[i] = int(logits[j].argmax())
        tick(len(chunk))
    for r in s.rows:
        if r.label is not None and r.label >= classes:
            raise EvalSetError(f"set {name!r} line {r.line}: label {r.label}, but the head has {classes} classes",
                               param=name)
    acc = sum(p == r.label for p, r in zip(pred, s.rows, strict=True)) / len(s)
    return SetResult("accuracy", {"accuracy": acc}, len(s), None, s.sha256)


def load_sets(paths: Mapping[str, str | Path], spec: EvaluateSpec | None = None) -> dict[str, EvalSet]:
    """Read evaluation sets from local JSONL files (name -> path); a declared kind is checked."""
    specs = spec.set_specs() if spec is not None else {}
    return {n: read_eval_set(p, kind=specs[n].kind if n in specs else None) for n, p in paths.items()}


def run_evaluation(merged_dir: str | Path, spec: EvaluateSpec, sets: Mapping[str, EvalSet], *,
                   base: ResolvedModel | None = None, experts: Mapping[str, ResolvedModel] | None = None,
                   task_specific: Sequence[str] = (), cache: ResultCache | None = None,
                   device: str = "cpu", merged_commit: str | None = None, channel: Channel | None = None
                   ) -> tuple[EvalResult, dict[str, EvalResult]]:
    """The evaluate stage of a job: the merged model on every set and, with `spec.baselines`, the
    base (perplexity and exact-match sets) and each set's paired expert (that set only), cached per
    input commit; then the merged result is normalised. Returns (merged, {"base" | "expert:<name>":
    result}) so the caller can record the baselines too."""
    ev = _evaluator(spec)
    kw = dict(device=device, batch_size=spec.batch_size, max_length=spec.max_length,
              answer_margin=spec.answer_margin, dtype=spec.dtype)
    specs = spec.set_specs()
    experts = dict(experts or {})
    pairing = spec.pairing(list(experts))
    heads = {n: s.head or pairing.get(n) or n for n, s in specs.items()}
    merged = ev(merged_dir, sets, heads=heads, task_specific=task_specific, model=merged_commit,
                channel=channel, **kw)
    baselines: dict[str, EvalResult] = {}
    if spec.baselines:
        if base is not None:
            on = {n: s for n, s in sets.items() if s.kind != "accuracy"}  # the base has no task heads
            if on:
                baselines["base"] = ev(base if base.adapter is not None else base.path, on, model=base.commit,
                                       cache=cache, channel=channel, **kw)
        by_expert: dict[str, dict[str, EvalSet]] = {}
        for n, e in pairing.items():
            if e is not None and e in experts:
                by_expert.setdefault(e, {})[n] = sets[n]
        for e, on in by_expert.items():
            r = experts[e]
            # an expert with a LoRA adapter is scored as base + adapter (the ResolvedModel carries both)
            baselines[f"expert:{e}"] = ev(r if r.adapter is not None else r.path, on, model=r.commit, cache=cache,
                                          task_specific=task_specific,
                                          channel=channel, **kw)
        per_set = {n: baselines.get(f"expert:{e}") for n, e in pairing.items() if e is not None}
        normalise(merged, baselines.get("base"), per_set)
    return merged, baselines


def _evaluator(spec: EvaluateSpec) -> Callable[..., EvalResult]:
    if spec.evaluator == "lm_eval":
        from merge_ops.evaluation.harness import evaluate_with_lm_eval

        return evaluate_with_lm_eval
    return evaluate_model
