"""One learned job over several ranks: the job's own process is rank 0, the others are launched here.

A GPU worker that owns N devices runs a learned job on all of them (data parallel, distributed.py):
the worker wraps the job in `ranks(N)`; when the learned driver starts it calls `helper_ranks(ctx)`,
which (as torchrun would) starts N − 1 Python processes with `subprocess` — a Celery prefork child is
a daemon process and may not use multiprocessing — gives each its rank, the rendezvous address and
the resolved job (spec, local model folders, calibration files), and joins the process group as rank
0 (`nccl` on CUDA, `gloo` on CPU). Every rank runs the same learned driver on its own device
(`cuda:<rank>`), with the same seeded batch streams; rank 0 reports progress, honours cancels and
writes the outputs, the helpers' outputs go to a temporary folder and are dropped.

A helper that fails ends the job with its error (rank 0 waits for the helpers after learning; a rank
blocked in a collective gives up after ALLOY_DIST_TIMEOUT_SECONDS, default 600). A cancelled or failed
rank 0 terminates its helpers.

CPU: `ranks(2)` runs the same path with gloo (tests/merge_ops/test_learned_launch.py checks that it
learns the coefficients of one process). The CUDA path (nccl, one device per rank) is built to be
correct but has not been run: no GPU was available to this project.
"""

from __future__ import annotations

import contextvars
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from merge_ops.errors import MergeFailed

_WORLD: contextvars.ContextVar[int] = contextvars.ContextVar("alloy_learned_ranks", default=1)


@contextmanager
def ranks(n: int) -> Iterator[None]:
    """Learned jobs started inside run on `n` ranks (the worker: one per GPU it owns)."""
    token = _WORLD.set(max(1, int(n)))
    try:
        yield
    finally:
        _WORLD.reset(token)


def world_for(device: str) -> int:
    """Ranks for a job on `device`: every visible GPU for CUDA, else ALLOY_LEARNED_RANKS (default 1)."""
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return max(1, int(os.environ.get("ALLOY_LEARNED_RANKS", "1") or 1))


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("ALLOY_DIST_TIMEOUT_SECONDS", "600")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_doc(ctx: Any) -> dict[str, Any]:
    def model(m: Any) -> dict[str, Any]:
        return {"ref": m.ref, "path": str(m.path), "adapter": str(m.adapter) if m.adapter else None}

    return {"spec": ctx.spec.model_dump(mode="json", exclude_none=True), "base": model(ctx.base),
            "experts": [model(e) for e in ctx.experts],
            "calibration": {n: str(p) for n, p in ctx.calibration.items()}, "device": ctx.device}


def _init(rank: int, world: int, port: int, device: str) -> str:
    """Join the group; the rank's device (`cuda:<rank>` on CUDA)."""
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=_timeout())
    return f"cuda:{rank}" if cuda else device


@contextmanager
def helper_ranks(ctx: Any) -> Iterator[None]:
    """Run the body as rank 0 of `ranks(n)` ranks (a no-op for one rank or inside a group)."""
    import torch.distributed as dist

    world = _WORLD.get()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="alloy-ranks-"))
    (tmp / "job.json").write_text(json.dumps(_job_doc(ctx)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([p for p in sys.path if p])}
    procs = [subprocess.Popen([sys.executable, "-m", "merge_ops.learned.launch", str(tmp), str(r), str(world),
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=(tmp / f"rank{r}.log").open("w"))
             for r in range(1, world)]
    ok = False
    try:
        ctx.device = _init(0, world, port, ctx.device)
        yield
        ok = True
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        failed = []
        for r, p in enumerate(procs, 1):
            if not ok:
                p.terminate()
            try:
                rc = p.wait(timeout=_timeout().total_seconds())
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            if ok and rc != 0:
                failed.append(f"rank {r} exited with {rc}: " + (tmp / f"rank{r}.log").read_text()[-1500:])
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if failed:
            raise MergeFailed("a learning rank failed: " + "; ".join(failed))


def _helper(folder: str, rank: int, world: int, port: int) -> None:
    """A helper rank: the resolved job from rank 0, learned on this rank's device, outputs dropped."""
    import torch
    import torch.distributed as dist

    from merge_ops.context import JobContext, ResolvedModel
    from merge_ops.runner import run_method
    from merge_ops.spec import spec_from_dict

    doc = json.loads((Path(folder) / "job.json").read_text())

    def model(d: dict[str, Any]) -> ResolvedModel:
        return ResolvedModel(d["ref"], Path(d["path"]), adapter=Path(d["adapter"]) if d["adapter"] else None)

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    device = _init(rank, world, port, doc["device"])
    try:
        with tempfile.TemporaryDirectory(prefix=f"alloy-rank{rank}-") as out:
            ctx = JobContext(spec=spec_from_dict(doc["spec"]), base=model(doc["base"]),
                             experts=[model(e) for e in doc["experts"]], out_dir=Path(out) / "model",
                             device=device, calibration={n: Path(p) for n, p in doc["calibration"].items()})
            run_method(ctx)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _helper(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
