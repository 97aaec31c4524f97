"""Small Llama-style checkpoints for the tests, the demo and the benchmarks, written without transformers.

`write_llama` writes a folder that `transformers.AutoModelForCausalLM` loads as LlamaForCausalLM
(config.json + safetensors with the exact HF tensor names), from a fixed seed. `make_experts`
writes perturbed copies of a base: expert = base + scale·N(0, 1), so task vectors are known noise.
Importing transformers costs seconds; building the tensors directly keeps tests fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from merge_ops.checkpoint import CheckpointReader, CheckpointWriter, TensorSpec, dtype_name


def llama_shapes(*, hidden: int, layers: int, intermediate: int, vocab: int, heads: int,
                 kv_heads: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """HF LlamaForCausalLM tensor names and shapes (untied head)."""
    hd = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (heads * hd, hidden)
        yield p + "self_attn.k_proj.weight", (kv_heads * hd, hidden)
        yield p + "self_attn.v_proj.weight", (kv_heads * hd, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, heads * hd)
        yield p + "mlp.gate_proj.weight", (intermediate, hidden)
        yield p + "mlp.up_proj.weight", (intermediate, hidden)
        yield p + "mlp.down_proj.weight", (hidden, intermediate)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def llama_config(*, hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                 dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": intermediate,
        "vocab_size": vocab, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "hidden_act": "silu", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.02,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype_name(dtype), "dtype": dtype_name(dtype),
    }


def write_llama(folder: str | Path, *, hidden: int = 64, layers: int = 2, intermediate: int = 128,
                vocab: int = 256, heads: int = 4, kv_heads: int | None = None, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16, shard_size: int | None = None,
                perturb_from: str | Path | None = None, scale: float = 0.002) -> Path:
    """Write a Llama checkpoint: random init N(0, 0.02) with unit norms, or, with `perturb_from`,
    that folder's tensors plus scale·N(0, 1) noise (an "expert" of it)."""
    folder = Path(folder)
    kv_heads = kv_heads or heads
    dims = dict(hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab, heads=heads,
                kv_heads=kv_heads)
    shapes = list(llama_shapes(**dims))
    gen = torch.Generator().manual_seed(seed)
    layout = [TensorSpec(n, s, dtype) for n, s in shapes]
    src = CheckpointReader(perturb_from) if perturb_from is not None else None
    try:
        with CheckpointWriter(folder, layout, shard_size or 1 << 62) as w:
            for name, shape in shapes:
                noise = torch.randn(shape, generator=gen)
                if src is not None:
                    t = src.read(name).float().add_(noise, alpha=scale)
                elif name.endswith("norm.weight"):
                    t = torch.ones(shape)
                else:
                    t = noise.mul_(0.02)
                w.write(name, t.to(dtype))
    finally:
        if src is not None:
            src.close()
    cfg = llama_config(**dims, dtype=dtype)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n")
    return folder


def read_float64(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, in float64 (for comparisons against references)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out |= {k: h.get_tensor(k).double() for k in h.keys()}  # noqa: SIM118
    return out


def read_dims(folder: str | Path) -> dict:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return dict(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"])


def make_experts(base_folder: str | Path, n: int, out_root: str | Path | None = None, *,
                 scale: float = 0.002, seed: int = 1, shard_size: int | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """n perturbed copies of a base written by `write_llama`, as `<out_root>/expert{i}`."""
    base_folder = Path(base_folder)
    root = Path(out_root) if out_root is not None else base_folder.parent
    return [write_llama(root / f"expert{i}", **read_dims(base_folder), seed=seed + i, dtype=dtype,
                        shard_size=shard_size, perturb_from=base_folder, scale=scale)
            for i in range(n)]
