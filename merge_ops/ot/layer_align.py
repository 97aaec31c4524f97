"""Cross-layer alignment (CLAFusion, Nguyen et al. 2023): match the hidden layers of a shallower MLP to
those of a deeper one, then give the shallower one the deeper one's depth, so OT fusion can fuse them.

    layer_cost     C[l, k] between deep hidden layer l and shallow hidden layer k: 1 − linear CKA of
                   their activations on the same inputs (`activation`), or the squared width
                   difference (`neuron`, the reference's default representation)
    align_layers   the strictly increasing map A: shallow k → deep A(k) minimising Σ_k C[A(k), k], by
                   dynamic programming; the first and last hidden layers are matched to each other
                   (the reference's defaults start-layer-idx 2 and free-end-layers 1)
    insert_identity  the reference's `add` balancing: an identity layer at every deep position no
                   shallow layer maps to. Exact: it follows a ReLU, so relu(I·x + 0) = x.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from merge_ops.errors import SpecError


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two activation matrices [n, d1], [n, d2] (Kornblith et al. 2019), in float64."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    xy = (y.T @ x).square().sum()
    den = (x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()
    return float(xy / den) if float(den) > 0 else 0.0


def layer_cost(deep: Sequence[torch.Tensor] | Sequence[int], shallow: Sequence[torch.Tensor] | Sequence[int],
               measure: str = "activation") -> torch.Tensor:
    """C [m, n] (float64). `activation`: hidden activations per layer; `neuron`: widths."""
    m, n = len(deep), len(shallow)
    c = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            if measure == "activation":
                c[i, j] = 1.0 - linear_cka(deep[i], shallow[j])  # type: ignore[arg-type]
            elif measure == "neuron":
                c[i, j] = float(deep[i] - shallow[j]) ** 2  # type: ignore[operator]
            else:
                raise SpecError(f"layer measure {measure!r} is not activation or neuron", param="layer_measure")
    return c


def align_layers(cost: torch.Tensor) -> list[int]:
    """A strictly increasing map of shallow layers 0..n−1 into deep layers 0..m−1 (n ≤ m) with A(0) = 0
    and A(n−1) = m−1, minimising Σ_k cost[A(k), k]. Ties go to the earlier deep layer."""
    m, n = cost.shape
    if n > m:
        raise ValueError(f"the shallow model has more hidden layers ({n}) than the deep one ({m})")
    if n == 1 or m == n:  # one layer: it is the first (the one end that must match), or equal depth
        return list(range(n))
    inf = float("inf")
    # f[k][j]: best cost of shallow 0..k with A(k) ≤ j; A(0) = 0 fixed
    f = [[inf] * m for _ in range(n)]
    take = [[False] * m for _ in range(n)]
    f[0] = [float(cost[0, 0])] * m
    take[0][0] = True
    for k in range(1, n):
        for j in range(k, m):
            if k == n - 1 and j != m - 1:
                continue  # the last shallow layer goes to the last deep one
            here = f[k - 1][j - 1] + float(cost[j, k])
            before = f[k][j - 1]
            if here < before:
                f[k][j], take[k][j] = here, True
            else:
                f[k][j] = before
    out, j = [0] * n, m - 1
    for k in range(n - 1, 0, -1):
        while not take[k][j]:
            j -= 1
        out[k], j = j, j - 1
    return out


def insert_identity(sd: Mapping[str, torch.Tensor], config: Mapping, mapping: Sequence[int], depth: int
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """An alloy_arch MLP with `depth` hidden layers computing the same function as (sd, config): its
    hidden layer k sits at position mapping[k], identity layers fill the other positions."""
    hidden = list(config["hidden"])
    # identity layers must follow a ReLU to be exact: the first hidden layer stays first
    if len(mapping) != len(hidden) or sorted(set(mapping)) != list(mapping) or mapping[0] != 0 or \
            mapping[-1] >= depth:
        raise ValueError(f"mapping {list(mapping)} is not an increasing map of {len(hidden)} layers into "
                         f"0..{depth - 1} starting at 0")
    bias = bool(config.get("bias", True))
    out: dict[str, torch.Tensor] = {}
    widths, k = [], 0
    for pos in range(depth):
        if k < len(mapping) and mapping[k] == pos:
            w = sd[f"layers.{k}.weight"]
            out[f"layers.{pos}.weight"] = w.clone()
            if bias:
                out[f"layers.{pos}.bias"] = sd[f"layers.{k}.bias"].clone()
            widths.append(hidden[k])
            k += 1
        else:
            d = widths[-1]
            ref = sd[f"layers.{k - 1}.weight"]
            out[f"layers.{pos}.weight"] = torch.eye(d, dtype=ref.dtype)
            if bias:
                out[f"layers.{pos}.bias"] = torch.zeros(d, dtype=ref.dtype)
            widths.append(d)
    n = len(hidden)
    out[f"layers.{depth}.weight"] = sd[f"layers.{n}.weight"].clone()
    if bias:
        out[f"layers.{depth}.bias"] = sd[f"layers.{n}.bias"].clone()
    return out, {**dict(config), "hidden": widths}


def hidden_activations(config: Mapping, sd: Mapping[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Post-ReLU activations of every hidden layer of an alloy_arch MLP on inputs x."""
    from merge_ops.ot.arch import build_module

    m = build_module(config, {k: v.float() for k, v in sd.items()})
    acts: list[torch.Tensor] = []
    h = x.float().flatten(1)
    with torch.no_grad():
        for i, layer in enumerate(m.layers):  # type: ignore[union-attr]
            if i == len(m.layers) - 1:  # type: ignore[arg-type]
                break
            h = torch.relu(layer(h))
            acts.append(h)
    return acts
