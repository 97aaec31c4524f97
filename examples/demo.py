"""`make demo`: build tiny Llama experts, merge them two ways, publish, load the result back.

Everything runs on this machine with no downloads: the models are random-init Llama checkpoints
(a base and three perturbed "experts") written straight to safetensors.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
MODELS = OUT / "models"
HUB = OUT / "hub"


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def build_models() -> None:
    from merge_ops.toy_models import write_llama

    dims = dict(hidden=256, layers=4, intermediate=688, vocab=2048, heads=8, kv_heads=4)
    base = write_llama(MODELS / "base", **dims, seed=0)
    for i, name in enumerate(("code", "math", "chat")):
        write_llama(MODELS / name, **dims, seed=10 + i, perturb_from=base, scale=0.01)
    print(f"base + 3 experts ({sum(f.stat().st_size for f in MODELS.rglob('*.safetensors')) / 1e6:.0f} MB "
          f"of bf16 safetensors) in {MODELS}")


def merge(spec: str, repo: str) -> Path:
    from service.cli import main

    out = OUT / "merged" / Path(spec).stem
    argv = ["merge", str(ROOT / "examples" / spec), "--out", str(out), "--publish", repo,
            "--hub-root", str(HUB)]
    print("$ alloy " + " ".join(argv), flush=True)
    if main(argv) != 0:
        sys.exit("demo: merge failed")
    return out


def load_back(repo: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from merge_ops.publish import LocalHub

    path = LocalHub(HUB).path(repo)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 17, 42, 7, 99]])
    with torch.no_grad():
        logits = model(ids).logits
    print(f"loaded {repo} from {path} with transformers: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")


def main() -> None:
    t0 = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    step("building a tiny Llama base and three experts")
    build_models()
    for spec, repo in (("task_arithmetic.yaml", "demo/merged-ta"), ("ties.yaml", "demo/merged-ties")):
        step(f"merging with {spec} and publishing to the local hub as {repo}")
        merge(spec, repo)
        load_back(repo)
    step(f"done in {time.perf_counter() - t0:.0f}s")
    print(f"  models:        {MODELS}\n  merged output: {OUT / 'merged'}\n  local hub:     {HUB}\n"
          f"  model cards:   {HUB}/demo/*/ (README.md, alloy_merge.json)")


if __name__ == "__main__":
    main()
