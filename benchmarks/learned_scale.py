"""Learned-merge memory and step time against K and model size, streamed vs in-memory, with the plan.

    .venv/bin/python benchmarks/learned_scale.py --quick        # tiny + small random Llamas, K = 1,2,4,8
    .venv/bin/python benchmarks/learned_scale.py --models smollm2,302m,1b --append
    .venv/bin/python benchmarks/learned_scale.py --steptime small:4:3:64   # CPU s per step, both engines, one process

Every row is one AdaMerging job (layer-wise) in a fresh process (so its peak RSS is its own), on
Llamas in bf16 (float32 compute): `tiny`/`small` (3 steps, batch 4 × 64 tokens per task), `smollm2`
(the causal-LM benchmark's SmolLM2-135M from benchmarks/.cache/smollm2/base when present, else a
random Llama of its shape — untied head, so 163M parameters; 2 steps, batch 2 × 32), the static
benchmark's `302m` and a `1b` Llama from a config with random weights (2 steps, batch 1 × 32).
`peak_mb` is the job's peak RSS; on CPU the device is the host, so `peak_device_mb` is the same number
(on CUDA it would be the allocator's peak); `runtime_mb` is the child's RSS after importing torch and
transformers, before the job; `predicted_peak_mb` is merge_ops/learned/plan.py's device prediction.
`step_s` is the mean step time after the first step. Rows run under ALLOY_MEMORY_BUDGET (default 10
GiB here: the machine has 23 GiB shared with other jobs); a row whose plan exceeds it is recorded as
`refused` with its prediction, as the worker would refuse it. Results: benchmarks/results/learned_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> write_llama dims
    "tiny": dict(hidden=128, layers=4, intermediate=352, vocab=2048, heads=4),
    "small": dict(hidden=384, layers=8, intermediate=1024, vocab=8192, heads=6),
    "smollm2": dict(hidden=576, layers=30, intermediate=1536, vocab=49152, heads=9, kv_heads=3),
    "302m": dict(hidden=1024, layers=16, intermediate=2816, vocab=32000, heads=16),  # the static benchmark's
    "1b": dict(hidden=2048, layers=16, intermediate=5632, vocab=32000, heads=32),
}
RUN = {  # name -> (steps, batch, tokens)
    "tiny": (3, 4, 64), "small": (3, 4, 64), "smollm2": (1, 1, 16), "302m": (1, 1, 16), "1b": (1, 1, 16),
}
SMOLLM2 = ROOT / "benchmarks" / ".cache" / "smollm2" / "base"

CHILD = r"""
import json, os, sys
from pathlib import Path
rss0 = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
import torch, transformers  # noqa: the runtime a worker has loaded before any job
from merge_ops.errors import InputError
from merge_ops.learned.plan import plan_memory
from merge_ops.runner import run_merge
from merge_ops.spec import spec_from_dict
base, cal, out, k, steps, batch, tokens = sys.argv[1:4] + [int(x) for x in sys.argv[4:8]]
runtime = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
experts = [str(Path(sys.argv[8]) / f"expert{i}") for i in range(k)]
spec = spec_from_dict({"method": "adamerging", "base": base,
    "experts": [{"model": e, "name": f"t{i}"} for i, e in enumerate(experts)],
    "parameters": {"steps": steps, "batch_size": batch, "granularity": "layer"},
    "calibration": {"tasks": {f"t{i}": cal for i in range(k)}, "max_length": tokens}, "seed": 0})
mode = os.environ["ALLOY_LEARNED_MODE"]
plan = plan_memory(Path(base), k=k, batch=batch, seq_len=tokens, mode=mode).to_dict()
try:
    m = run_merge(spec, Path(out)).result.metrics
except InputError as e:
    print("RESULT" + json.dumps({"refused": str(e), "memory_plan": plan, "runtime_mb": runtime}))
    sys.exit(0)
print("RESULT" + json.dumps({**{k: m[k] for k in ("peak_rss_mib", "step_seconds", "memory_plan")},
                             "runtime_mb": runtime}))
