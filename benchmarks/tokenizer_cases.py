"""Tokenizer configs, Alloy vs mergekit (`static_vs_mergekit.py --tokenizers`).

Three small Llama checkpoints with different WordLevel vocabularies (shared words at other ids, words
only some models have) go through mergekit-yaml and Alloy with each tokenizer config. The outputs
are compared token by token (rows looked up by token text, since mergekit orders a union's added
tokens by hash order, which changes from run to run), plus padding rows, every other tensor, the
vocabulary, config vocab_size and the chat template.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

DIMS = dict(hidden=64, layers=2, intermediate=128, heads=4)
N_WORDS = 300


def _vocabs() -> dict[str, list[str]]:
    rnd = random.Random(0)
    words = [f"w{i}" for i in range(N_WORDS + 60)]
    base = ["<unk>", *words[:N_WORDS]]
    e1 = ["<unk>", *rnd.sample(words[10:N_WORDS], N_WORDS - 10), *words[N_WORDS:N_WORDS + 30]]
    e2 = ["<unk>", *rnd.sample(words[:N_WORDS - 20], N_WORDS - 20), *words[N_WORDS + 20:N_WORDS + 60]]
    return {"base": base, "e1": e1, "e2": e2}


def build(folder: Path) -> dict[str, Path]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.toy_models import write_llama

    out = {}
    stamp = folder / "READY"
    for seed, (name, words) in enumerate(_vocabs().items()):
        out[name] = folder / name
        if stamp.is_file():
            continue
        write_llama(out[name], vocab=len(words), seed=seed, dtype=torch.bfloat16, **DIMS)
        t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>").save_pretrained(str(out[name]))
    stamp.write_text("ok")
    return out


def configs(m: dict[str, Path]) -> dict[str, dict]:
    b, e1, e2 = (str(m[k]) for k in ("base", "e1", "e2"))
    ta = {"merge_method": "task_arithmetic", "base_model": b,
          "models": [{"model": e1, "parameters": {"weight": 0.5}}, {"model": e2, "parameters": {"weight": 0.3}}]}
    common = {"dtype": "float32", "out_dtype": "float32"}
    return {
        "union_task_arithmetic": ta | {"tokenizer_source": "union"} | common,
        "union_slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": e2}],
                        "parameters": {"t": 0.3}, "tokenizer_source": "union"} | common,
        "model_source_padded": ta | {"tokenizer": {"source": e2, "pad_to_multiple_of": 64}} | common,
        # union, not base: mergekit 0.1.5 fails (KeyError in PermutedVocabulary) when `source: base` adds tokens
        "union_tokens_chatml": ta | {"tokenizer": {"source": "union", "tokens": {
            "w15": {"source": e1, "force": True},
            "w3": {"source": {"kind": "model_token", "model": e2, "token": "w330"}},
            "<|im_start|>": {"source": {"kind": "zero"}},
            "w335": {"source": e2}}}, "chat_template": "chatml"} | common,
        "union_linear_no_base": {"merge_method": "linear", "models": [
            {"model": e1, "parameters": {"weight": 1.0}}, {"model": e2, "parameters": {"weight": 1.0}},
            {"model": b, "parameters": {"weight": 1.0}}], "tokenizer_source": "union"} | common,
    }


def compare(alloy: Path, mk: Path) -> dict:
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    def load(p: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(p.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out |= {k: h.get_tensor(k).double() for k in h.keys()}  # noqa: SIM118
        return out

    ta, tm = AutoTokenizer.from_pretrained(str(alloy)), AutoTokenizer.from_pretrained(str(mk))
    va, vm = ta.get_vocab(), tm.get_vocab()
    xa, xm = load(alloy), load(mk)
    if set(xa) != set(xm):
        raise SystemExit(f"tensor names differ: {sorted(set(xa) ^ set(xm))[:5]}")
    worst, where = 0.0, ""
    common = sorted(set(va) & set(vm), key=va.__getitem__)
    for name in xa:
        a, b = xa[name], xm[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            ia, im = torch.tensor([va[t] for t in common]), torch.tensor([vm[t] for t in common])
            pad_a, pad_m = a[len(va):], b[len(vm):]  # padding rows: same count, compared in order
            a, b = torch.cat([a[ia], pad_a]), torch.cat([b[im], pad_m])
        if a.shape != b.shape:
            raise SystemExit(f"{name}: shape {tuple(a.shape)} (Alloy) vs {tuple(b.shape)} (mergekit)")
        d = float((a - b).abs().max()) if a.numel() else 0.0
        if d > worst:
            worst, where = d, name
    ca, cm = (json.loads((p / "config.json").read_text()) for p in (alloy, mk))
    return {"max_abs_diff": worst, "worst_tensor": where, "same_vocabulary": set(va) == set(vm),
            "same_ids": va == vm, "vocab_size": [ca["vocab_size"], cm["vocab_size"]],
            "same_chat_template": same_render(ta, tm)}



def same_render(ta, tm) -> bool:
    """Templates compared by what they render (the text may differ: see merge_ops/chat_templates.py)."""
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"}]
    if ta.chat_template is None or tm.chat_template is None:
        return ta.chat_template == tm.chat_template
    return all(ta.apply_chat_template(conv, tokenize=False, add_generation_prompt=g)
               == tm.apply_chat_template(conv, tokenize=False, add_generation_prompt=g) for g in (False, True))

def run_cases(work: Path, run_mergekit: Callable[[Path, Path, int], tuple],
              run_alloy: Callable[[Path, Path, int, str], tuple], device: str) -> list[dict]:
    import yaml

    m = build(work.parent / "tokenizer-models")
    cases = []
    for name, doc in configs(m).items():
        cfg = work / f"tok_{name}.yaml"
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        mk = run_mergekit(cfg, work / "mergekit", 1_000_000_000)
        al = run_alloy(cfg, work / "alloy", 2_000_000_000, device)
        cases.append({"config": name, **compare(work / "alloy", work / "mergekit"),
                      "alloy_wall_s": round(al[0], 2), "mergekit_wall_s": round(mk[0], 2)})
        print(json.dumps(cases[-1]), flush=True)
    shutil.rmtree(work / "alloy", ignore_errors=True)
    shutil.rmtree(work / "mergekit", ignore_errors=True)
    return cases
