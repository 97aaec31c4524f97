"""pytest fixtures around the Hub-protocol test server (tests/hubserver.py).

Register in tests/conftest.py with `from tests.hub_fixtures import hub_server  # noqa: F401`
(or `pytest_plugins = ["tests.hub_fixtures"]`). The server requires `HUB_TEST_TOKEN`, like a real
hub requires a token for private repos, so tests also exercise that the token reaches the client.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# hf-xet speaks its own upload/download protocol; the test server only serves regular git blobs.
# Set before huggingface_hub is imported anywhere (it reads the variable at import), and inherited
# by subprocesses (workers) started from the tests.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from tests.hubserver import HubServer, serve_hub  # noqa: E402

HUB_TEST_TOKEN = "hf_alloyTestToken0123456789"


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A fresh test hub on a free port: `.url` (give as endpoint / HF_ENDPOINT), `.token`,
    `.push(repo, {path: bytes | Path})`, `.push_folder(repo, folder)`, `.head(repo)`,
    `.commits(repo)`, `.read(repo, path, revision)`, `.files(repo, revision)`."""
    with serve_hub(token=HUB_TEST_TOKEN) as hub:
        yield hub