"""


def build(root: Path, name: str, k: int) -> tuple[Path, Path]:
    """(base, folder holding expert0..expert{k-1}); experts are the base + 0.002·N(0, 1) noise."""
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.toy_models import make_experts, write_llama

    d = root / name
    base = d / "base"
    if name == "smollm2" and SMOLLM2.is_dir():
        base, d = SMOLLM2, root / "smollm2-real"  # its experts apart from a random model's, built earlier
    elif not (base / "config.json").exists():  # written last: a folder without it is a killed run's
        write_llama(base, **MODELS[name], dtype=torch.bfloat16)
    have = len(list(d.glob("expert*/config.json")))
    if have < k:
        if base == SMOLLM2 or MODELS[name]["hidden"] >= 576:  # big: cheap noise (see _perturb)
            _perturb(base, d, k)
        else:
            make_experts(base, k, d, scale=0.002)
    return base, d


def _perturb(base: Path, d: Path, k: int) -> None:
    import shutil

    import torch

    from merge_ops.checkpoint import CheckpointReader, CheckpointWriter, TensorSpec

    # the noise is a 1M-entry N(0, 1) block tiled over each tensor and rolled per expert and tensor:
    # as far from the base as make_experts' (scale 0.002) at a fraction of the cost on a shared CPU
    noise = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1))
    with CheckpointReader(base) as r:
        for i in range(k):
            out = d / f"expert{i}"
            if (out / "config.json").is_file():
                continue  # written whole before (the config is copied last)
            layout = [TensorSpec(n, r.shape(n), r.dtype(n)) for n in r.names()]
            with CheckpointWriter(out, layout, 1 << 62) as w:
                for j, n in enumerate(r.names()):
                    t = r.read(n)
                    if t.is_floating_point():
                        reps = -(-t.numel() // noise.numel())
                        z = noise.roll(7919 * i + 104729 * j).repeat(reps)[: t.numel()].view(t.shape)
                        t = (t.float() + 0.002 * z).to(t.dtype)
                    w.write(n, t)
            for f in base.iterdir():
                if not f.name.endswith(".safetensors") and f.is_file():
                    shutil.copy(f, out / f.name)


def model_bytes(base: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from merge_ops.learned.plan import BYTES, _numel, safetensors_tensors

    return sum(_numel(s) * BYTES[t] for s, t in safetensors_tensors(base).values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--modes", default="in_memory,streamed")
    ap.add_argument("--quick", action="store_true", help="tiny and small only")
    ap.add_argument("--append", action="store_true", help="keep the other models' rows already in --out")
    ap.add_argument("--budget", default="10GB", help="ALLOY_MEMORY_BUDGET for every row")
    ap.add_argument("--work", type=Path, default=None, help="keep the models in this folder (default: a temp dir)")
    ap.add_argument("--rows", default=None, help="run only these K:mode pairs, in this order (e.g. 8:streamed,1:in_memory)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learned_scale.json")
    ap.add_argument("--steptime", default=None, help="MODEL:K:REPS:TOKENS — only the interleaved step-time comparison")
    a = ap.parse_args()
    if a.steptime:
        name, k, reps, tokens = a.steptime.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            t = steptime(a.work or Path(tmp), name, int(k), int(reps), int(tokens))
        # the median of the interleaved pairs' ratios (the load drifts between pairs, less within one)
        pairs = [s / m for s, m in zip(t["streamed"], t["in_memory"], strict=True)]
        print(json.dumps({"steptime": t, "ratio_streamed_over_in_memory": round(statistics.median(pairs), 2)}))
        return
    models = ["tiny", "small"] if a.quick else a.models.split(",")
    ks = [int(x) for x in a.ks.split(",")]
    old = json.loads(a.out.read_text())["rows"] if a.append and a.out.exists() else []
    rows = [r for r in old if r["model"] not in models or a.rows]
    with tempfile.TemporaryDirectory() as tmp:
        root = a.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        cal = root / "cal.jsonl"
        cal.write_text("".join(json.dumps({"input_ids": [(7 * j + m) % 2000 + 1 for m in range(64)]}) + "\n"
                               for j in range(16)))
        for name in models:
            pairs = ([(int(x.split(":")[0]), x.split(":")[1]) for x in a.rows.split(",")] if a.rows
                     else [(k, mode) for k in ks for mode in a.modes.split(",")])
            base, folder = build(root, name, max(k for k, _ in pairs))
            mb = model_bytes(base)
            steps, batch, tokens = RUN[name]
            for k, mode in pairs:
                out = root / f"out-{name}-{k}-{mode}"
                env = {**os.environ, "ALLOY_LEARNED_MODE": mode, "PYTHONPATH": str(ROOT),
                       "ALLOY_MEMORY_BUDGET": a.budget}
                r = subprocess.run([sys.executable, "-c", CHILD, str(base), str(cal), str(out), str(k),
                                    str(steps), str(batch), str(tokens), str(folder)],
                                   env=env, capture_output=True, text=True, cwd=ROOT)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
                if not line:
                    raise SystemExit(r.stderr[-3000:])
                m = json.loads(line[0][6:])
                plan = m["memory_plan"]
                row = {"model": name, "k": k, "mode": mode, "model_bytes": mb,
                       "steps": steps, "batch": batch, "tokens": tokens,
                       "runtime_mb": round(m["runtime_mb"], 1), "predicted_peak_mb": plan["peak_device_mib"]}
                if "refused" in m:
                    row.update(peak_mb=None, peak_device_mb=None, step_s=None, refused=m["refused"])
                else:
                    row.update(peak_mb=round(m["peak_rss_mib"], 1), peak_device_mb=round(m["peak_rss_mib"], 1),
                               step_s=m["step_seconds"])
                rows = [x for x in rows if (x["model"], x["k"], x["mode"]) != (name, k, mode)] + [row]
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps({"rows": rows, "machine": MACHINE}, indent=1) + "\n")


def steptime(root: Path, name: str, k: int, reps: int, tokens: int) -> dict[str, list[float]]:
    """CPU seconds per step of the two engines in one process, interleaved (a shared CPU's load drifts):
    AdaMerging's entropy loss, layer-wise, batch 4 × `tokens` per task, `reps` steps each after a warm-up."""
    import torch

    from merge_ops.learned.adapters import build_adapter
    from merge_ops.learned.batches import collate
    from merge_ops.learned.engine import MergeEngine, fit, load_merge_inputs
    from merge_ops.learned.groups import ParamGroups
    from merge_ops.learned.store import open_merge_inputs
    from merge_ops.learned.streaming import streamer_for
    from merge_ops.methods.adamerging import entropy_loss

    base, folder = build(root, name, k)
    exps, names = [folder / f"expert{i}" for i in range(k)], [f"t{i}" for i in range(k)]
    batches = [collate([[(7 * j + m + 13 * t) % 2000 + 1 for m in range(tokens)] for j in range(4)], 0)
               for t in range(k)]

    def engine(mode: str):
        if mode == "in_memory":
            ad = build_adapter(base, torch.float32)
            inp = load_merge_inputs(base, exps, names, only=ad.used)
        else:
            ad = build_adapter(base, torch.float32, skeleton=True)
            st = streamer_for(ad)
            inp = open_merge_inputs(base, exps, names, resident=st.held, only=ad.used)
            st.attach(inp, "cpu")
        ad.bind(inp.held_base())
        e = MergeEngine(inp, ParamGroups(inp.merged_shapes(), "layer"), init=0.3)
        if mode == "streamed":
            e.stream(ad)

        def loss(step, s):  # as AdaMerging's: tasks sharing a forward run as one (Adapter.task_groups)
            for group in ad.task_groups([{}] * k):
                outs = ad.forward_many(s.params, {}, [batches[t] for t in group])
                s.backward(sum(entropy_loss(o.logits) for o in outs))
        return e, loss

    import time

    engines = {m: engine(m) for m in ("in_memory", "streamed")}
    opts = {m: torch.optim.Adam([e.raw], lr=1e-3) for m, (e, _) in engines.items()}
    for m, (e, loss) in engines.items():  # one warm-up step each (first reads, allocator, caches)
        fit(e, loss, steps=1, optimizer=opts[m])
    # CPU seconds of the process per step (the prefetch thread's reads included): on a shared machine a
    # step's wall time is mostly waiting for a core, its CPU time is not
    times: dict[str, list[float]] = {m: [] for m in engines}
    for _ in range(reps):
        for m, (e, loss) in engines.items():
            c0 = time.process_time()
            fit(e, loss, steps=1, optimizer=opts[m])
            times[m].append(round(time.process_time() - c0, 3))
    return times


MACHINE = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, CPU only"


if __name__ == "__main__":
    main()
