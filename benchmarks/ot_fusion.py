"""OT fusion vs vanilla averaging on models trained from different seeds (no shared base).

(a) Fashion-MNIST (Debian `dataset-fashion-mnist`, installed here when missing): two MLPs
    (784-400-200-100-10) and two small CNNs (conv 16-32 with BatchNorm, FC 64), each pair trained
    from different seeds and data orders.
(b) Two small BERT-style classifiers (byte-level tokens, trained from scratch, different seeds) on a
    task of ../shared/benchmark-data (default language_id).
(c) CLAFusion (`--only depth`): a 5-hidden-layer MLP (784-400-300-200-150-100-10) and a 3-hidden-layer
    one (784-400-200-100-10) on Fashion-MNIST, different seeds; fused through the job path (`clafusion`,
    layer alignment by activation CKA or widths, identity layers inserted, then OT fusion) against
    the same OT fusion after naive depth matching (the shallow model's layers first, identity layers
    appended before its classifier); no plain average exists (the widths differ).
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


# depth 5 vs 3: the inner shallow layer may map to any of the deep model's layers 1-3 (with 2 into 3 the
# map is forced: first to first, last to last)
DEEP_MLP = {**MLP, "hidden": [400, 300, 200, 150, 100]}
SHALLOW_MLP = {**MLP, "hidden": [400, 200, 100]}


def run_depth_case(data, *, epochs: int, pairs=((1, 2), (3, 4), (5, 6))) -> dict:
    """CLAFusion through run_method (as a job) vs naive depth matching + the same OT fusion, over
    several parent pairs (each pair: the deep and the shallow MLP trained from its two seeds)."""
    per_pair = [_depth_pair(data, epochs=epochs, seeds=pr) for pr in pairs]
    keys = [(r["method"], r["ground_metric"]) for r in per_pair[0]["runs"]]
    runs = []
    for i, (method, metric) in enumerate(keys):
        accs = [pp["runs"][i]["acc"] for pp in per_pair]
        runs.append({"method": method, "ground_metric": metric, "solver": "exact",
                     "acc": round(sum(accs) / len(accs), 4), "acc_per_pair": accs,
                     **({"layer_maps": [pp["runs"][i]["layer_map"] for pp in per_pair]}
                        if "layer_map" in per_pair[0]["runs"][i] else {})})
        print(f"  fmnist_mlp_depth {method:40s} {metric:12s} mean {runs[-1]['acc']:.4f} {accs}", flush=True)
    parents = {n: round(sum(pp["parents"][n] for pp in per_pair) / len(per_pair), 4) for n in ("deep", "shallow")}
    best = max((r for r in runs if r["method"].startswith("CLAFusion")), key=lambda r: r["acc"])
    return {"name": "fmnist_mlp_depth", "family": "depth", "parents_acc": list(parents.values()),
            "parents": {n: {"hidden": c["hidden"], "acc": parents[n]} for n, c in
                        (("deep", DEEP_MLP), ("shallow", SHALLOW_MLP))},
            "pairs": [list(pr) for pr in pairs], "vanilla_acc": None,  # the widths differ: no plain average
            "ot_acc": best["acc"],
            "naive_ot_acc": max(r["acc"] for r in runs if r["method"] == "naive depth match + OT fusion"),
            "settings": {k: best[k] for k in ("method", "ground_metric", "solver")}, "runs": runs,
            "train_epochs": epochs, "train_s": round(sum(pp["train_s"] for pp in per_pair), 1),
            "calibration_samples": len(data[4])}


def _depth_pair(data, *, epochs: int, seeds: tuple[int, int]) -> dict:
    import tempfile

    from safetensors.torch import load_file, save_file

    from merge_ops.context import Callbacks, JobContext, ResolvedModel
    from merge_ops.ot.layer_align import insert_identity
    from merge_ops.runner import run_method
    from merge_ops.spec import spec_from_dict

    xtr, ytr, xte, yte, calib = data
    t0 = time.perf_counter()
    cfgs = {"deep": DEEP_MLP, "shallow": SHALLOW_MLP}
    sds, parents_acc = {}, {}
    for (name, cfg), s in zip(cfgs.items(), seeds, strict=True):
        torch.manual_seed(s)
        model = train(build_module(cfg).train(), xtr, ytr, seed=100 + s, epochs=epochs, lr=1e-3, batch=128)
        parents_acc[name] = accuracy(model, xte, yte)
        sds[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_s = time.perf_counter() - t0
    depth = len(DEEP_MLP["hidden"])

    def evaluate(sd: dict) -> float:
        return accuracy(build_module(DEEP_MLP, {k: v.float() for k, v in sd.items()}), xte, yte)

    settings = [SETTINGS[0], SETTINGS[2]]  # exact OT, weight and activation ground metrics
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="clafusion-bench-") as tmp:
        folders = {}
        for name, cfg in cfgs.items():
            folders[name] = Path(tmp) / name
            folders[name].mkdir()
            save_file({k: v.contiguous() for k, v in sds[name].items()}, str(folders[name] / "model.safetensors"))
            (folders[name] / "config.json").write_text(json.dumps(cfg))
        cal = Path(tmp) / "cal.jsonl"
        cal.write_text("".join(json.dumps({"input": r.flatten().tolist()}) + "\n" for r in calib))
        for measure in ("activation", "neuron"):
            for st in settings:
                out = Path(tmp) / f"out-{measure}-{st['ground_metric']}"
                spec = spec_from_dict({"method": "clafusion", "parameters": {"layer_measure": measure, **st},
                                       "experts": [{"model": str(p), "name": n} for n, p in folders.items()],
                                       "calibration": {"tasks": {"deep": str(cal)}, "samples_per_task": len(calib)}})
                ctx = JobContext(spec=spec, base=None, experts=[ResolvedModel(str(p), p) for p in folders.values()],
                                 out_dir=out, calibration={"deep": cal}, channel=Callbacks(lambda *a, **k: None))
                res = run_method(ctx)
                runs.append({"method": f"CLAFusion ({measure} layer cost)", "ground_metric": st["ground_metric"],
                             "acc": evaluate(load_file(str(out / "model.safetensors"))),
                             "layer_map": res.metrics["layer_maps"]["shallow"]})
        # naive matching: the shallow model's layers first, identity layers before its classifier
        naive, naive_cfg = insert_identity(sds["shallow"], SHALLOW_MLP, list(range(len(SHALLOW_MLP["hidden"]))),
                                           depth)
        for st in settings:
            res = fuse([sds["deep"], naive], [DEEP_MLP, naive_cfg], anchor=0, options=FusionOptions(**st), inputs=calib)
            runs.append({"method": "naive depth match + OT fusion", "ground_metric": st["ground_metric"],
                         "acc": evaluate(res.state_dict)})
    print(f"  pair {seeds}: parents {parents_acc}, " + ", ".join(f"{r['method']} {r['ground_metric']} {r['acc']:.4f}"
                                                           for r in runs), flush=True)
    return {"parents": parents_acc, "runs": runs, "train_s": train_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and samples (smoke run)")
    ap.add_argument("--task", default="language_id", help="benchmark-data text task for (b)")
    ap.add_argument("--only", choices=("mlp", "cnn", "transformer", "depth"), action="append")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default per case)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(args.only or ("mlp", "cnn", "transformer", "depth"))
    cases = []
    if only & {"mlp", "cnn", "depth"}:
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
        if "depth" in only:
            cases.append(run_depth_case((xtr, ytr, xte, yte, calib), epochs=args.epochs or (1 if args.quick else 3)))
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
    order = {"mlp": 0, "cnn": 1, "transformer": 2, "depth": 3}
    merged = sorted([c for c in kept if c["name"] not in done] + cases, key=lambda c: order[c["family"]])
    args.out.write_text(json.dumps({"cases": merged, "quick": args.quick}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
