"""Real parts for the service tests: a redis-server, uvicorn, Celery workers and the reaper as
subprocesses (each in its own process group, killed by group at teardown), tiny models on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cli_service import free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]
TOKENS = {  # plain tokens for the tests; the server only keeps their hashes
    "acme": "tok-acme-rw", "acme-ro": "tok-acme-ro", "other": "tok-other-rw", "admin": "tok-admin",
}


def token_config() -> list[dict]:
    return [
        {"token": TOKENS["acme"], "tenant": "acme", "scopes": ["jobs:read", "jobs:write"]},
        {"token": TOKENS["acme-ro"], "tenant": "acme", "scopes": ["jobs:read"]},
        {"token": TOKENS["other"], "tenant": "other", "scopes": ["jobs:read", "jobs:write"]},
        {"token": TOKENS["admin"], "tenant": "ops", "scopes": ["admin"]},
    ]


def auth(who: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


class Procs:
    """Subprocesses started by a test, each a process-group leader."""

    def __init__(self, logdir: Path):
        self.logdir, self.procs = logdir, []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.logdir / f"{name}.log").open("ab")
        p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        p.name = name
        self.procs.append(p)
        return p

    def kill(self, p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if p.poll() is None:
            os.killpg(p.pid, sig)
            p.wait(30)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)

    def log(self, name: str) -> str:
        f = self.logdir / f"{name}.log"
        return f.read_text(errors="replace") if f.exists() else ""


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(d)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def service_env(data_dir: Path, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
    env.update({
        "ALLOY_DATA_DIR": str(data_dir),
        "ALLOY_DATABASE_URL": f"sqlite:///{data_dir / 'alloy.db'}",
        "ALLOY_REDIS_URL": redis_url,
        "ALLOY_TOKENS": json.dumps(token_config()),
        "ALLOY_ALLOWED_ROOTS": json.dumps([str(data_dir)]),
        "ALLOY_LEASE_SECONDS": "5",
        "ALLOY_HEARTBEAT_SECONDS": "1",
        "ALLOY_REAPER_INTERVAL": "0.5",
        "ALLOY_PROGRESS_INTERVAL": "0.1",
        "ALLOY_WEBHOOK_SECRET": "whsec-test",
        "ALLOY_SSE_POLL_SECONDS": "0.1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
    })
    env.update(extra)
    return env


class Service:
    """API + workers + reaper of one test, on its own data dir and SQLite file."""

    def __init__(self, procs: Procs, env: dict[str, str]):
        self.procs, self.env = procs, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cli = [sys.executable, "-m", "service.cli"]
        subprocess.run(cli + ["migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
        self.api = procs.start("api", cli + ["serve", "--skip-migrate", "--port", str(self.port)], env)
        self.workers = [self.start_worker("worker0")]
        self.reaper = procs.start("reaper", cli + ["reaper"], env)
        wait_http(self.url + "/healthz", 30, [self.api])
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def start_worker(self, name: str, queues: str = "cpu") -> subprocess.Popen:
        return self.procs.start(name, [sys.executable, "-m", "service.cli", "worker", "--queues", queues,
                                       "--name", f"{name}@test"], self.env)

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float = 60, who: str = "acme") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.http.get(f"/v1/jobs/{job_id}", headers=auth(who)).json()
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} stuck in {job['state']}; worker log:\n"
                                     + self.procs.log("worker0")[-3000:])
            time.sleep(0.1)


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a webhook receiver runs: constant-time compare of any listed v1 signature."""
    import hmac

    from jobs.webhooks import sign

    expected = sign(secret, headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    return any(hmac.compare_digest(expected, s) for s in headers["webhook-signature"].split())
