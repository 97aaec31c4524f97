"""Webhook destinations: only http(s) URLs, and only allow-listed hosts when a list is set — checked
when the job is submitted and again when the webhook is delivered."""

from __future__ import annotations

import httpx
import pytest

from jobs.store import Store
from jobs.webhooks import deliver_due
from tests.security.conftest import auth, make_settings, spec_body
from tests.service.fixtures import verify

REFUSED_SCHEMES = ["ftp://hooks.example.com/x", "file:///etc/passwd", "gopher://hooks.example.com/",
                   "javascript:alert(1)", "data:text/plain,hi", "http:/missing-slash", "//hooks.example.com/x",
                   "hooks.example.com/x", "HTTP//hooks.example.com"]


@pytest.mark.parametrize("url", REFUSED_SCHEMES)
def test_non_http_schemes_are_refused(make_client, url):
    c = make_client()
    r = c.post("/v1/jobs", json=spec_body(c.app.state.settings.data_dir, notify={"url": url}), headers=auth())
    assert r.status_code == 422, (url, r.status_code)
    assert "http:// or https://" in r.json()["error"]["message"]


@pytest.mark.parametrize("url,ok", [
    ("https://hooks.example.com/alloy", True),
    ("http://hooks.example.com:8080/x?y=1", True),
    ("https://evil.example.com/alloy", False),
    ("https://hooks.example.com.evil.net/x", False),
    ("https://hooks.example.com@evil.net/x", False),  # userinfo: the host is evil.net
    ("http://127.0.0.1:9/x", False),
    ("http://169.254.169.254/latest/meta-data", False),
])
def test_allow_list(make_client, url, ok):
    c = make_client(webhook_allow=["hooks.example.com"])
    r = c.post("/v1/jobs", json=spec_body(c.app.state.settings.data_dir, notify={"url": url}), headers=auth())
    assert (r.status_code == 202) is ok, (url, r.status_code, r.text)
    if not ok:
        assert "not in the allowed webhook hosts" in r.json()["error"]["message"]


def test_delivery_rechecks_the_allow_list(tmp_path):
    """A job accepted before the allow-list was tightened is not delivered to a now-refused host."""
    loose = make_settings(tmp_path)
    store = Store(loose.database_url)
    job, _ = store.create_job(tenant="acme", spec={**spec_body(tmp_path), "notify": {"url": "https://evil.net/h"}},
                              method="task_arithmetic", queue="cpu")
    claim = store.claim(job.id, "w", 30)
    store.finish(job.id, claim.attempt, "succeeded", result={})
    sent: list[httpx.Request] = []
    client = httpx.Client(transport=httpx.MockTransport(lambda req: sent.append(req) or httpx.Response(200)))
    strict = loose.model_copy(update={"webhook_allow": ["hooks.example.com"], "webhook_max_attempts": 1})
    assert deliver_due(store, strict, client) == 1
    assert sent == []  # no request left the server
    (d,) = store.deliveries(job.id)
    assert "not in the allowed webhook hosts" in d.error and store.get_job(job.id).webhook_state == "failed"


def test_delivery_is_signed_and_carries_no_secret(tmp_path):
    s = make_settings(tmp_path, webhook_allow=["hooks.example.com"])
    store = Store(s.database_url)
    job, _ = store.create_job(tenant="acme", spec={**spec_body(tmp_path),
                                                   "notify": {"url": "https://hooks.example.com/h"}},
                              method="task_arithmetic", queue="cpu")
    claim = store.claim(job.id, "w", 30)
    store.finish(job.id, claim.attempt, "succeeded", result={})
    sent: list[httpx.Request] = []
    client = httpx.Client(transport=httpx.MockTransport(lambda req: sent.append(req) or httpx.Response(204)))
    deliver_due(store, s, client)
    (req,) = sent
    assert verify("whsec-sec", dict(req.headers), req.content)
    assert not verify("wrong-secret", dict(req.headers), req.content)
    assert b"whsec-sec" not in req.content and "whsec-sec" not in str(req.headers)
