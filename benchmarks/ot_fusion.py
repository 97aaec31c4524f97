"""OT fusion vs vanilla averaging on models trained from different seeds (no shared base).

(a) Fashion-MNIST (Debian `dataset-fashion-mnist`, installed here when missing): two MLPs
    (784-400-200-100-10) and two small CNNs (conv 16-32 with BatchNorm, FC 64), each pair trained
    from different seeds and data orders.
(b) Two small BERT-style classifiers (byte-level tokens, trained from scratch, different seeds) on a
    task of ../shared/benchmark-data (default language_id).
For each pair: the parents' test accuracy, vanilla weight averaging, and OT fusion with weight- and
activation-based ground metrics, exact (ot.emd) and Sinkhorn, all one-shot (no fine-tuning).

    .venv/bin/python benchmarks/ot_fusion.py                     # ~15 min on 2 idle CPU cores
    .venv/bin/python benchmarks/ot_fusion.py --only cnn          # one case; others in the file are kept
    .venv/bin/python benchmarks/ot_fusion.py --quick --out /tmp/x.json   # fewer epochs, a smoke run

Writes benchmarks/results/ot_fusion.json: {"cases": [{name, family, parents_acc, vanilla_acc, ot_acc,
settings (the best OT setting), runs (every setting's accuracy), ...}]}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from merge_ops.ot import FusionOptions, fuse  # noqa: E402
from merge_ops.ot.arch import build_module  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TEXT = Path(__file__).resolve().parents[2] / "shared" / "benchmark-data"
OUT = Path(__file__).resolve().parent / "results" / "ot_fusion.json"

MLP = {"alloy_arch": "mlp", "input_dim": 784, "hidden": [400, 200, 100], "num_classes": 10}
CNN = {"alloy_arch": "cnn", "in_channels": 1, "image_size": 28, "channels": [16, 32], "kernel_size": 3,
       "batch_norm": True, "hidden": [64], "num_classes": 10}
SETTINGS = [
    {"ground_metric": "weights", "solver": "exact"},
    {"ground_metric": "weights", "solver": "sinkhorn", "reg": 0.05},
    {"ground_metric": "activations", "solver": "exact"},
    {"ground_metric": "activations", "solver": "sinkhorn", "reg": 0.05},
]


# -- data -------------------------------------------------------------------------------------
def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        apt = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
        if shutil.which("sudo") and subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
            apt = ["sudo", *apt]
        subprocess.run(apt[:-3] + ["update"], check=False, capture_output=True)
        subprocess.run(apt, check=True)

    def images(name: str) -> torch.Tensor:
        raw = gzip.open(FMNIST / name).read()
        x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
        return torch.from_numpy((x - 0.2860) / 0.3530)

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(gzip.open(FMNIST / name).read(), np.uint8, offset=8).astype(np.int64))

    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


def byte_tokens(texts: list[str], max_len: int = 64) -> dict[str, torch.Tensor]:
    """[CLS]=1 + UTF-8 bytes shifted by 4, padded with 0: no tokenizer download needed."""
    ids = [[1] + [b + 4 for b in t.encode("utf-8")[: max_len - 1]] for t in texts]
    width = max(len(i) for i in ids)
    return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}


def text_task(task: str) -> tuple[dict, torch.Tensor, dict, torch.Tensor, dict, int]:
    def read(split: str) -> list[dict]:
        return [json.loads(line) for line in open(TEXT / task / f"{split}.jsonl")]

    tr, te, cal = read("train"), read("test"), read("calibration")
    n_cls = len(json.loads((TEXT / task / "meta.json").read_text())["classes"])
    return (byte_tokens([r["text"] for r in tr]), torch.tensor([r["label"] for r in tr]),
            byte_tokens([r["text"] for r in te]), torch.tensor([r["label"] for r in te]),
            byte_tokens([r["text"] for r in cal[:200]]), n_cls)


# -- training / evaluation --------------------------------------------------------------------
def _forward(model: nn.Module, x) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _take(x, idx):
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def train(model: nn.Module, x, y: torch.Tensor, *, seed: int, epochs: int, lr: float, batch: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch):
            idx = order[s:s + batch]
            loss = nn.functional.cross_entropy(_forward(model, _take(x, idx)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    hits = sum(int((_forward(model, _take(x, slice(s, s + batch))).argmax(-1) == y[s:s + batch]).sum())
               for s in range(0, len(y), batch))
    return hits / len(y)


# -- one case ---------------------------------------------------------------------------------
def run_case(name: str, family: str, make, config: dict, data, *, epochs: int, lr: float, batch: int,
             seeds=(1, 2), extra_settings: list[dict] | None = None) -> dict:
    xtr, ytr, xte, yte, calib = data
    t0 = time.perf_counter()
    parents = []
    for s in seeds:
        torch.manual_seed(s)
        parents.append(train(make(), xtr, ytr, seed=100 + s, epochs=epochs, lr=lr, batch=batch))
    train_s = time.perf_counter() - t0
    sds = [{k: v.detach().clone() for k, v in p.state_dict().items()} for p in parents]
    parents_acc = [accuracy(p, xte, yte) for p in parents]

    def evaluate(sd: dict) -> float:
        return accuracy(build_module(config, sd), xte, yte)

    vanilla = {k: (sds[0][k] + sds[1][k]) / 2 if v.is_floating_point() else v for k, v in sds[0].items()}
    vanilla_acc = evaluate(vanilla)
    runs = []
    for st in SETTINGS + (extra_settings or []):
        opt = FusionOptions(**st)
        t1 = time.perf_counter()
        res = fuse(sds, config, options=opt, inputs=calib)
        fuse_s = time.perf_counter() - t1
        acc = evaluate(res.state_dict)
        runs.append({**st, "acc": acc, "fuse_s": round(fuse_s, 2)})
        print(f"  {name:14s} {st}: {acc:.4f} ({fuse_s:.1f}s)", flush=True)
    best = max(runs, key=lambda r: r["acc"])
    case = {"name": name, "family": family, "parents_acc": parents_acc, "vanilla_acc": vanilla_acc,
            "ot_acc": best["acc"], "settings": {k: v for k, v in best.items() if k not in ("acc", "fuse_s")},
            "runs": runs, "train_epochs": epochs, "train_s": round(train_s, 1),
            "calibration_samples": len(calib["input_ids"]) if isinstance(calib, dict) else len(calib)}
    mean = sum(parents_acc) / len(parents_acc)
    print(f"{name}: parents {parents_acc}, vanilla {vanilla_acc:.4f}, best OT {best['acc']:.4f} "
          f"({best['acc'] / mean:.1%} of parents' mean, +{100 * (best['acc'] - vanilla_acc):.1f} points)", flush=True)
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and samples (smoke run)")
    ap.add_argument("--task", default="language_id", help="benchmark-data text task for (b)")
    ap.add_argument("--only", choices=("mlp", "cnn", "transformer"), action="append")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default per case)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only or ("mlp", "cnn", "transformer"))
    cases = []
    if only & {"mlp", "cnn"}:
        xtr, ytr, xte, yte = fashion_mnist()
        if args.quick:
            xtr, ytr = xtr[:10000], ytr[:10000]
        calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:200]]
        if "mlp" in only:
            cases.append(run_case("fmnist_mlp", "mlp", lambda: build_module(MLP).train(), MLP,
                                  (xtr, ytr, xte, yte, calib), epochs=args.epochs or (1 if args.quick else 3), lr=1e-3,
                                  batch=128))
        if "cnn" in only:
            bn = [{**s, "recompute_bn": True} for s in SETTINGS]
            cases.append(run_case("fmnist_cnn", "cnn", lambda: build_module(CNN).train(), CNN,
                                  (xtr, ytr, xte, yte, calib), epochs=args.epochs or (1 if args.quick else 2), lr=2e-3,
                                  batch=128, extra_settings=bn))
    if "transformer" in only:
        xtr, ytr, xte, yte, calib, n_cls = text_task(args.task)
        cfg = transformers.BertConfig(vocab_size=260, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, max_position_embeddings=64, num_labels=n_cls,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      architectures=["BertForSequenceClassification"])
        extra = [{"ground_metric": g, "solver": "sinkhorn", "reg": r, "resid_policy": p, "qk": "shared"}
                 for g in ("weights", "activations") for r in (0.02, 0.08) for p in ("mean", "joint")]
        cases.append(run_case(f"{args.task}_bert", "transformer",
                              lambda: transformers.BertForSequenceClassification(cfg), cfg.to_dict(),
                              (xtr, ytr, xte, yte, calib), epochs=args.epochs or (1 if args.quick else 8),
                              lr=2e-3, batch=32, extra_settings=extra))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {c["name"] for c in cases}
    kept = json.loads(args.out.read_text())["cases"] if args.out.is_file() else []
    order = {"mlp": 0, "cnn": 1, "transformer": 2}
    merged = sorted([c for c in kept if c["name"] not in done] + cases, key=lambda c: order[c["family"]])
    args.out.write_text(json.dumps({"cases": merged, "quick": args.quick}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
