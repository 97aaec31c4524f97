"""Alignment primitives: re-order (or softly recombine) one tensor axis with a transport map.

Convention: T has shape [n_model, n_anchor] and is already corrected (ground_metric.correct: n·T,
column-normalised for axes indexed by the space, row-normalised for axes that read it), so anchor
unit j receives Σ_i T[i, j] · (model unit i). One operation covers every case in the paper:
    linear, output side   Tᵀ W        (rows = units)           bias: Tᵀ b
    linear, input side    W T_in      (columns = units)
    conv                  the same on dim 0 / dim 1, once per kernel position (the kernel dims ride along)
    norms, BatchNorm      γ, β, running mean/var: Tᵀ v on their only axis
    embedding tables      the hidden axis (dim 1), like a linear's input side
    conv→FC flatten       the FC's input axis with Layout(repeat=H·W): the same T for every position
    attention heads       whole-head units (Layout(repeat=...)) and GQA groups (Layout(group=...))
For a hard permutation this is exactly index permutation; for soft maps each anchor neuron becomes
the barycentre of the model neurons sent to it, which is what lets widths differ.
"""

from __future__ import annotations

import torch

from merge_ops.ot.graph import Layout


def units(x: torch.Tensor, axis: int, layout: Layout) -> torch.Tensor:
    """x regrouped as [n_units, rows_per_unit, *other dims in their order]."""
    xm = x.movedim(axis, 0)
    idx = layout.rows(xm.shape[0])
    return xm[idx]


def apply_map(x: torch.Tensor, axis: int, layout: Layout, t: torch.Tensor, out_len: int | None = None) -> torch.Tensor:
    """x with its `axis` carried from the model's units to the anchor's through corrected map t."""
    u = units(x, axis, layout)  # [n_model, r, ...]
    n_model, r = u.shape[0], u.shape[1]
    if t.shape[0] != n_model:
        raise ValueError(f"map has {t.shape[0]} rows but the axis has {n_model} units")
    moved = torch.tensordot(t.to(u.dtype).T, u, dims=([1], [0]))  # [n_anchor, r, ...]
    n_anchor = t.shape[1]
    length = out_len if out_len is not None else n_anchor * r
    out = moved.new_zeros((length, *u.shape[2:]))
    out[layout.rows(length)] = moved
    return out.movedim(0, axis)
