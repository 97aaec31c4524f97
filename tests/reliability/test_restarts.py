"""Redis, the API and the database connection pool restarting under the service: nothing lost."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import redis

from service.metrics import queue_depth
from tests.reliability.conftest import full_only, static_spec
from tests.reliability.harness import Cluster, auth, group_pids

pytestmark = pytest.mark.integration


def _runs_per_job(c: Cluster) -> Counter:
    """How many attempts each job started, from every worker log (a job run twice shows twice)."""
    runs: Counter = Counter()
    for f in c.logs.glob("worker*.log"):
        runs.update(re.findall(r"job (job_[0-9a-f]+): attempt \d+ started", f.read_text(errors="replace")))
    return runs


def _assert_all_once(c: Cluster, ids: list[str], timeout: float) -> None:
    jobs = c.wait_jobs(ids, timeout=timeout)
    bad = {i: (j.state, j.error_message) for i, j in jobs.items() if j.state != "succeeded"}
    assert not bad, bad
    runs = _runs_per_job(c)
    twice = {i: runs[i] for i in ids if runs[i] != 1}
    assert not twice, f"jobs not run exactly once: {twice}"
    assert all(j.attempts == 1 for j in jobs.values())


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
def test_redis_restart_with_jobs_queued(cluster, models, full, appendonly):
    """Jobs queued, Redis killed and restarted, then workers start: every job completes once. Without
    persistence the messages are gone and the reaper re-sends them from the jobs table."""
    full_only(full)
    n = 100 if full else 10
    c = cluster(workers=None)
    c.start_redis(appendonly=appendonly)
    c.migrate()
    c.start_api()
    c.start_reaper()
    ids = [c.submit(static_spec(models)) for _ in range(n)]
    r = redis.Redis(port=c.redis_port)
    assert queue_depth(r, "cpu") == n
    c.signal("redis", signal.SIGKILL)
    c.start_redis(appendonly=appendonly)
    assert queue_depth(r, "cpu") == (n if appendonly else 0)
    c.start_worker("worker0")
    c.start_worker("worker1")
    _assert_all_once(c, ids, timeout=60 + 3 * n)
    print(f"\nRELIABILITY redis-restart-queued aof={appendonly}: jobs={n} restarts=1 lost=0 duplicates=0")


def test_redis_down_while_jobs_run(cluster, models, full):
    """Redis down for 10 s (3 s in CI) while jobs run: running jobs finish, jobs submitted meanwhile
    are kept, and after the restart every worker consumes again (the known failure: workers that
    reconnect but never consume again)."""
    full_only(full)
    c = cluster(workers=2)
    first = [c.submit(static_spec(models)) for _ in range(4)]
    c.wait_for(lambda: any(c.store.get_job(i).state == "running" for i in first), what="a running job")
    c.signal("redis", signal.SIGKILL)
    during = [c.submit(static_spec(models)) for _ in range(2)]  # recorded; sent by the reaper later
    time.sleep(10 if full else 3)
    c.start_redis()
    _assert_all_once(c, first + during, timeout=120)
    # consumption after the reconnect: new jobs must be picked up by *each* worker
    after = [c.submit(static_spec(models)) for _ in range(8)]
    _assert_all_once(c, first + during + after, timeout=120)
    by = Counter()
    for i in after:
        pid = int(c.store.get_job(i).worker.rsplit(":", 1)[1])
        by.update(w for w in ("worker0", "worker1") if pid in group_pids(c.procs[w].pid))
    assert by["worker0"] > 0 and by["worker1"] > 0, f"a worker stopped consuming after the reconnect: {by}"
    print(f"\nRELIABILITY redis-down: outage={10 if full else 3}s jobs={len(first + during + after)} lost=0 "
          f"duplicates=0 consumed_after_reconnect={dict(by)}")


class Load:
    """Clients that submit and read jobs in a loop; records every HTTP status and transport error."""

    def __init__(self, c: Cluster, body: dict, clients: int = 4):
        self.c, self.body = c, body
        self.statuses: Counter = Counter()
        self.transport_errors = 0
        self.accepted: dict[str, dict] = {}  # job id -> the body it was accepted with
        self.bad_records: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.c.url, headers=auth(), timeout=10) as h:
            k = 0
            while not self._stop.is_set():
                k += 1
                body = {**self.body, "seed": i * 100_000 + k}  # each submit a distinct, checkable body
                try:
                    r = h.post("/v1/jobs", json=body)
                    self._record(r)
                    if r.status_code == 202:
                        with self._lock:
                            self.accepted[r.json()["id"]] = body
                    ids = list(self.accepted)[-5:]
                    for job_id in ids:
                        g = h.get(f"/v1/jobs/{job_id}")
                        self._record(g)
                        if g.status_code == 200:
                            got = g.json()
                            if got["id"] != job_id or got["spec"]["seed"] != self.accepted[job_id]["seed"]:
                                self.bad_records.append(job_id)
                except httpx.TransportError:
                    with self._lock:
                        self.transport_errors += 1
                    time.sleep(0.05)

    def _record(self, r: httpx.Response) -> None:
        with self._lock:
            self.statuses[r.status_code] += 1

    def errors_5xx(self) -> dict[int, int]:
        return {s: n for s, n in self.statuses.items() if s >= 500 and s != 503}


def _check_records(c: Cluster, load: Load) -> None:
    assert not load.bad_records, load.bad_records
    for job_id, body in load.accepted.items():
        job = c.store.get_job(job_id)
        assert job is not None, f"accepted job {job_id} is not in the store"
        assert job.spec["seed"] == body["seed"] and job.tenant == "acme"


def test_api_restart_under_load(cluster, models, full):
    """SIGKILL the API while clients submit and poll, start it again: clients see connection errors
    or 503 at most, every accepted job is in the store with its body, and every job completes."""
    full_only(full)
    c = cluster(workers=1)
    with Load(c, static_spec(models)) as load:
        time.sleep(2)
        for _ in range(3 if full else 1):
            c.signal("api", signal.SIGKILL)
            time.sleep(1)
            c.start_api()
            time.sleep(2)
    assert not load.errors_5xx(), load.statuses
    assert load.statuses[202] > 0 and load.transport_errors > 0  # the load really spanned the outage
    _check_records(c, load)
    jobs = c.wait_jobs(load.accepted, timeout=60 + len(load.accepted))
    assert all(j.state == "succeeded" for j in jobs.values())
    print(f"\nRELIABILITY api-restart: requests={sum(load.statuses.values())} statuses={dict(load.statuses)} "
          f"transport_errors={load.transport_errors} jobs={len(jobs)} lost=0")


@pytest.fixture
def pg_database() -> Iterator[str]:
    url = os.environ.get("ALLOY_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set ALLOY_TEST_POSTGRES_URL (a PostgreSQL server) for the connection-pool test")
    import psycopg

    admin = psycopg.connect(url.replace("+psycopg", ""), autocommit=True)
    name = f"alloy_rel_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def test_database_connections_dropped_under_load(cluster, models, pg_database, full):
    """Every PostgreSQL connection of the service terminated (a database restart or failover, as the
    pool sees it) while clients load the API: 503 at most, no corrupted record, every job completes."""
    full_only(full)
    import psycopg

    c = cluster(workers=1, database_url=pg_database)
    admin = psycopg.connect(pg_database.replace("+psycopg", ""), autocommit=True)
    terminated = 0
    with Load(c, static_spec(models)) as load:
        for _ in range(5):
            time.sleep(1)
            terminated += len(admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()").fetchall())
        time.sleep(1)
    admin.close()
    assert terminated > 0
    assert not load.errors_5xx(), load.statuses
    _check_records(c, load)
    jobs = c.wait_jobs(load.accepted, timeout=60 + len(load.accepted))
    assert all(j.state == "succeeded" for j in jobs.values()), Counter(j.state for j in jobs.values())
    print(f"\nRELIABILITY db-connections-dropped: terminated={terminated} statuses={dict(load.statuses)} "
          f"jobs={len(jobs)} lost=0")
