"""Load on the whole service: N concurrent clients submit small merge jobs and poll them for D seconds
against `alloy up` (its own redis-server, the API, one worker, the reaper), started here in a temp dir.

Reports submit and status latency (p50/p99), jobs completed, and the two invariants: no job lost
(every accepted job ends `succeeded`) and none run twice (one `running` event and attempts == 1 each).

    .venv/bin/python benchmarks/service_load.py --clients 50 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.cli_service import free_port, wait_http  # noqa: E402
from tests.toy_models import make_experts, write_llama  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def client(c: httpx.AsyncClient, spec: dict, stop_at: float, submit_ms: list, status_ms: list,
                 ids: list, poll: float) -> None:
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        r = await c.post("/v1/jobs", json=spec)
        submit_ms.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 202:
            raise RuntimeError(f"submit answered {r.status_code}: {r.text[:300]}")
        job_id = r.json()["id"]
        ids.append(job_id)
        while time.monotonic() < stop_at:
            await asyncio.sleep(poll)
            t0 = time.perf_counter()
            r = await c.get(f"/v1/jobs/{job_id}")
            status_ms.append((time.perf_counter() - t0) * 1000)
            if r.json()["state"] in TERMINAL:
                break


async def load(api: str, token: str, spec: dict, clients: int, duration: float, poll: float) -> dict:
    submit_ms: list[float] = []
    status_ms: list[float] = []
    ids: list[str] = []
    limits = httpx.Limits(max_connections=clients + 5)
    async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {token}"},
                                 timeout=60, limits=limits) as c:
        stop_at = time.monotonic() + duration
        await asyncio.gather(*(client(c, spec, stop_at, submit_ms, status_ms, ids, poll)
                               for _ in range(clients)))
    return {"submit_ms": submit_ms, "status_ms": status_ms, "ids": ids}


async def burst(api: str, token: str, spec: dict, n: int, connections: int) -> dict:
    """Submit n jobs at once (over `connections` connections); the clock starts at the first submit."""
    sem = asyncio.Semaphore(connections)
    ids: list[str] = []
    submit_ms: list[float] = []
    async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                                 limits=httpx.Limits(max_connections=connections)) as c:
        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await c.post("/v1/jobs", json={**spec, "seed": i})
                submit_ms.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 202:
                    raise RuntimeError(f"submit answered {r.status_code}: {r.text[:300]}")
                ids.append(r.json()["id"])
        t0 = time.time()
        await asyncio.gather(*(one(i) for i in range(n)))
    return {"ids": ids, "submit_ms": submit_ms, "t0": t0, "submitted_s": time.time() - t0}


def burst_report(res: dict, final: dict[str, dict]) -> dict:
    """Invariants plus queue-to-start latency (created -> first started) and throughput."""
    from datetime import datetime

    def ts(s: str) -> float:
        return datetime.fromisoformat(s).timestamp()

    done = [j for j in final.values() if j["state"] == "succeeded"]
    wait_s = [ts(j["started_at"]) - ts(j["created_at"]) for j in done if j.get("started_at")]
    last = max((ts(j["finished_at"]) for j in done if j.get("finished_at")), default=res["t0"])
    return {
        "submitted": len(res["ids"]), "completed": len(done),
        "lost": sum(1 for i in res["ids"] if i not in final or final[i]["state"] != "succeeded"),
        "duplicated": sum(1 for j in final.values() if j["attempts"] != 1 or j["running_events"] != 1),
        "submit_all_s": round(res["submitted_s"], 2),
        "submit_ms": {"p50": round(pct(res["submit_ms"], 50), 1), "p99": round(pct(res["submit_ms"], 99), 1)},
        "queue_to_start_s": {"p50": round(pct(wait_s, 50), 2), "p99": round(pct(wait_s, 99), 2),
                             "max": round(max(wait_s, default=float("nan")), 2)},
        "throughput_jobs_per_s": round(len(done) / max(last - res["t0"], 1e-9), 2),
    }


def drain(api: str, token: str, ids: list[str], timeout: float) -> dict[str, dict]:
    """Wait until every accepted job is terminal; returns the final records."""
    h = {"Authorization": f"Bearer {token}"}
    final: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=api, headers=h, timeout=30) as c:
        while time.monotonic() < deadline and len(final) < len(ids):
            for job_id in ids:
                if job_id not in final:
                    job = c.get(f"/v1/jobs/{job_id}").json()
                    if job["state"] in TERMINAL:
                        final[job_id] = job
            time.sleep(0.5)
        for job_id, job in final.items():
            text = c.get(f"/v1/jobs/{job_id}/events").text
            job["running_events"] = text.count('"state": "running"')
    return final


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between status polls per client")
    ap.add_argument("--worker-concurrency", type=int, default=2)
    ap.add_argument("--drain-timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default: results/service_load.json, or service_burst.json with --burst)")
    ap.add_argument("--burst", type=int, default=0, metavar="N",
                    help="instead of the timed load: submit N jobs at once, wait for all, report queue-to-start "
                         "latency and throughput (the reliability suite's 1,000-job burst)")
    ap.add_argument("--burst-connections", type=int, default=50)
    ap.add_argument("--database-url", default=None,
                    help="job store for the run (default: SQLite in the temp dir), e.g. an empty PostgreSQL db")
    args = ap.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        "service_burst.json" if args.burst else "service_load.json")

    with tempfile.TemporaryDirectory(prefix="alloy-load-") as tmp:
        data = Path(tmp)
        base = write_llama(data / "models" / "base", hidden=32, layers=2, intermediate=64, vocab=64)
        experts = make_experts(base, 2, data / "models")
        spec = {"method": "task_arithmetic", "base": str(base), "experts": [{"model": str(e)} for e in experts],
                "parameters": {"lambda": 0.5}}
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
        env.update(ALLOY_DATA_DIR=str(data), ALLOY_ALLOWED_ROOTS=json.dumps([str(data)]), ALLOY_LOG_LEVEL="WARNING",
                   ALLOY_MAX_ACTIVE_JOBS_PER_TENANT="0")  # a load test: no per-tenant quota
        if args.database_url:
            env["ALLOY_DATABASE_URL"] = args.database_url
        up = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port),
                               "--worker-concurrency", str(args.worker_concurrency)],
                              env=env, cwd=ROOT, start_new_session=True)
        try:
            wait_http(api + "/readyz", 120, [up])
            token = (data / "dev-token").read_text().strip()
            t0 = time.monotonic()
            if args.burst:
                res = asyncio.run(burst(api, token, spec, args.burst, args.burst_connections))
            else:
                res = asyncio.run(load(api, token, spec, args.clients, args.duration, args.poll))
            final = drain(api, token, res["ids"], args.drain_timeout)
            wall = time.monotonic() - t0
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)

    if args.burst:
        report = {"burst": args.burst, "worker_concurrency": args.worker_concurrency,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "wall_s_with_drain": round(wall, 1),
                  **burst_report(res, final)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0 if not report["lost"] and not report["duplicated"] else 1

    ids = res["ids"]
    lost = [i for i in ids if i not in final or final[i]["state"] != "succeeded"]
    dup = [i for i, j in final.items() if j["attempts"] != 1 or j["running_events"] != 1]
    report = {
        "clients": args.clients, "duration_s": args.duration, "poll_s": args.poll,
        "worker_concurrency": args.worker_concurrency, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "submitted": len(ids), "completed": sum(j["state"] == "succeeded" for j in final.values()),
        "lost": len(lost), "duplicated": len(dup), "wall_s_with_drain": round(wall, 1),
        "submit_ms": {"n": len(res["submit_ms"]), "p50": round(pct(res["submit_ms"], 50), 1),
                      "p99": round(pct(res["submit_ms"], 99), 1),
                      "mean": round(statistics.fmean(res["submit_ms"]), 1) if res["submit_ms"] else None},
        "status_ms": {"n": len(res["status_ms"]), "p50": round(pct(res["status_ms"], 50), 1),
                      "p99": round(pct(res["status_ms"], 99), 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if not lost and not dup else 1


if __name__ == "__main__":
    sys.exit(main())
