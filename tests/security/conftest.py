from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jobs.migrate import upgrade
from jobs.settings import Settings
from service.app import create_app

TOKENS = {"acme": "sec-acme-rw-1f3a", "acme-ro": "sec-acme-ro-8c2e", "other": "sec-other-rw-44d0",
          "admin": "sec-admin-6b91"}


def tokens() -> list[dict]:
    return [{"token": TOKENS["acme"], "tenant": "acme", "scopes": ["jobs:read", "jobs:write"]},
            {"token": TOKENS["acme-ro"], "tenant": "acme", "scopes": ["jobs:read"]},
            {"token": TOKENS["other"], "tenant": "other", "scopes": ["jobs:read", "jobs:write"]},
            {"token": TOKENS["admin"], "tenant": "ops", "scopes": ["admin"]}]


def auth(who: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


def make_settings(root: Path, **over) -> Settings:
    s = Settings(data_dir=root, database_url=f"sqlite:///{root / 'alloy.db'}", redis_url="redis://127.0.0.1:1/0",
                 tokens=tokens(), allowed_roots=[root], max_upload_bytes=4096, webhook_secret="whsec-sec",
                 sse_poll_seconds=0.05, **over)
    upgrade(s.database_url)
    return s


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator:
    """Factory: make_client(**settings) -> a TestClient of a fresh app (no broker: enqueue is a no-op)."""
    opened: list[TestClient] = []

    def make(**over) -> TestClient:
        c = TestClient(create_app(make_settings(tmp_path / f"app{len(opened)}", **over),
                                  enqueue=lambda job_id, queue: None))
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def spec_body(root: Path, **over) -> dict:
    body = {"method": "task_arithmetic", "base": str(root / "base"),
            "experts": [{"model": str(root / "e1")}, {"model": str(root / "e2")}], "parameters": {"lambda": 0.5}}
    body.update(over)
    return body
