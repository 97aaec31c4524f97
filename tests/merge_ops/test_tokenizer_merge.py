"""Tokenizer merges (mergekit 0.1.5 semantics): output vocabulary, embedding / lm_head rows remapped by
token with mergekit's default rows for missing tokens, config vocab_size, chat templates, refusals.

Tiny Llama checkpoints get small WordLevel tokenizers whose words sit at different ids in each model;
every expected row is written out by hand from the inputs in float64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_ops.chat_templates import CHAT_TEMPLATES
from merge_ops.context import JobContext, ResolvedModel
from merge_ops.errors import CheckpointError, SpecError
from merge_ops.spec import MergeSpec, spec_from_dict
from merge_ops.static import driver
from merge_ops.tokenizer_spec import TokenizerSpec
from tests.toy_models import write_llama

pytest.importorskip("transformers")
DIMS = dict(hidden=8, layers=1, intermediate=16, heads=2, dtype=torch.float32)
VOCABS = {
    "base": ["<unk>", "a", "b", "c"],
    "e1": ["<unk>", "b", "a", "d"],  # a and b swapped, no c, adds d
    "e2": ["<unk>", "c", "a", "b", "e", "d"],  # adds e and d
}
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def write_tokenizer(folder: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>").save_pretrained(str(folder))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for seed, (name, words) in enumerate(VOCABS.items()):
        out[name] = write_llama(root / name, vocab=len(words), seed=seed, **DIMS)
        write_tokenizer(out[name], words)
    return out


def load64(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k).double() for k in h.keys()}  # noqa: SIM118


def row(models: dict[str, Path], model: str, tensor: str, word: str) -> torch.Tensor:
    return load64(models[model])[tensor][VOCABS[model].index(word)]


def run(spec: MergeSpec, out: Path) -> Path:
    base = ResolvedModel(spec.base, Path(spec.base)) if spec.base else None
    experts = [ResolvedModel(e.model, Path(e.model)) for e in spec.experts]
    driver.run(JobContext(spec=spec, base=base, experts=experts, out_dir=out))
    return out


def ta_spec(models: dict[str, Path], tokenizer: dict | None, experts=("e1", "e2"), **kw) -> MergeSpec:
    return MergeSpec(method="task_arithmetic", base=str(models["base"]), dtype="float64", out_dtype="float32",
                     experts=[{"model": str(models[e]), "name": e, "parameters": {"weight": w}}
                              for e, w in zip(experts, (0.5, 0.25), strict=False)],
                     tokenizer=tokenizer, **kw)


def ta(b: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    return b + 0.5 * (e1 - b) + 0.25 * (e2 - b)


@pytest.mark.parametrize("tensor", [EMB, HEAD])
def test_union_remaps_rows_by_token_with_mergekit_defaults(models, tmp_path, tensor) -> None:
    out = run(ta_spec(models, {"source": "union"}), tmp_path / "out")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    vocab = tok.get_vocab()
    # the base's words keep their ids; the others are added in model order (d from e1, then e)
    assert vocab == {"<unk>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 6
    got = load64(out)[tensor]
    assert got.shape == (6, 8)

    def r(m: str, w: str) -> torch.Tensor:
        return row(models, m, tensor, w)

    expected = {
        "<unk>": ta(r("base", "<unk>"), r("e1", "<unk>"), r("e2", "<unk>")),
        "a": ta(r("base", "a"), r("e1", "a"), r("e2", "a")),
        "b": ta(r("base", "b"), r("e1", "b"), r("e2", "b")),
        # e1 lacks c: the base has it, so e1 takes the base's row
        "c": ta(r("base", "c"), r("base", "c"), r("e2", "c")),
        # the base lacks d, two models have it: the base takes their mean
        "d": ta((r("e1", "d") + r("e2", "d")) / 2, r("e1", "d"), r("e2", "d")),
        # only e2 has e: everyone else takes e2's row (so the merge keeps it exactly)
        "e": r("e2", "e"),
    }
    for w, exp in expected.items():
        torch.testing.assert_close(got[vocab[w]], exp, atol=1e-6, rtol=0)
    # tensors outside the vocabulary are merged as usual
    b, e1, e2 = (load64(models[m]) for m in ("base", "e1", "e2"))
    n = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(load64(out)[n], ta(b[n], e1[n], e2[n]), atol=1e-6, rtol=0)
    assert tok("a d e")["input_ids"] == [1, 4, 5]


def test_model_source_and_padding(models, tmp_path) -> None:
    # mergekit's older spelling model:<ref> is the same as the ref; pad 6 tokens to 8 rows
    spec = ta_spec(models, {"source": f"model:{models['e2']}", "pad_to_multiple_of": 4})
    out = run(spec, tmp_path / "out")
    got = load64(out)[EMB]
    assert got.shape == (8, 8) and json.loads((out / "config.json").read_text())["vocab_size"] == 8

    def r(m: str, w: str) -> torch.Tensor:
        return row(models, m, EMB, w)

    rows = {}
    for i, w in enumerate(VOCABS["e2"]):  # e2's vocabulary, in e2's order
        base = r("base", w) if w in VOCABS["base"] else (r("e1", w) + r("e2", w)) / 2 if w == "d" else r("e2", w)
        e1 = r("e1", w) if w in VOCABS["e1"] else r("base", w) if w in VOCABS["base"] else r("e2", w)
        rows[w] = (base, e1, r("e2", w))
        torch.testing.assert_close(got[i], ta(base, e1, r("e2", w)), atol=1e-6, rtol=0)
    # padding rows: each model's mean row, then merged
    means = [torch.stack([rows[w][k] for w in VOCABS["e2"]]).mean(0) for k in range(3)]
    for i in (6, 7):
        torch.testing.assert_close(got[i], ta(*means), atol=1e-6, rtol=0)


def test_token_sources_force_zero_and_model_token(models, tmp_path) -> None:
    spec = ta_spec(models, {"source": "base", "tokens": {
        "<new>": {"source": {"kind": "zero"}},
        "b": {"source": "e1", "force": True},  # by expert name
        "c": {"source": {"kind": "model_token", "model": str(models["e1"]), "token": "d"}},
        "a": {"source": {"kind": "model_token", "model": "e2", "token_id": 4}, "force": True},
    }})
    out = run(spec, tmp_path / "out")
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert vocab == {"<unk>": 0, "a": 1, "b": 2, "c": 3, "<new>": 4}
    got = load64(out)[EMB]

    def r(m: str, w: str) -> torch.Tensor:
        return row(models, m, EMB, w)

    torch.testing.assert_close(got[vocab["<new>"]], torch.zeros(8, dtype=torch.float64), atol=0, rtol=0)
    torch.testing.assert_close(got[vocab["b"]], r("e1", "b"), atol=1e-6, rtol=0)  # forced on all: kept
    torch.testing.assert_close(got[vocab["a"]], r("e2", "e"), atol=1e-6, rtol=0)  # e2's id 4 is "e"
    # c: only e1 lacks it, and it gets e1's row of d
    torch.testing.assert_close(got[vocab["c"]], ta(r("base", "c"), r("e1", "d"), r("e2", "c")), atol=1e-6, rtol=0)


def test_without_a_base_missing_tokens_take_the_mean(models, tmp_path) -> None:
    spec = MergeSpec(method="linear", dtype="float64", out_dtype="float32", tokenizer={"source": "union"},
                     experts=[{"model": str(models[m]), "parameters": {"weight": 1.0}} for m in ("e1", "e2", "base")])
    out = run(spec, tmp_path / "out")
    got = load64(out)[EMB]

    def r(m: str, w: str) -> torch.Tensor:
        return row(models, m, EMB, w)

    # first model's words first: <unk> b a d, then c and e
    # d: e1 and e2 have it, the third model lacks it: no base, so it gets their mean
    d = (r("e1", "d") + r("e2", "d")) / 2
    torch.testing.assert_close(got[3], (r("e1", "d") + r("e2", "d") + d) / 3, atol=1e-6, rtol=0)
    c = (r("e2", "c") + r("base", "c")) / 2  # e1 lacks c: the mean of the other two
    torch.testing.assert_close(got[4], (c + r("e2", "c") + r("base", "c")) / 3, atol=1e-6, rtol=0)


def test_vocabulary_mismatch_without_a_tokenizer_is_refused_with_a_hint(models, tmp_path) -> None:
    longer = write_llama(tmp_path / "longer", vocab=5, seed=8, **DIMS)  # the base's ids, one token more
    write_tokenizer(longer, [*VOCABS["base"], "z"])
    spec = MergeSpec(method="task_arithmetic", base=str(models["base"]), experts=[{"model": str(longer)}])
    with pytest.raises(CheckpointError, match=r"\[5, 8\] in expert longer but \[4, 8\] in base: the vocabularies "
                                              r"differ; set `tokenizer: \{source: base\}`"):
        run(spec, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_tokenizer_larger_than_its_embedding_is_refused(models, tmp_path) -> None:
    bad = write_llama(tmp_path / "bad", vocab=3, seed=9, **DIMS)  # 3 rows, but its tokenizer uses id 3
    write_tokenizer(bad, VOCABS["base"])
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": 4}))
    spec = MergeSpec(method="task_arithmetic", base=str(models["base"]), tokenizer={"source": "base"},
                     experts=[{"model": str(bad)}])
    with pytest.raises(CheckpointError, match="has 3 rows but its tokenizer uses id 3"):
        run(spec, tmp_path / "out")


def test_token_source_must_have_the_token(models, tmp_path) -> None:
    spec = ta_spec(models, {"source": "union", "tokens": {"e": {"source": "e1", "force": True}}})
    with pytest.raises(SpecError, match=r"tokenizer.tokens\['e'\].source: .* has no token 'e'"):
        run(spec, tmp_path / "out")


@pytest.mark.parametrize("template", ["chatml", "{% for m in messages %}{{ m['content'] }}|{% endfor %}"])
def test_chat_template_is_written_into_the_tokenizer(models, tmp_path, template) -> None:
    from transformers import AutoTokenizer

    same = write_llama(tmp_path / "same", vocab=4, seed=5, **DIMS)  # the base's vocabulary: no tokenizer merge
    write_tokenizer(same, VOCABS["base"])
    for tokenizer in (None, {"source": "union"}):
        spec = ta_spec({**models, "same": same}, tokenizer, experts=("same",) if tokenizer is None else ("e1", "e2"),
                       chat_template=template)
        out = run(spec, tmp_path / f"out{tokenizer is None}")
        tok = AutoTokenizer.from_pretrained(str(out))
        assert tok.chat_template == CHAT_TEMPLATES.get(template, template)
        text = tok.apply_chat_template([{"role": "user", "content": "a b"}], tokenize=False)
        assert "a b" in text


CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
RENDERS = {  # each family's published format, written out by hand
    "chatml": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n"
              "a1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|><|start_header_id|>user"
              "<|end_header_id|>\n\nq1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nq2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "be brief\n\n### Instruction:\nq1\n\n### Response:\na1\n\n### Instruction:\nq2\n\n### Response:\n",
    "mistral": "<s> [INST] be brief\n\nq1 [/INST] a1</s> [INST] q2 [/INST]",
    "exaone": "[|system|]be brief[|endofturn|]\n[|user|]q1\n[|assistant|]a1[|endofturn|]\n[|user|]q2\n[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_named_chat_templates_render_their_family_format(name) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    assert set(RENDERS) == set(CHAT_TEMPLATES)
    (text,), _ = render_jinja_template(conversations=[CONV], chat_template=CHAT_TEMPLATES[name],
                                       add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert text == RENDERS[name]


def test_mistral_template_refuses_turns_out_of_order() -> None:
    from jinja2.exceptions import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    with pytest.raises(TemplateError, match="alternate"):
        render_jinja_template(conversations=[[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]],
                              chat_template=CHAT_TEMPLATES["mistral"])


# -- the spec: mergekit keys translated, bad settings refused naming the key -------------------------
MK = {"merge_method": "task_arithmetic", "base_model": "org/base", "models": [{"model": "org/e1"}]}


def test_mergekit_keys_translate() -> None:
    s = spec_from_dict({**MK, "tokenizer_source": "union", "chat_template": "llama3"})
    assert s.tokenizer is not None and s.tokenizer.source == "union" and s.chat_template == "llama3"
    s = spec_from_dict({**MK, "tokenizer": {"source": "org/e1", "tokens": {"<x>": {"source": "org/base"}},
                                            "pad_to_multiple_of": 64}})
    assert s.tokenizer.source == "org/e1" and s.tokenizer.pad_to_multiple_of == 64
    assert spec_from_dict({**MK, "tokenizer_source": "model:org/e1"}).tokenizer.source == "org/e1"


@pytest.mark.parametrize("extra,match", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "both `tokenizer_source` and `tokenizer`"),
    ({"tokenizer_source": "org/other"}, "tokenizer.source: 'org/other' is not one of the merged models"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "org/zz", "token": "a"}}}}},
     r"tokenizer.tokens\['<x>'\].source.model"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "org/e1"}}}}},
     "exactly one of `token` or `token_id`"),
    ({"tokenizer": {"tokens": {"<x>": {"source": {"model": "org/e1"}}}}},
     r"tokenizer.tokens.<x>.source: a token's source is a merged model"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"tokenizer": {"source": "union", "vocab": 3}}, "tokenizer.vocab"),
    ({"chat_template": "chatmlx"}, "chat_template"),
])
def test_bad_tokenizer_settings_are_refused_naming_the_field(extra, match) -> None:
    with pytest.raises(SpecError, match=match):
        spec_from_dict({**MK, **extra})


def test_learned_methods_refuse_tokenizer_settings() -> None:
    with pytest.raises(SpecError, match="tokenizer: method adamerging is learned"):
        spec_from_dict({"method": "adamerging", "base": "org/base", "experts": [{"model": "org/e1", "name": "t"}],
                        "calibration": {"tasks": {"t": "cal-0123456789abcdef"}}, "tokenizer": {"source": "base"}})


def test_tokenizer_source_base_without_a_base_is_the_first_models() -> None:
    # mergekit builds the tokenizer from base_model, or from the first model without one
    s = spec_from_dict({"merge_method": "linear", "models": [{"model": "org/a"}, {"model": "org/b"}],
                        "tokenizer_source": "base"})
    assert s.tokenizer is not None and s.tokenizer.source == "base" and s.base is None


def test_relative_model_refs_in_tokenizer_are_anchored_like_the_models(tmp_path) -> None:
    from merge_ops.spec import load_spec

    f = tmp_path / "merge.yaml"
    f.write_text("merge_method: task_arithmetic\nbase_model: ./m/base\nmodels: [{model: ./m/e1}]\n"
                 "tokenizer: {source: ./m/e1, tokens: {x: {source: {kind: model_token, model: ./m/base, token: y}}}}\n")
    s = load_spec(f)
    assert s.tokenizer.source == s.experts[0].model == str((tmp_path / "m" / "e1").resolve())
    assert s.tokenizer.tokens["x"].source.model == s.base


def test_same_size_vocabularies_with_other_ids_are_refused_without_a_tokenizer(models, tmp_path) -> None:
    # same row count as the base, but a and b swapped: merging rows by id would mix a with b
    swapped = write_llama(tmp_path / "swapped", vocab=4, seed=7, **DIMS)
    write_tokenizer(swapped, ["<unk>", "b", "a", "c"])
    spec = MergeSpec(method="task_arithmetic", base=str(models["base"]), experts=[{"model": str(swapped)}])
    with pytest.raises(CheckpointError, match=r"other ids than base's \(e.g. 'b': 1 vs 2\).*tokenizer: \{source: base\}"):
        run(spec, tmp_path / "out")
    # with the setting, rows are merged by token
    out = run(spec.model_copy(update={"tokenizer": TokenizerSpec(source="base")}), tmp_path / "ok")
    want = (row(models, "base", EMB, "a") + (load64(swapped)[EMB][2] - row(models, "base", EMB, "a")))
    torch.testing.assert_close(load64(out)[EMB][1], want, atol=1e-6, rtol=0)
