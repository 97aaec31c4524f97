"""Checkpoint I/O: round trips against the safetensors library, streaming writes, every refusal."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_ops.checkpoint import (
    INDEX_NAME,
    CheckpointReader,
    CheckpointWriter,
    TensorSpec,
    check_compatible,
    copy_aux_files,
)
from merge_ops.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(17, generator=g),
        "c.ids": torch.arange(5, dtype=torch.int64),
        "d.half": torch.randn(8, 8, generator=g).half(),
        "e.empty": torch.empty(0, 4),
    }


def _raw(path: Path, header: str | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors-like file with a hand-written header (for the refusals)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def test_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    ts = _tensors()
    save_file(ts, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with CheckpointReader(tmp_path) as r:
        assert set(r.names()) == set(ts)
        for n, t in ts.items():
            assert r.shape(n) == tuple(t.shape) and r.dtype(n) == t.dtype
            assert torch.equal(r.read(n), t)
        buf = torch.empty(10_000, dtype=torch.uint8)
        assert torch.equal(r.read("a.weight", buf), ts["a.weight"])
        with pytest.raises(CheckpointError, match="no tensor 'nope'"):
            r.read("nope")


def test_sharded_round_trip_loads_in_safetensors(tmp_path: Path) -> None:
    ts = _tensors()
    layout = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    with CheckpointWriter(tmp_path / "out", layout, shard_size=2000) as w:
        for n in reversed(list(ts)):  # any order: each tensor has a fixed place
            w.write(n, ts[n])
    out = tmp_path / "out"
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted({*index["weight_map"].values()})
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # 4 KB, rest
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    for n, t in ts.items():
        with safe_open(str(out / index["weight_map"][n]), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(n), t)
    with CheckpointReader(out) as r:
        assert r.names() == list(ts)  # storage order = layout order
        assert all(torch.equal(r.read(n), t) for n, t in ts.items())


def test_single_shard_is_model_safetensors(tmp_path: Path) -> None:
    ts = _tensors()
    with CheckpointWriter(tmp_path, [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in ts.items()],
                          shard_size=10**9) as w:
        for n, t in ts.items():
            w.write(n, t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_writer_streams_shards_as_they_fill(tmp_path: Path) -> None:
    layout = [TensorSpec(f"t{i}", (250,), torch.float32) for i in range(4)]  # 1000 B each
    w = CheckpointWriter(tmp_path, layout, shard_size=2000)
    w.write("t0", torch.zeros(250))
    w.write("t1", torch.ones(250))
    first = tmp_path / ".model-00001-of-00002.safetensors.partial"
    assert first.is_file() and first.stat().st_size > 2000  # complete on disk before finish()
    assert not (tmp_path / "model-00001-of-00002.safetensors").exists()  # not visible until finish
    with pytest.raises(ValueError, match="never written"):
        w.finish()
    w.write("t2", torch.full((250,), 2.0))
    w.write("t3", torch.full((250,), 3.0))
    w.finish()
    assert not list(tmp_path.glob(".*partial"))
    with CheckpointReader(tmp_path) as r:
        assert torch.equal(r.read("t3"), torch.full((250,), 3.0))


def test_writer_checks_and_aborts(tmp_path: Path) -> None:
    layout = [TensorSpec("x", (4,), torch.bfloat16), TensorSpec("y", (4,), torch.bfloat16)]
    with pytest.raises(ValueError, match="layout says"):
        with CheckpointWriter(tmp_path, layout, shard_size=8) as w:
            w.write("x", torch.zeros(4, dtype=torch.bfloat16))
            w.write("y", torch.zeros(4))  # wrong dtype
    assert list(tmp_path.iterdir()) == []  # the aborted shards are gone


def test_refuses_pickle_only_folder(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": [1.0]}))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*arbitrary code.*safetensors"):
        CheckpointReader(tmp_path)


def test_refuses_pickle_renamed_safetensors(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: this is a pickle"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # torch.save zip format
    with pytest.raises(CheckpointError, match="pickle"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("header,data,length,problem", [
    ("{}", b"", 10**6, "runs past the end"),
    ("{}", b"", 200_000_000, "limit"),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
     '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"\0" * 12, None, "'a' and 'b' overlap"),
    ('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8, None, "outside the data"),
    ('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8, None, "need 12"),
    ('{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8, None, "unknown dtype 'Q4'"),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
     '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8, None, "'a' appears twice"),
    ("not json", b"", None, "not valid JSON"),
])
def test_refuses_bad_headers(tmp_path: Path, header: str, data: bytes, length: int | None,
                             problem: str) -> None:
    _raw(tmp_path / "model.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=problem) as e:
        CheckpointReader(tmp_path)
    assert str(tmp_path / "model.safetensors") in e.value.message


def test_refuses_broken_index(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is missing"):
        CheckpointReader(tmp_path)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="'b' is not in shard"):
        CheckpointReader(tmp_path)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../elsewhere/x.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a .safetensors file in the folder"):
        CheckpointReader(tmp_path)


def test_refuses_empty_folder_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        CheckpointReader(tmp_path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{oops")
    with CheckpointReader(tmp_path) as r, pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        r.config()


def test_check_compatible_names_first_mismatch(tiny_llama) -> None:
    base, (e0, e1) = tiny_llama(2)
    other, _ = tiny_llama(0, root="other", intermediate=96)
    with CheckpointReader(base) as b, CheckpointReader(e0) as a, CheckpointReader(other) as o:
        assert check_compatible({"base": b, "expert a": a}) == b.names()
        with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                                                  r"\[96, 64\] in expert o but \[128, 64\] in base"):
            check_compatible({"base": b, "expert o": o})
        # a name the expert lacks: drop lm_head from a copy
        names = [n for n in b.names() if n != "lm_head.weight"]
        save_file({n: b.read(n) for n in names}, str(e1 / "model.safetensors"))
        for f in e1.glob("model-*.safetensors"):
            f.unlink()
        (e1 / INDEX_NAME).unlink(missing_ok=True)
        with CheckpointReader(e1) as c:
            with pytest.raises(CheckpointError, match="'lm_head.weight' is in base but missing from expert c"):
                check_compatible({"base": b, "expert c": c})
            assert "lm_head.weight" not in check_compatible({"base": b, "expert c": c}, ignore=["^lm_head"])


def test_copy_aux_files_records_output_dtype(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    for fn in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "merges.txt"):
        (src / fn).write_text(fn)
    (src / "pytorch_model.bin").write_bytes(b"x")
    copied = copy_aux_files(src, tmp_path / "dst", torch.bfloat16)
    assert sorted(copied) == ["config.json", "generation_config.json", "merges.txt", "tokenizer.json",
                              "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16" and cfg["model_type"] == "llama"
    assert not (tmp_path / "dst" / "pytorch_model.bin").exists()


def test_toy_llama_loads_in_transformers(tiny_llama) -> None:
    transformers = pytest.importorskip("transformers")
    base, (expert,) = tiny_llama(1, shard_size=20_000)
    assert (expert / INDEX_NAME).is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(expert)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    sd = model.state_dict()
    with CheckpointReader(expert) as r:
        assert set(r.names()) == set(sd)
        assert all(torch.equal(sd[n], r.read(n)) for n in r.names())
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256) and torch.isfinite(logits).all()
