"""One-shot merges side by side with FusionBench: RegMean, RegMean++, Fisher, WUDI, TSV-M, Iso-C, Iso-CTS.

Same experts (the multi-task benchmark's, cached by multitask_quality.py), the same 256 calibration rows
per task (Alloy's seeded choice, token ids handed to both), the same hyper-parameters (RegMean/++ α 0.95,
WUDI 300 Adam steps at lr 1e-5, TSV-M α 1, Iso α 1.5 and f 0.8, Fisher floor 1e-6), the same scorer
(multitask_quality.Evaluator, each task's own head). Each side runs in its own process: Alloy through
run_method (as a job), FusionBench from benchmarks/.venv-peers calling its own functions
(`merging_with_regmean_weights`, `RegMeanAlgorithmPlusPlus.run`, `merging_with_fisher_weights`,
`wudi_merging`, `compute_and_sum_svd_mem_reduction`, `iso_c`, `iso_cts`) with the hooks and loops of
its CLIP subclasses re-targeted at the BERT encoder (mean-pooled tokens, per-task linear head):
RegMean Grams include padding positions and FusionBench's Fisher squares the gradient of a batch-summed
Σ√p·log p (batches of 32), as FusionBench does; Alloy's own choices are in its method docstrings.
Time is the merge's wall time (loading the checkpoints included, evaluation not); memory is the peak
RSS over the merge (VmHWM reset after imports) minus the RSS at that point.

One FusionBench input is adapted, and said so in the output: its WUDI divides by ‖τ‖², which is 0 on
the experts' frozen embeddings (NaN everywhere), so those 2-D tensors are passed as `exclude_keys`
(they get the mean task vector, 0); Alloy skips a zero τ itself.

    .venv/bin/python benchmarks/fusionbench_static.py [--methods regmean,regmean_pp,...] [--tasks a,b] [--skip-accuracy]

Both children run one thread (OMP_NUM_THREADS=1, ALLOY_MATRIX_THREADS=1). Each merge takes a lock file, so
a second invocation given the methods in another order shares the work; finished merges and their scores
are cached and reused.

Writes benchmarks/results/fusionbench_static.json (one entry per task set under "runs", rewritten after
each method; finished merges are cached under benchmarks/.cache/fusionbench_static) and prints a table
(ratios are Alloy / FusionBench; the 1-minute load average at the end of each merge is recorded, since
the wall-time ratio means little when other work shares the CPU). For the data-free methods (same task
vectors on both sides) the largest |Alloy − FusionBench| entry is reported too.
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
sys.path.insert(0, str(ROOT))
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
WORK = ROOT / ".cache" / "fusionbench_static"
METHODS = ("regmean", "regmean_pp", "fisher", "wudi", "tsv_m", "iso_c", "iso_cts")
ROWS = 256
BATCH = 32


from fusionbench_adamerging import reset_peak, rss_mib  # noqa: E402  (one memory probe)


# -- children -------------------------------------------------------------------------------------------
def child_alloy(method: str, inputs: dict, out: Path) -> None:
    """Alloy: the method through run_method, as a job (the one-shot rows of multitask_quality)."""
    import multitask_quality as mq
    import torch  # noqa: F401

    from merge_ops.context import JobContext, ResolvedModel
    from merge_ops.runner import run_method
    from merge_ops.spec import spec_from_dict

    tasks, data = inputs["tasks"], Path(inputs["data"])
    _, name, params = mq.ONE_SHOT[method]
    calibrated = name in ("regmean", "regmean_plusplus", "fisher")
    cal = {t: data / t / "calibration.jsonl" for t in tasks}
    spec = spec_from_dict({
        "method": name, "base": str(mq.base_dir()), "parameters": params,
        # position_ids (a buffer transformers 5 does not save) is aligned by the checkpoint reader itself
        "task_specific": [r"^classifier\."],
        "experts": [{"model": str(mq.expert_dir(t)), "name": t} for t in tasks],
        **({"calibration": {"tasks": {t: str(p) for t, p in cal.items()}, "max_length": mq.MAX_LEN,
                            "samples_per_task": ROWS}} if calibrated else {})})
    base = reset_peak()
    t0 = time.perf_counter()
    run_method(JobContext(spec=spec, base=ResolvedModel(str(mq.base_dir()), mq.base_dir()),
                          experts=[ResolvedModel(str(mq.expert_dir(t)), mq.expert_dir(t)) for t in tasks],
                          out_dir=out, calibration=cal if calibrated else {}))
    (out / "bench.json").write_text(json.dumps({"seconds": time.perf_counter() - t0,
                                                "peak_mib": rss_mib("VmHWM") - base, "load": os.getloadavg()}))


def child_fusionbench(method: str, inputs: dict, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import BertModel

    tasks, experts, base_path = inputs["tasks"], inputs["experts"], inputs["base"]
    rows = {t: inputs["rows"][t] for t in tasks}
    base0 = reset_peak()
    t0 = time.perf_counter()
    torch.manual_seed(0)

    def load(folder: str) -> BertModel:
        return BertModel.from_pretrained(folder).eval()

    def batches(ids: list[list[int]]):
        for s in range(0, len(ids), BATCH):
            chunk = ids[s: s + BATCH]
            n = max(len(x) for x in chunk)
            x = torch.zeros(len(chunk), n, dtype=torch.long)
            m = torch.zeros(len(chunk), n, dtype=torch.long)
            for i, r in enumerate(chunk):
                x[i, : len(r)], m[i, : len(r)] = torch.tensor(r), 1
            yield x, m

    def gram_hooks(modules: dict, weights: dict):
        counts: dict = {}

        def make(name):
            def hook(_m, inp, _o):  # FusionBench's CLIP hook: every row, padding included, running mean
                x = inp[0].detach().reshape(-1, inp[0].shape[-1])
                xtx = x.T @ x
                if name not in weights:
                    weights[name], counts[name] = xtx / x.shape[0], x.shape[0]
                else:
                    weights[name] = (weights[name] * counts[name] + xtx) / (counts[name] + x.shape[0])
                    counts[name] += x.shape[0]
            return hook
        return [m.register_forward_hook(make(n)) for n, m in modules.items()]

    base_model = load(base_path)
    base_sd = base_model.state_dict()
    merged: dict

    if method == "regmean":
        from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

        params: dict = {}
        weights_list = []
        with torch.no_grad():
            for t in tasks:
                model = load(experts[t])
                for k, v in model.state_dict().items():
                    params.setdefault(k, []).append(v)
                linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
                w: dict = {}
                hs = gram_hooks(linears, w)
                for x, m in batches(rows[t]):
                    model(input_ids=x, attention_mask=m)
                for h in hs:
                    h.remove()
                weights_list.append(w)
        merged = merging_with_regmean_weights(params, weights_list, 0.95, True)
    elif method == "regmean_pp":
        from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
        from fusion_bench.modelpool import BaseModelPool

        class BertRegMeanPP(RegMeanAlgorithmPlusPlus):
            """The hooks of RegMeanAlgorithmForCLIPPlusPlus, for a BERT encoder."""

            def merge_embedding_layer(self, models_to_merge_dict):
                sds = [m.state_dict() for m in models_to_merge_dict.values()]
                return {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0] if k.startswith("embeddings.")}

            def get_input_for_first_layer(self, model, train_dataset):
                out = []
                layer0 = model.encoder.layer[0]

                def grab(_m, args, kwargs):
                    out.append((args, kwargs))
                    raise StopIteration

                h = layer0.register_forward_pre_hook(grab, with_kwargs=True)
                for x, m in batches(train_dataset):
                    try:
                        model(input_ids=x, attention_mask=m)
                    except StopIteration:
                        pass
                h.remove()
                return out

            def get_layers(self, model):
                return model.encoder.layer

            def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
                merged_params_dict.update({f"encoder.layer.{layer_idx}.{k}": v for k, v in new_merged_params.items()})
                return merged_params_dict

            def layer_batches_forward(self, layer, batches_input):
                outs = []
                for args, kwargs in batches_input:
                    y = layer(*args, **kwargs)
                    y = y[0] if isinstance(y, tuple) else y
                    outs.append(((y, *args[1:]), kwargs))
                return outs

            def get_regmean_weights(self, model_name, layer, batches_input, linear_modules_to_merge):
                w: dict = {}
                hs = gram_hooks(linear_modules_to_merge, w)
                self.layer_batches_forward(layer, batches_input)
                for h in hs:
                    h.remove()
                return w

        pool = BaseModelPool({"_pretrained_": base_model, **{t: load(experts[t]) for t in tasks}})
        pool.load_train_dataset = lambda name: rows[name]  # the calibration rows, as token ids
        algo = BertRegMeanPP(num_regmean_examples=ROWS, exclude_param_names_regex=[],
                             reduce_non_diagonal_ratio=0.95, weight_transpose=True)
        merged = algo.run(pool).state_dict()
    elif method == "fisher":
        from fusion_bench.method.fisher_merging.fisher_merging import (
            get_param_squared_gradients,
            merging_with_fisher_weights,
        )

        params, fishers = {}, []
        for t in tasks:
            model = load(experts[t])
            sd = load_file(str(Path(experts[t]) / "model.safetensors"))
            hw, hb = sd["classifier.weight"], sd["classifier.bias"]
            for k, v in model.state_dict().items():
                params.setdefault(k, []).append(v.detach())
            acc: dict = {}
            n = 0
            for x, m in batches(rows[t]):  # clip_fisher_merging.get_fisher_weights, per batch
                h = model(input_ids=x, attention_mask=m).last_hidden_state
                mk = m.unsqueeze(-1).to(h.dtype)
                logits = ((h * mk).sum(1) / mk.sum(1)) @ hw.T + hb
                p = torch.softmax(logits, -1).detach()
                loss = (torch.sqrt(p) * torch.log_softmax(logits, -1)).sum(-1).sum(0)
                model.zero_grad()
                loss.backward()
                # parameters no gradient reaches (the unused pooler) have none to square
                g = get_param_squared_gradients(model, [k for k, q in model.named_parameters() if q.grad is not None])
                for k, v in g.items():
                    acc[k] = acc[k] + v if k in acc else v.clone()
                n += x.shape[0]
            fishers.append({k: v / n for k, v in acc.items()})
            for k in params:
                if k not in fishers[-1]:
                    fishers[-1][k] = torch.zeros_like(params[k][-1])
        merged = merging_with_fisher_weights(params, fishers, torch.ones(len(tasks)) / len(tasks), True, 1e-6)
    else:
        tvs = []
        for t in tasks:
            sd = load(experts[t]).state_dict()
            tvs.append({k: (sd[k] - base_sd[k]) for k in base_sd if base_sd[k].is_floating_point()})
        if method == "wudi":
            from fusion_bench.method.wudi.wudi import wudi_merging

            zero = [k for k in tvs[0] if tvs[0][k].dim() == 2 and all(float(tv[k].abs().max()) == 0 for tv in tvs)]
            tv, scale = wudi_merging(tvs, accelerator="cpu", iter_num=300, exclude_keys=zero), 1.0
            tv = {k: v.detach() for k, v in tv.items()}
        elif method == "tsv_m":
            from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
                compute_and_sum_svd_mem_reduction,
            )

            tv, scale = compute_and_sum_svd_mem_reduction(tvs, exclude_keys=[], accelerator="cpu"), 1.0
        elif method == "iso_c":
            from fusion_bench.method.isotropic_merging.iso_utils import iso_c

            tv, scale = iso_c(tvs, accelerator="cpu"), 1.5
        else:
            from fusion_bench.method.isotropic_merging.iso_utils import iso_cts

            tv, scale = iso_cts(tvs, 0.8, accelerator="cpu"), 1.5
        merged = {k: base_sd[k] + scale * tv[k] if k in tv else base_sd[k] for k in base_sd}
    seconds = time.perf_counter() - t0
    peak = rss_mib("VmHWM") - base0
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in merged.items() if v.is_floating_point()},
              str(out / "model.safetensors"))
    (out / "bench.json").write_text(json.dumps({"seconds": seconds, "peak_mib": peak, "load": os.getloadavg()}))


# -- parent ----------------------------------------------------------------------------------------------
# the data-free methods see the same task vectors on both sides, so their merged tensors are comparable
# entry by entry; the calibrated ones do not (Grams with/without padding, a different Fisher estimator)
SAME_INPUTS = ("wudi", "tsv_m", "iso_c", "iso_cts")


def claim(out: Path) -> bool:
    """Take `out`'s lock (its pid inside) unless a live invocation holds it: two invocations given
    the methods in opposite orders share the CPU (one niced merge at a time gets little of a loaded one)."""
    lock = out.parent / f"{out.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid == 0:
                return False  # being created this instant
            if pid == os.getpid():
                return True
            try:
                os.kill(pid, 0)
                return False  # alive: it runs this merge
            except ProcessLookupError:
                pass
            lock.unlink(missing_ok=True)  # left by a dead invocation
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


def max_difference(alloy: Path, peer: Path, base: Path) -> dict:
    """Largest |Alloy − FusionBench| over the merged encoder tensors, absolute and relative to the
    largest change FusionBench made to that tensor (max |merged − θ₀|), with the tensor it occurs in."""
    import multitask_quality as mq

    a, p, b = (mq.load_st(d / "model.safetensors") for d in (alloy, peer, base))
    worst = {"max_abs_diff": 0.0, "max_abs_diff_tensor": None, "max_rel_diff": 0.0, "max_rel_diff_tensor": None}
    for n, x in p.items():
        if n not in a or n not in b or not x.is_floating_point() or n.startswith("classifier."):
            continue
        d = float((a[n].double() - x.double()).abs().max())
        change = float((x.double() - b[n].double()).abs().max())
        if d > worst["max_abs_diff"]:
            worst["max_abs_diff"], worst["max_abs_diff_tensor"] = d, n
        if change > 0 and d / change > worst["max_rel_diff"]:
            worst["max_rel_diff"], worst["max_rel_diff_tensor"] = d / change, n
    return worst


def main() -> None:
    import multitask_quality as mq
    import torch

    from merge_ops.learned.batches import load_calibration

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tasks", default=",".join(mq.TASKS))
    ap.add_argument("--data", type=Path, default=mq.DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "fusionbench_static.json")
    ap.add_argument("--skip-accuracy", action="store_true",
                    help="merge and compare tensors, time and memory only (scoring costs more CPU than a "
                         "merge; run again without it later: the merges are cached)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tasks = a.tasks.split(",")
    for t in tasks:
        mq.finetune_expert(a.data, t)
    base = mq.base_dir()
    # the rows Alloy's job reads: calibration.samples_per_task 256, seed 0
    rows = load_calibration({t: a.data / t / "calibration.jsonl" for t in tasks}, tasks, tokenizer_dir=base,
                            max_length=mq.MAX_LEN, samples_per_task=ROWS, seed=0)
    WORK.mkdir(parents=True, exist_ok=True)
    inputs = {"tasks": tasks, "data": str(a.data), "base": str(base), "rows": rows,
              "experts": {t: str(mq.expert_dir(t)) for t in tasks}}
    (WORK / "inputs.json").write_text(json.dumps(inputs))
    ev = None if a.skip_accuracy else mq.Evaluator(a.data, tasks)
    heads = {t: mq.split_heads(mq.load_st(mq.expert_dir(t) / "model.safetensors"))[1] for t in tasks}
    expert_acc: dict = {}
    for t in tasks if ev is not None else []:  # multitask_quality's cached scores (same keys): written back, so each is computed once
        cached = json.loads(mq.EVALS.read_text()) if mq.EVALS.exists() else {}
        if f"experts|{t}" not in cached:
            sd = mq.split_heads(mq.load_st(mq.expert_dir(t) / "model.safetensors"))[0]
            cached = {**(json.loads(mq.EVALS.read_text()) if mq.EVALS.exists() else {}),
                      f"experts|{t}": ev.accuracy(sd, heads, [t])[t]}
            mq.EVALS.write_text(json.dumps(cached, indent=1))
        expert_acc[t] = cached[f"experts|{t}"]
    results = []
    for m in a.methods.split(","):
        row: dict = {"method": m}
        for side, py in (("alloy", sys.executable), ("fusionbench", str(PEERS_PY))):
            out = WORK / side / f"{m}-{'_'.join(tasks)}"
            if not (out / "bench.json").exists() and claim(out):
                import shutil

                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["nice", "-n", "10", py, __file__, "--child", side, m, str(out)], check=True,
                               # one thread on both sides (Alloy's SVD methods would take every core)
                               env={**os.environ, "OMP_NUM_THREADS": "1", "ALLOY_MATRIX_THREADS": "1"})
            while not (out / "bench.json").exists():  # another invocation is running this merge
                if claim(out):
                    raise RuntimeError(f"{out}: the invocation running this merge died; run again")
                time.sleep(10)
            b = json.loads((out / "bench.json").read_text())
            scored = out / "accuracy.json"  # kept with the merge: another invocation need not score it again
            if scored.exists():
                acc = json.loads(scored.read_text())
            elif ev is not None:
                acc = ev.accuracy(mq.load_st(out / "model.safetensors"), heads)
                scored.write_text(json.dumps(acc))
            else:
                acc = None
            row[side] = {"avg_acc": round(sum(acc.values()) / len(acc), 4) if acc else None,
                         "normalized": round(sum(acc[t] / expert_acc[t] for t in tasks) / len(tasks), 4)
                         if acc and expert_acc else None,
                         "per_task": {t: round(v, 4) for t, v in acc.items()} if acc else None,
                         "seconds": round(b["seconds"], 2), "peak_mib": round(b["peak_mib"], 1)}
            row[side]["load_avg_1m_at_end"] = round(b.get("load", [float("nan")])[0], 2)
        row["same_inputs"] = m in SAME_INPUTS
        row |= max_difference(WORK / "alloy" / f"{m}-{'_'.join(tasks)}",
                              WORK / "fusionbench" / f"{m}-{'_'.join(tasks)}", base)
        row["time_ratio"] = round(row["alloy"]["seconds"] / row["fusionbench"]["seconds"], 3)
        row["mem_ratio"] = round(row["alloy"]["peak_mib"] / max(row["fusionbench"]["peak_mib"], 1e-9), 3)
        results.append(row)
        print(json.dumps(row), flush=True)
        # one entry per task set, rewritten after every method (an interrupted run keeps what it measured)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        doc = json.loads(a.out.read_text()) if a.out.exists() else {}
        runs = doc.get("runs", {}) if isinstance(doc.get("runs"), dict) else {}
        runs[",".join(tasks)] = {"tasks": tasks, "rows_per_task": ROWS, "expert_acc": expert_acc,
                                 "cpu_count": os.cpu_count(), "results": results}
        a.out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print("\n| method | Alloy norm. | FusionBench norm. | max abs diff (rel.) | time ratio | memory ratio | load 1m |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        diff = f"{r['max_abs_diff']:.2e} ({r['max_rel_diff']:.2e})" if r["same_inputs"] else "— (other inputs)"
        print(f"| {r['method']} | {r['alloy']['normalized']} | {r['fusionbench']['normalized']} | {diff} | "
              f"{r['time_ratio']:.2f} | {r['mem_ratio']:.2f} | {r['alloy']['load_avg_1m_at_end']}/"
              f"{r['fusionbench']['load_avg_1m_at_end']} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        side, method, out = sys.argv[2], sys.argv[3], Path(sys.argv[4])
        inp = json.loads((WORK / "inputs.json").read_text())
        (child_alloy if side == "alloy" else child_fusionbench)(method, inp, out)
    else:
        main()
