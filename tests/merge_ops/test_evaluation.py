"""Evaluation: metrics against hand-computed values on tiny models, rows, cache, gates, model-index."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_ops.errors import Cancelled
from merge_ops.evaluation import (
    EvalResult,
    EvalSetError,
    EvaluateSpec,
    SetResult,
    check_gates,
    model_index,
    normalise,
    parse_eval_set,
    parse_publish_if,
    validate_evaluation,
)
from merge_ops.evaluation.cache import ResultCache
from merge_ops.evaluation.evaluate import evaluate_model, run_evaluation
from merge_ops.evaluation.results import accuracy_ratio, normalised_gain
from tests.toy_models import write_llama

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3: pad, bos, eos (as toy_models' config), unk
LETTERS = "abcdefgh"
ALLOWED = LETTERS + ":\n"  # what greedy decoding may emit


def write_byte_tokenizer(folder: Path) -> object:
    """A byte-level BPE tokenizer with no merges: 4 specials + 256 byte tokens, BOS prepended.
    Decoding round-trips any text, so exact-match answers can be written as strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(SPECIALS + alphabet)}, merges=[],
                               unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast


def _restrict_lm_head(folder: Path, tok: object, allowed: str) -> None:
    """Only `allowed` characters (and nothing else) get non-zero logits, scaled up: greedy decoding
    then always emits one of them, so a prompt's continuation is readable text."""
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    ids = [tok.convert_tokens_to_ids(tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(c)[0][0])  # type: ignore[attr-defined]
           for c in allowed]
    w = torch.zeros_like(sd["lm_head.weight"])
    w[ids] = sd["lm_head.weight"][ids] * 40
    sd["lm_head.weight"] = w
    save_file(sd, str(f), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A float32 tiny Llama (vocab 260) with a byte tokenizer; greedy emits only a-h, ':' and newlines.
    Its generation_config.json asks for sampling: evaluation must ignore it."""
    d = tmp_path_factory.mktemp("llama") / "model"
    write_llama(d, hidden=32, layers=2, intermediate=64, vocab=len(SPECIALS) + 256, heads=2, seed=5,
                dtype=torch.float32)
    tok = write_byte_tokenizer(d)
    _restrict_lm_head(d, tok, ALLOWED)
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 5.0, "top_k": 0,
         "repetition_penalty": 3.0}))
    return d, tok


@pytest.fixture(scope="module")
def ref_model(llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(llama[0]), dtype=torch.float64).eval()


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """float64 log-softmax of the model's logits for one unpadded row: [T, V]."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(_logprobs(model, out)[-1].argmax()))
    return out[len(ids):]


class Channel:
    """merge_ops.context.Channel: progress calls recorded, a cancel after `cancel_after` calls."""

    def __init__(self, cancel_after: int | None = None):
        self.calls: list[tuple] = []
        self.cancel_after = cancel_after

    def progress(self, stage: str, step: int, total: int | None, loss: float | None = None) -> None:
        self.calls.append((stage, step, total))

    def cancel_requested(self) -> bool:
        return self.cancel_after is not None and len(self.calls) >= self.cancel_after


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ---- perplexity ------------------------------------------------------------------------------

def test_perplexity_is_token_weighted_mean_nll_computed_by_hand(llama, ref_model):
    folder, tok = llama
    texts = ["the cat sat on the mat", "hi", "a much longer line of text, with punctuation; and more words here"]
    rows = [{"text": t} for t in texts] + [{"input_ids": [1, 70, 71, 72, 73, 74, 75]}, {"input_ids": [5]}]
    s = parse_eval_set(_jsonl(rows), source="ppl.jsonl")
    max_length = 40  # cuts the third text
    seqs = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]  # type: ignore[operator]
    seqs += [[1, 70, 71, 72, 73, 74, 75], [5]]
    assert len(seqs[2]) == max_length and len(tok(texts[2])["input_ids"]) > max_length  # type: ignore[operator]
    sums, counts = [], []
    for ids in seqs:
        lp = _logprobs(ref_model, ids)
        sums.append(-sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids))))
        counts.append(len(ids) - 1)
    want = sum(sums) / sum(counts)
    by_row = sum(x / c for x, c in zip(sums, counts, strict=True) if c) / sum(1 for c in counts if c)
    assert abs(want - by_row) > 1e-3  # token weighting is what is being checked
    for bs in (1, 2, 8):  # padded batches of mixed lengths give the same numbers
        r = evaluate_model(folder, {"ppl": s}, batch_size=bs, max_length=max_length).sets["ppl"]
        assert r.kind == "perplexity" and r.rows == 5 and r.tokens == sum(counts)
        assert r.metrics["nll"] == pytest.approx(want, rel=1e-5)
        assert r.metrics["ppl"] == pytest.approx(math.exp(want), rel=1e-5)


