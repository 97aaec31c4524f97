"""`alloy up` (own redis-server, API, worker, reaper) + `alloy submit --wait`, then Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import redis
import yaml

from merge_ops.publish import LocalHub
from service.cli_service import free_port
from tests.service.fixtures import ROOT
from tests.toy_models import make_experts, write_llama

pytestmark = pytest.mark.integration


def test_up_submit_wait_and_ctrl_c(tmp_path):
    data = tmp_path / "data"
    base = write_llama(data / "models" / "base", hidden=32, layers=2, intermediate=64, vocab=64)
    make_experts(base, 2, data / "models")
    for i in range(2):  # local calibration files: `submit` uploads them and sends their set ids
        # distinct per task: sets are content-addressed, so equal files would be one set
        (data / f"cal{i}.jsonl").write_text("".join(f'{{"input_ids": [{j + 1 + i}, 5, 7]}}\n' for j in range(8)))
    (data / "spec.yaml").write_text(yaml.safe_dump({
        "method": "adamerging", "base": "./models/base",
        "experts": [{"model": "./models/expert0"}, {"model": "./models/expert1"}],
        "parameters": {"steps": 2, "batch_size": 4, "granularity": "task"},
        "calibration": {"tasks": {"expert0": "./cal0.jsonl", "expert1": "./cal1.jsonl"}},
        "publish": {"repo": "local/demo"}}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
    env.update(ALLOY_DATA_DIR=str(data), ALLOY_ALLOWED_ROOTS=f'["{data}"]', PYTHONUNBUFFERED="1",
               ALLOY_API_URL=f"http://127.0.0.1:{port}")
    cli = [sys.executable, "-m", "service.cli"]
    up = subprocess.Popen(cli + ["up", "--port", str(port)], env=env, cwd=ROOT, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("Ctrl-C"):
            line = up.stdout.readline()
            assert line, "alloy up exited during startup:\n" + "".join(lines)
            lines.append(line)
        redis_url = next(ln.split()[-1] for ln in lines if ln.startswith("redis-server child"))
        assert redis.Redis.from_url(redis_url).ping()
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        token = (data / "dev-token").read_text().strip()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs").status_code == 401
        sub = subprocess.run(cli + ["submit", str(data / "spec.yaml"), "--wait"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert "succeeded" in sub.stdout and "published:" in sub.stdout
        job_id = sub.stdout.split()[1]
        assert LocalHub(data / "hub").find_commit("local/demo", job_id) is not None
        h = {"Authorization": f"Bearer {token}"}
        jobs = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers=h).json()["data"]
        assert [j["state"] for j in jobs] == ["succeeded"]
        sets = httpx.get(f"http://127.0.0.1:{port}/v1/calibration-sets", headers=h).json()["data"]
        spec = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{jobs[0]['id']}", headers=h).json()["spec"]  # lists omit it
        assert sorted(spec["calibration"]["tasks"].values()) == sorted(x["id"] for x in sets)
        assert "learn" in sub.stderr  # the progress bar followed the learning stage
    finally:
        up.send_signal(signal.SIGINT)  # what Ctrl-C delivers
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    assert up.returncode == 0, up.stdout.read()
    with pytest.raises(redis.ConnectionError):  # its redis-server child is gone too
        redis.Redis.from_url(redis_url).ping()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_up_gives_up_after_start_timeout_with_a_reason(tmp_path):
    """An API that does not answer within --start-timeout: exit 1 with what to do, children stopped."""
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
    env.update(ALLOY_DATA_DIR=str(data), ALLOY_ALLOWED_ROOTS=f'["{tmp_path / "models"}"]', PYTHONUNBUFFERED="1")
    # 0.05 s: no API process imports FastAPI that fast
    up = subprocess.run([sys.executable, "-m", "service.cli", "up", "--port", str(port), "--start-timeout", "0.05"],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert up.returncode == 1, up.stdout + up.stderr
    assert "did not answer within 0.05 s" in up.stderr and "--start-timeout" in up.stderr
    assert "Traceback" not in up.stderr
    redis_url = next(ln.split()[-1] for ln in up.stdout.splitlines() if ln.startswith("redis-server child"))
    with pytest.raises(redis.ConnectionError):  # nothing it started is left running
        redis.Redis.from_url(redis_url).ping()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def _start_up(tmp_path, **popen) -> tuple[subprocess.Popen, int, list[str]]:
    data = tmp_path / "data"
    data.mkdir(parents=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
    env.update(ALLOY_DATA_DIR=str(data), ALLOY_ALLOWED_ROOTS=f'["{tmp_path / "models"}"]', PYTHONUNBUFFERED="1")
    up = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port)], env=env, cwd=ROOT,
                          start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **popen)
    lines: list[str] = []
    while not lines or not lines[-1].startswith("Ctrl-C"):
        line = up.stdout.readline()
        assert line, "alloy up exited during startup:\n" + "".join(lines)
        lines.append(line)
    return up, port, lines


def _gone(url: str, port: int, within: float = 30.0) -> bool:
    """Both the redis-server child and the API refuse connections within `within` seconds."""
    import time

    def down(probe) -> bool:
        try:
            probe()
        except (redis.ConnectionError, httpx.HTTPError):
            return True
        return False

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if down(lambda: redis.Redis.from_url(url, socket_connect_timeout=1).ping()) and down(
                lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)):
            return True
        time.sleep(0.5)
    return False


def test_up_killed_leaves_no_children_and_sigint_works_when_inherited_ignored(tmp_path):
    """A supervisor killed with SIGKILL takes its children with it (they have their own sessions, so
    nothing else would); started with SIGINT ignored (a shell's background job), SIGINT still stops it."""
    up, port, lines = _start_up(tmp_path / "a")
    url = next(ln.split()[-1] for ln in lines if ln.startswith("redis-server child"))
    up.kill()
    up.wait(10)
    assert _gone(url, port), "alloy up's children outlived it"

    up, port, lines = _start_up(tmp_path / "b", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    url = next(ln.split()[-1] for ln in lines if ln.startswith("redis-server child"))
    up.send_signal(signal.SIGINT)
    try:
        assert up.wait(60) == 0
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        raise
    assert _gone(url, port, within=5)
