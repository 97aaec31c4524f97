"""The HTTP client side of the CLI (`alloy submit`, `alloy schedules ...`): where the API is, the
token, and turning an error body into one line."""

from __future__ import annotations

import argparse
import os
from typing import Any

API_HELP = "API URL (default: $ALLOY_API_URL or http://127.0.0.1:8000)"
TOKEN_HELP = "API token (default: $ALLOY_API_TOKEN or the `alloy up` token)"


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default=None, help=API_HELP)
    p.add_argument("--token", default=None, help=TOKEN_HELP)


def client_config(args: argparse.Namespace) -> tuple[str, str]:
    """(API URL, token): flags, then environment, then the token `alloy up` wrote to DATA_DIR."""
    api = (args.api or os.environ.get("ALLOY_API_URL") or "http://127.0.0.1:8000").rstrip("/")
    token = args.token or os.environ.get("ALLOY_API_TOKEN")
    if not token:
        from jobs.settings import get_settings

        path = get_settings().data_dir / "dev-token"
        if path.is_file():
            token = path.read_text().strip()
    if not token:
        from merge_ops.errors import InputError

        raise InputError("no API token: pass --token or set ALLOY_API_TOKEN")
    return api, token


def client(args: argparse.Namespace):
    import httpx

    api, token = client_config(args)
    return httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def api_error(r) -> str:
    """The message of an API error body (or the start of whatever came back)."""
    try:
        return r.json()["error"]["message"]
    except Exception:
        return r.text[:500]


def call(args: argparse.Namespace, method: str, path: str, ok: int = 200, **kw) -> Any:
    """One request; an answer other than `ok` is an InputError carrying the API's message."""
    from merge_ops.errors import InputError

    with client(args) as c:
        r = c.request(method, path, **kw)
    if r.status_code != ok:
        raise InputError(f"the API answered {r.status_code}: {api_error(r)}")
    return r.json() if r.content else None
