"""Buffers transformers does not persist (BERT's position_ids under v5, rotary inv_freq, GPT-2's attn.bias)
may be in one checkpoint and not another: the reference's (base's) set is used; any other missing
tensor is still refused with its name, on the static and the learned paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_ops.checkpoint import INDEX_NAME, NON_PERSISTENT_BUFFER, CheckpointReader
from merge_ops.context import JobContext, ResolvedModel
from merge_ops.errors import CheckpointError
from merge_ops.learned.engine import load_merge_inputs
from merge_ops.learned.store import open_merge_inputs
from merge_ops.spec import MergeSpec
from merge_ops.static import driver

POS = "embeddings.position_ids"
MAX_POS = 24


def _bert(folder: Path, seed: int, base: Path | None = None) -> Path:
    """A tiny BERT saved by transformers itself (v5: no position_ids); an expert is base + noise."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=MAX_POS)
    torch.manual_seed(seed)
    model = BertModel(cfg, add_pooling_layer=False)
    if base is not None:
        g, sd = torch.Generator().manual_seed(seed), load_file(str(base / "model.safetensors"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(sd[n] + 0.01 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def _rewrite(folder: Path, add: dict[str, torch.Tensor] = {}, drop: tuple[str, ...] = ()) -> None:  # noqa: B006
    """The checkpoint as one file with tensors added (as an older transformers saved them) or removed."""
    with CheckpointReader(folder) as r:
        sd = {n: r.read(n) for n in r.names() if n not in drop}
    for f in folder.glob("model*.safetensors"):
        f.unlink()
    (folder / INDEX_NAME).unlink(missing_ok=True)
    save_file({**sd, **add}, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _load64(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118


def _merge(base: Path, experts: list[Path], out: Path) -> None:
    spec = MergeSpec(method="task_arithmetic", base=str(base), dtype="float64",
                     experts=[{"model": str(e), "parameters": {"weight": w}}
                              for e, w in zip(experts, (0.6, 0.9), strict=False)],
                     parameters={"lambda": 0.7})
    driver.run(JobContext(spec=spec, base=ResolvedModel(str(base), base),
                          experts=[ResolvedModel(str(e), e) for e in experts], out_dir=out))


@pytest.fixture
def berts(tmp_path: Path) -> tuple[Path, list[Path]]:
    base = _bert(tmp_path / "base", 0)
    experts = [_bert(tmp_path / f"e{i}", i + 1, base) for i in range(2)]
    with CheckpointReader(base) as r:
        assert POS not in r  # the premise: transformers 5 does not save it
    return base, experts


def _check_merged(out: Path, base: Path, experts: list[Path]) -> dict[str, torch.Tensor]:
    """Every weight equals base + λ·Σ wᵢ(eᵢ − base), computed in float64 from the files."""
    got, b = _load64(out), {k: v.double() for k, v in _load64(base).items()}
    es = [{k: v.double() for k, v in _load64(e).items()} for e in experts]
    weights = [n for n in b if not NON_PERSISTENT_BUFFER.search(n)]
    assert weights and all(n in got for n in weights)
    for n in weights:
        want = b[n] + 0.7 * sum(w * (e[n] - b[n]) for w, e in zip((0.6, 0.9), es, strict=False))
        assert got[n].dtype == torch.float32
        assert torch.allclose(got[n].double(), want, rtol=2**-23, atol=1e-9), n
    return got


def test_buffer_in_base_only_is_the_bases(berts, tmp_path: Path) -> None:
    base, experts = berts
    pos = torch.arange(MAX_POS).unsqueeze(0)
    _rewrite(base, add={POS: pos})  # an old base (transformers < 4.31 persisted position_ids)
    _merge(base, experts, tmp_path / "out")
    got = _check_merged(tmp_path / "out", base, experts)
    assert got[POS].dtype == torch.int64 and torch.equal(got[POS], pos)


def test_buffer_in_an_expert_only_is_dropped(berts, tmp_path: Path) -> None:
    base, experts = berts
    _rewrite(experts[1], add={POS: torch.arange(MAX_POS).unsqueeze(0)})
    _merge(base, experts, tmp_path / "out")
    got = _check_merged(tmp_path / "out", base, experts)
    assert POS not in got  # the base's tensor set: a model built from its config recreates the buffer


def test_missing_weight_is_still_refused_by_name(berts, tmp_path: Path) -> None:
    base, experts = berts
    _rewrite(base, add={POS: torch.arange(MAX_POS).unsqueeze(0)})
    gone = "encoder.layer.1.output.dense.weight"
    _rewrite(experts[0], drop=(gone,))
    with pytest.raises(CheckpointError, match=rf"'{gone}' is in base but missing from expert e0"):
        _merge(base, experts, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match=rf"expert 'e0' .* has no tensor '{gone}'"):
        load_merge_inputs(base, experts, ["e0", "e1"])


def test_learned_paths_take_a_float_buffer_from_the_base(tiny_llama) -> None:
    """Old Llama checkpoints hold rotary inv_freq (float): experts saved without it still load."""
    base, experts = tiny_llama(2)
    inv = "model.layers.0.self_attn.rotary_emb.inv_freq"
    freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    _rewrite(base, add={inv: freq})
    for load in (load_merge_inputs, lambda b, e, n: open_merge_inputs(b, e, n, resident=lambda _: True)):
        inputs = load(base, experts, ["a", "b"])
        try:
            assert torch.equal(inputs.base[inv], freq) and inv in inputs.constant  # τ = 0: not learned
            assert "model.layers.0.mlp.up_proj.weight" in inputs.task_vectors
        finally:
            if inputs.files is not None:
                inputs.files.close()
    gone = "model.layers.1.mlp.up_proj.weight"
    _rewrite(experts[1], drop=(gone,))
    with pytest.raises(CheckpointError, match=rf"expert 'b' .* has no tensor '{gone}'"):
        open_merge_inputs(base, experts, ["a", "b"], resident=lambda _: True)
