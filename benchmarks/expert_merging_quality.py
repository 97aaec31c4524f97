"""Expert Merging / Expert Merging++ on the multi-task benchmark, their ablation, and learning-stage memory.

Same base, experts, data and scoring as benchmarks/multitask_quality.py (imported from it: the expert
cache, the pre-tokenised splits, the Evaluator). Each merge runs through the production path
(`run_method(ctx)` on an expert_merging spec writes a checkpoint and per-task heads; the benchmark scores them on each
task's test.jsonl). Calibration: the first `--samples` rows of each task's unlabelled calibration.jsonl
(chosen by the seed).

    .venv/bin/python benchmarks/expert_merging_quality.py [--tasks a,b] [--seeds 0,1,2] [--steps 100]
        [--samples 128] [--ablation-seeds 0] [--memory] [--publish-only]

Rows "Expert Merging" and "Expert Merging++" (means over seeds) are put into
benchmarks/results/multitask_quality.json (other rows are left as they are: run multitask_quality.py
first, then this; finished runs are cached, so `--publish-only` re-inserts them in seconds). The
ablation (EM++ without the hidden loss, without the regulariser, with uniform chunks, with the authors'
cold stage 2; EM = the full run's stage 1) goes to benchmarks/results/expert_merging_ablation.json, together with the memory table
(`--memory`: learning-stage peak RSS for 1..K of the given experts, each in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import multitask_quality as mq  # noqa: E402
import torch  # noqa: E402

RESULTS = ROOT / "results"
ROWS = {"em": ("Expert Merging", {}), "empp": ("Expert Merging++", {"chunked": True})}
ABLATION = {
    "empp": ("Expert Merging++ (full)", {"chunked": True}),
    "empp_nohidden": ("− hidden-state loss", {"chunked": True, "hidden_layers": "none"}),
    "empp_noreg": ("− regulariser (γ 0)", {"chunked": True, "gamma": 0.0}),
    "empp_uniform": ("uniform chunks (κ 0, same budget)", {"chunked": True, "kappa": 0.0}),
    "empp_cold": ("cold stage 2 (α₀ start, authors' code)", {"chunked": True, "warm_start": False}),
    "em": ("− chunking (= Expert Merging)", {}),
}


def spec_for(tasks: list[str], params: dict, seed: int, samples: int, data: Path):
    from merge_ops.spec import spec_from_dict

    return spec_from_dict({
        "method": "expert_merging", "base": str(mq.base_dir()),
        "experts": [{"model": str(mq.expert_dir(t)), "name": t} for t in tasks],
        "parameters": params,
        "task_specific": [rf"^{mq.HEAD}\."],
        "calibration": {"tasks": {t: str(data / t / "calibration.jsonl") for t in tasks},
                        "samples_per_task": samples, "max_length": mq.MAX_LEN},
        "seed": seed,
    })


def run_one(data: Path, tasks: list[str], key: str, params: dict, seed: int, samples: int,
            ev: mq.Evaluator | None) -> dict:
    from merge_ops.context import Callbacks, JobContext, ResolvedModel
    from merge_ops.runner import run_method

    # keyed on the settings, not the row name: rows and ablation variants that run the same merge share it
    tag = "em-" + "-".join(f"{k}{v}" for k, v in sorted(params.items())) + f"-s{seed}-c{samples}-{'_'.join(tasks)}"
    out = mq.CACHE / "runs" / tag
    done = out / "bench_result.json"
    if done.exists():
        return json.loads(done.read_text())
    if ev is None:
        raise SystemExit(f"run {tag} is not cached; run without --publish-only")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    spec = spec_for(tasks, params, seed, samples, data)
    t0 = time.time()

    def progress(stage: str, step: int, total: int | None, loss: float | None = None) -> None:
        if stage == "learn" and step and (step % 20 == 0 or step == total):
            print(f"  [{key} seed {seed}] step {step}/{total} loss {loss:.4f} ({time.time() - t0:.0f}s)",
                  flush=True)

    ctx = JobContext(spec=spec, base=ResolvedModel(str(mq.base_dir()), mq.base_dir()),
                     experts=[ResolvedModel(str(mq.expert_dir(t)), mq.expert_dir(t)) for t in tasks],
                     out_dir=out, calibration={t: data / t / "calibration.jsonl" for t in tasks},
                     channel=Callbacks(progress))
    res = run_method(ctx)
    heads = {t: mq.load_st(out / "heads" / f"{t}.safetensors") for t in tasks}
    acc = ev.accuracy(mq.load_st(out / "model.safetensors"), heads)
    m = res.metrics
    keep = ("learn_seconds", "step_seconds", "loss_first", "loss_final", "loss_parts_final", "coefficient_mean",
            "n_coefficients", "chunks_used", "chunk_budget", "fixed_tensors", "hidden_layers",
            "teacher_cache_mib", "task_vectors_mib", "base_mib", "rss_before_learn_mib", "learn_peak_rss_mib")
    result = {"per_task": acc, "wall_seconds": round(time.time() - t0, 1), **{k: m.get(k) for k in keep if k in m}}
    if "chunk_plan" in m:  # the plan's shape, by tensor kind (full plan is in the run's alloy facts)
        kinds: dict[str, list[int]] = {}
        for n, c in m["chunk_plan"].items():
            kinds.setdefault(".".join(n.split(".")[-3:-1]), []).append(c)
        result["chunks_by_kind"] = {k: round(sum(v) / len(v), 2) for k, v in kinds.items()}
        imp = m["importance"]
        result["importance_top5"] = sorted(imp, key=imp.get, reverse=True)[:5]
    if "stage1_coefficients" in m:  # EM++ stage 1 is Expert Merging: score it too, from its coefficients
        result["stage1_per_task"] = ev.accuracy(stage1_state(tasks, m["stage1_coefficients"]), heads)
    done.write_text(json.dumps(result, indent=1))
    print(f"  [{key} seed {seed}] avg {sum(acc.values()) / len(acc):.4f} ({time.time() - t0:.0f}s)", flush=True)
    return result


def stage1_state(tasks: list[str], coeffs: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """θ₀ + Σ_k α_k τ_k over the tensors stage 1 learned; every other tensor keeps the base value."""
    base = mq.load_st(mq.base_dir() / "model.safetensors")
    experts = [mq.load_st(mq.expert_dir(t) / "model.safetensors") for t in tasks]
    out = dict(base)
    for n, a in coeffs.items():
        out[n] = base[n] + sum(a[k] * (e[n] - base[n]) for k, e in enumerate(experts))
    return out


def expert_accuracy(ev: mq.Evaluator | None, tasks: list[str]) -> dict[str, float]:
    """Each expert on its own task, from the cache multitask_quality.py keeps ("experts|<task>")."""
    evals = json.loads(mq.EVALS.read_text()) if mq.EVALS.exists() else {}
    missing = [t for t in tasks if not isinstance(evals.get(f"experts|{t}"), float)]
    if missing:
        if ev is None:
            raise SystemExit("expert accuracies are not cached; run without --publish-only")
        for t in missing:
            enc, head = mq.split_heads(mq.load_st(mq.expert_dir(t) / "model.safetensors"))
            evals[f"experts|{t}"] = ev.accuracy(enc, {t: head}, [t])[t]
        mq.EVALS.write_text(json.dumps(evals, indent=1))
    return {t: evals[f"experts|{t}"] for t in tasks}


def row(method: str, runs: list[dict], seeds: list[int], tasks: list[str], expert_acc: dict[str, float]) -> dict:
    mean = {t: sum(r["per_task"][t] for r in runs) / len(runs) for t in tasks}
    avg = sum(mean.values()) / len(mean)
    per_seed = [sum(r["per_task"].values()) / len(tasks) for r in runs]
    return {"method": method, "avg_acc": round(avg, 4),
            "normalized": round(sum(mean[t] / expert_acc[t] for t in tasks) / len(tasks), 4),
            "per_task": {t: round(mean[t], 4) for t in tasks},
            "avg_acc_per_seed": [round(x, 4) for x in per_seed],
            "runs": [{"seed": s, **r} for s, r in zip(seeds, runs, strict=True)]}


# -- memory: learning-stage peak RSS vs the number of experts (fresh process each) -------------------
def memory_child(tasks: list[str], data: Path) -> None:
    from merge_ops.context import JobContext, ResolvedModel
    from merge_ops.runner import run_method

    k = len(tasks)
    out = mq.CACHE / "runs" / f"em-memory-k{k}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    spec = spec_for(tasks, {"steps": 5, "batch_size": 8}, 0, 32, data)
    ctx = JobContext(spec=spec, base=ResolvedModel(str(mq.base_dir()), mq.base_dir()),
                     experts=[ResolvedModel(str(mq.expert_dir(t)), mq.expert_dir(t)) for t in tasks],
                     out_dir=out, calibration={t: data / t / "calibration.jsonl" for t in tasks})
    m = run_method(ctx).metrics
    print(json.dumps({k2: m[k2] for k2 in ("base_mib", "task_vectors_mib", "teacher_cache_mib",
                                            "rss_before_learn_mib", "learn_peak_rss_mib")}))


def memory_table(data: Path, tasks: list[str]) -> list[dict]:
    rows = []
    for k in range(1, len(tasks) + 1):
        p = subprocess.run([sys.executable, __file__, "--memory-child", ",".join(tasks[:k])],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-2000:])
        m = json.loads(p.stdout.strip().splitlines()[-1])
        m["experts"] = k
        m["learning_extra_mib"] = round(m["learn_peak_rss_mib"] - m["rss_before_learn_mib"], 1)
        rows.append(m)
        print(f"  memory K={k}: {m}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(mq.TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ablation-seeds", default="0")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--empp-steps", type=int, default=None,
                    help="steps per stage for Expert Merging++ (default --steps; --steps/2 matches EM's total)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--alpha0", type=float, default=None, help="override the method default (0.1)")
    ap.add_argument("--gamma", type=float, default=None, help="override the method default (5)")
    ap.add_argument("--stage2-lr-scale", type=float, default=None,
                    help="override the method default (0.1)")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples per task")
    ap.add_argument("--data", type=Path, default=mq.DATA)
    ap.add_argument("--memory", action="store_true", help="also measure learning-stage memory for 1/3/5 experts")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--rows", default="em,empp", help="em,empp; empp alone also scores its stage 1 as EM")
    ap.add_argument("--publish-only", action="store_true", help="only re-insert cached rows into the results")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.memory_child is not None:
        memory_child(a.memory_child.split(","), a.data)
        return
    tasks = [t for t in a.tasks.split(",") if t]
    seeds = [int(x) for x in a.seeds.split(",") if x]
    abl_seeds = [int(x) for x in a.ablation_seeds.split(",") if x]
    ev = None
    if not a.publish_only:
        for t in tasks:
            mq.finetune_expert(a.data, t)
        ev = mq.Evaluator(a.data, tasks)
    expert_acc = expert_accuracy(ev, tasks)
    common = {"steps": a.steps, "batch_size": a.batch_size,
              **({"alpha0": a.alpha0} if a.alpha0 is not None else {}),
              **({"gamma": a.gamma} if a.gamma is not None else {}),
              **({"stage2_lr_scale": a.stage2_lr_scale} if a.stage2_lr_scale is not None else {})}

    def params(p: dict) -> dict:
        steps = a.empp_steps if p.get("chunked") and a.empp_steps else a.steps
        return {**common, **p, "steps": steps}

    runs = {key: [run_one(a.data, tasks, key, params(p), s, a.samples, ev) for s in seeds]
            for key, (label, p) in ROWS.items() if key in a.rows.split(",")}
    if "em" not in runs:  # EM++'s stage 1 is Expert Merging with the same settings: score that
        runs = {"em": [{**r, "per_task": r["stage1_per_task"], "note": "stage 1 of the Expert Merging++ run"}
                       for r in runs["empp"]], **runs}
    mine = [row(ROWS[key][0], rs, seeds, tasks, expert_acc) for key, rs in runs.items()]
    def ablation_runs(key: str, p: dict) -> list[dict]:
        if key == "em":  # the full EM++ run's stage 1 is this row: score it instead of re-learning it
            return [{**r, "per_task": r["stage1_per_task"]} for r in ablation_runs("empp", ABLATION["empp"][1])]
        return [run_one(a.data, tasks, key, params(p), s, a.samples, ev) for s in abl_seeds]

    ablation = [] if a.no_ablation else [row(label, ablation_runs(key, p), abl_seeds, tasks, expert_acc)
                                         for key, (label, p) in ABLATION.items()]

    # multitask_quality.json: replace our rows, keep everyone else's
    path = RESULTS / "multitask_quality.json"
    doc = json.loads(path.read_text()) if path.exists() else {"seeds": seeds, "tasks": tasks, "rows": []}
    if doc.get("tasks") != tasks:
        print(f"note: {path} was computed on tasks {doc.get('tasks')}; our rows use {tasks}")
    names = {r["method"] for r in mine}
    doc["rows"] = [r for r in doc.get("rows", []) if r["method"] not in names] + \
                  [{**r, "seeds": seeds, "config": {**params(ROWS[k][1]), "samples_per_task": a.samples}}
                   for k, r in zip(ROWS, mine, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")

    abl_path = RESULTS / "expert_merging_ablation.json"
    old = json.loads(abl_path.read_text()) if abl_path.exists() else {}
    out_config = {**common, "empp_steps_per_stage": params({"chunked": True})["steps"],
                  "samples_per_task": a.samples, "max_length": mq.MAX_LEN,
                  "defaults": "alpha0 0.1, T 1, hidden middle (index 3), gamma 5 (paper normalisation), "
                              "lr 0.5 AdamW wd 1e-5, cosine warm restarts T_0 50, clip 1.0, "
                              "chunk_budget 2.0, kappa 1.0, warm_start true"}
    out = {"tasks": tasks, "seeds": seeds, "ablation_seeds": abl_seeds, "config": out_config,
           "expert_accuracy": expert_acc, "rows": mine, "ablation": ablation or old.get("ablation", []),
           # the ablation keeps the settings it ran with when only the main rows are re-run
           "ablation_config": out_config if ablation else old.get("ablation_config", old.get("config")),
           "memory": memory_table(a.data, tasks) if a.memory else old.get("memory", [])}
    abl_path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")

    others = {r["method"]: r for r in doc["rows"]}
    print("\n| method | avg acc | normalised | " + " | ".join(tasks) + " |")
    print("|---|---|---|" + "---|" * len(tasks))
    for r in [others[n] for n in others if n not in names] + mine:
        if set(r.get("per_task", {})) >= set(tasks):
            print(f"| {r['method']} | {r['avg_acc']:.3f} | {r['normalized']:.3f} | "
                  + " | ".join(f"{r['per_task'][t]:.3f}" for t in tasks) + " |")
    if ablation:
        print(f"\nablation (seeds {abl_seeds})\n| variant | avg acc | normalised |\n|---|---|---|")
        for r in ablation:
            print(f"| {r['method']} | {r['avg_acc']:.3f} | {r['normalized']:.3f} |")


if __name__ == "__main__":
    main()
