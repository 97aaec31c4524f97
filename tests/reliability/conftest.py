"""Fixtures of the reliability suite. `--full` runs the counts of the issue (20 kills, 100 queued
jobs, >= 1,000 schemathesis requests): `make reliability`. Without it CI runs a fast subset."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.reliability.harness import Cluster


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", default=False,
                     help="reliability suite with the full counts (make reliability)")


@pytest.fixture(scope="session")
def full(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--full", default=False))


def full_only(full: bool) -> None:
    if not full:
        pytest.skip("runs with --full (make reliability)")


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny float32 Llama base, two experts and an unlabelled calibration file per expert."""
    from tests.toy_models import make_experts, write_llama

    root = tmp_path_factory.mktemp("rel-models")
    base = write_llama(root / "base", hidden=16, layers=1, intermediate=32, vocab=32, heads=2,
                       dtype=torch.float32)
    e0, e1 = make_experts(base, 2, root, scale=0.01, dtype=torch.float32)
    out = {"root": root, "base": base, "e0": e0, "e1": e1}
    for i, name in enumerate(("e0", "e1")):
        rows = [{"input_ids": [(3 * j + 7 * i + m) % 31 + 1 for m in range(4 + j % 3)]} for j in range(16)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[f"cal_{name}"] = root / f"{name}.jsonl"
    return out


def static_spec(models: dict[str, Path], repo: str | None = None, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"method": "task_arithmetic", "base": str(models["base"]),
                            "experts": [{"model": str(models["e0"])}, {"model": str(models["e1"])}],
                            "parameters": {"lambda": 0.5}}
    if repo:
        body["publish"] = {"repo": repo}
    return {**body, **over}


def learned_spec(models: dict[str, Path], cal_ids: dict[str, str], repo: str | None, steps: int,
                 **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "method": "adamerging", "base": str(models["base"]),
        "experts": [{"model": str(models["e0"]), "name": "e0"}, {"model": str(models["e1"]), "name": "e1"}],
        "parameters": {"steps": steps, "batch_size": 4, "granularity": "layer"},
        "calibration": {"tasks": cal_ids}}
    if repo:
        body["publish"] = {"repo": repo}
    return {**body, **over}


@pytest.fixture
def cluster(tmp_path: Path, models: dict[str, Path], request: pytest.FixtureRequest
            ) -> Iterator[Callable[..., Cluster]]:
    """Factory: `cluster(workers=1, **settings)` starts Redis, API, reaper and workers (not yet when
    workers=None: call .up() parts yourself). Everything it started is killed at teardown."""
    made: list[Cluster] = []

    def make(workers: int | None = 1, **settings: Any) -> Cluster:
        roots = settings.pop("allowed_roots", []) + [str(tmp_path), str(models["root"])]
        c = Cluster(tmp_path / f"c{len(made)}", allowed_roots=roots,
                    **{"max_attempts": 3, **settings})
        # one torch thread per worker: 2 CI cores shared by API, workers and the test itself
        c.env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        made.append(c)
        if workers is not None:
            c.up(workers)
        return c

    yield make
    failed = getattr(request.node, "rep_call", None)
    for c in made:
        if failed is not None and failed.failed:
            print(c.tail())
        c.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep
