from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from jobs.migrate import upgrade
from jobs.settings import Settings
from service.app import create_app
from tests.service.fixtures import redis_url, token_config  # noqa: F401  (fixture)


@pytest.fixture
def settings(tmp_path, redis_url) -> Settings:  # noqa: F811
    s = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'alloy.db'}", redis_url=redis_url,
                 tokens=token_config(), allowed_roots=[tmp_path], max_upload_bytes=4096,
                 webhook_secret="whsec-test", sse_poll_seconds=0.05,
                 hub_namespaces={"acme": ["acme", "org"]})  # the schedule tests publish to org/merged
    upgrade(s.database_url)
    return s


@pytest.fixture
def client(settings) -> TestClient:
    with TestClient(create_app(settings)) as c:
        yield c


def spec_body(tmp_path, **over) -> dict:
    """A valid task_arithmetic spec over (possibly absent) local folders under tmp_path."""
    body = {"method": "task_arithmetic", "base": str(tmp_path / "base"),
            "experts": [{"model": str(tmp_path / "e1")}, {"model": str(tmp_path / "e2")}],
            "parameters": {"lambda": 0.5}}
    body.update(over)
    return json.loads(json.dumps(body))
