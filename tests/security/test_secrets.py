"""After a full run with known secret values (API tokens, a tenant's hub token, the webhook secret),
none of them appears anywhere the service writes or answers: logs, the database file, the Redis
append-only file, job records, errors, events, the published model card and files, webhook payloads,
/metrics and the OpenAPI document."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from service.cli_service import free_port
from tests.hub_fixtures import HUB_TEST_TOKEN
from tests.hubserver import serve_hub
from tests.reliability.harness import TOKENS, Cluster, auth

pytestmark = pytest.mark.integration
WEBHOOK_SECRET = "whsec-Sup3rSecretValue-4c1f"


class Receiver(http.server.BaseHTTPRequestHandler):
    got: list[tuple[dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["content-length"]))
        Receiver.got.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a) -> None:
        pass


def test_no_secret_leaks_after_a_full_run(tmp_path: Path):
    from tests.toy_models import make_experts, write_llama

    secrets = [*TOKENS.values(), HUB_TEST_TOKEN, WEBHOOK_SECRET]
    models = tmp_path / "models"
    base = write_llama(models / "base", hidden=16, layers=1, intermediate=32, vocab=32, heads=2, dtype=torch.float32)
    e0, e1 = make_experts(base, 2, models, scale=0.01, dtype=torch.float32)
    port = free_port()
    Receiver.got = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    with serve_hub(token=HUB_TEST_TOKEN) as hub:
        c = Cluster(tmp_path / "svc", hub_endpoint=hub.url, hub_tokens={"acme": HUB_TEST_TOKEN},
                    webhook_secret=WEBHOOK_SECRET, webhook_allow=["127.0.0.1"],
                    allowed_roots=[str(models)], log_level="DEBUG")
        try:
            c.up(workers=1)
            body = {"method": "task_arithmetic", "base": str(base),
                    "experts": [{"model": str(e0)}, {"model": str(e1)}], "parameters": {"lambda": 0.5},
                    "publish": {"repo": "acme/secret-test", "hub": "hf"},
                    "notify": {"url": f"http://127.0.0.1:{port}/hook"}}
            ok = c.submit(body)
            # failures that go through the hub with the token: a missing repo, an unreachable expert
            bad_hub = c.submit({**body, "base": "acme/does-not-exist@main"})
            r = c.http.post("/v1/jobs", json=body, headers=auth("other"))  # no hub token for `other`
            assert r.status_code == 422 and "no hub token" in r.text
            jobs = c.wait_jobs([ok, bad_hub], timeout=180)
            assert jobs[ok].state == "succeeded", (jobs[ok].error_code, jobs[ok].error_message)
            assert jobs[bad_hub].state == "failed"
            c.wait_for(lambda: Receiver.got, timeout=60, what="the webhook")
            c.http.get("/v1/jobs", headers={"Authorization": "Bearer " + TOKENS["acme"] + "x"})  # a wrong token
            answers = [c.http.get("/v1/jobs", headers=auth("admin")).text, c.http.get("/metrics").text,
                       c.http.get("/openapi.json").text]
            for job_id in (ok, bad_hub):
                answers.append(c.http.get(f"/v1/jobs/{job_id}").text)
                answers.append(c.http.get(f"/v1/jobs/{job_id}/events").text)
            repo_files = {p: hub.read("acme/secret-test", p, "main") for p in hub.files("acme/secret-test", "main")}
        finally:
            c.close()
            srv.shutdown()
    assert "README.md" in repo_files  # the model card was published (through the token)
    places: dict[str, bytes] = {f"answer {i}": a.encode() for i, a in enumerate(answers)}
    places.update({f"hub:{p}": b if isinstance(b, bytes) else str(b).encode() for p, b in repo_files.items()})
    places.update({f"webhook {i}": json.dumps(h).encode() + b for i, (h, b) in enumerate(Receiver.got)})
    for f in (tmp_path / "svc").rglob("*"):  # logs, SQLite file (+WAL), Redis AOF, job folders
        if f.is_file():
            places[str(f)] = f.read_bytes()
    assert any("alloy.db" in k for k in places) and any("worker0.log" in k for k in places)
    leaks = [(secret[:6] + "…", where) for secret in secrets for where, data in places.items()
             if secret.encode() in data]
    assert not leaks, leaks
    # the published job carries the hub commit; the failed one an error that names the repo, not the token
    assert "acme/does-not-exist" in jobs[bad_hub].error_message
    print(f"\nSECURITY secrets: {len(secrets)} secrets, {len(places)} places searched, leaks=0")


def test_hub_client_errors_are_scrubbed():
    """An error text that echoes the token (as some HTTP errors do) is scrubbed before it is stored."""
    from merge_ops.sources import scrub

    text = f"401 for url https://hub/api?token={HUB_TEST_TOKEN} (Authorization: Bearer {HUB_TEST_TOKEN})"
    out = scrub(text, HUB_TEST_TOKEN)
    assert HUB_TEST_TOKEN not in out and "***" in out
    unknown = "hf_" + "a" * 20
    assert unknown not in scrub(f"token {unknown} leaked")  # any hf_ token, even one not configured
