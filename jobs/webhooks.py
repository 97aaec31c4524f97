"""Webhook delivery from the outbox in the jobs table, signed the Standard Webhooks way.

Headers: `webhook-id` (stable across retries, for receiver-side dedupe), `webhook-timestamp` (unix
seconds) and `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`.
Redirects are not followed (a 3xx is a failed attempt, recorded like any other). The reaper
delivers; the API checks `notify.url` at submit (jobs/admission.py with jobs/egress.url_problem).

A `notify.url` is tenant-chosen, so every attempt goes through jobs/egress.py: the URL is checked
again (the allow list may have changed since submit), its host is resolved once and the request is
sent to the checked address. What the job record keeps of a failed attempt is a status class
("delivery failed: HTTP 5xx", "delivery failed: connection failed") or a refusal that depends on the
URL only — never a transport error or a DNS answer, which would describe the inside of the network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import httpx

from jobs import egress
from jobs.job_view import job_summary
from jobs.settings import Settings
from jobs.store import Store

FAILED = "delivery failed: "
# one message for "does not resolve" and "resolves inside": telling them apart would answer DNS questions
REFUSED_AT_DELIVERY = (FAILED + "destination refused (webhooks go to public hosts only; an operator can "
                       "allow a host with ALLOY_WEBHOOK_ALLOW)")


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    msg = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()


def backoff(attempt: int) -> float:
    return float(min(2 ** (attempt - 1), 300))


def _attempt(url: str, body: bytes, headers: dict[str, str], settings: Settings, client: httpx.Client,
             resolver: egress.Resolver) -> tuple[int | None, str | None, bool]:
    """One delivery attempt: (status code or None, the error to record or None when delivered,
    whether a retry may help)."""
    problem = egress.url_problem(url, settings.webhook_allow)  # no DNS: depends on the URL only
    if problem is not None:
        return None, FAILED + problem, False  # the URL itself is refused: retrying cannot change that
    try:
        pinned = egress.pin(url, settings.webhook_allow, resolver=resolver)
    except egress.EgressRefused:
        return None, REFUSED_AT_DELIVERY, True  # DNS may change (a name not yet published)
    try:
        r = client.post(pinned.url, content=body, headers={**headers, **pinned.headers},
                        extensions=pinned.extensions, timeout=settings.webhook_timeout,
                        follow_redirects=False)
    except httpx.HTTPError:
        return None, FAILED + egress.status_class(None), True
    code = r.status_code
    return code, None if 200 <= code < 300 else FAILED + egress.status_class(code), True


def deliver_due(store: Store, settings: Settings, client: httpx.Client,
                resolver: egress.Resolver = egress.resolve) -> int:
    """Deliver every webhook that is due now; returns how many attempts were made."""
    n = 0
    while (job := store.claim_webhook(hold_seconds=settings.webhook_timeout * 3)) is not None:
        n += 1
        url = job.spec["notify"]["url"]
        webhook_id = f"{job.id}.{job.state}"
        body = job_summary(job).model_dump_json().encode()  # no spec: it names the server's model folders
        ts = int(time.time())
        code: int | None = None
        retryable = True
        if settings.webhook_secret is None:
            err: str | None = FAILED + "no webhook secret configured (ALLOY_WEBHOOK_SECRET)"
        else:
            headers = {"content-type": "application/json", "webhook-id": webhook_id,
                       "webhook-timestamp": str(ts),
                       "webhook-signature": sign(settings.webhook_secret.get_secret_value(), webhook_id,
                                                 ts, body)}
            code, err, retryable = _attempt(url, body, headers, settings, client, resolver)
        ok = err is None
        retry = None if ok or not retryable or job.webhook_attempts >= settings.webhook_max_attempts \
            else backoff(job.webhook_attempts)
        store.record_delivery(job.id, webhook_id=webhook_id, attempt=job.webhook_attempts, url=url,
                              status_code=code, error=err, delivered=ok, retry_in=retry)
    return n
