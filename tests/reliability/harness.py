"""The fault harness: a whole Alloy service of real processes that a test may break.

`Cluster` starts its own redis-server, uvicorn API (`alloy serve`), Celery workers (`alloy worker`)
and reaper, each in its own process group (start_new_session=True), and only ever signals those
groups: nothing else on the machine is touched. Logs go to `<root>/logs/<name>.log`; a failing test
prints their tails. The job store is a SQLite file under root (or a PostgreSQL URL), so a test can
read the truth straight from the database while the API is down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import redis

from jobs.states import TERMINAL
from jobs.store import Store
from merge_ops.publish import LocalHub
from service.cli_service import free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "service.cli"]
TOKENS = {"acme": "rel-acme-token-5f0c", "other": "rel-other-token-9b1d", "admin": "rel-admin-token-77e2"}


def token_config() -> list[dict[str, Any]]:
    return [{"token": TOKENS["acme"], "tenant": "acme", "scopes": ["jobs:read", "jobs:write"]},
            {"token": TOKENS["other"], "tenant": "other", "scopes": ["jobs:read", "jobs:write"]},
            {"token": TOKENS["admin"], "tenant": "ops", "scopes": ["admin"]}]


def auth(who: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


class Cluster:
    def __init__(self, root: Path, *, database_url: str | None = None, **settings: Any):
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data = self.root / "data"
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.database_url = database_url or f"sqlite:///{self.data / 'alloy.db'}"
        conf = {  # short leases and sweeps so that a dead worker is noticed in seconds
            "data_dir": str(self.data), "database_url": self.database_url,
            "redis_url": f"redis://127.0.0.1:{self.redis_port}/0", "tokens": token_config(),
            "allowed_roots": [str(self.root)], "lease_seconds": 3, "heartbeat_seconds": 0.5,
            "reaper_interval": 0.3, "progress_interval": 0.1, "requeue_after": 5,
            "sse_poll_seconds": 0.1, "webhook_secret": "whsec-reliability", **settings}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
        self.env.update({f"ALLOY_{k.upper()}": v if isinstance(v, str) else json.dumps(v)
                         for k, v in conf.items()})
        self.env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_XET": "1"})
        self.procs: dict[str, subprocess.Popen] = {}
        self.redis: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30, headers=auth())
        self._store: Store | None = None
        self.hub = LocalHub(self.data / "hub")

    # -- processes --------------------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        p = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, **kw)
        log.close()
        self.procs[name] = p
        return p

    def signal(self, name: str, sig: int = signal.SIGKILL, wait: float | None = 60, group: bool = True) -> None:
        """Signal the process group of `name` (or only its leader: group=False, as a supervisor's SIGTERM
        reaches the main process) and wait for the leader to exit."""
        p = self.procs[name]
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig) if group else p.send_signal(sig)
            except ProcessLookupError:
                pass
        if wait is not None:
            p.wait(wait)
            if sig == signal.SIGKILL:  # a SIGKILLed group may leave children: make sure none survive
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def start_redis(self, appendonly: bool = True) -> None:
        (self.root / "redis").mkdir(exist_ok=True)
        self.redis = self.spawn("redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always",
            "--dir", str(self.root / "redis"), "--maxmemory-policy", "noeviction"])
        r = redis.Redis(port=self.redis_port)
        deadline = time.monotonic() + 15
        while True:
            try:
                r.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def migrate(self) -> None:
        subprocess.run(CLI + ["migrate"], env=self.env, cwd=ROOT, check=True, capture_output=True)

    def start_api(self) -> None:
        self.spawn("api", CLI + ["serve", "--skip-migrate", "--port", str(self.api_port)])
        wait_http(self.url + "/healthz", 60, [self.procs["api"]])

    def start_worker(self, name: str = "worker0", concurrency: int = 1) -> subprocess.Popen:
        return self.spawn(name, CLI + ["worker", "--concurrency", str(concurrency), "--name", f"{name}@rel"])

    def start_reaper(self) -> None:
        self.spawn("reaper", CLI + ["reaper"])

    def up(self, workers: int = 1) -> Cluster:
        self.start_redis()
        self.migrate()
        self.start_api()
        self.start_reaper()
        for i in range(workers):
            self.start_worker(f"worker{i}")
        return self

    def close(self) -> None:
        self.http.close()
        for name in reversed(list(self.procs)):
            self.signal(name, signal.SIGKILL, wait=10)

    def tail(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-chars:]}"
                         for f in sorted(self.logs.glob("*.log")))

    # -- the job store and the hub ------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.database_url)
        return self._store

    def submit(self, body: dict[str, Any], who: str = "acme") -> str:
        r = self.http.post("/v1/jobs", json=body, headers=auth(who))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def upload_calibration(self, content: bytes, who: str = "acme") -> str:
        r = self.http.post("/v1/calibration-sets", content=content, headers={
            **auth(who), "content-type": "application/x-ndjson"})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def wait_jobs(self, ids: Iterable[str], states: tuple[str, ...] = TERMINAL, timeout: float = 120) -> dict:
        """{id: Job} once every job is in `states` (read from the database, not the API)."""
        ids = list(ids)
        deadline = time.monotonic() + timeout
        while True:
            jobs = {i: self.store.get_job(i) for i in ids}
            if all(j is not None and j.state in states for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                stuck = {i: j.state for i, j in jobs.items() if j is None or j.state not in states}
                raise AssertionError(f"{len(stuck)} job(s) not in {states}: {stuck}\n{self.tail()}")
            time.sleep(0.1)

    def wait_for(self, pred, timeout: float = 60, what: str = "condition", poll: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.tail()}")
            time.sleep(poll)

    def commits_for(self, repo: str, job_id: str) -> int:
        """Hub commits carrying the job id, over the whole log (including commits no branch reaches)."""
        return sum(1 for c in self.hub.log(repo).values() if c.get("job_id") == job_id)


class MemoryWatchdog:
    """Plays the kernel OOM killer under a memory limit for the named process groups: SIGKILLs any
    of their processes whose RSS passes `limit_mb`. Counts the kills."""

    def __init__(self, cluster: Cluster, names: Iterable[str], limit_mb: int):
        self.cluster, self.names, self.limit_kb = cluster, set(names), limit_mb * 1024
        self.kills = 0
        self._killed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for name in list(self.names):
                p = self.cluster.procs.get(name)
                if p is None or p.poll() is not None:
                    continue
                for pid in group_pids(p.pid):
                    if pid not in self._killed and rss_kb(pid) > self.limit_kb:
                        try:  # like the OOM killer: that process, not its whole group
                            os.kill(pid, signal.SIGKILL)
                            self._killed.add(pid)
                            self.kills += 1
                        except ProcessLookupError:
                            pass


def group_pids(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    out.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                continue
    return out


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0
