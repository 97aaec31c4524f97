"""Service commands: `alloy serve | worker | reaper | scheduler | migrate | up | submit`.

The worker-side processes (worker, reaper, scheduler) are started, never imported: each has its own
`python -m workers.<module>` entry point, and `alloy worker|reaper|scheduler` replaces itself with
it (exec), so signals reach the process itself and the API side never loads worker code.

`alloy up` is the laptop setup: a redis-server child (unless ALLOY_REDIS_URL is set), migrations,
then the API, one worker, the reaper and the scheduler as child processes, each in its own process
group so that Ctrl-C stops exactly what it started. A child that dies is started again (`Supervisor`):
a crashed worker does not take the API down, and its job comes back through the reaper once its
lease expires. Only a child that keeps dying (a broken configuration) stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from jobs.queue import CPU, QUEUES, parse_queues
from jobs.states import SUCCEEDED, TERMINAL
from service.api_client import add_client_args, api_error, client_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--skip-migrate", action="store_true", help="do not upgrade the database first")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker")
    p.add_argument("--queues", default=CPU, help=f"comma-separated: {', '.join(QUEUES)} (default: {CPU})")
    p.add_argument("--concurrency", type=int, default=1, help="jobs at once (GPU workers: always 1)")
    p.add_argument("--name", default=None, help="Celery node name (default: alloy-<queues>@<host>)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("reaper", help="requeue jobs of dead workers, re-send lost messages, deliver webhooks")
    p.set_defaults(func=cmd_reaper)

    p = sub.add_parser("scheduler", help="run the scheduler loop (any number may run; each run fires once)")
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("migrate", help="create or upgrade the job store's tables (Alembic)")
    p.add_argument("--revision", default="head")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("up", help="Redis + API + worker + reaper + scheduler on this machine; Ctrl-C stops all")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--worker-concurrency", type=int, default=1)
    p.add_argument("--start-timeout", type=float, default=180.0, metavar="S",
                   help="seconds to wait for the API to answer before giving up (raise it on a loaded machine)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("submit", help="submit a spec to the API; --wait follows its progress")
    p.add_argument("spec", type=Path)
    p.add_argument("--wait", action="store_true", help="follow the event stream until the job ends")
    add_client_args(p)
    p.add_argument("--idempotency-key", default=None)
    p.set_defaults(func=cmd_submit)


# -- long-running processes ------------------------------------------------------------------------
def _settings():
    from jobs.settings import get_settings

    return get_settings()


def cmd_migrate(args: argparse.Namespace) -> int:
    from jobs.migrate import upgrade

    upgrade(_settings().database_url, args.revision)
    print(f"database at revision {args.revision}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if not args.skip_migrate:
        from jobs.migrate import upgrade

        upgrade(_settings().database_url)
    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning", access_log=False)
    return 0


def worker_process(module: str, *args: str) -> list[str]:
    """The argv of a worker-side process (workers/<module>.py): started, never imported from here."""
    return [sys.executable, "-m", f"workers.{module}", *args]


def _exec(argv: list[str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def _worker_args(queues: str, concurrency: int, name: str | None = None) -> list[str]:
    from merge_ops.errors import InputError

    try:
        names = parse_queues(queues)
    except ValueError as e:
        raise InputError(str(e)) from None
    return ["--queues", ",".join(names), "--concurrency", str(concurrency)] + (["--name", name] if name else [])


def cmd_worker(args: argparse.Namespace) -> int:
    _exec(worker_process("worker", *_worker_args(args.queues, args.concurrency, args.name)))


def cmd_reaper(args: argparse.Namespace) -> int:
    _exec(worker_process("reaper"))


def cmd_scheduler(args: argparse.Namespace) -> int:
    _exec(worker_process("scheduler"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it dies, so a
    supervisor killed with SIGKILL leaves no orphaned API, worker or broker behind (each child has its
    own session, so the supervisor's process group does not reach them)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no such guard
        pass


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("ab")
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def stop_processes(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM each child's process group, then SIGKILL what is still there after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


class Supervisor:
    """Named children, started in order; one that exits is started again after a short back-off
    (0.5, 1, 2 … s, at most 10). `check()` returns the name of a child that died more than
    `max_restarts` times within `window` seconds: restarting it is pointless, the caller gives up."""

    def __init__(self, children: dict[str, list[str]], env: dict[str, str], logs: Path, *,
                 max_restarts: int = 5, window: float = 60.0, clock=time.monotonic, out=sys.stderr):
        self.children, self.env, self.logs = children, env, logs
        self.max_restarts, self.window, self.clock, self.out = max_restarts, window, clock, out
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, list[float]] = {name: [] for name in children}
        self._due: dict[str, float] = {}  # dead child -> when to start it again

    def start(self, name: str) -> subprocess.Popen:
        self.procs[name] = _spawn(self.children[name], self.env, self.logs / f"{name}.log")
        return self.procs[name]

    def start_all(self) -> None:
        for name in self.children:
            self.start(name)

    def running(self) -> list[subprocess.Popen]:
        """Children in start order (stop them in reverse: the API before the broker)."""
        return [self.procs[n] for n in self.children if n in self.procs]

    def check(self) -> str | None:
        now = self.clock()
        for name, p in list(self.procs.items()):
            if p.poll() is None:
                continue
            if name not in self._due:
                # its process group may outlive it (a Celery pool child, uvicorn's workers): a leftover
                # would keep a job's lease alive; the replacement starts clean
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                recent = [t for t in self.restarts[name] if now - t < self.window]
                self.restarts[name] = recent
                if len(recent) >= self.max_restarts:
                    print(f"alloy up: {name} exited (code {p.returncode}) {len(recent) + 1} times within "
                          f"{self.window:g} s; giving up. See {self.logs / (name + '.log')}", file=self.out,
                          flush=True)
                    return name
                self._due[name] = now + min(0.5 * 2 ** len(recent), 10.0)
                print(f"alloy up: {name} exited (code {p.returncode}); starting it again", file=self.out,
                      flush=True)
            if now >= self._due[name]:
                del self._due[name]
                self.restarts[name].append(now)
                new = self.start(name)
                print(f"alloy up: {name} restarted (pid {new.pid})", file=self.out, flush=True)
        return None


def wait_http(url: str, timeout: float, procs: list[subprocess.Popen] = ()) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a child process exited during startup")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def cmd_up(args: argparse.Namespace) -> int:
    from jobs.migrate import upgrade

    s = _settings()
    data = s.data_dir.resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    children: dict[str, list[str]] = {}
    if not os.environ.get("ALLOY_REDIS_URL"):
        if shutil.which("redis-server") is None:
            from merge_ops.errors import InputError

            raise InputError("redis-server not found: install it (apt install redis-server) or set ALLOY_REDIS_URL")
        port = free_port()
        (data / "redis").mkdir(exist_ok=True)
        # append-only in DATA_DIR/redis: a restarted redis-server child reloads the queued messages
        children["redis"] = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--dir", str(data / "redis"),
                             "--maxmemory-policy", "noeviction"]
        env["ALLOY_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        print(f"redis-server child on {env['ALLOY_REDIS_URL']}", flush=True)
    if not os.environ.get("ALLOY_TOKENS"):
        token = _dev_token(data)
        env["ALLOY_TOKENS"] = json.dumps([{"token": token, "tenant": "local",
                                           "scopes": ["jobs:read", "jobs:write", "admin"]}])
    env.setdefault("ALLOY_DATA_DIR", str(data))
    upgrade(s.database_url)
    children.update({
        "api": [sys.executable, "-m", "service.cli", "serve", "--skip-migrate", "--host", args.host,
                "--port", str(args.port)],
        "worker": worker_process("worker", *_worker_args(CPU, args.worker_concurrency)),
        "reaper": worker_process("reaper"),
        "scheduler": worker_process("scheduler"),
    })
    sup = Supervisor(children, env, logs)
    # SIGINT stops us even when started from a non-interactive shell's background job, which would
    # otherwise inherit SIGINT as ignored (and Python would then never raise KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sup.start_all()
        try:
            wait_http(f"http://{args.host}:{args.port}/healthz", args.start_timeout, sup.running())
        except TimeoutError:
            from merge_ops.errors import AlloyError

            raise AlloyError(f"the API did not answer within {args.start_timeout:g} s (see {logs / 'api.log'}); "
                              "on a loaded machine raise --start-timeout") from None
        print(f"Alloy is up: http://{args.host}:{args.port} (docs: /docs); logs in {logs}", flush=True)
        if not os.environ.get("ALLOY_TOKENS"):
            print(f"API token (tenant `local`) in {data / 'dev-token'}", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        stopping = {"flag": False}
        signal.signal(signal.SIGTERM, lambda *_: stopping.update(flag=True))
        while not stopping["flag"]:
            if sup.check() is not None:
                return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        stop_processes(list(reversed(sup.running())))


def _dev_token(data: Path) -> str:
    path = data / "dev-token"
    if path.is_file():
        return path.read_text().strip()
    token = "alloy_" + secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


# -- client ----------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    import httpx

    from merge_ops.errors import InputError
    from merge_ops.spec import load_spec

    api, token = client_config(args)
    spec = load_spec(args.spec)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=api, headers=headers, timeout=30) as c:
        body = spec.model_dump(mode="json", exclude_none=True)
        if spec.calibration is not None:  # local JSONL files are uploaded and replaced by set ids
            for task, src in list(body["calibration"]["tasks"].items()):
                if Path(src).is_file():
                    r = c.post("/v1/calibration-sets", params={"name": Path(src).name},
                               content=Path(src).read_bytes(), headers={"content-type": "application/x-ndjson"})
                    if r.status_code != 201:
                        raise InputError(f"calibration {src}: {api_error(r)}")
                    body["calibration"]["tasks"][task] = r.json()["id"]
        extra = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
        r = c.post("/v1/jobs", json=body, headers=extra)
        if r.status_code != 202:
            raise InputError(f"the API refused the job ({r.status_code}): {api_error(r)}")
        job = r.json()
        print(f"job {job['id']} {job['state']}", flush=True)
        if not args.wait:
            return 0
        final = follow(c, job["id"])
    print(f"job {final['id']} {final['state']}")
    if final["state"] == SUCCEEDED:
        pub = (final.get("result") or {}).get("published")
        if pub:
            print("published: " + ", ".join(f"{k}={v}" for k, v in pub.items() if v is not None))
        return 0
    if final.get("error"):
        print(f"{final['error']['code']}: {final['error']['message']}", file=sys.stderr)
    return 1


def follow(c, job_id: str) -> dict[str, Any]:
    """Follow /events with a progress bar (one bar per stage), resuming after disconnects."""
    import httpx
    from tqdm import tqdm

    last, bar, stage = 0, None, None
    try:
        while True:
            try:
                with c.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(last)},
                              timeout=httpx.Timeout(30, read=60)) as r:
                    ev: dict[str, str] = {}
                    for line in r.iter_lines():
                        if line.startswith(":"):
                            continue
                        if line:
                            k, _, v = line.partition(":")
                            ev[k] = v.lstrip(" ")
                            continue
                        if "id" in ev:
                            last = int(ev["id"])
                            data = json.loads(ev.get("data", "{}"))
                            kind = ev.get("event")
                            if kind in ("stage", "progress") and data.get("stage") != stage:
                                if bar is not None:
                                    bar.close()
                                stage = data["stage"]
                                bar = tqdm(desc=stage, total=None, unit="step", leave=True)
                            if kind == "progress" and bar is not None:
                                if data.get("total") and bar.total != data["total"]:
                                    bar.total = data["total"]
                                bar.n = data.get("step") or 0
                                if data.get("loss") is not None:
                                    bar.set_postfix(loss=f"{data['loss']:.4g}", refresh=False)
                                bar.refresh()
                            if kind == "state":
                                tqdm.write(f"state: {data['state']}")
                        ev = {}
                job = c.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in TERMINAL:
                    return job
            except httpx.TransportError:
                time.sleep(1)  # API restarting: resume from the last event id
    finally:
        if bar is not None:
            bar.close()
