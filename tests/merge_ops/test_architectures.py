"""Architectures matrix: tiny random models from real `transformers` configs (Llama, Mistral, Qwen2,
Qwen3, Gemma2, Gemma3 text, Phi-3, GPT-2 with Conv1D, BERT, Mixtral with per-layer MoE experts).

For each: the block index of every tensor matches the config's depth; a static merge (TIES, checked
against a float64 TIES written here) and a learned merge (a few steps of AdaMerging, Expert Merging
for the MoE) run through the real drivers; transformers loads each result and generates (BERT: a
forward pass). Models are a few KB, so the whole matrix runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_ops import layers
from merge_ops.context import JobContext, ResolvedModel
from merge_ops.runner import run_method
from merge_ops.spec import spec_from_dict

T = pytest.importorskip("transformers")
VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs() -> dict[str, object]:
    return {
        "llama": lambda: T.LlamaConfig(**SMALL),
        "mistral": lambda: T.MistralConfig(**SMALL, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**SMALL),
        "qwen3": lambda: T.Qwen3Config(**SMALL, head_dim=8),
        "gemma2": lambda: T.Gemma2Config(**SMALL, head_dim=8),
        "gemma3": lambda: T.Gemma3TextConfig(**SMALL, head_dim=8),
        "phi3": lambda: T.Phi3Config(**SMALL),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "bert": lambda: T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, pad_token_id=0),
        "mixtral": lambda: T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    }


ARCHS = list(_configs())
ENCODER = {"bert"}
CLASSES = {"e0": 3, "e1": 2}


def _build(arch: str, root: Path) -> tuple[Path, list[Path]]:
    """Base (random init, seed 0) and two experts = base + N(0, 0.02²) (encoders: + a classifier head)."""
    cfg = _configs()[arch]()
    torch.manual_seed(0)
    model = (T.AutoModel if arch in ENCODER else T.AutoModelForCausalLM).from_config(cfg).eval()
    base = root / "base"
    model.save_pretrained(str(base))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = []
    for i, name in enumerate(CLASSES):
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(state[k] + 0.02 * torch.randn(p.shape, generator=gen))
        folder = root / name
        model.save_pretrained(str(folder))
        if arch in ENCODER:  # a per-task head the merge keeps apart (task_specific)
            with safe_open(str(folder / "model.safetensors"), "pt") as h:
                sd = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
            sd["classifier.weight"] = torch.randn(CLASSES[name], 32, generator=gen) * 0.1
            sd["classifier.bias"] = torch.zeros(CLASSES[name])
            from safetensors.torch import save_file

            save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        experts.append(folder)
    return base, experts


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tmp_path_factory) -> tuple[str, Path, list[Path]]:
    root = tmp_path_factory.mktemp(request.param)
    return (request.param, *_build(request.param, root))


def _load64(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k).double() for k in h.keys()}  # noqa: SIM118


def _run(spec_doc: dict, base: Path, experts: list[Path], out: Path, cal: dict[str, Path] | None = None) -> Path:
    spec = spec_from_dict(spec_doc)
    ctx = JobContext(spec=spec, base=ResolvedModel(str(base), base),
                     experts=[ResolvedModel(str(p), p) for p in experts], out_dir=out, calibration=cal)
    run_method(ctx)
    return out


def _ties64(b: torch.Tensor, es: list[torch.Tensor], w: list[float], density: float) -> torch.Tensor:
    """TIES (Yadav et al.) in float64: trim each τ to its top-`density` magnitudes, elect the sign of
    Σ wᵢ·τ̂ᵢ, average the agreeing weighted entries (divided by the agreeing weights: mergekit's normalize)."""
    taus = []
    for e, wi in zip(es, w, strict=True):
        tau = (e - b).flatten()
        k = int(density * tau.numel())
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[tau.abs().argsort(descending=True)[:k]] = True
        taus.append(wi * torch.where(keep, tau, 0.0))
    t = torch.stack(taus)
    sign = torch.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(t) == sign) & (t != 0)
    ws = torch.tensor(w, dtype=torch.float64).view(-1, 1).expand_as(t)
    denom = (ws * agree).sum(0)
    merged = (t * agree).sum(0) / torch.where(denom == 0, 1.0, denom)
    return b + merged.view(b.shape)


