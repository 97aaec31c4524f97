"""Layer-wise AdaMerging side by side: Alloy's engine vs FusionBench's LayerWiseMergedModel.

Same experts (the multi-task benchmark's, cached by multitask_quality.py), the same calibration batches
in the same order (drawn once here and handed to both), the same init (0.3), clamp ([0, 1], set
explicitly: FusionBench's shipped config turns it off), Adam lr and step count, and the same loss (the
official plain entropy, summed over tasks, each task through its own head). Each side runs in its own
process (FusionBench from benchmarks/.venv-peers) so peak memory is measured separately: the peak RSS
(VmHWM, reset after imports) minus the RSS at that point. The FusionBench loop mirrors
LayerWiseAdaMergingAlgorithm.test_time_adaptation: per task `backward(retain_graph=True)`, then
`step()`, `zero_grad()`, `merge_weights()` (reference §5.3: pass copies, re-merge after each step).
Dropout is off on both sides (eval mode) so the two are the same function; FusionBench runs with
strict=False (as its shipped configs): BERT's non-persistent buffers are not in its state dict.

    .venv/bin/python benchmarks/fusionbench_adamerging.py [--steps 20] [--batch-size 16] [--lr 1e-3] [--padded-too]

Writes benchmarks/results/fusionbench_adamerging.json:
{"alloy_acc", "fusionbench_acc", "step_time_ratio", "peak_mem_ratio", ...} (ratios are Alloy / FusionBench).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
WORK = ROOT / ".cache" / "fusionbench"


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Reset VmHWM (Linux: write 5 to clear_refs) and return the RSS now: the baseline."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss_mib("VmRSS")


def mean_pool(h, m):
    m = m.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def plain_entropy(logits):
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


# -- one side, in its own process -----------------------------------------------------------------------
def side(which: str, cfg: dict) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    batches = load_file(str(WORK / "batches.safetensors"))
    tasks, base_dir, experts = cfg["tasks"], Path(cfg["base"]), [Path(p) for p in cfg["experts"]]
    heads = {t: load_file(str(p / "model.safetensors")) for t, p in zip(tasks, experts, strict=True)}
    heads = {t: (h["classifier.weight"], h["classifier.bias"]) for t, h in heads.items()}
    base_rss = reset_peak()
    times: list[float] = []
    losses: list[float] = []
    if which.startswith("alloy"):
        from merge_ops.learned.adapters import build_adapter
        from merge_ops.learned.engine import MergeEngine, Step, load_merge_inputs
        from merge_ops.learned.groups import ParamGroups

        adapter = build_adapter(base_dir, torch.float32, packing=which == "alloy")
        inputs = load_merge_inputs(base_dir, experts, tasks, task_specific=[r"^classifier\."],
                                   only=adapter.used)
        adapter.bind(inputs.base)
        engine = MergeEngine(inputs, ParamGroups(inputs.merged_shapes(), "layer"), init=0.3)
        opt = torch.optim.Adam(engine.parameters(), lr=cfg["lr"])
        for step in range(cfg["steps"]):
            t0 = time.perf_counter()
            opt.zero_grad()
            s = Step(engine)
            for t in tasks:
                ids, mask = batches[f"{step}/{t}/ids"], batches[f"{step}/{t}/mask"]
                from merge_ops.learned.batches import Batch

                logits = adapter.forward(s.params, {"classifier.weight": heads[t][0], "classifier.bias": heads[t][1]},
                                         Batch(ids, mask)).logits
                s.backward(plain_entropy(logits))
            s.finish()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(s.total)
        with torch.no_grad():
            merged = {n: engine.merged_tensor(n).contiguous() for n in inputs.base}
    else:
        from fusion_bench.method.adamerging.entropy_loss import entropy_loss
        from fusion_bench.models.wrappers.layer_wise_fusion import (
            LayerWiseMergedModel,
            get_layer_wise_weights,
        )
        from transformers import AutoModel

        pretrained = AutoModel.from_pretrained(str(base_dir)).eval()
        finetuned = [AutoModel.from_pretrained(str(p)).eval() for p in experts]  # fresh copies: FB edits them
        n_layers = len([p for p in pretrained.parameters() if p.requires_grad])
        w = get_layer_wise_weights(num_models=len(experts), num_layers=n_layers, init_values=0.3)
        model = LayerWiseMergedModel(w, pretrained, finetuned, clamp_weights=True, tie_weights=False, strict=False)
        model.eval()
        opt = torch.optim.Adam([model.merge_weight], lr=cfg["lr"])
        model.merge_weights()
        for step in range(cfg["steps"]):
            t0 = time.perf_counter()
            total = 0.0
            for t in tasks:
                ids, mask = batches[f"{step}/{t}/ids"], batches[f"{step}/{t}/mask"]
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = torch.nn.functional.linear(mean_pool(h, mask), *heads[t])
                loss = entropy_loss(logits)
                loss.backward(retain_graph=True)
                total += float(loss.detach())
            opt.step()
            opt.zero_grad()
            model.merge_weights()
            times.append(time.perf_counter() - t0)
            losses.append(total)
        with torch.no_grad():
            merged = {n: t.detach().clone().contiguous() for n, t in model.merge_and_unload().state_dict().items()
                      if t.is_floating_point()}
    peak = rss_mib("VmHWM") - base_rss
    save_file(merged, str(WORK / f"{which}_merged.safetensors"))
    steady = times[1:] or times
    (WORK / f"{which}.json").write_text(json.dumps({
        "step_seconds": sum(steady) / len(steady), "peak_mib": peak, "losses": losses, "times": times}))


# -- orchestration --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    ap.add_argument("--tasks", default="sentiment,supersense,tweet_source,fortune_topic,language_id")
    ap.add_argument("--padded-too", action="store_true",
                    help="also time Alloy with sequence packing off (a third process): what packing buys")
    ap.add_argument("--side", choices=("alloy", "alloy-padded", "fusionbench"), help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "fusionbench_adamerging.json")
    a = ap.parse_args()
    if a.side:
        side(a.side, json.loads(a.cfg))
        return

    import torch

    import benchmarks.multitask_quality as mq
    from merge_ops.learned.batches import BatchSampler, read_samples

    torch.set_num_threads(a.threads)
    tasks = a.tasks.split(",")
    for t in tasks:
        mq.finetune_expert(mq.DATA, t)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(mq.base_dir()))
    samples = {t: read_samples(mq.DATA / t / "calibration.jsonl", tokenizer=tok, max_length=mq.MAX_LEN)
               for t in tasks}
    sampler = BatchSampler(samples, a.batch_size, seed=0)
    batches = {}
    for step in range(a.steps):  # the same batches, in the same order, for both sides
        for t in tasks:
            b = sampler.next(t)
            batches[f"{step}/{t}/ids"], batches[f"{step}/{t}/mask"] = b.input_ids, b.attention_mask
    WORK.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in batches.items()}, str(WORK / "batches.safetensors"))
    cfg = {"steps": a.steps, "lr": a.lr, "threads": a.threads, "tasks": tasks, "base": str(mq.base_dir()),
           "experts": [str(mq.expert_dir(t)) for t in tasks]}
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    res = {}
    sides = [("fusionbench", PEERS_PY), ("alloy", Path(sys.executable))]
    if a.padded_too:
        sides.append(("alloy-padded", Path(sys.executable)))
    for which, py in sides:
        t0 = time.time()
        subprocess.run([str(py), __file__, "--side", which, "--cfg", json.dumps(cfg)], check=True, env=env)
        res[which] = json.loads((WORK / f"{which}.json").read_text())
        print(f"{which}: {res[which]['step_seconds']:.3f} s/step, peak +{res[which]['peak_mib']:.0f} MiB "
              f"({time.time() - t0:.0f}s)", flush=True)
    ev = mq.Evaluator(mq.DATA, tasks)
    heads = {t: mq.split_heads(mq.load_st(mq.expert_dir(t) / "model.safetensors"))[1] for t in tasks}
    acc = {w: ev.accuracy(mq.load_st(WORK / f"{w}_merged.safetensors"), heads) for w in ("alloy", "fusionbench")}
    avg = {w: sum(v.values()) / len(v) for w, v in acc.items()}
    doc = {
        "alloy_acc": round(avg["alloy"], 4), "fusionbench_acc": round(avg["fusionbench"], 4),
        "step_time_ratio": round(res["alloy"]["step_seconds"] / res["fusionbench"]["step_seconds"], 3),
        "peak_mem_ratio": round(res["alloy"]["peak_mib"] / res["fusionbench"]["peak_mib"], 3),
        "alloy_step_seconds": round(res["alloy"]["step_seconds"], 3),
        "fusionbench_step_seconds": round(res["fusionbench"]["step_seconds"], 3),
        "alloy_peak_mib": round(res["alloy"]["peak_mib"], 1), "fusionbench_peak_mib": round(res["fusionbench"]["peak_mib"], 1),
        "per_task": {w: {t: round(x, 4) for t, x in v.items()} for w, v in acc.items()},
        "final_loss": {w: round(r["losses"][-1], 5) for w, r in res.items()},
        **({"step_time_ratio_padded": round(res["alloy-padded"]["step_seconds"]
                                            / res["fusionbench"]["step_seconds"], 3),
            "alloy_padded_step_seconds": round(res["alloy-padded"]["step_seconds"], 3)} if a.padded_too else {}),
        "max_abs_loss_diff": round(max(abs(x - y) for x, y in zip(res["alloy"]["losses"], res["fusionbench"]["losses"],
                                                                strict=True)), 6),
        "config": {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "init": 0.3, "clamp": True,
                   "granularity": "layer", "loss": "entropy (plain, summed over tasks)", "threads": a.threads,
                   "max_length": mq.MAX_LEN, "tasks": tasks},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
