"""Learned jobs through the driver: the streamed (file-backed) mode learns the in-memory mode's
coefficients, and the worker's launch path (launch.ranks: the job's process as rank 0, helper ranks
started with subprocess, gloo on CPU) learns those of one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merge_ops.learned import launch
from merge_ops.runner import run_merge
from merge_ops.spec import spec_from_dict
from tests.merge_ops.test_learned_stream import _calib, llama  # noqa: F401


def _spec(method: str, base: Path, experts: dict[str, Path], cal: dict[str, Path], **extra) -> dict:
    params = {"steps": 3, "batch_size": 4, **extra}
    if method == "expert_merging":
        params.update(chunked=True, lr=0.3)
    return {"method": method, "base": str(base),
            "experts": [{"model": str(p), "name": n} for n, p in experts.items()],
            "parameters": params, "calibration": {"tasks": {n: str(p) for n, p in cal.items()}}, "seed": 3}


def _table(out: Path) -> torch.Tensor:
    return torch.tensor(json.loads((out / "coefficients.json").read_text())["values"], dtype=torch.float64)


@pytest.mark.parametrize("method,extra", [("adamerging", {"plus": True}), ("expert_merging", {})])
def test_streamed_job_learns_the_in_memory_coefficients(request, tmp_path, monkeypatch, method, extra):
    base, experts, _ = request.getfixturevalue("llama")
    cal = _calib(tmp_path, list(experts))
    spec = spec_from_dict(_spec(method, base, experts, cal, **extra))
    got = {}
    for mode in ("in_memory", "streamed"):
        monkeypatch.setenv("ALLOY_LEARNED_MODE", mode)
        m = run_merge(spec, tmp_path / mode).result.metrics
        assert m["learned_mode"] == mode
        got[mode] = _table(tmp_path / mode)
    # streamed: no τ held, except AdaMerging++ whose TIES trim needs them all (materialised)
    assert (m["task_vectors_mib"] > 0) == bool(extra.get("plus"))
    a, b = got["in_memory"], got["streamed"]
    assert a.shape == b.shape and not torch.allclose(a, a.flatten()[0].expand_as(a))
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()


def test_worker_launch_path_two_gloo_ranks_learn_the_coefficients_of_one(request, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLOY_LEARNED_MODE", "streamed")
    base, experts, _ = request.getfixturevalue("llama")
    cal = _calib(tmp_path, list(experts))
    spec = spec_from_dict(_spec("expert_merging", base, experts, cal))
    run_merge(spec, tmp_path / "one")
    monkeypatch.setenv("ALLOY_LEARNED_RANKS", "2")
    assert launch.world_for("cpu") == 2
    with launch.ranks(launch.world_for("cpu")):
        m = run_merge(spec, tmp_path / "two").result.metrics
    assert not torch.distributed.is_initialized()  # the group is gone with the job
    a, b = _table(tmp_path / "one"), _table(tmp_path / "two")
    assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    assert (tmp_path / "two" / "model.safetensors").exists() or any((tmp_path / "two").glob("*.safetensors"))
    assert m["learned_mode"] == "streamed"
