"""End to end with real parts: redis-server, uvicorn, Celery worker subprocesses, the reaper, a local
hub and the Hub-protocol test server. Jobs run on tiny Llama checkpoints written by the tests."""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from merge_ops.publish import LocalHub
from tests.hub_fixtures import HUB_TEST_TOKEN
from tests.hubserver import serve_hub
from tests.service.fixtures import Procs, Service, auth, service_env, verify
from tests.service.test_api import parse_sse
from tests.toy_models import make_experts, write_llama

pytestmark = pytest.mark.integration


class Receiver:
    """A webhook endpoint that fails its first request (to exercise retries) and records the rest."""

    def __init__(self):
        self.got: list[tuple[dict, bytes]] = []
        self.calls = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.calls += 1
                if outer.calls == 1:
                    self.send_response(500)
                else:
                    outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("e2e")
    models = root / "models"
    base = write_llama(models / "base", hidden=32, layers=2, intermediate=64, vocab=64)
    experts = make_experts(base, 2, models)
    with serve_hub(token=HUB_TEST_TOKEN) as hub:
        env = service_env(root, redis_url, ALLOY_HUB_ENDPOINT=hub.url,
                          ALLOY_HUB_TOKENS=json.dumps({"acme": HUB_TEST_TOKEN}),
                          ALLOY_WEBHOOK_ALLOW='["127.0.0.1"]')  # the receiver is local (egress guard)
        procs = Procs(root)
        try:
            svc = Service(procs, env)
            receiver = Receiver()
            yield {"svc": svc, "base": base, "experts": experts, "hub": hub, "root": root,
                   "receiver": receiver}
        finally:
            procs.stop_all()


def calibration_ids(svc: Service) -> dict[str, str]:
    ids = {}
    for i in range(2):
        lines = "".join(json.dumps({"input_ids": [1 + j, 5, 7, 9, 11]}) + "\n" for j in range(16))
        r = svc.http.post("/v1/calibration-sets", content=lines.encode(), headers=auth())
        assert r.status_code == 201, r.text
        ids[f"expert{i}"] = r.json()["id"]
    return ids


def learned_spec(w, steps: int, **over) -> dict:
    spec = {"method": "adamerging", "base": str(w["base"]),
            "experts": [{"model": str(e)} for e in w["experts"]],
            "parameters": {"steps": steps, "batch_size": 4, "granularity": "task"},
            "calibration": {"tasks": calibration_ids(w["svc"])}}
    spec.update(over)
    return spec


def submit(svc: Service, spec: dict, who: str = "acme") -> dict:
    r = svc.http.post("/v1/jobs", json=spec, headers=auth(who))
    assert r.status_code == 202, r.text
    return r.json()


def wait_progress(svc: Service, job_id: str, stage: str, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = svc.http.get(f"/v1/jobs/{job_id}", headers=auth()).json()
        if job["stage"] == stage and (job["progress"]["step"] or 0) >= step:
            return
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {stage} step {step}")


def test_learned_job_publishes_serves_coefficients_and_signs_webhook(world):
    svc, recv = world["svc"], world["receiver"]
    spec = learned_spec(world, steps=3, publish={"repo": "acme/merged", "hub": "local"},
                        notify={"url": recv.url})
    job = submit(svc, spec)
    done = svc.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout=90)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 1
    pub = done["result"]["published"]
    hub = LocalHub(world["root"] / "hub")
    assert hub.find_commit("acme/merged", job["id"]).commit == pub["commit"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hub.path("acme/merged", pub["commit"]))
    assert model.config.hidden_size == 32
    job_dir = world["root"] / "jobs" / job["id"]
    assert not (job_dir / "attempt-1").exists()  # published: the worker's copy is gone

    coeffs = svc.http.get(f"/v1/jobs/{job['id']}/coefficients", headers=auth())
    assert coeffs.status_code == 200 and coeffs.json()
    png = svc.http.get(f"/v1/jobs/{job['id']}/coefficients.png", headers=auth())
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    events = parse_sse(svc.http.get(f"/v1/jobs/{job['id']}/events", headers=auth()).text)
    stages = [e["data"]["stage"] for e in events if e["event"] == "stage"]
    assert stages[0] == "resolve" and {"learn", "write", "publish"} <= set(stages)
    assert events[-1]["data"]["state"] == "succeeded"
    assert any(e["event"] == "progress" and e["data"]["stage"] == "learn" for e in events)

    # webhook: first attempt answered 500, the retry is delivered and verifies with the secret
    deadline = time.monotonic() + 30
    while not recv.got and time.monotonic() < deadline:
        time.sleep(0.1)
    headers, body = recv.got[0]
    assert verify("whsec-test", headers, body)
    assert not verify("wrong-secret", headers, body)
    assert json.loads(body)["id"] == job["id"] and json.loads(body)["state"] == "succeeded"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        final = svc.http.get(f"/v1/jobs/{job['id']}", headers=auth()).json()
        if final["webhook_state"] == "delivered":
            break
        time.sleep(0.1)
    assert [d["status_code"] for d in final["webhook_deliveries"]] == [500, 204]
    assert final["webhook_deliveries"][0]["webhook_id"] == final["webhook_deliveries"][1]["webhook_id"]

    # a duplicate wake-up for a finished job is dropped by the claim
    from jobs.queue import producer, send
    from jobs.settings import Settings

    send(job["id"], "cpu", producer(Settings(redis_url=svc.env["ALLOY_REDIS_URL"])))
    deadline = time.monotonic() + 20
    while "not claimable" not in svc.procs.log("worker0") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "not claimable" in svc.procs.log("worker0")
    assert svc.http.get(f"/v1/jobs/{job['id']}", headers=auth()).json()["attempts"] == 1


