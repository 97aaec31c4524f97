"""Workers dying: SIGKILL mid-learning, SIGTERM mid-job, a job that kills its worker every time."""

from __future__ import annotations

import json
import signal
import struct
import time
from collections import Counter
from pathlib import Path

import pytest

from jobs.models import Job
from tests.reliability.conftest import full_only, learned_spec, static_spec
from tests.reliability.harness import Cluster, MemoryWatchdog, group_pids

pytestmark = pytest.mark.integration
STEPS = 60  # learning steps of the tiny model: long enough to be caught mid-learning


def _calibration(c: Cluster, models: dict[str, Path]) -> dict[str, str]:
    return {n: c.upload_calibration(models[f"cal_{n}"].read_bytes()) for n in ("e0", "e1")}


def _learning(c: Cluster, worker: str, ids: list[str], kills: Counter, max_kills: int) -> Job | None:
    """A job that the live process group `worker` is learning right now, preferring one not killed
    yet (a killed attempt still reads `running` until its lease expires: its pid is gone)."""
    pids = set(group_pids(c.procs[worker].pid))
    jobs = [c.store.get_job(i) for i in ids]
    mid = [j for j in jobs if j.state == "running" and j.stage == "learn" and kills[j.id] < max_kills and j.worker and int(j.worker.rsplit(":", 1)[1]) in pids]
    return min(mid, key=lambda j: kills[j.id], default=None)


def _assert_published_once(c: Cluster, repo: str, jobs: dict[str, Job]) -> None:
    for job_id, job in jobs.items():
        assert job.state == "succeeded", (job_id, job.state, job.error_code, job.error_message)
        assert c.commits_for(repo, job_id) == 1, f"job {job_id} published {c.commits_for(repo, job_id)} times"
        commit = job.result["published"]["commit"]
        assert c.hub.log(repo)[commit]["job_id"] == job_id


def test_sigkill_mid_learning(cluster, models, full):
    """N kills over N jobs: every job succeeds, is published exactly once, and its attempts count
    its kills. A kill takes the worker's whole process group (node loss); a new worker replaces it."""
    n = 20 if full else 3
    c = cluster(workers=1, max_attempts=5)
    cal = _calibration(c, models)
    repo = "acme/killed"
    ids = [c.submit(learned_spec(models, cal, repo, STEPS)) for _ in range(n)]
    kills: Counter = Counter()
    for k in range(n):
        job = c.wait_for(lambda k=k: _learning(c, f"worker{k}", ids, kills, max_kills=2), timeout=180,
                         what=f"a job learning (kill {k + 1})", poll=0.02)
        c.signal(f"worker{k}", signal.SIGKILL)
        kills[job.id] += 1
        c.start_worker(f"worker{k + 1}")
    jobs = c.wait_jobs(ids, timeout=120 + 20 * n)
    _assert_published_once(c, repo, jobs)
    for job_id, job in jobs.items():
        assert job.attempts == 1 + kills[job_id], (job_id, job.attempts, kills[job_id])
    assert sum(kills.values()) == n
    print(f"\nRELIABILITY sigkill: jobs={n} kills={n} succeeded={len(jobs)} lost=0 duplicates=0 "
          f"attempts={sorted(j.attempts for j in jobs.values())}")


def test_sigterm_mid_job(cluster, models, full):
    """SIGTERM to the worker's main process while it learns: warm shutdown finishes the running job,
    gives back the message it had reserved; nothing is left `running`, a new worker finishes the rest."""
    full_only(full)
    c = cluster(workers=1, max_attempts=3)
    cal = _calibration(c, models)
    repo = "acme/termed"
    ids = [c.submit(learned_spec(models, cal, repo, STEPS)) for _ in range(2)]
    c.wait_for(lambda: _learning(c, "worker0", ids, Counter(), 1), timeout=180, what="a job learning", poll=0.02)
    c.signal("worker0", signal.SIGTERM, wait=180, group=False)
    time.sleep(4)  # past one lease: a job the stopped worker still held would show as expired now
    c.store.reap(requeue_after=3600)  # what the reaper does anyway; makes an expired lease visible
    states = {i: c.store.get_job(i).state for i in ids}
    assert "running" not in states.values(), states
    c.start_worker("worker1")
    _assert_published_once(c, repo, c.wait_jobs(ids, timeout=180))


def _memory_bomb(root: Path, gb: float) -> dict[str, str]:
    """Base + 2 experts whose one tensor is `gb` GB of float32 in a sparse file: tiny on disk, but a
    merge must hold it in memory."""
    n = int(gb * 2**30) // 4
    header = json.dumps({"big.weight": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    out = {}
    for name in ("base", "e0", "e1"):
        d = root / "bomb" / name
        d.mkdir(parents=True)
        with open(d / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + 4 * n)
        (d / "config.json").write_text('{"model_type": "llama"}')
        out[name] = str(d)
    return out


def test_job_that_kills_its_worker_every_time_fails_at_the_attempt_cap(cluster, models, tmp_path, full):
    """A spec that exhausts memory: each attempt is OOM-killed (a watchdog plays the kernel's OOM
    killer at 600 MB); after max_attempts the job is `failed` with that reason instead of looping."""
    full_only(full)
    cap = 2
    c = cluster(workers=1, max_attempts=cap)
    bomb = _memory_bomb(tmp_path, gb=1.5)
    with MemoryWatchdog(c, ["worker0"], limit_mb=600) as dog:
        job_id = c.submit({"method": "task_arithmetic", "base": bomb["base"],
                           "experts": [{"model": bomb["e0"]}, {"model": bomb["e1"]}]})
        job = c.wait_jobs([job_id], timeout=180)[job_id]
        time.sleep(2)  # several reaper sweeps later: still failed, no further attempt
        kills = dog.kills
    job = c.store.get_job(job_id)
    assert job.state == "failed" and job.error_code == "worker_lost", (job.state, job.error_code)
    assert f"attempt cap {cap}" in job.error_message
    assert job.attempts == cap and kills == cap
    assert c.procs["worker0"].poll() is None  # the worker's main process survived and keeps consuming
    ok = c.submit(static_spec(models))
    assert c.wait_jobs([ok])[ok].state == "succeeded"
