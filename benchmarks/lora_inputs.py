"""A static merge with a LoRA expert (`base+adapter`, applied per tensor as it streams) against the same
merge with the adapter materialised into a full checkpoint first: same tensors, time and peak RSS.

    .venv/bin/python benchmarks/lora_inputs.py [--hidden 512 --layers 8 --rank 16]

Each merge runs in its own process (peak RSS is per process). The materialised run does not count
the time or disk of writing the merged copy (mergekit's way), which Alloy never does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MERGE = """
import json, sys
from pathlib import Path
from merge_ops.runner import run_merge
from merge_ops.spec import spec_from_dict
spec = spec_from_dict(json.loads(sys.argv[1]))
o = run_merge(spec, Path(sys.argv[2]))
print(json.dumps({k: o.result.metrics[k] for k in ("seconds", "peak_rss_mb")}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file, save_file

    from merge_ops.checkpoint import CheckpointReader, CheckpointWriter, TensorSpec
    from merge_ops.lora.reader import LoraReader
    from tests.toy_models import make_experts, write_llama

    tmp = Path(tempfile.mkdtemp(prefix="alloy-lora-bench-"))
    dims = dict(hidden=args.hidden, layers=args.layers, intermediate=args.hidden * 11 // 4, vocab=8000,
                heads=max(1, args.hidden // 64))
    base = write_llama(tmp / "base", **dims)
    (e0,) = make_experts(base, 1, tmp, scale=0.01)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    with CheckpointReader(base) as r:
        for n in r.names():
            if n.startswith("model.layers.") and n.endswith("_proj.weight"):
                out, inp = r.shape(n)
                m = "base_model.model." + n.removesuffix(".weight")
                tensors[f"{m}.lora_A.weight"] = torch.randn(args.rank, inp, generator=g) * 0.01
                tensors[f"{m}.lora_B.weight"] = torch.randn(out, args.rank, generator=g) * 0.01
    ad = tmp / "adapter"
    ad.mkdir()
    save_file(tensors, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank}))
    full = tmp / "materialised"
    with LoraReader(base, ad) as r:
        with CheckpointWriter(full, [TensorSpec(n, r.shape(n), r.dtype(n)) for n in r.names()], 1 << 40) as w:
            for n in r.names():
                w.write(n, r.read(n))
    (full / "config.json").write_text((base / "config.json").read_text())

    results = {}
    for label, ref in (("base+adapter", f"{base}+{ad}"), ("materialised", str(full))):
        spec = {"method": "ties", "base": str(base), "parameters": {"density": 0.5},
                "experts": [{"model": str(e0)}, {"model": ref, "name": "lora"}]}
        out = tmp / f"out-{label}"
        p = subprocess.run([sys.executable, "-c", MERGE, json.dumps(spec), str(out)], cwd=ROOT, check=True,
                           capture_output=True, text=True)
        results[label] = json.loads(p.stdout.strip().splitlines()[-1])
        results[label]["out"] = out
    a = load_file(str(results["base+adapter"]["out"] / "model.safetensors"))
    b = load_file(str(results["materialised"]["out"] / "model.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    params = sum(t.numel() for t in a.values())
    print(f"{params / 1e6:.1f}M params bf16, ties of 2 experts, LoRA rank {args.rank} on every projection")
    for label, r in results.items():
        print(f"  {label:<13} wall {r['seconds']:.2f} s   peak RSS {r['peak_rss_mb']:.0f} MiB")
    print(f"  identical output tensors: {same}")


if __name__ == "__main__":
    main()
