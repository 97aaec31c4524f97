"""End to end: the webhook egress guard against a real HTTP receiver on 127.0.0.1 (a stand-in for an
internal service). With no allow list it receives nothing — the submit is refused, and a job recorded
with that URL anyway (an older row, a direct insert) is not delivered, its record showing only a
class of failure. With 127.0.0.1 allow-listed it receives the signed webhook."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from jobs.egress import url_problem
from jobs.store import Store
from jobs.webhooks import FAILED, REFUSED_AT_DELIVERY, deliver_due
from tests.security.conftest import auth, make_settings, spec_body
from tests.service.fixtures import verify


class Receiver:
    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _finished_job(store: Store, root, url: str) -> str:
    job, _ = store.create_job(tenant="acme", spec={**spec_body(root), "notify": {"url": url}},
                              method="task_arithmetic", queue="cpu")
    claim = store.claim(job.id, "w", 30)
    assert store.finish(job.id, claim.attempt, "succeeded", result={})
    return job.id


def test_submit_refuses_a_loopback_receiver(make_client, receiver):
    c = make_client()
    for host in ("127.0.0.1", "localhost", "[::1]", "2130706433"):
        url = f"http://{host}:{receiver.port}/hook"
        r = c.post("/v1/jobs", json=spec_body(c.app.state.settings.data_dir, notify={"url": url}), headers=auth())
        assert r.status_code == 422, (url, r.text)
        assert "public hosts only" in r.json()["error"]["message"]
    assert receiver.got == []


def test_recorded_job_is_not_delivered_and_its_record_shows_a_class(tmp_path, receiver):
    s = make_settings(tmp_path)  # 5 attempts allowed: a refused URL is not retried anyway
    store = Store(s.database_url)
    url = f"http://127.0.0.1:{receiver.port}/hook"
    job_id = _finished_job(store, tmp_path, url)
    with httpx.Client(trust_env=False) as client:
        assert deliver_due(store, s, client) == 1
    assert receiver.got == []  # nothing reached the receiver
    (d,) = store.deliveries(job_id)
    assert d.status_code is None and d.error.startswith(FAILED) and "public hosts only" in d.error
    assert store.get_job(job_id).webhook_state == "failed"


def test_name_resolving_to_loopback_is_refused_without_a_dns_oracle(tmp_path, receiver):
    """A public-looking name that resolves inside (rebinding, internal DNS) is refused at delivery with
    the same message as a name that does not resolve: the record tells the tenant nothing about DNS."""
    s = make_settings(tmp_path, webhook_max_attempts=1)
    store = Store(s.database_url)
    inside = _finished_job(store, tmp_path, f"http://hooks.example.com:{receiver.port}/hook")
    with httpx.Client(trust_env=False) as client:
        deliver_due(store, s, client, resolver=lambda host, port: ["127.0.0.1"])
    nowhere = _finished_job(store, tmp_path, f"http://nowhere.example.com:{receiver.port}/hook")

    def fail(host: str, port: int) -> list[str]:
        raise OSError("[Errno -2] Name or service not known")

    with httpx.Client(trust_env=False) as client:
        deliver_due(store, s, client, resolver=fail)
    assert receiver.got == []
    errors = [store.deliveries(j)[0].error for j in (inside, nowhere)]
    assert errors == [REFUSED_AT_DELIVERY, REFUSED_AT_DELIVERY]
    assert not any("127.0.0.1" in e or "Errno" in e for e in errors)


def test_transport_errors_are_recorded_as_a_class(tmp_path, receiver):
    """A closed port and an answering one differ only by class: no errno, no exception text."""
    s = make_settings(tmp_path, webhook_allow=["127.0.0.1"], webhook_max_attempts=1)
    store = Store(s.database_url)
    receiver.server.shutdown()
    receiver.server.server_close()  # the port is now closed: connection refused
    job_id = _finished_job(store, tmp_path, f"http://127.0.0.1:{receiver.port}/hook")
    with httpx.Client(trust_env=False) as client:
        deliver_due(store, s, client)
    (d,) = store.deliveries(job_id)
    assert d.error == "delivery failed: connection failed" and d.status_code is None


def test_allow_listed_loopback_is_delivered(tmp_path, make_client, receiver):
    url = f"http://127.0.0.1:{receiver.port}/hook"
    c = make_client(webhook_allow=["127.0.0.1"])
    r = c.post("/v1/jobs", json=spec_body(c.app.state.settings.data_dir, notify={"url": url}), headers=auth())
    assert r.status_code == 202, r.text
    s = c.app.state.settings
    store = Store(s.database_url)
    job_id = r.json()["id"]
    claim = store.claim(job_id, "w", 30)
    assert store.finish(job_id, claim.attempt, "succeeded", result={})
    with httpx.Client(trust_env=False) as client:
        assert deliver_due(store, s, client) == 1
    ((headers, body),) = receiver.got
    assert verify("whsec-sec", headers, body) and headers["host"] == f"127.0.0.1:{receiver.port}"
    (d,) = store.deliveries(job_id)
    assert d.status_code == 204 and d.error is None and store.get_job(job_id).webhook_state == "delivered"


def test_pinned_request_carries_the_name_and_goes_to_the_checked_address(tmp_path):
    """Delivery to a public name: the connection goes to the address that was checked (the first DNS
    answer), the name travels in the Host header; a later, different DNS answer is never used."""
    s = make_settings(tmp_path, webhook_max_attempts=1)
    store = Store(s.database_url)
    job_id = _finished_job(store, tmp_path, "https://hooks.example.com:8443/h?x=1")
    assert url_problem("https://hooks.example.com:8443/h?x=1", []) is None
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    sent: list[httpx.Request] = []
    client = httpx.Client(transport=httpx.MockTransport(lambda req: sent.append(req) or httpx.Response(503)))
    deliver_due(store, s, client, resolver=lambda h, p: next(answers))
    (req,) = sent
    assert str(req.url) == "https://93.184.216.34:8443/h?x=1"
    assert req.headers["host"] == "hooks.example.com:8443"
    assert req.extensions.get("sni_hostname") == "hooks.example.com"
    (d,) = store.deliveries(job_id)
    assert d.error == "delivery failed: HTTP 5xx" and d.status_code == 503
