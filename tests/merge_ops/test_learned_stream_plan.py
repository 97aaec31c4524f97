"""The memory plan of a learned merge: torch-free prediction, in the job's metrics and alloy_merge.json,
`alloy plan SPEC`, and refusal of a job whose prediction exceeds the device budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge_ops.errors import InputError
from merge_ops.learned.plan import MemoryPlan, check_fits, plan_memory
from merge_ops.runner import run_merge
from merge_ops.spec import spec_from_dict
from tests.toy_models import make_experts, write_llama

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("plan")
    base = write_llama(root / "base", hidden=64, layers=3, intermediate=128, vocab=512, heads=4)
    experts = make_experts(base, 2, root)
    cal = root / "cal.jsonl"
    cal.write_text("".join(json.dumps({"input_ids": [(3 * j + m) % 500 + 1 for m in range(16)]}) + "\n"
                           for j in range(8)))
    spec = {"method": "adamerging", "base": str(base),
            "experts": [{"model": str(e), "name": f"t{i}"} for i, e in enumerate(experts)],
            "parameters": {"steps": 2, "batch_size": 2},
            "calibration": {"tasks": {f"t{i}": str(cal) for i in range(2)}, "max_length": 16}, "seed": 0}
    return base, spec


def test_plan_counts_task_vectors_per_expert_and_streaming_saves_the_merged_copy(family):
    base, _ = family
    one = plan_memory(base, k=1, batch=2, seq_len=16, mode="in_memory")
    mem = plan_memory(base, k=4, batch=2, seq_len=16, mode="in_memory")
    assert mem.task_vectors_mib == pytest.approx(4 * one.task_vectors_mib)
    assert one.base_mib == pytest.approx(2 * one.model_mib)  # bf16 checkpoint, float32 compute
    four = plan_memory(base, k=4, batch=2, seq_len=16)  # streamed: the files are the store
    s1 = plan_memory(base, k=1, batch=2, seq_len=16)
    assert four.task_vectors_mib == 0 and four.base_mib == 0  # untied: nothing held
    assert 0 < s1.blocks_mib < four.blocks_mib <= 0.5 * four.model_mib + 1e-9  # the cache's budget
    assert mem.merged_mib > four.merged_mib
    assert mem.peak_device_mib > four.peak_device_mib


def test_check_fits_explains_what_to_change(family):
    p = plan_memory(family[0], k=2, batch=2, seq_len=16)
    assert check_fits(p, None) is None and check_fits(p, p.peak_device_mib + 1) is None
    why = check_fits(p, 1.0)
    assert why and "MiB" in why and "batch_size" in why


def test_job_reports_its_plan_and_refuses_past_the_budget(family, tmp_path, monkeypatch):
    base, spec = family
    monkeypatch.delenv("ALLOY_MEMORY_BUDGET", raising=False)
    monkeypatch.delenv("ALLOY_LEARNED_MODE", raising=False)
    out = run_merge(spec_from_dict(spec), tmp_path / "ok")
    plan = out.result.metrics["memory_plan"]
    assert plan["k"] == 2 and plan["mode"] == out.result.metrics["learned_mode"]
    facts = json.loads((tmp_path / "ok" / "alloy_merge.json").read_text())
    assert facts["metrics"]["memory_plan"] == plan
    # generous: the prediction is within a factor of 2 of the measured peak (runtime included)
    measured = out.result.metrics["peak_rss_mib"]
    assert 0.5 * measured < plan["peak_device_mib"] < 2 * measured
    # auto: a budget between the two predictions learns streamed
    mem = plan_memory(base, k=2, batch=2, seq_len=16, mode="in_memory").peak_device_mib
    streamed = plan_memory(base, k=2, batch=2, seq_len=16, mode="streamed").peak_device_mib
    assert streamed < mem
    monkeypatch.setenv("ALLOY_MEMORY_BUDGET", str(int((mem + streamed) / 2 * 2**20)))
    monkeypatch.setenv("ALLOY_LEARNED_MODE", "auto")
    auto = run_merge(spec_from_dict(spec), tmp_path / "auto").result.metrics
    assert auto["learned_mode"] == "streamed" and auto["memory_plan"]["mode"] == "streamed"
    # streamed: the same generous band, wider below (the test process's own imports are in its RSS)
    assert 0.3 * auto["peak_rss_mib"] < auto["memory_plan"]["peak_device_mib"] < 2 * auto["peak_rss_mib"]
    monkeypatch.setenv("ALLOY_MEMORY_BUDGET", "1MB")
    with pytest.raises(InputError, match="MiB"):
        run_merge(spec_from_dict(spec), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_alloy_plan_prints_the_plan(family, tmp_path):
    _, spec = family
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = subprocess.run([sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())",
                        "plan", str(path), "--mode", "in_memory"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "memory plan (in_memory, K=2" in r.stdout and "peak_device_mib" in r.stdout


def test_plan_is_torch_free():
    code = ("import sys; import merge_ops.learned.plan; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    assert isinstance(torch.zeros(1), torch.Tensor) and MemoryPlan  # imports used
