"""Webhook delivery from the outbox in the jobs table, signed the Standard Webhooks way.

Headers: `webhook-id` (stable across retries, for receiver-side dedupe), `webhook-timestamp` (unix
seconds) and `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`.
Redirects are not followed (a 3xx is a failed attempt, recorded like any other). The reaper
delivers; the API checks `notify.url` at submit (jobs/admission.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import urlsplit

import httpx

from jobs.job_view import job_out
from jobs.settings import Settings
from jobs.store import Store


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    msg = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()


def url_problem(url: str, allow: list[str]) -> str | None:
    """Why this URL may not receive webhooks, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "notify.url must be an http:// or https:// URL"
    if allow and parts.hostname not in allow:
        return f"notify.url host {parts.hostname!r} is not in the allowed webhook hosts"
    return None


def backoff(attempt: int) -> float:
    return float(min(2 ** (attempt - 1), 300))


def deliver_due(store: Store, settings: Settings, client: httpx.Client) -> int:
    """Deliver every webhook that is due now; returns how many attempts were made."""
    n = 0
    while (job := store.claim_webhook(hold_seconds=settings.webhook_timeout * 3)) is not None:
        n += 1
        url = job.spec["notify"]["url"]
        webhook_id = f"{job.id}.{job.state}"
        body = job_out(job).model_dump_json().encode()
        ts = int(time.time())
        code: int | None = None
        err: str | None = url_problem(url, settings.webhook_allow)
        if settings.webhook_secret is None:
            err = "no webhook secret configured (ALLOY_WEBHOOK_SECRET)"
        if err is None:
            headers = {"content-type": "application/json", "webhook-id": webhook_id,
                       "webhook-timestamp": str(ts),
                       "webhook-signature": sign(settings.webhook_secret.get_secret_value(), webhook_id,
                                                 ts, body)}
            try:
                r = client.post(url, content=body, headers=headers, timeout=settings.webhook_timeout,
                                follow_redirects=False)
                code = r.status_code
                err = None if 200 <= code < 300 else f"HTTP {code}"
            except httpx.HTTPError as e:
                err = f"{type(e).__name__}: {e}"[:500]
        ok = err is None
        retry = None if ok or job.webhook_attempts >= settings.webhook_max_attempts else backoff(
            job.webhook_attempts)
        store.record_delivery(job.id, webhook_id=webhook_id, attempt=job.webhook_attempts, url=url,
                              status_code=code, error=err, delivered=ok, retry_in=retry)
    return n