def test_cancel_mid_learning(world):
    svc = world["svc"]
    job = submit(svc, learned_spec(world, steps=2000, publish={"repo": "acme/never", "hub": "local"}))
    wait_progress(svc, job["id"], "learn", 1)
    r = svc.http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth())
    assert r.status_code == 200 and r.json()["state"] in ("cancelling", "cancelled")
    done = svc.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout=30)
    assert done["state"] == "cancelled" and done["error"]["code"] == "cancelled"
    assert done["progress"]["step"] < 2000
    assert LocalHub(world["root"] / "hub").find_commit("acme/never", job["id"]) is None
    states = [e["data"]["state"] for e in parse_sse(
        svc.http.get(f"/v1/jobs/{job['id']}/events", headers=auth()).text) if e["event"] == "state"]
    assert states[-2:] == ["cancelling", "cancelled"]
    assert svc.http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth()).json()["state"] == "cancelled"


def test_killed_worker_job_is_retried_and_published_once(world):
    svc = world["svc"]
    job = submit(svc, learned_spec(world, steps=60, publish={"repo": "acme/retried", "hub": "local"}))
    wait_progress(svc, job["id"], "learn", 1)
    svc.procs.kill(svc.workers[0], signal.SIGKILL)  # the whole worker: parent and child
    svc.workers[0] = svc.start_worker("worker0")
    done = svc.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout=90)
    assert done["state"] == "succeeded" and done["attempts"] == 2, done
    commits = LocalHub(world["root"] / "hub").commits("acme/retried")
    assert len(commits) == 1


def test_input_error_fails_the_job_with_its_message(world):
    svc = world["svc"]
    missing = world["root"] / "models" / "no-such-expert"
    spec = {"method": "task_arithmetic", "base": str(world["base"]),
            "experts": [{"model": str(world["experts"][0])}, {"model": str(missing)}]}
    done = svc.wait_state(submit(svc, spec)["id"], ("succeeded", "failed", "cancelled"))
    assert done["state"] == "failed" and done["attempts"] == 1
    assert "no-such-expert" in done["error"]["message"], done["error"]


def test_static_merge_published_to_hf_hub_with_tenant_token(world):
    pytest.importorskip("merge_ops.methods.task_arithmetic", reason="static kernels not built yet")
    svc, hub = world["svc"], world["hub"]
    spec = {"method": "task_arithmetic", "base": str(world["base"]),
            "experts": [{"model": str(e)} for e in world["experts"]], "parameters": {"lambda": 0.5},
            "publish": {"repo": "acme/ta-merged", "hub": "hf"}}
    job = submit(svc, spec)
    done = svc.wait_state(job["id"], ("succeeded", "failed", "cancelled"), timeout=60)
    assert done["state"] == "succeeded", done
    pub = done["result"]["published"]
    assert pub["commit"] == hub.head("acme/ta-merged")
    assert sum(job["id"] in c.message for c in
               hub.commits("acme/ta-merged")) == 1
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    local = snapshot_download("acme/ta-merged", endpoint=hub.url, token=HUB_TEST_TOKEN,
                              cache_dir=world["root"] / "dl")
    assert AutoModelForCausalLM.from_pretrained(local).config.num_hidden_layers == 2
    # the hub token comes from the server's settings and never leaks into records or logs
    assert HUB_TEST_TOKEN not in json.dumps(done)
    for name in ("api", "worker0", "reaper"):
        assert HUB_TEST_TOKEN not in svc.procs.log(name)
    # a tenant without a configured hub token cannot ask for `hf`
    r = svc.http.post("/v1/jobs", json=spec, headers=auth("other"))
    assert r.status_code == 422 and "no hub token" in r.json()["error"]["message"]
