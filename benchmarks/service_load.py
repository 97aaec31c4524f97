"""Load on the whole service: N concurrent clients submit small merge jobs and poll them for D seconds
against `alloy up` (its own redis-server, the API, one worker, the reaper), started here in a temp dir.

Reports submit and status latency (p50/p99), jobs completed, and the two invariants: no job lost
(every accepted job ends `succeeded`) and none run twice (one `running` event and attempts == 1 each).

    .venv/bin/python benchmarks/service_load.py --clients 50 --duration 60

Open loop (`--rates`): submits are sent at fixed arrival rates whatever the answers do (a slow answer
does not slow the next send, so queueing in the server shows in the tail instead of hiding it), each
rate for `--rate-seconds`, while the worker merges the jobs already accepted. Latency runs from the
scheduled send time. Reports p50/p99/max per rate, the achieved rate, the load average around each
rate, and the highest rate whose p99 stays under `--target-ms`. `--profile` samples the API process
with py-spy during the highest rate (pip install py-spy; collapsed stacks next to the results).

    .venv/bin/python benchmarks/service_load.py --rates 10,25,50,100 --rate-seconds 20
    .venv/bin/python benchmarks/service_load.py --rates 10,25,50,100 --database-url postgresql+psycopg://...
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


def cpu_ms(pid: int | None) -> float:
    """User + system CPU time of a process so far (ms): CPU per submit does not depend on how busy
    the rest of a shared machine is, unlike latency."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


