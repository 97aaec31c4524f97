"""Learned-merge memory and step time against K and model size, streamed vs in-memory, with the plan.

    .venv/bin/python benchmarks/learned_scale.py --quick        # tiny + small random Llamas, K = 1,2,4,8
    .venv/bin/python benchmarks/learned_scale.py --models tiny,small,302m,1b

Every row is one AdaMerging job (layer-wise, 3 steps, batch 4 per task × 64 tokens) in a fresh process
(so its peak RSS is its own), on random-weight Llamas built from a config (bf16 checkpoints, float32
compute). `peak_mb` is the job's peak RSS; on CPU the device is the host, so `peak_device_mb` is the
same number (on CUDA it would be the allocator's peak); `predicted_peak_mb` is merge_ops/learned/plan.py's
device prediction. Results: benchmarks/results/learned_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> write_llama dims
    "tiny": dict(hidden=128, layers=4, intermediate=352, vocab=2048, heads=4),
    "small": dict(hidden=384, layers=8, intermediate=1024, vocab=8192, heads=6),
    "302m": dict(hidden=1024, layers=16, intermediate=2816, vocab=32000, heads=16),  # the static benchmark's
    "1b": dict(hidden=2048, layers=16, intermediate=5632, vocab=32000, heads=32),
}

CHILD = r"""
import json, os, sys
from pathlib import Path
from merge_ops.runner import run_merge
from merge_ops.spec import spec_from_dict
base, cal, out, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
experts = [str(Path(base).parent / f"expert{i}") for i in range(k)]
spec = spec_from_dict({"method": "adamerging", "base": base,
    "experts": [{"model": e, "name": f"t{i}"} for i, e in enumerate(experts)],
    "parameters": {"steps": 3, "batch_size": 4, "granularity": "layer"},
    "calibration": {"tasks": {f"t{i}": cal for i in range(k)}, "max_length": 64}, "seed": 0})
m = run_merge(spec, Path(out)).result.metrics
print("RESULT" + json.dumps({k: m[k] for k in ("peak_rss_mib", "step_seconds", "memory_plan")}))
"""


def build(root: Path, name: str, k: int) -> Path:
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.toy_models import make_experts, write_llama

    d = root / name
    base = d / "base"
    if not base.exists():
        write_llama(base, **MODELS[name], dtype=torch.bfloat16)
    have = len(list(d.glob("expert*")))
    if have < k:
        make_experts(base, k, d, scale=0.002)
    return base


def model_bytes(base: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from merge_ops.learned.plan import BYTES, _numel, safetensors_tensors

    return sum(_numel(s) * BYTES[t] for s, t in safetensors_tensors(base).values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--quick", action="store_true", help="tiny and small only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learned_scale.json")
    a = ap.parse_args()
    models = ["tiny", "small"] if a.quick else a.models.split(",")
    ks = [int(x) for x in a.ks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cal = root / "cal.jsonl"
        cal.write_text("".join(json.dumps({"input_ids": [(7 * j + m) % 2000 + 1 for m in range(64)]}) + "\n"
                               for j in range(16)))
        for name in models:
            base = build(root, name, max(ks))
            mb = model_bytes(base)
            for k in ks:
                for mode in ("in_memory", "streamed"):
                    out = root / f"out-{name}-{k}-{mode}"
                    env = {**os.environ, "ALLOY_LEARNED_MODE": mode, "PYTHONPATH": str(ROOT)}
                    r = subprocess.run([sys.executable, "-c", CHILD, str(base), str(cal), str(out), str(k)],
                                       env=env, capture_output=True, text=True, cwd=ROOT)
                    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
                    if not line:
                        raise SystemExit(r.stderr[-3000:])
                    m = json.loads(line[0][6:])
                    row = {"model": name, "k": k, "mode": mode, "model_bytes": mb,
                           "peak_mb": round(m["peak_rss_mib"], 1), "peak_device_mb": round(m["peak_rss_mib"], 1),
                           "predicted_peak_mb": m["memory_plan"]["peak_device_mib"],
                           "step_s": m["step_seconds"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"rows": rows, "machine": machine}, indent=1) + "\n")


if __name__ == "__main__":
    main()
