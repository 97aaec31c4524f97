"""`alloy up` (own redis-server, API, worker, reaper) + `alloy submit --wait`, then Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from merge_ops.publish import LocalHub
from merge_ops.toy_models import make_experts, write_llama
from service.cli_service import free_port, wait_http
from tests.service.fixtures import ROOT

pytestmark = pytest.mark.integration


def processes_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_up_submit_wait_and_ctrl_c(tmp_path):
    pytest.importorskip("merge_ops.methods.task_arithmetic", reason="static kernels not built yet")
    data = tmp_path / "data"
    base = write_llama(data / "models" / "base", hidden=32, layers=2, intermediate=64, vocab=64)
    make_experts(base, 2, data / "models")
    (data / "spec.yaml").write_text(yaml.safe_dump({
        "method": "task_arithmetic", "base": "./models/base",
        "experts": [{"model": "./models/expert0"}, {"model": "./models/expert1"}],
        "parameters": {"lambda": 0.5}, "publish": {"repo": "local/demo"}}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOY_")}
    env.update(ALLOY_DATA_DIR=str(data), ALLOY_ALLOWED_ROOTS=f'["{data}"]', PYTHONUNBUFFERED="1",
               ALLOY_API_URL=f"http://127.0.0.1:{port}")
    cli = [sys.executable, "-m", "service.cli"]
    redis_before = set(processes_mentioning("redis-server"))
    up = subprocess.Popen(cli + ["up", "--port", str(port)], env=env, cwd=ROOT, start_new_session=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 60, [up])
        token = (data / "dev-token").read_text().strip()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs").status_code == 401
        sub = subprocess.run(cli + ["submit", str(data / "spec.yaml"), "--wait"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert "succeeded" in sub.stdout and "published:" in sub.stdout
        job_id = sub.stdout.split()[1]
        assert LocalHub(data / "hub").find_commit("local/demo", job_id) is not None
        jobs = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": f"Bearer {token}"})
        assert [j["state"] for j in jobs.json()["data"]] == ["succeeded"]
        ours = set(processes_mentioning("redis-server")) - redis_before
        assert ours  # `up` started its own redis-server
    finally:
        up.send_signal(signal.SIGINT)  # what Ctrl-C delivers
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    assert up.returncode == 0, up.stdout.read()
    assert not ours & set(processes_mentioning("redis-server"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")