async def open_loop(api: str, token: str, spec: dict, rate: float, seconds: float, api_pid: int | None,
                    request_timeout: float = 5.0) -> dict:
    """Send `rate` submits per second for `seconds`, each at its scheduled time (not after the previous
    answer); latency counts from the scheduled time, so a send the client could not make on time is
    charged to the run (coordinated omission). An answer later than `request_timeout` counts as an
    error (`timeout`), and whatever is unanswered `request_timeout` after the last send is given up:
    past saturation the queue only grows."""
    lat_ms: list[float] = []
    errors: dict[str, int] = {}
    n = int(rate * seconds)
    # at most 64 requests in flight: httpcore assigns queued requests to connections in O(n²), which
    # past saturation starved this client itself; later sends wait here, and the wait is counted
    gate = asyncio.Semaphore(64)
    async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {token}"},
                                 timeout=request_timeout, limits=httpx.Limits(max_connections=64)) as c:
        async def one(i: int, due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                async with gate:
                    r = await c.post("/v1/jobs", json={**spec, "seed": i})
                code = str(r.status_code)
            except httpx.TimeoutException:
                code = "timeout"
            except httpx.HTTPError as e:
                code = type(e).__name__
            if code == "202":
                lat_ms.append((time.perf_counter() - due) * 1000)
            else:
                errors[code] = errors.get(code, 0) + 1

        load0, cpu0 = os.getloadavg()[0], cpu_ms(api_pid)
        t0 = time.perf_counter() + 0.2
        tasks = [asyncio.ensure_future(one(i, t0 + i / rate)) for i in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=seconds + request_timeout + 1)
        for t in pending:
            t.cancel()
        if pending:
            errors["unanswered"] = len(pending)
        wall = time.perf_counter() - t0
        cpu = cpu_ms(api_pid) - cpu0
    return {"rate": rate, "sent": n, "ok": len(lat_ms), "errors": errors,
            "achieved_per_s": round(len(lat_ms) / wall, 1), "p50_ms": round(pct(lat_ms, 50), 1),
            "p99_ms": round(pct(lat_ms, 99), 1), "max_ms": round(max(lat_ms, default=float("nan")), 1),
            "api_cpu_ms_per_submit": round(cpu / max(len(lat_ms), 1), 2),
            "loadavg_1m_before": round(load0, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)}


def _api_pid(up_pid: int) -> int | None:
    """The uvicorn process `alloy up` started (its child, in its own session)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == up_pid and b"serve" in argv:
            return int(proc.name)
    return None


def run_rates(api: str, token: str, spec: dict, rates: list[float], seconds: float, profile: Path | None,
              profile_rate: float | None, up_pid: int, on_rate=lambda results: None) -> list[dict]:
    """Each rate in turn; `on_rate(results so far)` after each (the file is written as the run goes)."""
    out: list[dict] = []
    pid = _api_pid(up_pid)
    for rate in rates:
        spy = None
        if profile is not None and rate == profile_rate and pid is not None:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                    "--format", "raw", "--rate", "200", "--duration", str(int(seconds) + 1),
                                    "--output", str(profile), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res = asyncio.run(open_loop(api, token, spec, rate, seconds, pid))
        if spy is not None:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:  # it has written its file; a profiler must not sink the run
                spy.kill()
                spy.wait()
        print(json.dumps(res), flush=True)
        out.append(res)
        on_rate(out)
        time.sleep(2)  # let the answers of this rate settle before the next one
    return out


def job_counts(api: str) -> dict[str, int]:
    """Jobs by state from /metrics (how far the worker got while the load ran)."""
    counts: dict[str, int] = {}
    try:
        text = httpx.get(api + "/metrics", timeout=60).text
    except httpx.HTTPError:  # a saturated API: the latencies are the result, not these counts
        return counts
    for line in text.splitlines():
        if line.startswith("alloy_jobs{"):
            state = line.split('state="', 1)[1].split('"', 1)[0]
            counts[state] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def quota_count(history: int, database_url: str | None, repeat: int = 200) -> dict:
    """The quota's count of a tenant's active jobs (run on every submit) and a list by state, with
    `history` finished jobs of that tenant in the table, with the (tenant, state) index and with it
    dropped."""
    from sqlalchemy import insert, text

    from jobs.migrate import upgrade
    from jobs.models import Job
    from jobs.store import Store

    with tempfile.TemporaryDirectory(prefix="alloy-count-") as tmp:
        url = database_url or f"sqlite:///{Path(tmp) / 'count.db'}"
        upgrade(url)
        store = Store(url)
        rows = [{"id": f"job_h{i:020d}", "tenant": "acme", "state": "succeeded" if i >= 10 else "queued",
                 "method": "task_arithmetic", "queue": "cpu", "spec": {}, "spec_hash": "0" * 64}
                for i in range(history)]
        with store.tx() as s:
            for k in range(0, history, 5000):
                s.execute(insert(Job), rows[k:k + 5000])
        out: dict = {"history": history, "database": store.engine.dialect.name}
        for label in ("with_index", "without_index"):
            assert store.count_active("acme") == 10
            t0 = time.perf_counter()
            for _ in range(repeat):
                store.count_active("acme")
            out[f"count_{label}_ms"] = round((time.perf_counter() - t0) / repeat * 1000, 3)
            t0 = time.perf_counter()
            for _ in range(repeat):  # GET /v1/jobs?state=queued: the page of the 10 queued ones
                assert len(store.list_jobs("acme", state="queued", limit=20)[0]) == 10
            out[f"list_queued_{label}_ms"] = round((time.perf_counter() - t0) / repeat * 1000, 3)
            if label == "with_index":
                with store.tx() as s:
                    s.execute(text("DROP INDEX ix_jobs_tenant_state"))
                    if store.engine.dialect.name == "postgresql":
                        s.execute(text("ANALYZE jobs"))
        store.engine.dispose()
        if database_url:  # a shared database: leave it as found
            with Store(database_url).tx() as s:
                s.execute(text("DELETE FROM jobs WHERE id LIKE 'job_h%'"))
                s.execute(text("CREATE INDEX ix_jobs_tenant_state ON jobs (tenant, state, seq)"))
    return out


def save_open_loop(args: argparse.Namespace, results: list[dict], counts: dict | None) -> dict:
    """Write this database's run into the results file (which keeps the other database's run).
    counts=None: written after a rate, the run is not over (`complete: false`)."""
    db = "postgresql" if args.database_url and args.database_url.startswith("postgres") else "sqlite"
    under = [r["rate"] for r in results if r["p99_ms"] < args.target_ms and not r["errors"]]
    report = {"mode": "open loop", "database": db, "rate_seconds": args.rate_seconds,
              "worker_concurrency": args.worker_concurrency, "complete": counts is not None,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared: see loadavg)",
              "rates": results, "target_p99_ms": args.target_ms,
              "highest_rate_under_target": max(under, default=None), "jobs_at_end": counts}
    runs = []
    if args.out.exists():  # one file holds both databases' runs
        runs = [r for r in json.loads(args.out.read_text()).get("runs", []) if r.get("database") != db]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": [*runs, report]}, indent=2) + "\n")
    return report


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
    ap.add_argument("--rates", default=None, metavar="R1,R2,...",
                    help="open loop: submits per second, one rate after the other (e.g. 10,25,50,100)")
    ap.add_argument("--rate-seconds", type=float, default=20, help="open loop: seconds per rate")
    ap.add_argument("--target-ms", type=float, default=50, help="open loop: the p99 a rate must stay under")
    ap.add_argument("--profile", type=float, default=None, metavar="RATE",
                    help="open loop: py-spy the API process during this rate")
    ap.add_argument("--quota-count", type=int, default=0, metavar="N",
                    help="instead: time the quota's active-job count with N finished jobs in the table, with "
                         "and without its index (SQLite in a temp dir, or --database-url)")
    args = ap.parse_args()
    # SIGTERM (timeout(1), a CI runner) unwinds like Ctrl-C, so `alloy up` below is always stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quota_count:
        print(json.dumps(quota_count(args.quota_count, args.database_url)))
        return 0
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        "service_burst.json" if args.burst else "service_open_loop.json" if args.rates else "service_load.json")

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
                   # a load test: a quota never reached, but counted on every submit as in production
                   ALLOY_MAX_ACTIVE_JOBS_PER_TENANT="1000000")
        if args.database_url:
            env["ALLOY_DATABASE_URL"] = args.database_url
        up = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port),
                               "--worker-concurrency", str(args.worker_concurrency)],
                              env=env, cwd=ROOT, start_new_session=True)
        try:
            wait_http(api + "/readyz", 300, [up])  # a loaded machine starts slowly
            token = (data / "dev-token").read_text().strip()
            t0 = time.monotonic()
            if args.rates:
                rates = [float(r) for r in args.rates.split(",")]
                prof = args.out.with_suffix(".pyspy.txt") if args.profile else None
                res = run_rates(api, token, spec, rates, args.rate_seconds, prof, args.profile, up.pid,
                                on_rate=lambda done: save_open_loop(args, done, None))
                counts = job_counts(api)
            elif args.burst:
                res = asyncio.run(burst(api, token, spec, args.burst, args.burst_connections))
            else:
                res = asyncio.run(load(api, token, spec, args.clients, args.duration, args.poll))
            final = {} if args.rates else drain(api, token, res["ids"], args.drain_timeout)
            wall = time.monotonic() - t0
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)

    if args.rates:
        print(json.dumps(save_open_loop(args, res, counts), indent=2))
        return 0

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
