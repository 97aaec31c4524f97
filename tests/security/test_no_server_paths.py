"""Server paths never reach a tenant (#16 item 10). A whole service (`alloy serve`, a Celery worker, the
reaper) merges local model folders and publishes to a hub; then every place a tenant or a third party
reads is searched for the server's absolute paths (the model folders as resolved, the data dir) and for
the folders' names: the job documents (all but the spec the tenant sent), their events, the published
README.md and alloy_merge.json, the hub commit and the webhook body. Failing jobs name the refs the
tenant gave, not the files the worker opened (a hub download's cache, a folder behind a link)."""

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
from tests.reliability.harness import Cluster

pytestmark = pytest.mark.integration


class Receiver(http.server.BaseHTTPRequestHandler):
    got: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        Receiver.got.append(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a) -> None:
        pass


def test_no_server_path_in_results_errors_cards_commits_or_webhooks(tmp_path: Path):
    from tests.toy_models import make_experts, write_llama

    models = tmp_path / "srvmodels-x41"
    base = write_llama(models / "basefolder-q7", hidden=16, layers=1, intermediate=32, vocab=32, heads=2,
                       dtype=torch.float32)
    e0, e1 = make_experts(base, 2, models / "experts-k2", scale=0.01, dtype=torch.float32)
    # a folder reached through a link, whose weights are not safetensors: its error names the link
    broken = models / "brokenfolder-r9"
    broken.mkdir()
    (broken / "config.json").write_text((base / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a header")
    (models / "via-link").symlink_to(broken, target_is_directory=True)
    port = free_port()
    Receiver.got = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    with serve_hub(token=HUB_TEST_TOKEN) as hub:
        hub.push_folder("acme/upstream-broken", broken)  # a hub model that fails once downloaded
        c = Cluster(tmp_path / "svc", hub_endpoint=hub.url, hub_tokens={"acme": HUB_TEST_TOKEN},
                    webhook_allow=["127.0.0.1"], allowed_roots=[str(models)])
        try:
            c.up(workers=1)
            experts = [{"model": str(e0), "name": "code"}, {"model": str(e1), "name": "math"}]
            body = {"method": "task_arithmetic", "base": str(base), "experts": experts,
                    "parameters": {"lambda": 0.5}, "publish": {"repo": "acme/paths-test", "hub": "hf"},
                    "notify": {"url": f"http://127.0.0.1:{port}/hook"}}
            published = c.submit(body)
            kept = c.submit({**body, "publish": None, "notify": None})  # unpublished: the output stays
            local = c.submit({**body, "publish": {"repo": "acme/paths-local"}, "notify": None})  # the local hub
            via_hub = c.submit({**body, "publish": None, "notify": None,
                                "experts": [experts[0], {"model": "acme/upstream-broken@main", "name": "math"}]})
            via_link = c.submit({**body, "publish": None, "notify": None,
                                 "experts": [experts[0], {"model": str(models / "via-link"), "name": "math"}]})
            jobs = c.wait_jobs([published, kept, local, via_hub, via_link], timeout=240)
            assert jobs[published].state == jobs[kept].state == jobs[local].state == "succeeded", c.tail()
            assert jobs[via_hub].state == jobs[via_link].state == "failed", c.tail()
            c.wait_for(lambda: Receiver.got, timeout=60, what="the webhook")
            docs = {j: c.http.get(f"/v1/jobs/{j}").json() for j in jobs}
            events = {j: c.http.get(f"/v1/jobs/{j}/events").text for j in jobs}
            listed = c.http.get("/v1/jobs").json()["data"]
            card = hub.read("acme/paths-test", "README.md").decode()
            facts = hub.read("acme/paths-test", "alloy_merge.json").decode()
            commits = [(x.title, x.message) for x in hub.commits("acme/paths-test")]
            local_dir = c.hub.path("acme/paths-local")
            local_hub = {"local card": (local_dir / "README.md").read_text(),
                         "local alloy_merge.json": (local_dir / "alloy_merge.json").read_text(),
                         "local commits": json.dumps(c.hub.commits("acme/paths-local"))}
            data_dir = c.data
        finally:
            c.close()
            srv.shutdown()

    forbidden = {str(models), str(models.resolve()), str(data_dir), str(data_dir.resolve()),
                 "basefolder-q7", "experts-k2", "brokenfolder-r9"}
    ok = (published, kept, local)
    places = {"card": card, "alloy_merge.json": facts, "commit": json.dumps(commits), **local_hub,
              "list": json.dumps([j for j in listed if j["id"] in ok]),
              **{f"webhook {i}": b.decode() for i, b in enumerate(Receiver.got)},
              **{f"events {j}": t for j, t in events.items() if j in ok},
              **{f"job {j}": json.dumps({k: v for k, v in d.items() if k != "spec"}) for j, d in docs.items()
                 if j in ok}}
    leaks = [(where, f) for where, text in places.items() for f in forbidden if f in text]
    assert not leaks, leaks

    # cards and results name local models by fingerprint; the hub ids of local models are not invented
    assert "base_model:" not in card.split("---")[1]  # no hub inputs: nothing the Hub could link to
    names = [i["model"] for i in docs[published]["result"]["inputs"]]
    assert all(m.startswith("local:") and len(m) == 18 for m in names) and len(set(names)) == 3, names
    assert all(m in card for m in names)
    assert docs[kept]["result"]["output"] == f"jobs/{kept}/attempt-1/model"
    assert docs[local]["result"]["published"]["repo"] == "acme/paths-local"
    assert docs[local]["result"]["published"]["url"] is None  # not the file:// URL of the hub's folder
    # errors: the refs as given, none of the files behind them
    hub_err = docs[via_hub]["error"]["message"]
    assert "acme/upstream-broken@main/model.safetensors" in hub_err, hub_err
    link_err = docs[via_link]["error"]["message"]
    assert str(models / "via-link") in link_err, link_err
    for job_id in (via_hub, via_link):
        text = json.dumps({k: v for k, v in docs[job_id].items() if k != "spec"}) + events[job_id]
        assert not [f for f in (str(data_dir), str(data_dir.resolve()), "brokenfolder-r9", "/cache/")
                    if f in text], text
