"""Where a tensor sits in the network, read from its name.

mergekit-style per-layer gradients and LiNeS both need a depth for each tensor. HF checkpoints name
block tensors `<prefix>.<i>.<rest>` (`model.layers.3.mlp.up_proj.weight`,
`encoder.layer.3.attention.self.query.weight`, `transformer.h.3...`), so the first all-digit path
segment is the block index. Tensors outside blocks (embeddings, final norm, heads) have no index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# config keys of the block count, by model family (Llama/BERT/..., GPT-2, T5-style)
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Block index of a tensor name, or None for tensors outside the repeated blocks."""
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


def with_index(name: str, i: int) -> str:
    """`name` with its block index replaced by i (`model.layers.3.mlp.up_proj.weight`, 7 ->
    `model.layers.7.mlp.up_proj.weight`); other numbers in the name (expert ids) are kept."""
    m = _INDEX.search(name)
    if m is None:
        raise ValueError(f"tensor {name!r} is not in a block")
    return name[:m.start(1)] + str(i) + name[m.end(1):]


# tensors before the blocks (mergekit's `pre_weights`): token and position embeddings
_BEFORE = re.compile(r"(?:^|\.)(?:embed(?!_out)[a-z_]*|wte|wpe|embeddings|word_embeddings|tok_embeddings)(?:\.|$)")


def before_blocks(name: str) -> bool:
    """A tensor outside the blocks that precedes them (embeddings), not one after them (final norm,
    head). Layer slices take the first from the first slice's sources, the second from the last's."""
    return layer_index(name) is None and bool(_BEFORE.search(name))


def num_layers(names: Iterable[str]) -> int:
    """Number of blocks: one more than the largest index seen (0 when there are none)."""
    return max((i for n in names if (i := layer_index(n)) is not None), default=-1) + 1


def depth_fraction(name: str, n_layers: int) -> float:
    """Position t in [0, 1] used to interpolate gradient parameters, as mergekit does.

    Block i of L gets i/(L-1) (1 for a one-block model). Tensors outside blocks get 0, before the
    blocks (embeddings) *and* after them (final norm, lm_head, classifier): mergekit's planner
    (`MergePlanner.plan_module`, 0.1.5) reads both with a config reader built at t = 0. Checked against
    mergekit itself in `benchmarks/static_vs_mergekit.py --gradient`.
    """
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0
