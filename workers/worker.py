"""A Celery worker process (`alloy worker` runs `python -m workers.worker --queues cpu ...`)."""

from __future__ import annotations

import argparse
import os

from jobs.queue import CPU, GPU, QUEUES, parse_queues


def celery_argv(queues: list[str], concurrency: int, name: str | None, log_level: str) -> list[str]:
    argv = ["worker", "-Q", ",".join(queues), "-P", "prefork", "--prefetch-multiplier=1",
            "--without-gossip", "--without-mingle", "-l", log_level,
            "-n", name or f"alloy-{'-'.join(queues)}-{os.getpid()}@%h"]
    if GPU in queues:
        # one job per process on GPU workers: a fresh child per job releases the CUDA context
        return argv + ["-c", "1", "--max-tasks-per-child=1"]
    return argv + ["-c", str(concurrency)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.worker", description="run a Celery worker")
    p.add_argument("--queues", default=CPU, help=f"comma-separated, of {', '.join(QUEUES)}")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    try:
        queues = parse_queues(args.queues)
    except ValueError as e:
        p.error(str(e))

    from jobs.settings import get_settings
    from workers.app import app

    app.worker_main(celery_argv(queues, args.concurrency, args.name, get_settings().log_level))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
