"""The memory plan of a learned merge: torch-free prediction, in the job's metrics and alloy_merge.json,
`alloy plan SPEC`, and refusal of a job whose prediction exceeds the device budget."""

from __future__ import annotations

import json
import math
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
    # the cache's slots stay within its budget (one slot of θ₀ + 1 expert at K = 1; at K = 4 a block
    # exceeds the budget: slots of θ₀ only, as many as it holds)
    assert 0 < s1.blocks_mib <= four.blocks_mib <= 0.5 * four.model_mib + 1e-9
    assert mem.merged_mib > four.merged_mib
    assert mem.peak_device_mib > four.peak_device_mib


def _header_only(folder: Path, tensors: dict[str, tuple[int, ...]], cfg: dict) -> Path:
    """A checkpoint folder the plan can read: config.json and a safetensors header (F32, no data)."""
    import struct

    folder.mkdir(parents=True)
    header, at = {}, 0
    for n, shape in tensors.items():
        size = 4 * math.prod(shape)
        header[n] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_streamed_plan_counts_the_cache_slots_and_a_tied_embedding(tmp_path):
    h, inter, vocab, layers = 64, 128, 8000, 6
    block = {f"model.layers.{i}.{n}": s for i in range(layers) for n, s in
             [("self_attn.q_proj.weight", (h, h)), ("self_attn.k_proj.weight", (h, h)),
              ("self_attn.v_proj.weight", (h, h)), ("self_attn.o_proj.weight", (h, h)),
              ("mlp.gate_proj.weight", (inter, h)), ("mlp.up_proj.weight", (inter, h)),
              ("mlp.down_proj.weight", (h, inter)), ("input_layernorm.weight", (h,))]}
    cfg = {"hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
           "vocab_size": vocab, "tie_word_embeddings": True}
    base = _header_only(tmp_path / "tied", {"model.embed_tokens.weight": (vocab, h), **block,
                                              "model.norm.weight": (h,)}, cfg)
    per_block = 4 * h * h + 3 * inter * h + h  # elements
    emb = vocab * h
    mib = 2**20
    # the cache's budget is 0.4 of the model's bytes: it holds 3 slots of θ₀ + K experts at K = 1, 2 at
    # K = 2, one at K = 4; at K = 64 a block alone exceeds it: 3 slots of θ₀ only (experts read piece by piece)
    for k, slots, tensors in [(1, 3, 2), (2, 2, 3), (4, 1, 5), (64, 3, 1)]:
        p = plan_memory(base, k=k, batch=1, seq_len=8)
        assert p.blocks_mib == pytest.approx(slots * tensors * 4 * per_block / mib, abs=0.01)
        # no θ₀ held; the tied embedding's θ(c) and the gradient its tasks add into, and one block's θ(c),
        # gradients and scratch
        assert p.base_mib == 0
        assert p.merged_mib == pytest.approx(4 * (2 * per_block + 2 * emb) / mib, abs=0.01)
        cuda = plan_memory(base, k=k, batch=1, seq_len=8, device="cuda")  # + the merge's full-size scratch
        assert cuda.merged_mib == pytest.approx(4 * (3 * per_block + 2 * emb) / mib, abs=0.01)
    # in memory: no term for the input files' pages (they are read with preadv, never mapped)
    m = plan_memory(base, k=2, batch=1, seq_len=8, mode="in_memory")
    terms = m.base_mib + m.task_vectors_mib + m.merged_mib + m.activations_mib
    assert m.peak_device_mib == pytest.approx(terms + 420.0, abs=0.1)


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