# ---- exact match -----------------------------------------------------------------------------

def _find_prompts(model, tok, n: int) -> list[tuple[str, str]]:
    """Prompts whose greedy continuation is 2-4 characters then a newline, with that answer."""
    found = []
    for i in range(400):
        prompt = "".join(LETTERS[(i * 7 + j * 3 + i // 5) % 8] for j in range(3 + i % 6)) + "?"
        cont = tok.decode(_greedy(model, tok(prompt)["input_ids"], 6))
        head, nl, _ = cont.partition("\n")
        if nl and 2 <= len(head) <= 4:
            found.append((prompt, head))
            if len(found) == n:
                return found
    raise AssertionError("no prompt with a short greedy answer")


def test_exact_match_greedy_answers_and_answer_nll_by_hand(llama, ref_model):
    folder, tok = llama
    (p1, a1), (p2, a2), (p3, a3) = _find_prompts(ref_model, tok, 3)
    wrong = a2[:-1] + ("a" if a2[-1] != "a" else "b")
    rows = [{"prompt": p1, "answer": a1},            # the greedy answer, then a newline: correct
            {"prompt": p2, "answer": wrong},         # one letter off: wrong
            {"prompt": p3, "answer": "  " + a3 + " "},  # surrounding whitespace is stripped: correct
            {"prompt": p1, "answer": a1[:-1]}]       # a prefix of the greedy answer: wrong
    s = parse_eval_set(_jsonl(rows), source="qa.jsonl")
    assert s.kind == "exact_match"
    nll, count = 0.0, 0
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"]
        lp = _logprobs(ref_model, p + a)
        nll -= sum(float(lp[len(p) + k - 1, t]) for k, t in enumerate(a))
        count += len(a)
    for bs in (1, 3):  # left-padded batches of different prompt lengths decode the same
        r = evaluate_model(folder, {"qa": s}, batch_size=bs, answer_margin=3).sets["qa"]
        assert r.metrics["exact_match"] == pytest.approx(0.5)
        assert r.metrics["answer_nll"] == pytest.approx(nll / count, rel=1e-5) and r.tokens == count
    # with no margin, decoding stops at the answer's length: the prefix answer now matches too
    r0 = evaluate_model(folder, {"qa": s}, answer_margin=0).sets["qa"]
    assert r0.metrics["exact_match"] == pytest.approx(0.75)


def test_text_sets_need_a_tokenizer_and_kinds_fit_the_model(llama, tmp_path):
    folder, _ = llama
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(folder / f, bare / f)
    s = parse_eval_set('{"text": "abc"}\n', source="t.jsonl")
    with pytest.raises(EvalSetError, match="no tokenizer files"):
        evaluate_model(bare, {"t": s})
    ok = evaluate_model(bare, {"t": parse_eval_set('{"input_ids": [1, 5, 6]}\n')}).sets["t"]
    assert ok.tokens == 2
    with pytest.raises(EvalSetError, match=r"line 2: token id 999 is outside"):
        evaluate_model(bare, {"t": parse_eval_set('{"input_ids": [1, 5]}\n{"input_ids": [999, 5]}\n')})
    with pytest.raises(EvalSetError, match="accuracy sets are for encoder classifiers"):
        evaluate_model(folder, {"c": parse_eval_set('{"text": "abc", "label": 1}\n')})
    (bare / "model.safetensors").unlink()
    (bare / "pytorch_model.bin").write_bytes(b"not loaded")
    from merge_ops.errors import CheckpointError

    with pytest.raises(CheckpointError, match="pickled"):
        evaluate_model(bare, {"t": s})


def test_progress_and_cancel_between_batches(llama):
    folder, _ = llama
    s = parse_eval_set(_jsonl([{"input_ids": [1, 5 + i, 6, 7]} for i in range(5)]))
    ch = Channel()
    evaluate_model(folder, {"t": s}, batch_size=2, channel=ch)
    assert ch.calls == [("evaluate", 2, 5), ("evaluate", 4, 5), ("evaluate", 5, 5)]
    ch = Channel(cancel_after=2)
    with pytest.raises(Cancelled):
        evaluate_model(folder, {"t": s}, batch_size=2, channel=ch)
    assert ch.calls == [("evaluate", 2, 5), ("evaluate", 4, 5)]  # stopped after the second batch


# ---- classifier accuracy ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):
    from tests.merge_ops.test_learned_engine import write_bert_family

    return write_bert_family(tmp_path_factory.mktemp("bert"))


def _bert_predictions(folder: Path, head_w: torch.Tensor, head_b: torch.Tensor, rows: list[list[int]]) -> list[int]:
    """Mean-pooled last hidden state of each unpadded row through the head, in float64."""
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(folder), dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for ids in rows:
            h = m(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
            out.append(int((h @ head_w.double().T + head_b.double()).argmax()))
    return out


def test_classifier_accuracy_with_own_head_and_with_saved_heads(bert, tmp_path):
    base, experts = bert
    rows = [[(5 * j + 3 * k) % 97 + 2 for k in range(3 + j % 6)] for j in range(12)]
    sd = load_file(str(experts["b"] / "model.safetensors"))
    pred = _bert_predictions(experts["b"], sd["classifier.weight"], sd["classifier.bias"], rows)
    labels = [p if j % 3 else (p + 1) % 3 for j, p in enumerate(pred)]  # every third row wrong
    s = parse_eval_set(_jsonl([{"input_ids": r, "label": y} for r, y in zip(rows, labels, strict=True)]))
    assert s.kind == "accuracy"
    own = evaluate_model(experts["b"], {"b": s}, batch_size=5, task_specific=[r"^classifier\."]).sets["b"]
    assert own.metrics == {"accuracy": pytest.approx(8 / 12)}
    # the expert's own head without patterns: the tensors the encoder does not use
    assert evaluate_model(experts["b"], {"b": s}).sets["b"].metrics["accuracy"] == pytest.approx(8 / 12)
    # a learned merge's layout: the encoder plus heads/<task>.safetensors
    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(base / "config.json", merged / "config.json")
    save_file({k: v for k, v in sd.items() if not k.startswith("classifier")}, str(merged / "model.safetensors"))
    (merged / "heads").mkdir()
    save_file({"classifier.weight": sd["classifier.weight"], "classifier.bias": sd["classifier.bias"]},
              str(merged / "heads" / "b.safetensors"))
    got = evaluate_model(merged, {"sst": s}, heads={"sst": "b"}).sets["sst"]
    assert got.metrics["accuracy"] == pytest.approx(8 / 12)
    with pytest.raises(EvalSetError, match=r"no task head heads/c.safetensors \(it has \['b'\]\)"):
        evaluate_model(merged, {"sst": s}, heads={"sst": "c"})
    too_big = parse_eval_set(_jsonl([{"input_ids": [3, 4], "label": 1}, {"input_ids": [3, 5], "label": 3}]))
    with pytest.raises(EvalSetError, match="line 2: label 3, but the head has 3 classes"):
        evaluate_model(experts["b"], {"b": too_big})
    with pytest.raises(EvalSetError, match="not a causal LM"):
        evaluate_model(base, {"p": parse_eval_set('{"input_ids": [2, 3, 4]}\n')})


# ---- evaluation sets -------------------------------------------------------------------------

def test_rows_parse_with_errors_naming_the_line():
    s = parse_eval_set(b'{"text": "a", "id": 7}\n\n{"input_ids": [1, 2]}\n', source="x.jsonl")
    assert s.kind == "perplexity" and [r.line for r in s.rows] == [1, 3]
    same = parse_eval_set('{"text":"a"}\n{"input_ids":[1,2],"source":"y"}\n', source="y.jsonl")
    assert same.sha256 == s.sha256  # formatting and ignored keys do not change the set's identity
    assert parse_eval_set('{"text": "b"}\n{"input_ids": [1, 2]}\n').sha256 != s.sha256
    assert parse_eval_set('{"text": "a"}\n{"input_ids": [1, 2]}\n', kind="perplexity").sha256 == s.sha256
    labelled = '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'
    assert parse_eval_set(labelled).kind == "accuracy"
    assert parse_eval_set(labelled, kind="perplexity").kind == "perplexity"  # labels ignored there
    bad = {
        '{"text": "a"}\n{"text": "b"\n': r"x.jsonl:2: not valid JSON",
        '[1, 2]\n': r"x.jsonl:1: each line must be a JSON object",
        '{"foo": 1}\n': r'x.jsonl:1: a line needs "text" or "input_ids"',
        '{"text": "a"}\n{"prompt": "q", "answer": "a"}\n': r"x.jsonl:2: a exact_match row, but line 1 made "
                                                           r"the set perplexity",
        '{"prompt": "q"}\n': r'x.jsonl:1: "answer" must be a non-empty string',
        '{"prompt": "q", "answer": "  "}\n': r'x.jsonl:1: "answer" must be a non-empty string',
        '{"text": "a", "label": -1}\n': r'x.jsonl:1: "label" must be a class index',
        '{"text": "a", "label": true}\n': r'x.jsonl:1: "label" must be a class index',
        '{"input_ids": [1, "2"], "label": 0}\n': r"x.jsonl:1: input_ids must be a non-empty list",
        '{"text": " "}\n': r"x.jsonl:1: text must be a non-empty string",
        '\n\n': r"x.jsonl has no rows",
    }
    for text, msg in bad.items():
        with pytest.raises(EvalSetError, match=msg):
            parse_eval_set(text, source="x.jsonl")
    with pytest.raises(EvalSetError, match=r"x.jsonl:1: a perplexity row, but the set is declared exact_match"):
        parse_eval_set('{"text": "a"}\n', source="x.jsonl", kind="exact_match")
    with pytest.raises(EvalSetError, match="more than 2 rows"):
        parse_eval_set('{"text": "a"}\n' * 3, source="x.jsonl", max_rows=2)
    with pytest.raises(EvalSetError, match=r"^line 2: text must be"):  # an upload: no file name
        parse_eval_set(b'{"text": "a"}\n{"text": 3}\n')
    assert EvalSetError("x").code == "invalid_evaluation_set"


# ---- cache and the evaluate stage ------------------------------------------------------------

def test_cache_skips_loading_and_is_keyed_on_settings(llama, tmp_path):
    folder, _ = llama
    s = parse_eval_set('{"input_ids": [1, 5, 6, 7]}\n{"input_ids": [1, 8, 9]}\n')
    cache = ResultCache(tmp_path / "cache")
    first = evaluate_model(folder, {"t": s}, model="sha-1", cache=cache)
    # all sets cached: the model is not loaded (the folder need not even exist)
    again = evaluate_model(tmp_path / "gone", {"t": s}, model="sha-1", cache=cache)
    assert again.sets["t"].to_dict() == first.sets["t"].to_dict()
    for kw in ({"model": "sha-2"}, {"model": "sha-1", "max_length": 3}, {"model": "sha-1", "dtype": "float64"}):
        with pytest.raises(Exception, match="gone"):
            evaluate_model(tmp_path / "gone", {"t": s}, cache=cache, **kw)
    # without a commit nothing is cached
    evaluate_model(folder, {"u": s}, cache=cache)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1


def test_run_evaluation_normalises_against_cached_base_and_experts(tiny_llama, tmp_path):
    from merge_ops.context import ResolvedModel

    base, experts = tiny_llama(2, hidden=32, layers=1, intermediate=64, vocab=64, heads=2, scale=0.2)
    rows = {n: _jsonl([{"input_ids": [(i * 5 + j * (k + 2)) % 63 + 1 for j in range(6)]} for i in range(4)])
            for k, n in enumerate(["e0", "e1"])}
    sets = {n: parse_eval_set(t, source=n) for n, t in rows.items()}
    spec = EvaluateSpec(sets={"e0": "x", "e1": "y"})
    cache = ResultCache(tmp_path / "cache")
    res = {"e0": ResolvedModel("e0", experts[0], commit="c-e0"), "e1": ResolvedModel("e1", experts[1], commit="c-e1")}
    b = ResolvedModel("base", base, commit="c-base")
    # the "merged" model is expert 0 itself: its normalised gain on e0 is exactly 1
    merged, baselines = run_evaluation(experts[0], spec, sets, base=b, experts=res, cache=cache)
    assert set(baselines) == {"base", "expert:e0", "expert:e1"}
    assert set(baselines["expert:e0"].sets) == {"e0"}  # each expert only on its own set
    assert merged.normalised["e0"]["normalised_gain"] == pytest.approx(1.0)
    nb, nm, ne = (r.sets["e1"].metrics["nll"] for r in (baselines["base"], merged, baselines["expert:e1"]))
    assert merged.normalised["e1"]["normalised_gain"] == pytest.approx((nb - nm) / (nb - ne))
    assert merged.aggregate["mean_normalised_gain"] == pytest.approx((1 + (nb - nm) / (nb - ne)) / 2)
    assert merged.aggregate["mean_accuracy_ratio"] is None
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 4  # base × 2 sets, each expert × 1
    again, _ = run_evaluation(experts[0], spec, sets, base=b, experts=res, cache=cache)
    assert again.to_dict() == merged.to_dict()
    # round trip through JSON (alloy_merge.json, the job record, a published revision's results)
    assert EvalResult.from_dict(json.loads(json.dumps(merged.to_dict()))).to_dict() == merged.to_dict()


# ---- normalisation and gates ------------------------------------------------------------------

def _result(values: dict[str, dict[str, float]], kinds: dict[str, str] | None = None) -> EvalResult:
    kinds = kinds or {}
    return EvalResult({n: SetResult(kinds.get(n, "perplexity"), m, 10) for n, m in values.items()})


def test_normalised_gain_and_accuracy_ratio_by_hand():
    assert normalised_gain(3.0, 2.5, 2.0) == pytest.approx(0.5)
    assert normalised_gain(3.0, 3.2, 2.0) == pytest.approx(-0.2)
    assert normalised_gain(3.0, 2.0, 3.0) is None
    assert accuracy_ratio(0.6, 0.8) == pytest.approx(0.75) and accuracy_ratio(0.5, 0.0) is None
    kinds = {"code": "perplexity", "math": "perplexity", "qa": "exact_match", "cls": "accuracy"}
    merged = _result({"code": {"nll": 2.5}, "math": {"nll": 2.2}, "qa": {"exact_match": 0.3},
                      "cls": {"accuracy": 0.9}}, kinds)
    base = _result({"code": {"nll": 3.0}, "math": {"nll": 2.4}, "qa": {"exact_match": 0.1}}, kinds)
    e_code = _result({"code": {"nll": 2.0}}, kinds)
    e_math = _result({"math": {"nll": 2.0}, "qa": {"exact_match": 0.6}}, kinds)
    e_cls = _result({"cls": {"accuracy": 0.95}}, kinds)
    normalise(merged, base, {"code": e_code, "math": e_math, "qa": e_math, "cls": e_cls})
    assert merged.normalised == {"code": {"normalised_gain": pytest.approx(0.5)},
                                 "math": {"normalised_gain": pytest.approx(0.5)},
                                 "qa": {"accuracy_ratio": pytest.approx(0.5)},
                                 "cls": {"accuracy_ratio": pytest.approx(0.9 / 0.95)}}
    assert merged.aggregate["mean_normalised_gain"] == pytest.approx(0.5)
    assert merged.aggregate["mean_accuracy_ratio"] == pytest.approx((0.5 + 0.9 / 0.95) / 2)
    assert merged.value("qa", "accuracy_ratio") == pytest.approx(0.5) and merged.value("nope", "nll") is None
    table = merged.table()
    assert "| code " in table and "normalised_gain 0.5 " in table and "mean_accuracy_ratio" in table
    # no base: no gain; an unpaired set: nothing
    m2 = normalise(_result({"code": {"nll": 2.5}}), None, {"code": e_code})
    assert m2.normalised == {} and m2.aggregate["mean_normalised_gain"] is None


def test_threshold_gates_pass_fail_and_unmeasured():
    merged = _result({"code": {"nll": 2.5, "ppl": math.exp(2.5)}, "qa": {"exact_match": 0.4}},
                     {"qa": "exact_match"})
    merged.aggregate = {"mean_normalised_gain": 0.55}
    ok = check_gates(merged, [{"set": "code", "metric": "ppl", "max": 13.0},
                              {"set": "qa", "metric": "exact_match", "min": 0.4},
                              {"metric": "mean_normalised_gain", "min": 0.5, "max": 1.5}])
    assert ok.passed and not ok.failed
    bad = check_gates(merged, [{"set": "code", "metric": "ppl", "max": 12.0},
                               {"set": "qa", "metric": "exact_match", "min": 0.4},
                               {"set": "code", "metric": "normalised_gain", "min": 0.1}])
    assert not bad.passed
    assert [(c.set, c.metric, c.passed, c.note) for c in bad.checks] == [
        ("code", "ppl", False, ""), ("qa", "exact_match", True, ""), ("code", "normalised_gain", False,
                                                                          "not measured")]
    table = bad.table()
    assert "| code.ppl <= 12" in table and "FAIL (not measured)" in table and "12.1825" in table
    assert bad.to_dict()["passed"] is False and bad.to_dict()["table"] == table


def test_not_worse_than_published_with_tolerance():
    merged = _result({"code": {"nll": 2.55}, "qa": {"exact_match": 0.38}}, {"qa": "exact_match"})
    published = _result({"code": {"nll": 2.50}, "qa": {"exact_match": 0.40}}, {"qa": "exact_match"}).to_dict()

    def gate(metric: str, set_name: str, **kw) -> bool:
        rule = {"not_worse_than_published": {"set": set_name, "metric": metric, **kw}}
        return check_gates(merged, [rule], published).passed

    # lower is better for nll: 2.55 is 0.05 worse than 2.50
    assert not gate("nll", "code") and not gate("nll", "code", tolerance=0.04)
    assert gate("nll", "code", tolerance=0.06)
    assert gate("nll", "code", tolerance=0.021, relative=True) and not gate("nll", "code", tolerance=0.019,
                                                                             relative=True)
    # higher is better for exact match: 0.38 is 0.02 worse than 0.40
    assert not gate("exact_match", "qa", tolerance=0.01) and gate("exact_match", "qa", tolerance=0.03)
    rule = [{"not_worse_than_published": {"set": "code", "metric": "nll"}}]
    first = check_gates(merged, rule, None)
    assert first.passed and first.checks[0].note == "nothing published yet"
    old = check_gates(merged, rule, {"sets": {}})
    assert old.passed and old.checks[0].note == "published revision has no value"
    unmeasured = check_gates(merged, [{"not_worse_than_published": {"set": "math", "metric": "nll"}}],
                             published)
    assert not unmeasured.passed
    r = check_gates(merged, [{"not_worse_than_published": {"set": "code", "metric": "nll", "tolerance": 0.01}}],
                    published).checks[0]
    assert (r.value, r.published, r.bound) == (2.55, 2.5, "<= 2.51")


def test_spec_declarations_are_checked_without_torch():
    import subprocess
    import sys

    code = ("import sys; from merge_ops.evaluation import EvaluateSpec, parse_publish_if, validate_evaluation\n"
            "e = EvaluateSpec(sets={'code': './c.jsonl', 'qa': {'set': 'es_1', 'kind': 'exact_match'}})\n"
            "validate_evaluation(e, parse_publish_if([{'set': 'qa', 'metric': 'exact_match', 'min': 0.1}]), "
            "['code'])\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    ev = EvaluateSpec(sets={"code": "./c.jsonl", "qa": {"set": "es_1", "kind": "exact_match", "expert": "math"},
                            "cls": {"set": "./cls.jsonl", "kind": "accuracy"}})
    assert ev.pairing(["code", "math"]) == {"code": "code", "qa": "math", "cls": None}
    good = [{"set": "code", "metric": "normalised_gain", "min": 0.2}, {"metric": "mean_accuracy_ratio", "min": 0.5},
            {"not_worse_than_published": {"set": "qa", "metric": "exact_match", "tolerance": 0.02}}]
    validate_evaluation(ev, parse_publish_if(good), ["code", "math"])
    bad_rules = {
        "publish_if[0]: unknown metric 'bleu'": [{"set": "code", "metric": "bleu", "min": 1}],
        "needs `min` and/or `max`": [{"set": "code", "metric": "nll"}],
        "min 2.0 is above max 1.0": [{"set": "code", "metric": "nll", "min": 2, "max": 1}],
        "is a mean over all sets: drop `set`": [{"set": "code", "metric": "mean_normalised_gain", "min": 0}],
        "is per set: add `set`": [{"metric": "nll", "max": 3}],
        "move set/metric inside it": [{"set": "code", "not_worse_than_published": {"set": "code", "metric": "nll"}}],
        "tolerance": [{"not_worse_than_published": {"set": "code", "metric": "nll", "tolerance": -1}}],
        "Extra inputs": [{"set": "code", "metric": "nll", "max": 3, "maximum": 4}],
    }
    for msg, rules in bad_rules.items():
        with pytest.raises(ValueError, match=re.escape(msg)):
            parse_publish_if(rules)
    cross = {
        "no evaluation set 'nope'": [{"set": "nope", "metric": "nll", "max": 3}],
        "a exact_match set scored by the alloy evaluator reports exact_match, answer_nll, accuracy_ratio, "
        "not 'nll'": [{"set": "qa", "metric": "nll", "max": 3}],
        "accuracy_ratio of 'cls' needs its expert": [{"set": "cls", "metric": "accuracy_ratio", "min": 0.1}],
    }
    for msg, rules in cross.items():
        with pytest.raises(ValueError, match=re.escape(msg)):
            validate_evaluation(ev, parse_publish_if(rules), ["code", "math"])
    with pytest.raises(ValueError, match="add `evaluate:`"):
        validate_evaluation(None, parse_publish_if(good[:1]), ["code"])
    with pytest.raises(ValueError, match="evaluate.baselines: true"):
        validate_evaluation(EvaluateSpec(sets={"code": "x"}, baselines=False), parse_publish_if(good[:1]), ["code"])
    with pytest.raises(ValueError, match="this merge has none"):
        validate_evaluation(ev, parse_publish_if(good[:1]), ["code", "math"], has_base=False)
    with pytest.raises(ValueError, match="'ghost' is not an expert"):
        validate_evaluation(EvaluateSpec(sets={"x": {"set": "y", "expert": "ghost"}}), None, ["code"])
    with pytest.raises(ValueError, match="lm_eval evaluator cannot score accuracy sets"):
        validate_evaluation(EvaluateSpec(sets={"c": {"set": "y", "kind": "accuracy"}}, evaluator="lm_eval"), None, [])
    with pytest.raises(ValueError, match="lm_eval evaluator reports .*bits_per_byte.*, not .nll."):
        validate_evaluation(EvaluateSpec(sets={"code": "y"}, evaluator="lm_eval"),
                            parse_publish_if([{"set": "code", "metric": "nll", "max": 3}]), ["code"])
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="evaluation set name"):
        EvaluateSpec(sets={"bad name": "x"})
    # a head is a name under the merged model's heads/, never a file the worker would open anywhere
    assert EvaluateSpec(sets={"c": {"set": "x", "head": "sst2.v2"}}).sets["c"].head == "sst2.v2"
    for head in ("/etc/secret.safetensors", "../other/heads/x", "x.safetensors", ".hidden", "a/b"):
        with pytest.raises(ValidationError, match="must be the name of a task head"):
            EvaluateSpec(sets={"c": {"set": "x", "head": head}})


# ---- model-index ------------------------------------------------------------------------------

def test_model_index_parses_with_huggingface_hub_model_card():
    from huggingface_hub import ModelCard

    merged = _result({"code": {"nll": 2.5, "ppl": math.exp(2.5)}, "qa": {"exact_match": 0.4, "answer_nll": 1.25},
                      "sst2": {"accuracy": 0.875}}, {"qa": "exact_match", "sst2": "accuracy"})
    merged.normalised = {"code": {"normalised_gain": 0.5}, "sst2": {"accuracy_ratio": None}}
    meta = {"license": "apache-2.0", "tags": ["merge"],
            "model-index": model_index(merged, "team/merged", dataset_types={"qa": "es_42"},
                                       source={"name": "Alloy job j1", "url": "https://alloy.example/v1/jobs/j1"})}
    card = ModelCard("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n# merged\n")
    assert card.data.model_name == "team/merged"
    got = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    assert set(got) == {("code", "nll"), ("code", "perplexity"), ("code", "normalised_gain"),
                        ("qa", "exact_match"), ("qa", "answer_nll"), ("sst2", "accuracy")}
    assert got[("code", "perplexity")].metric_value == pytest.approx(math.exp(2.5), rel=1e-6)
    assert got[("code", "perplexity")].task_type == "text-generation"
    assert got[("sst2", "accuracy")].task_type == "text-classification"
    assert got[("sst2", "accuracy")].metric_value == 0.875 and got[("sst2", "accuracy")].metric_name == "Accuracy"
    assert got[("qa", "exact_match")].dataset_type == "es_42" and got[("code", "nll")].dataset_type == "code"
    assert got[("code", "nll")].source_url == "https://alloy.example/v1/jobs/j1"
    assert model_index(EvalResult({}), "x") == []
    bare = ModelCard("---\n" + yaml.safe_dump({"model-index": model_index(merged, "m")}) + "---\n")
    assert len(bare.data.eval_results) == 6 and bare.data.eval_results[0].source_name is None


# ---- lm-eval (optional extra) -----------------------------------------------------------------

def test_lm_eval_evaluator_against_hand_computed_values(llama, ref_model):
    pytest.importorskip("lm_eval")
    from merge_ops.evaluation.harness import evaluate_with_lm_eval

    folder, tok = llama
    texts = ["the cat sat on the mat", "hello there, general kenobi"]
    ppl = parse_eval_set(_jsonl([{"text": t} for t in texts]))
    (p1, a1), (p2, a2) = _find_prompts(ref_model, tok, 2)
    qa = parse_eval_set(_jsonl([{"prompt": p1, "answer": a1}, {"prompt": p2, "answer": a2 + "x"}]))
    theirs = evaluate_with_lm_eval(folder, {"p": ppl, "q": qa}, batch_size=2, answer_margin=3)
    assert theirs.evaluator == "lm_eval" and theirs.settings["evaluator"] == "lm_eval"
    # lm-eval's rolling loglikelihood: every token of tok(text) (which starts with the tokenizer's own
    # BOS) predicted after its prefix token (BOS); bits per byte = total NLL / (UTF-8 bytes · ln 2)
    total = 0.0
    for t in texts:
        ids = [1, *tok(t)["input_ids"]]
        lp = _logprobs(ref_model, ids)
        total -= sum(float(lp[k - 1, ids[k]]) for k in range(1, len(ids)))
    n_bytes = sum(len(t.encode()) for t in texts)
    assert theirs.sets["p"].metrics["bits_per_byte"] == pytest.approx(total / (n_bytes * math.log(2)), rel=1e-5)
    assert theirs.sets["p"].metrics["byte_perplexity"] == pytest.approx(math.exp(total / n_bytes), rel=1e-5)
    # greedy until a newline, whitespace stripped: the same verdicts as Alloy's evaluator
    ours = evaluate_model(folder, {"q": qa}, answer_margin=3).sets["q"]
    assert theirs.sets["q"].metrics == {"exact_match": 0.5} and ours.metrics["exact_match"] == 0.5
    with pytest.raises(EvalSetError, match="cannot score accuracy"):
        evaluate_with_lm_eval(folder, {"c": parse_eval_set('{"text": "a", "label": 0}\n')})
    with pytest.raises(EvalSetError, match="line 1: lm-eval reads text"):
        evaluate_with_lm_eval(folder, {"c": parse_eval_set('{"input_ids": [1, 2]}\n')})
