"""`alloy up` keeps its children running: one that dies is started again (its leftover process group
killed first), and only a child that keeps dying stops everything."""

from __future__ import annotations

import io
import os
import signal
import sys
import time

from service.cli_service import Supervisor, stop_processes

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# a child with a grandchild in its process group (as a Celery worker has its pool): prints the grandchild's pid
PARENT = [sys.executable, "-c", "import subprocess, sys, time; "
          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
          "print(p.pid, flush=True); time.sleep(120)"]
CRASHER = [sys.executable, "-c", "raise SystemExit(3)"]


def _wait(pred, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_dead_child_is_restarted_and_its_group_cleaned(tmp_path):
    t = [0.0]
    out = io.StringIO()
    sup = Supervisor({"api": SLEEPER, "worker": PARENT}, dict(os.environ), tmp_path, clock=lambda: t[0], out=out)
    sup.start_all()
    try:
        api, worker = sup.procs["api"], sup.procs["worker"]
        log = tmp_path / "worker.log"
        _wait(lambda: log.is_file() and log.read_text().strip(), "the worker never printed its pool child")
        grandchild = int(log.read_text().split()[0])
        assert sup.check() is None and sup.procs["worker"] is worker  # all running: nothing to do
        os.kill(worker.pid, signal.SIGKILL)  # the worker dies; its pool child would live on
        worker.wait()
        assert sup.check() is None
        assert "worker exited (code -9)" in out.getvalue()
        _wait(lambda: not _alive(grandchild), "the dead worker's process group was left running")
        assert sup.procs["worker"] is worker  # back-off: not yet
        t[0] += 1.0
        assert sup.check() is None
        new = sup.procs["worker"]
        assert new is not worker and new.poll() is None and f"worker restarted (pid {new.pid})" in out.getvalue()
        assert sup.procs["api"] is api and api.poll() is None  # the others were left alone
    finally:
        stop_processes(list(reversed(sup.running())), grace=5)
    assert all(p.poll() is not None for p in sup.running())


def test_a_child_that_keeps_dying_gives_up(tmp_path):
    t = [0.0]
    out = io.StringIO()
    sup = Supervisor({"api": SLEEPER, "broken": CRASHER}, dict(os.environ), tmp_path, max_restarts=3,
                     window=60.0, clock=lambda: t[0], out=out)
    sup.start_all()
    try:
        gave_up = None
        for _ in range(200):
            sup.procs["broken"].wait()
            gave_up = sup.check()
            if gave_up is not None:
                break
            t[0] += 5.0  # past any back-off, well within the window
            sup.check()
        assert gave_up == "broken"
        assert len(sup.restarts["broken"]) == 3 and "giving up" in out.getvalue()
        assert sup.procs["api"].poll() is None
    finally:
        stop_processes(list(reversed(sup.running())), grace=5)


def test_restarts_outside_the_window_do_not_count(tmp_path):
    t = [0.0]
    sup = Supervisor({"broken": CRASHER}, dict(os.environ), tmp_path, max_restarts=2, window=10.0,
                     clock=lambda: t[0], out=io.StringIO())
    sup.start_all()
    try:
        for _ in range(6):  # one death every 30 s: never 2 within 10 s
            first = sup.procs["broken"]
            first.wait()
            t[0] += 30.0
            assert sup.check() is None
            t[0] += 1.0
            assert sup.check() is None and sup.procs["broken"] is not first  # restarted
        assert len(sup.restarts["broken"]) == 1  # only the latest restart is still in the window
    finally:
        stop_processes(sup.running(), grace=5)