def _check_generates(arch: str, out: Path) -> None:
    cfg = json.loads((out / "config.json").read_text())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        if arch in ENCODER:
            m = T.AutoModel.from_pretrained(str(out)).eval()
            h = m(input_ids=ids).last_hidden_state
            assert h.shape == (1, 4, cfg["hidden_size"]) and torch.isfinite(h).all()
            return
        m = T.AutoModelForCausalLM.from_pretrained(str(out)).eval()
        gen = m.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert gen.shape == (1, 7) and int(gen.max()) < VOCAB


def test_block_index_of_every_tensor_matches_the_config(family) -> None:
    arch, base, _ = family
    names = list(_load64(base))
    cfg = json.loads((base / "config.json").read_text())
    depth = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    assert layers.num_layers(names) == depth
    # every tensor inside a block gets its block's index (MoE experts too: the block, not the expert)
    for n in names:
        i = layers.layer_index(n)
        inside = any(s in n for s in (".layers.", ".h.", ".layer."))
        assert (i is not None) == inside, n
        if arch == "mixtral" and ".experts." in n:
            assert n.split(".")[2] == str(i)


def test_static_ties_merge_loads_and_generates(family, tmp_path) -> None:
    arch, base, experts = family
    doc = {"method": "ties", "base": str(base), "dtype": "float64", "out_dtype": "float32",
           "experts": [{"model": str(e), "parameters": {"weight": w, "density": 0.5}}
                       for e, w in zip(experts, (0.6, 0.4), strict=True)]}
    if arch in ENCODER:
        doc["task_specific"] = [r"^classifier\."]
    out = _run(doc, base, experts, tmp_path / "out")
    got, b, es = _load64(out), _load64(base), [_load64(e) for e in experts]
    for n in got:
        if n.startswith("classifier."):
            continue
        want = _ties64(b[n], [e[n] for e in es], [0.6, 0.4], 0.5)
        torch.testing.assert_close(got[n], want, atol=1e-6, rtol=0, msg=lambda m, n=n: f"{arch} {n}: {m}")
    _check_generates(arch, out)


def _calibration(root: Path) -> dict[str, Path]:
    out = {}
    for i, t in enumerate(CLASSES):
        p = root / f"{t}.jsonl"
        rows = [{"input_ids": [(3 * j + 7 * i + m) % (VOCAB - 3) + 3 for m in range(3 + j % 4)]} for j in range(8)]
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[t] = p
    return out


@pytest.mark.slow
def test_learned_merge_loads_and_generates(family, tmp_path) -> None:
    arch, base, experts = family
    cal = _calibration(tmp_path)
    moe = arch == "mixtral"
    doc = {"method": "expert_merging" if moe else "adamerging", "base": str(base), "seed": 0,
           "experts": [{"model": str(e), "name": n} for e, n in zip(experts, CLASSES, strict=True)],
           "parameters": {"steps": 3, "batch_size": 4, "lr": 0.05} | ({} if moe else {"granularity": "block"}),
           "calibration": {"tasks": {n: str(p) for n, p in cal.items()}}}
    if arch in ENCODER:
        doc["task_specific"] = [r"^classifier\."]
    out = _run(doc, base, experts, tmp_path / "out", cal)
    coef = json.loads((out / "coefficients.json").read_text())
    assert coef  # the learned table was written
    got, b, es = _load64(out), _load64(base), [_load64(e) for e in experts]
    # a merged block tensor moved from the base towards the experts (something was learned and written)
    n = next(k for k in got if layers.layer_index(k) == 1 and k.endswith("weight") and b[k].dim() == 2
             and (not moe or ".experts." in k))
    assert not torch.equal(got[n], b[n]), n
    # θ₀ + Σ cₖ τₖ with coefficients in (0, 1]: never further from the base than Σ |τₖ|
    assert bool(((got[n] - b[n]).abs() <= (es[0][n] - b[n]).abs() + (es[1][n] - b[n]).abs() + 1e-5).all())
    _check_generates(arch, out)


def test_fused_moe_tensors_are_built_as_transformers_loads_them(tmp_path) -> None:
    """The learned adapter builds Mixtral's fused expert tensors from the checkpoint's per-expert ones
    exactly as transformers' loader does (layouts.py)."""
    from merge_ops.learned.layouts import CheckpointLayout

    base, _ = _build("mixtral", tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    layout = CheckpointLayout.of(model)
    ckpt = _load64(base)
    built = layout.to_module(ckpt)
    fused = [n for n in model.state_dict() if n not in ckpt]
    assert fused and set(fused) <= set(built)
    for n in fused:
        torch.testing.assert_close(built[n], model.state_dict()[n].double(), atol=0, rtol=0)
    assert layout.checkpoint_names(set(model.state_dict())) == set(ckpt)
