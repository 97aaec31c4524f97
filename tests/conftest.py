"""Shared fixtures: small checkpoints built on the fly (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hub_fixtures import hub_server  # noqa: F401  (a Hub-API test server, per test)


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Callable[..., tuple[Path, list[Path]]]:
    """Factory: `tiny_llama(n_experts=2, shard_size=None, **dims)` writes a bf16 Llama base and
    n perturbed experts under tmp_path and returns (base, [experts])."""
    from tests.toy_models import make_experts, write_llama

    def make(n_experts: int = 2, *, shard_size: int | None = None, root: str = "models",
             **dims) -> tuple[Path, list[Path]]:
        folder = tmp_path / root
        base = write_llama(folder / "base", shard_size=shard_size, **dims)
        return base, make_experts(base, n_experts, folder, shard_size=shard_size,
                                  scale=dims.get("scale", 0.01))

    return make
